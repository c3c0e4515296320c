"""The SQLite journal: one file, WAL mode, one transaction per commit.

Durability: `synchronous=NORMAL` by default, which survives any process crash; a power
loss may drop the last few commits, so a commit that records an intent (before a `write`
or `external` effect) is synced with `FULL`: the record of an effect about to happen is
on disk before the effect. `durability="full"` syncs every commit.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path
from typing import Any

from tether.errors import ConcurrentWriteError, JournalError, RunNotFound, TicketError
from tether.journal.records import (
    Commit,
    Entry,
    NewEntry,
    RunRecord,
    RunUpdate,
    Ticket,
    chain,
)

SCHEMA_VERSION = 1
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, workflow_name TEXT NOT NULL, workflow_version TEXT NOT NULL,
    workflow_hash TEXT NOT NULL, workflow_ref TEXT NOT NULL, policy_hash TEXT NOT NULL,
    policy_ref TEXT, model_spec TEXT, status TEXT NOT NULL, state TEXT NOT NULL, input TEXT NOT NULL,
    data TEXT NOT NULL, facts TEXT NOT NULL, checkpoint TEXT NOT NULL, owner TEXT,
    reason_code TEXT, message TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    last_seq INTEGER NOT NULL, last_hash TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_at);
CREATE TABLE IF NOT EXISTS entries (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, step_id TEXT,
    state TEXT, body TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (run_id, seq));
CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END;
CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END;
CREATE TABLE IF NOT EXISTS tickets (
    ticket_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL,
    kind TEXT NOT NULL, subject TEXT NOT NULL, args TEXT NOT NULL, args_hash TEXT NOT NULL,
    approver TEXT NOT NULL, question TEXT, status TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, decided_at REAL, decided_by TEXT, reason TEXT, answer TEXT,
    consumed_at REAL);
CREATE INDEX IF NOT EXISTS tickets_by_status ON tickets (status, created_at);
"""
_JSON_RUN_FIELDS = ("input", "data", "facts", "checkpoint")
_RUN_COLUMNS = tuple(RunRecord.model_fields)
_TICKET_COLUMNS = tuple(Ticket.model_fields)


