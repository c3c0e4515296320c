"""Errors tether raises to its callers.

TetherError
├── DefinitionError        a workflow definition is broken (raised before anything runs)
├── PolicyFileError        a policy file is broken (raised before anything runs)
├── ModelSpecError         a --model string names no known model, or its file is bad
├── JournalError           the store refused an operation
│   ├── RunNotFound
│   ├── TicketError        an approval ticket is unknown, already used, expired or
│   │   │                  bound to other arguments
│   │   └── TicketExpired  decided or used after its expiry, by the journal's clock
│   └── ConcurrentWriteError  another process appended to the same run
├── RunStateError          the run cannot do what was asked in its current status
└── InputError             a run's input is refused (not a JSON object within the limits)
"""

from __future__ import annotations


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


class ConcurrentWriteError(JournalError):
    pass


class RunStateError(TetherError):
    """The run's status does not allow the requested operation."""


class InputError(TetherError):
    """A run's input is refused before anything is created; the message says why."""
