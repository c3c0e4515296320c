"""Errors tether raises to its callers.

TetherError
├── DefinitionError        a workflow definition is broken (raised before anything runs)
├── PolicyFileError        a policy file is broken (raised before anything runs)
├── ModelSpecError         a --model string names no known model, or its file is bad
├── JournalError           the store refused an operation
│   ├── RunNotFound
│   ├── JournalTampered    a row disagrees with its chain, the chain is broken, or the
│   │                      append-only triggers are gone: nothing is acted on
│   ├── TicketError        an approval ticket is unknown, already used, expired or
│   │   │                  bound to other arguments
│   │   ├── TicketExpired  decided or used after its expiry, by the journal's clock
│   │   └── TicketConflict already decided, or already approved by this principal
│   └── ConcurrentWriteError  another process appended to the same run
├── RunStateError          the run cannot do what was asked in its current status
├── AuthError              no valid API token: unauthenticated, token_expired, token_revoked
├── Forbidden              the principal's role or scope does not allow the action
├── EditRefused            edited arguments failed schema, scope or policy (ticket unchanged)
└── InputError             a run's input is refused (not a JSON object within the limits)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class TetherError(Exception):
    """Base class of every error tether raises on purpose."""


class DefinitionError(TetherError):
    """A workflow definition is invalid. The message names the state, tool or field."""


class PolicyFileError(TetherError):
    """A policy file is invalid. The message names the rule and field."""


class ModelSpecError(TetherError):
    """A model specification cannot be resolved."""


class JournalError(TetherError):
    """The journal refused an operation."""


class JournalTampered(JournalError):
    """The journal cannot be trusted for what was asked: `findings` (each with its run, first
    bad entry and kind of damage, `tether.journal.integrity.Finding`) say why. Its reason
    code is `journal_tampered`."""

    reason_code = "journal_tampered"

    def __init__(self, findings: Sequence[Any], *, doing: str) -> None:
        self.findings = list(findings)
        shown = "; ".join(str(f) for f in self.findings[:3])
        more = f" (and {len(self.findings) - 3} more)" if len(self.findings) > 3 else ""
        super().__init__(
            f"journal_tampered: refusing to {doing}: {shown}{more}; "
            "run `tether audit verify` and restore the journal from a trusted copy"
        )


class RunNotFound(JournalError):
    pass


class TicketError(JournalError):
    pass


class TicketExpired(TicketError):
    """A ticket was decided or used after its expiry, by the journal's own clock.

    Distinct from other ticket errors so the runtime can record `approval_expired`.
    """

    def __init__(self, message: str, *, ticket_id: str, expires_at: float) -> None:
        super().__init__(message)
        self.ticket_id, self.expires_at = ticket_id, expires_at


class TicketConflict(TicketError):
    """The ticket is no longer pending (another decision won), or this principal already
    gave one of the approvals it needs. An HTTP API answers it with 409."""


class ConcurrentWriteError(JournalError):
    pass


class RunStateError(TetherError):
    """The run's status does not allow the requested operation."""


class InputError(TetherError):
    """A run's input is refused before anything is created; the message says why."""


class AuthError(TetherError):
    """A token did not authenticate. `code` is `unauthenticated` (unknown or malformed),
    `token_expired` (by the store's clock) or `token_revoked`."""

    def __init__(self, message: str, *, code: str = "unauthenticated") -> None:
        super().__init__(message)
        self.code = code


class Forbidden(TetherError):
    """The principal may not do this: the message names the role or scope that was missing."""

    code = "forbidden"


class EditRefused(TetherError):
    """Arguments an approver edited were refused by schema, scope or policy; the ticket is
    left pending, unchanged. `reason_code` is the refusal's (tether.reasons)."""

    def __init__(self, message: str, *, reason_code: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