class SQLiteJournal:
    def __init__(self, path: Path, *, durability: str = "normal") -> None:
        if durability not in ("normal", "full"):
            raise JournalError(f"durability must be 'normal' or 'full', not {durability!r}")
        self.path = path
        self.durability = durability
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
        except sqlite3.OperationalError as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from None
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA busy_timeout=30000")
        self._sync_default = "FULL" if durability == "full" else "NORMAL"
        self._db.execute(f"PRAGMA synchronous={self._sync_default}")
        self._migrate()

    def _migrate(self) -> None:
        # Every statement is IF NOT EXISTS, so concurrent first opens are harmless.
        self._db.executescript(_SCHEMA)
        self._db.execute("BEGIN IMMEDIATE")
        row = self._db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
        if row is None:
            self._db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        elif int(row[0]) > SCHEMA_VERSION:
            self._db.execute("ROLLBACK")
            raise JournalError(
                f"journal {self.path} has schema version {row[0]}, newer than this tether "
                f"understands ({SCHEMA_VERSION}); upgrade tether"
            )
        self._db.execute("COMMIT")

    def close(self) -> None:
        self._db.close()

    # -- writing ---------------------------------------------------------------------

    async def create_run(self, run: RunRecord, entries: list[NewEntry]) -> list[Entry]:
        written = chain(run.run_id, 0, run.last_hash, entries, run.created_at)
        if written:
            run = run.model_copy(update={"last_seq": written[-1].seq, "last_hash": written[-1].hash})
        values = [_encode(k, getattr(run, k)) for k in _RUN_COLUMNS]
        with self._transaction(durable=False):
            self._db.execute(
                f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' * len(_RUN_COLUMNS))})",
                values,
            )
            self._insert_entries(written)
        return written

    async def commit(self, commit: Commit) -> list[Entry]:
        now = time.time()
        written = chain(commit.run_id, commit.expected_seq, commit.expected_hash, commit.entries, now)
        with self._transaction(durable=commit.durable):
            sets = {"updated_at": now}
            if written:
                sets |= {"last_seq": written[-1].seq, "last_hash": written[-1].hash}
            if commit.update is not None:
                sets |= {k: _encode(k, v) for k, v in _set_fields(commit.update).items()}
            assignments = ", ".join(f"{k} = ?" for k in sets)
            cursor = self._db.execute(
                f"UPDATE runs SET {assignments} WHERE run_id = ? AND last_seq = ?",
                (*sets.values(), commit.run_id, commit.expected_seq),
            )
            if cursor.rowcount != 1:
                self._raise_conflict(commit.run_id, commit.expected_seq)
            self._insert_entries(written)
            for ticket in commit.new_tickets:
                values = [_encode(k, getattr(ticket, k)) for k in _TICKET_COLUMNS]
                self._db.execute(
                    f"INSERT INTO tickets ({', '.join(_TICKET_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(_TICKET_COLUMNS))})",
                    values,
                )
            if commit.consume is not None:
                self._consume(*commit.consume, now=now)
        return written

    def _consume(self, ticket_id: str, args_hash: str, *, now: float) -> None:
        cursor = self._db.execute(
            "UPDATE tickets SET status = 'consumed', consumed_at = ? "
            "WHERE ticket_id = ? AND status = 'approved' AND args_hash = ?",
            (now, ticket_id, args_hash),
        )
        if cursor.rowcount == 1:
            return
        row = self._db.execute(
            "SELECT status, args_hash FROM tickets WHERE ticket_id = ?", (ticket_id,)
        ).fetchone()
        if row is None:
            raise TicketError(f"no ticket {ticket_id}")
        if row[1] != args_hash:
            raise TicketError(f"ticket {ticket_id} approves other arguments ({row[1]}), not {args_hash}")
        raise TicketError(f"ticket {ticket_id} is {row[0]}, not approved: it cannot be used")

    async def decide_ticket(
        self,
        ticket_id: str,
        *,
        approve: bool,
        by: str,
        reason: str = "",
        answer: str | None = None,
        now: float,
    ) -> Ticket:
        with self._transaction(durable=False):
            ticket = self._ticket(ticket_id)
            if ticket.status != "pending":
                raise TicketError(f"ticket {ticket_id} is already {ticket.status}")
            if ticket.expires_at <= now:
                self._db.execute("UPDATE tickets SET status='expired' WHERE ticket_id=?", (ticket_id,))
                raise TicketError(f"ticket {ticket_id} expired; the run will record it as expired")
            if ticket.kind == "question":
                status = "answered" if approve else "denied"
            else:
                status = "approved" if approve else "denied"
            self._db.execute(
                "UPDATE tickets SET status=?, decided_at=?, decided_by=?, reason=?, answer=? "
                "WHERE ticket_id=?",
                (status, now, by, reason, answer, ticket_id),
            )
            run = self._run(ticket.run_id)
            entry = NewEntry(
                kind="ticket_decided",
                step_id=ticket.step_id,
                state=run.state,
                body={
                    "ticket_id": ticket_id,
                    "status": status,
                    "by": by,
                    "reason": reason,
                    "answer": answer,
                    "args_hash": ticket.args_hash,
                },
            )
            written = chain(run.run_id, run.last_seq, run.last_hash, [entry], now)
            self._db.execute(
                "UPDATE runs SET last_seq=?, last_hash=?, updated_at=? WHERE run_id=? AND last_seq=?",
                (written[-1].seq, written[-1].hash, now, run.run_id, run.last_seq),
            )
            self._insert_entries(written)
            return self._ticket(ticket_id)

    async def expire_ticket(self, ticket_id: str, now: float) -> Ticket:
        with self._transaction(durable=False):
            self._db.execute(
                "UPDATE tickets SET status='expired' "
                "WHERE ticket_id=? AND status='pending' AND expires_at<=?",
                (ticket_id, now),
            )
            return self._ticket(ticket_id)

    # -- reading ---------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord:
        return self._run(run_id)

    async def list_runs(self, status: str | None = None, limit: int = 100) -> list[RunRecord]:
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        rows = self._db.execute(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs {where} ORDER BY created_at DESC LIMIT ?",
            (*params, limit),
        ).fetchall()
        return [_decode_run(r) for r in rows]

    async def read_entries(self, run_id: str, after_seq: int = 0) -> list[Entry]:
        rows = self._db.execute(
            "SELECT run_id, seq, kind, step_id, state, body, prev_hash, hash, created_at "
            "FROM entries WHERE run_id = ? AND seq > ? ORDER BY seq",
            (run_id, after_seq),
        )
        return [
            Entry(
                run_id=r[0],
                seq=r[1],
                kind=r[2],
                step_id=r[3],
                state=r[4],
                body=json.loads(r[5]),
                prev_hash=r[6],
                hash=r[7],
                created_at=r[8],
                body_json=r[5],
            )
            for r in rows
        ]

    async def get_ticket(self, ticket_id: str) -> Ticket:
        return self._ticket(ticket_id)

    async def list_tickets(self, status: str | None = "pending") -> list[Ticket]:
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        rows = self._db.execute(
            f"SELECT {', '.join(_TICKET_COLUMNS)} FROM tickets {where} ORDER BY created_at", params
        ).fetchall()
        return [_decode_ticket(r) for r in rows]

    # -- helpers ---------------------------------------------------------------------

    def _run(self, run_id: str) -> RunRecord:
        row = self._db.execute(
            f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?", (run_id,)
        ).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.path}")
        return _decode_run(row)

    def _ticket(self, ticket_id: str) -> Ticket:
        row = self._db.execute(
            f"SELECT {', '.join(_TICKET_COLUMNS)} FROM tickets WHERE ticket_id = ?", (ticket_id,)
        ).fetchone()
        if row is None:
            raise TicketError(f"no ticket {ticket_id!r} in {self.path}")
        return _decode_ticket(row)

    def _insert_entries(self, entries: list[Entry]) -> None:
        self._db.executemany(
            "INSERT INTO entries (run_id, seq, kind, step_id, state, body, prev_hash, hash, "
            "created_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            [
                (
                    e.run_id,
                    e.seq,
                    e.kind,
                    e.step_id,
                    e.state,
                    e.body_json,
                    e.prev_hash,
                    e.hash,
                    e.created_at,
                )
                for e in entries
            ],
        )

    def _raise_conflict(self, run_id: str, expected_seq: int) -> None:
        row = self._db.execute("SELECT last_seq FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.path}")
        raise ConcurrentWriteError(
            f"run {run_id} moved on (journal at seq {row[0]}, writer expected {expected_seq}); "
            "another process is working on it"
        )

    def _transaction(self, *, durable: bool) -> _Transaction:
        return _Transaction(self._db, "FULL" if durable else self._sync_default, self._sync_default)


