"""The journal: runs with their checkpoints, append-only entries, and approval tickets.

One interface, `Journal`; a URL or path picks the store (`sqlite:///path`, or a plain
file path). Every store keeps the same contract: a `Commit` is applied whole or not at
all, entries are numbered and hash-chained per run, tickets are single-use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from tether.errors import JournalError
from tether.journal.records import (
    FINISHED,
    Commit,
    Entry,
    NewEntry,
    RunRecord,
    RunStatus,
    RunUpdate,
    Ticket,
    verify_chain,
)

DEFAULT_DB = "tether.db"
DB_ENV = "TETHER_DB"


class Journal(Protocol):
    async def create_run(self, run: RunRecord, entries: list[NewEntry]) -> list[Entry]: ...

    async def commit(self, commit: Commit) -> list[Entry]: ...

    async def get_run(self, run_id: str) -> RunRecord: ...

    async def list_runs(self, status: str | None = None, limit: int = 100) -> list[RunRecord]: ...

    async def read_entries(self, run_id: str, after_seq: int = 0) -> list[Entry]: ...

    async def get_ticket(self, ticket_id: str) -> Ticket: ...

    async def list_tickets(self, status: str | None = "pending") -> list[Ticket]: ...

    async def decide_ticket(
        self,
        ticket_id: str,
        *,
        approve: bool,
        by: str,
        reason: str = "",
        answer: str | None = None,
        now: float,
    ) -> Ticket: ...

    async def expire_ticket(self, ticket_id: str, now: float) -> Ticket: ...

    def close(self) -> None: ...


def open_journal(target: str | None = None, *, durability: str = "normal") -> Journal:
    """Open the store named by `target`, `$TETHER_DB`, or `./tether.db` by default."""
    target = target or os.environ.get(DB_ENV) or DEFAULT_DB
    if target.startswith("sqlite://"):
        # sqlite:///relative/path and sqlite:////absolute/path, as SQLAlchemy spells them.
        target = target.removeprefix("sqlite://").removeprefix("/") or DEFAULT_DB
    elif "://" in target:
        scheme = target.split("://", 1)[0]
        raise JournalError(f"unsupported journal URL scheme {scheme!r} (supported: sqlite://)")
    from tether.journal.sqlite import SQLiteJournal

    return SQLiteJournal(Path(target), durability=durability)


__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "FINISHED",
    "Commit",
    "Entry",
    "Journal",
    "NewEntry",
    "RunRecord",
    "RunStatus",
    "RunUpdate",
    "Ticket",
    "open_journal",
    "verify_chain",
]
