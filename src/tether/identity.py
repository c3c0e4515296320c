"""Who acts: principals (people and services), their API tokens, and what each role may do.

Every decision, answer and operator action records the `Principal` that made it, never a
free-text name. A principal is established by the server from an API token
(`authenticate`), or, for a command that opens the journal directly, is the local
administrator (`Principal.local()`): whoever can write the database can do anything, and is
recorded as such (docs/security.md).

Tokens are `tth_` + 43 random URL-safe characters (256 bits), shown once when created and
stored only as their SHA-256: a random secret of that size cannot be guessed from its hash,
so no slow password hash is needed (docs/decisions.md). Expiry is decided by the store's
clock, never the caller's.

Roles (`authorize`):

    viewer    view
    operator  view, start, cancel, retry, take_over
    approver  view; decide and answer the tickets whose approver role (`approver: supervisor`
              in a policy rule) is in its `approver_for`
    admin     everything

A principal with `workflows` set acts only on runs (and tickets) of those workflows.
"""

from __future__ import annotations

import getpass
import hashlib
import re
import secrets
import socket
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Literal, cast, get_args

import msgspec

from tether.errors import AuthError, Forbidden, TetherError

if TYPE_CHECKING:
    from tether.journal import Journal, RunRecord, Ticket

Role = Literal["viewer", "operator", "approver", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "approver", "admin")
PrincipalKind = Literal["person", "service", "local"]
TOKEN_KINDS: tuple[str, ...] = ("person", "service")
Action = Literal["view", "start", "cancel", "retry", "take_over", "decide", "answer", "admin"]
ACTIONS: tuple[Action, ...] = get_args(Action)
TOKEN_PREFIX = "tth_"
# A name is how a principal is shown and what its id is made from: printable, no spaces.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
_OPERATOR_ACTIONS = frozenset({"view", "start", "cancel", "retry", "take_over"})