class _Transaction:
    """BEGIN IMMEDIATE ... COMMIT, rolled back on any exception, with a sync level."""

    def __init__(self, db: sqlite3.Connection, sync: str, default_sync: str) -> None:
        self.db, self.sync, self.default_sync = db, sync, default_sync

    def __enter__(self) -> None:
        if self.sync != self.default_sync:
            self.db.execute(f"PRAGMA synchronous={self.sync}")
        self.db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: Any, *_: Any) -> None:
        try:
            self.db.execute("ROLLBACK" if exc_type else "COMMIT")
        finally:
            if self.sync != self.default_sync:
                self.db.execute(f"PRAGMA synchronous={self.default_sync}")


def _set_fields(update: RunUpdate) -> dict[str, Any]:
    return {k: getattr(update, k) for k in update.model_fields_set}


def _encode(column: str, value: Any) -> Any:
    if column in _JSON_RUN_FIELDS or column == "args":
        return json.dumps(value, default=str)
    return value


def _decode_run(row: tuple[Any, ...]) -> RunRecord:
    values = dict(zip(_RUN_COLUMNS, row, strict=True))
    for k in _JSON_RUN_FIELDS:
        values[k] = json.loads(values[k])
    return RunRecord.model_validate(values)


def _decode_ticket(row: tuple[Any, ...]) -> Ticket:
    values = dict(zip(_TICKET_COLUMNS, row, strict=True))
    values["args"] = json.loads(values["args"])
    return Ticket.model_validate(values)
