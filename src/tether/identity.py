"""Who acts: principals (people and services) and the roles they hold.

Every decision, answer and operator action records the `Principal` that made it, never a
free-text name. A principal is established by the server from an API token, or, for a
command that opens the journal directly, is the local administrator (`Principal.local()`):
whoever can write the database can do anything, and is recorded as such.
"""

from __future__ import annotations

import getpass
import socket
from typing import Literal

import msgspec

Role = Literal["viewer", "operator", "approver", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "approver", "admin")
PrincipalKind = Literal["person", "service", "local"]


class Principal(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An authenticated actor, as recorded in the journal.

    `principal_id` is stable and unique (a token's principal, or `local:USER@HOST`);
    `name` is for display only and never decides anything. `approver_for` lists the
    approver roles a policy names (`approver: supervisor`) that this principal may decide;
    empty means none, except for admins. `workflows` limits the workflows it may act on;
    empty means all.
    """

    principal_id: str
    name: str
    kind: PrincipalKind
    role: Role
    approver_for: tuple[str, ...] = ()
    workflows: tuple[str, ...] = ()

    @classmethod
    def local(cls) -> Principal:
        """The operating-system user of a command that opened the journal directly."""
        user = getpass.getuser()
        return cls(principal_id=f"local:{user}@{socket.gethostname()}", name=user, kind="local", role="admin")

    def describe(self) -> str:
        return f"{self.name} ({self.principal_id}, {self.role})"