class Principal(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """An authenticated actor, as recorded in the journal.

    `principal_id` is stable and unique (`person:NAME`, `service:NAME`, or
    `local:USER@HOST`); `name` is for display only and never decides anything.
    `approver_for` lists the approver roles a policy names (`approver: supervisor`) that
    this principal may decide; empty means none, except for admins. `workflows` limits the
    workflows it may act on; empty means all. `token_id` is the token it authenticated
    with (none for a local principal).
    """

    principal_id: str
    name: str
    kind: PrincipalKind
    role: Role
    approver_for: tuple[str, ...] = ()
    workflows: tuple[str, ...] = ()
    token_id: str | None = None

    def __post_init__(self) -> None:
        # msgspec checks the Literal types when decoding, not when code builds one: a
        # principal with a role outside the vocabulary would be recorded and then unreadable.
        if self.role not in ROLES:
            raise ValueError(
                f"principal {self.principal_id!r}: role must be one of {ROLES}, not {self.role!r}"
            )
        if self.kind not in get_args(PrincipalKind):
            raise ValueError(
                f"principal {self.principal_id!r}: kind must be one of {get_args(PrincipalKind)}, "
                f"not {self.kind!r}"
            )

    @classmethod
    def local(cls) -> Principal:
        """The operating-system user of a command that opened the journal directly."""
        user = getpass.getuser()
        return cls(principal_id=f"local:{user}@{socket.gethostname()}", name=user, kind="local", role="admin")

    @classmethod
    def legacy(cls, name: str) -> Principal:
        """Who a decision recorded before principals existed (a free-text `by`) was made by:
        someone who could write the journal, so a local admin; the name is as recorded."""
        return cls(principal_id=f"local:{name}", name=name, kind="local", role="admin")

    def describe(self) -> str:
        return f"{self.name} ({self.principal_id}, {self.role})"


class TokenInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A token as stored (never its plaintext): whose it is, its role and scope, its times
    (the store's clock; `expires_at` None: never), and who revoked it, when."""

    token_id: str
    principal_id: str
    name: str
    kind: PrincipalKind
    role: Role
    approver_for: tuple[str, ...] = ()
    workflows: tuple[str, ...] = ()
    created_at: float
    expires_at: float | None = None
    revoked_at: float | None = None
    revoked_by: str | None = None

    def principal(self) -> Principal:
        return Principal(
            principal_id=self.principal_id,
            name=self.name,
            kind=self.kind,
            role=self.role,
            approver_for=self.approver_for,
            workflows=self.workflows,
            token_id=self.token_id,
        )

    def as_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = msgspec.to_builtins(self)
        return values


def hash_token(token: str) -> str:
    """What is stored of a token: its SHA-256, hex."""
    return hashlib.sha256(token.encode()).hexdigest()


def _names(values: Iterable[str], what: str) -> tuple[str, ...]:
    out: list[str] = []
    for v in values:
        if not isinstance(v, str) or not _NAME.fullmatch(v):
            raise TetherError(f"{what} {v!r} is not a valid name (letters, digits, . _ @ + -; at most 64)")
        if v not in out:
            out.append(v)
    return tuple(out)


async def create_token(
    store: Journal,
    *,
    name: str,
    role: str,
    approver_for: Iterable[str] = (),
    workflows: Iterable[str] = (),
    expires_in: float | None,
    kind: str = "person",
) -> tuple[str, TokenInfo]:
    """Create a principal's token; return the plaintext (shown once, never stored) and its
    record. The principal is `KIND:NAME`: a second token for the same name is the same
    principal (a rotation), with the role and scope of that token."""
    if not _NAME.fullmatch(name or ""):
        raise TetherError(f"name {name!r} is not valid (letters, digits, . _ @ + -; at most 64 characters)")
    if role not in ROLES:
        raise TetherError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if kind not in TOKEN_KINDS:
        raise TetherError(f"kind {kind!r} is not one of {', '.join(TOKEN_KINDS)}")
    scopes = _names(approver_for, "approver role")
    if scopes and role != "approver":
        raise TetherError(f"--approver-for applies to role approver, not {role}")
    if role == "approver" and not scopes:
        raise TetherError("an approver token must name the approver roles it decides (--approver-for ROLE)")
    if expires_in is not None and not expires_in > 0:
        raise TetherError(f"a token's lifetime must be positive, not {expires_in}")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    info = TokenInfo(
        token_id="tok_" + secrets.token_hex(6),
        principal_id=f"{kind}:{name}",
        name=name,
        kind=cast(PrincipalKind, kind),  # both checked above
        role=role,
        approver_for=scopes,
        workflows=_names(workflows, "workflow"),
        created_at=0.0,  # the store's clock sets it
    )
    stored = await store.insert_token(info, hash_token(token), expires_in)
    return token, stored


async def list_tokens(store: Journal) -> list[TokenInfo]:
    """Every token, revoked and expired ones included, oldest first."""
    return await store.list_tokens()


async def revoke_token(store: Journal, token_id: str, by: Principal) -> TokenInfo:
    """Revoke a token at once (admins only); a revoked token never authenticates again."""
    authorize(by, "admin")
    return await store.revoke_token(token_id, by.principal_id)


async def authenticate(store: Journal, token: str) -> Principal:
    """The principal a token belongs to; `AuthError` if it is unknown, malformed, revoked
    or expired (by the store's clock)."""
    if not isinstance(token, str) or not token.startswith(TOKEN_PREFIX) or len(token) > 200:
        raise AuthError("no valid API token given (expected a tth_… token)", code="unauthenticated")
    found = await store.find_token(hash_token(token))
    if found is None:
        raise AuthError("unknown API token", code="unauthenticated")
    info, now = found
    if info.revoked_at is not None:
        raise AuthError(f"token {info.token_id} was revoked", code="token_revoked")
    if info.expires_at is not None and info.expires_at <= now:
        raise AuthError(f"token {info.token_id} has expired", code="token_expired")
    return info.principal()


def authorize(
    principal: Principal,
    action: str,
    *,
    workflow: str | None = None,
    ticket: Ticket | None = None,
    run: RunRecord | None = None,
) -> None:
    """Refuse (`Forbidden`, saying what was missing) unless `principal` may do `action`.

    `workflow` (or the `run`'s workflow) is checked against the principal's workflow scope;
    for `decide` and `answer`, the `ticket`'s approver role against its `approver_for`.
    A scoped principal acting on something whose workflow is not given is refused.
    """
    if action not in ACTIONS:
        raise Forbidden(f"unknown action {action!r}")
    who = principal.describe()
    if principal.role == "admin":
        return
    if action == "admin":
        raise Forbidden(f"{who} may not administer tether: that needs role admin")
    if action in ("decide", "answer"):
        if principal.role != "approver":
            raise Forbidden(f"{who} may not {action} tickets: that needs role approver (or admin)")
        if ticket is None:
            raise Forbidden(f"{who}: no ticket given to {action}")
        if ticket.approver not in principal.approver_for:
            mine = ", ".join(principal.approver_for) or "none"
            raise Forbidden(
                f"{who} may not {action} ticket {ticket.ticket_id}: it is for approver "
                f"{ticket.approver!r}, and this principal approves for {mine}"
            )
    elif action != "view" and (principal.role != "operator" or action not in _OPERATOR_ACTIONS):
        raise Forbidden(f"{who} may not {action.replace('_', ' ')} runs: that needs role operator (or admin)")
    if principal.workflows:
        name = workflow if workflow is not None else run.workflow_name if run is not None else None
        if name is None and action != "view":
            raise Forbidden(
                f"{who} is limited to workflows {', '.join(principal.workflows)}; the workflow is not known"
            )
        if name is not None and name not in principal.workflows:
            raise Forbidden(
                f"{who} may not {action.replace('_', ' ')} in workflow {name!r}: it is limited to "
                f"{', '.join(principal.workflows)}"
            )


def allowed(
    principal: Principal,
    action: str,
    *,
    workflow: str | None = None,
    ticket: Ticket | None = None,
    run: RunRecord | None = None,
) -> bool:
    """`authorize` as a yes/no (to filter what a principal is shown)."""
    try:
        authorize(principal, action, workflow=workflow, ticket=ticket, run=run)
    except Forbidden:
        return False
    return True


__all__ = [
    "ACTIONS",
    "ROLES",
    "Action",
    "Principal",
    "PrincipalKind",
    "Role",
    "TokenInfo",
    "allowed",
    "authenticate",
    "authorize",
    "create_token",
    "hash_token",
    "list_tokens",
    "revoke_token",
]
