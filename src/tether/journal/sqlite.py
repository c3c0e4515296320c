"""The SQLite journal: one file, WAL mode, one transaction per commit.

Durability: `synchronous=NORMAL` by default, which survives any process crash; a power
loss may drop the last few commits, so a commit that records an intent (before a `write`
or `external` effect) is synced with `FULL`: the record of an effect about to happen is
on disk before the effect. `durability="full"` syncs every commit.

Every write is `BEGIN IMMEDIATE`: writers to one file are serialized, which is what
makes `claim` atomic here (PostgreSQL needs row locks for the same guarantee).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any, Self

from tether.errors import JournalError, RunNotFound, TicketError
from tether.journal import migrations
from tether.journal.common import (
    ENTRY_COLUMNS,
    EXCHANGE_COLUMNS,
    RUN_COLUMNS,
    TICKET_COLUMNS,
    commit_values,
    decided_status,
    decision_entry,
    decode_entry,
    decode_exchange,
    decode_run,
    decode_ticket,
    encode,
    entry_row,
    exchange_row,
    fence_sql,
    lease_held,
    lease_is_live,
    refused_commit,
    run_values,
    runnable_sql,
)
from tether.journal.records import Commit, Entry, ModelExchange, NewEntry, RunRecord, Ticket, chain

_RUN_SELECT = f"SELECT {', '.join(RUN_COLUMNS)} FROM runs"


class SQLiteJournal:
    def __init__(self, path: Path, *, durability: str = "normal", migrate: bool = True) -> None:
        if durability not in ("normal", "full"):
            raise JournalError(f"durability must be 'normal' or 'full', not {durability!r}")
        self.path = path
        self.durability = durability
        try:
            self._db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
            self._db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from None
        self._db.execute("PRAGMA busy_timeout=30000")
        self._sync_default = "FULL" if durability == "full" else "NORMAL"
        self._db.execute(f"PRAGMA synchronous={self._sync_default}")
        # (schema version found, schema version now): what opening this journal upgraded.
        self.migrated: tuple[int, int] = self._migrate(apply=migrate)

    def _migrate(self, *, apply: bool) -> tuple[int, int]:
        with self._transaction(durable=False):
            self._db.execute(migrations.META_SQL)
            row = self._db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row[0]) if row else 0
            todo = migrations.pending(migrations.SQLITE, current, str(self.path))
            if todo and not apply:
                raise JournalError(
                    f"journal {self.path} has schema version {current}; this tether needs "
                    f"{migrations.LATEST}: run `tether db upgrade --db {self.path}`"
                )
            for migration in todo:
                migrations.apply(self._db, migration, "?")
        return current, migrations.LATEST if todo else current

    def close(self) -> None:
        self._db.close()

    async def aclose(self) -> None:
        self.close()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- writing ---------------------------------------------------------------------

    async def create_run(self, run: RunRecord, entries: list[NewEntry]) -> list[Entry]:
        written = chain(run.run_id, 0, run.last_hash, entries, run.created_at)
        if written:
            run = run.model_copy(update={"last_seq": written[-1].seq, "last_hash": written[-1].hash})
        values = run_values(run)
        with self._transaction(durable=False):
            try:
                self._db.execute(
                    f"INSERT INTO runs ({', '.join(values)}) VALUES ({', '.join('?' * len(values))})",
                    tuple(values.values()),
                )
            except sqlite3.IntegrityError:
                raise JournalError(f"run {run.run_id} already exists in {self.path}") from None
            self._insert_entries(written)
        return written

    async def commit(self, commit: Commit) -> list[Entry]:
        now = time.time()
        written = chain(commit.run_id, commit.expected_seq, commit.expected_hash, commit.entries, now)
        sets = commit_values(commit, written, now)
        fence, fence_args = fence_sql(commit.lease_owner, now, "?")
        with self._transaction(durable=commit.durable):
            cursor = self._db.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in sets)} "
                f"WHERE run_id = ? AND last_seq = ? AND {fence}",
                (*sets.values(), commit.run_id, commit.expected_seq, *fence_args),
            )
            if cursor.rowcount != 1:
                row = self._db.execute(
                    "SELECT last_seq, lease_owner, lease_expires_at FROM runs WHERE run_id = ?",
                    (commit.run_id,),
                ).fetchone()
                if row is None:
                    raise RunNotFound(f"no run {commit.run_id!r} in {self.path}")
                raise refused_commit(commit.run_id, commit.expected_seq, commit.lease_owner, row, now)
            self._insert_entries(written)
            if commit.exchanges:
                self._db.executemany(
                    f"INSERT INTO exchanges ({', '.join(EXCHANGE_COLUMNS)}) "
                    f"VALUES ({', '.join('?' * len(EXCHANGE_COLUMNS))})",
                    [exchange_row(x) for x in commit.exchanges],
                )
            for ticket in commit.new_tickets:
                try:
                    self._db.execute(
                        f"INSERT INTO tickets ({', '.join(TICKET_COLUMNS)}) "
                        f"VALUES ({', '.join('?' * len(TICKET_COLUMNS))})",
                        [encode(k, getattr(ticket, k)) for k in TICKET_COLUMNS],
                    )
                except sqlite3.IntegrityError:
                    raise TicketError(f"ticket {ticket.ticket_id} already exists") from None
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
                raise TicketError(f"ticket {ticket_id} expired; the run will record it as expired")
            status = decided_status(ticket, approve)
            self._db.execute(
                "UPDATE tickets SET status=?, decided_at=?, decided_by=?, reason=?, answer=? "
                "WHERE ticket_id=?",
                (status, now, by, reason, answer, ticket_id),
            )
            run = self._run(ticket.run_id)
            entry = decision_entry(ticket, run, status, by, reason, answer)
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

    # -- leases ----------------------------------------------------------------------

    async def acquire(self, run_id: str, worker_id: str, *, lease_seconds: float, now: float) -> RunRecord:
        with self._transaction(durable=False):
            row = self._db.execute(
                "SELECT lease_owner, lease_expires_at FROM runs WHERE run_id = ?", (run_id,)
            ).fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.path}")
            if row[0] != worker_id and lease_is_live(row[0], row[1], now):
                raise lease_held(run_id, row[0], row[1])
            self._lease(run_id, worker_id, now + lease_seconds)
            return self._run(run_id)

    async def claim(
        self,
        worker_id: str,
        *,
        lease_seconds: float,
        now: float,
        limits: Mapping[str, int] | None = None,
        skip_runs: Collection[str] = (),
    ) -> RunRecord | None:
        with self._transaction(durable=False):
            full = self._workflows_at_limit(limits or {}, now)
            skip = f"AND r.workflow_name NOT IN ({', '.join('?' * len(full))})" if full else ""
            if skip_runs:
                skip += f" AND r.run_id NOT IN ({', '.join('?' * len(skip_runs))})"
            row = self._db.execute(
                f"SELECT r.run_id FROM runs r WHERE {runnable_sql('?')} {skip} "
                "ORDER BY r.updated_at, r.run_id LIMIT 1",
                (now, now, *full, *skip_runs),
            ).fetchone()
            if row is None:
                return None
            self._lease(row[0], worker_id, now + lease_seconds)
            return self._run(row[0])

    def _workflows_at_limit(self, limits: Mapping[str, int], now: float) -> list[str]:
        if not limits:
            return []
        counts = dict(
            self._db.execute(
                "SELECT workflow_name, count(*) FROM runs WHERE lease_owner IS NOT NULL "
                f"AND lease_expires_at > ? AND workflow_name IN ({', '.join('?' * len(limits))}) "
                "GROUP BY workflow_name",
                (now, *limits),
            ).fetchall()
        )
        return [name for name, limit in limits.items() if counts.get(name, 0) >= limit]

    async def heartbeat(self, run_id: str, worker_id: str, *, lease_seconds: float, now: float) -> bool:
        with self._transaction(durable=False):
            cursor = self._db.execute(
                "UPDATE runs SET lease_expires_at = ? WHERE run_id = ? AND lease_owner = ?",
                (now + lease_seconds, run_id, worker_id),
            )
            return cursor.rowcount == 1

    async def release(self, run_id: str, worker_id: str) -> None:
        with self._transaction(durable=False):
            self._db.execute(
                "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL "
                "WHERE run_id = ? AND lease_owner = ?",
                (run_id, worker_id),
            )

    async def wait_for_work(self, timeout: float) -> None:
        """SQLite has no notifications: workers poll, at most every 0.2 s."""
        await asyncio.sleep(max(0.0, min(timeout, 0.2)))

    def _lease(self, run_id: str, worker_id: str, expires_at: float) -> None:
        self._db.execute(
            "UPDATE runs SET lease_owner = ?, lease_expires_at = ? WHERE run_id = ?",
            (worker_id, expires_at, run_id),
        )

    # -- reading ---------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord:
        return self._run(run_id)

    async def list_runs(
        self, status: str | None = None, limit: int = 100, *, workflow: str | None = None
    ) -> list[RunRecord]:
        filters = {"status": status, "workflow_name": workflow}
        given = {k: v for k, v in filters.items() if v is not None}
        where = ("WHERE " + " AND ".join(f"{k} = ?" for k in given)) if given else ""
        rows = self._db.execute(
            f"{_RUN_SELECT} {where} ORDER BY created_at DESC, run_id DESC LIMIT ?", (*given.values(), limit)
        ).fetchall()
        return [decode_run(r) for r in rows]

    async def read_entries(self, run_id: str, after_seq: int = 0) -> list[Entry]:
        rows = self._db.execute(
            f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries WHERE run_id = ? AND seq > ? ORDER BY seq",
            (run_id, after_seq),
        )
        return [decode_entry(r) for r in rows]

    async def read_exchanges(self, run_id: str) -> list[ModelExchange]:
        rows = self._db.execute(
            f"SELECT {', '.join(EXCHANGE_COLUMNS)} FROM exchanges WHERE run_id = ? ORDER BY seq", (run_id,)
        )
        return [decode_exchange(r) for r in rows]

    async def prune_exchanges(self, before: float) -> int:
        with self._transaction(durable=False):
            return self._db.execute("DELETE FROM exchanges WHERE created_at < ?", (before,)).rowcount

    async def get_ticket(self, ticket_id: str) -> Ticket:
        return self._ticket(ticket_id)

    async def list_tickets(self, status: str | None = "pending") -> list[Ticket]:
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        rows = self._db.execute(
            f"SELECT {', '.join(TICKET_COLUMNS)} FROM tickets {where} ORDER BY created_at", params
        ).fetchall()
        return [decode_ticket(r) for r in rows]

    # -- helpers ---------------------------------------------------------------------

    def _run(self, run_id: str) -> RunRecord:
        row = self._db.execute(f"{_RUN_SELECT} WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.path}")
        return decode_run(row)

    def _ticket(self, ticket_id: str) -> Ticket:
        row = self._db.execute(
            f"SELECT {', '.join(TICKET_COLUMNS)} FROM tickets WHERE ticket_id = ?", (ticket_id,)
        ).fetchone()
        if row is None:
            raise TicketError(f"no ticket {ticket_id!r} in {self.path}")
        return decode_ticket(row)

    def _insert_entries(self, entries: list[Entry]) -> None:
        self._db.executemany(
            f"INSERT INTO entries ({', '.join(ENTRY_COLUMNS)}) VALUES ({', '.join('?' * 9)})",
            [entry_row(e) for e in entries],
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
