"""The SQLite journal: one file, WAL mode, the standard library's `sqlite3` called directly.

Durability: `synchronous=NORMAL` by default, which survives any process crash; a power
loss may drop the last few commits, so a commit that records an intent (before a `write`
or `external` effect) is synced with `FULL`: the record of an effect about to happen is
on disk before the effect, and a batch carrying it is synced whole. `durability="full"`
syncs every commit.

Two connections: the writer, whose transactions are `BEGIN IMMEDIATE` (writers to one file
are serialized, which is what makes `claim` atomic here; PostgreSQL needs row locks), taken
by one task at a time; and a reader, which sees only committed data and never waits for
the writer (WAL). The COMMIT of a synced batch of several commits (its fsync) runs in a
thread, so the event loop meanwhile drives other runs and queues their commits for the next
batch; a lone commit's fsync runs where it is, sparing the hop.

The store's clock is this process's clock, read inside the store (`tether_now()` in SQL):
SQLite runs on the machine it is opened from.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from tether.errors import JournalError
from tether.journal import migrations
from tether.journal.common import GATED, NOW
from tether.journal.store import CommitPlan, SQLStore

# RETURNING, UPDATE … FROM and ALTER TABLE DROP COLUMN (schema version 4).
MIN_SQLITE = (3, 35, 0)


class SQLiteJournal(SQLStore):
    def __init__(
        self,
        path: Path,
        *,
        durability: str = "normal",
        migrate: bool = True,
        clock: Callable[[], float] = time.time,
    ) -> None:
        """`clock` is the store's clock (this process's; a test may make time pass with its own)."""
        self.path = path
        super().__init__(SQLiteDialect(path, durability=durability, migrate=migrate, clock=clock))


class SQLiteDialect:
    row_lock = ""  # BEGIN IMMEDIATE already holds the file's write lock
    skip_locked = ""
    # Without statistics the planner prefers runs_by_status and sorts every unfinished run.
    runs_to_claim = "runs r INDEXED BY runs_unfinished"
    unsynced_commits_block = True
    # A synced batch's COMMIT (the fsync) runs in a thread; bench/store.py turns it off to compare.
    sync_in_thread = True

    def __init__(self, path: Path, *, durability: str, migrate: bool, clock: Callable[[], float]) -> None:
        if durability not in ("normal", "full"):
            raise JournalError(f"durability must be 'normal' or 'full', not {durability!r}")
        if sqlite3.sqlite_version_info < MIN_SQLITE:
            raise JournalError(
                f"the SQLite journal needs SQLite {'.'.join(map(str, MIN_SQLITE))} or later (RETURNING, "
                f"UPDATE FROM, DROP COLUMN); this Python's sqlite3 has {sqlite3.sqlite_version}"
            )
        self.where = str(path)
        self.durability = durability
        self.clock = clock
        self._sync = "FULL" if durability == "full" else "NORMAL"
        self._writer = self._connect(path, wal=True)
        self._reader = self._connect(path, wal=False)
        self._tx = _Tx(self._writer, self._render)
        self._lock: asyncio.Lock | None = None
        self._sql: dict[str, str] = {}
        self.migrated = self._migrate(apply=migrate)

    def _connect(self, path: Path, *, wal: bool) -> sqlite3.Connection:
        try:
            db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
            if wal:
                db.execute("PRAGMA journal_mode=WAL")
        except sqlite3.DatabaseError as exc:
            raise JournalError(f"cannot open journal {path}: {exc}") from None
        db.execute("PRAGMA busy_timeout=30000")
        db.execute(f"PRAGMA synchronous={self._sync}")
        # Keep the WAL file from staying at its largest size after a checkpoint.
        db.execute("PRAGMA journal_size_limit=67108864")
        db.create_function("tether_now", 0, self.clock)
        return db

    def _migrate(self, *, apply: bool) -> tuple[int, int]:
        db = self._writer
        db.execute("BEGIN IMMEDIATE")
        try:
            db.execute(migrations.META_SQL)
            row = db.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            current = int(row[0]) if row else 0
            todo = migrations.pending(migrations.SQLITE, current, self.where)
            if todo and not apply:
                raise JournalError(
                    f"journal {self.where} has schema version {current}; this tether needs "
                    f"{migrations.LATEST}: run `tether db upgrade --db {self.where}`"
                )
            for migration in todo:
                migrations.apply(db, migration, "?")
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return current, migrations.LATEST if todo else current

    def _render(self, sql: str) -> str:
        rendered = self._sql.get(sql)
        if rendered is None:
            # A commit's writes run only once its gate passed: their condition is always true.
            rendered = self._sql[sql] = sql.replace(NOW, "tether_now()").replace(GATED, "1")
        return rendered

    def _write_lock(self) -> asyncio.Lock:
        # Created on first use, inside the loop that uses it.
        if self._lock is None:
            self._lock = asyncio.Lock()
        return self._lock

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Tx]:
        async with self._write_lock():
            self._writer.execute("BEGIN IMMEDIATE")
            try:
                yield self._tx
            except BaseException:
                self._writer.execute("ROLLBACK")
                raise
            self._writer.execute("COMMIT")

    async def write(self, sql: str, params: Sequence[Any] = ()) -> tuple[int, list[tuple[Any, ...]]]:
        async with self._write_lock():
            cursor = self._writer.execute(self._render(sql), params)
            rows = cursor.fetchall()
            return cursor.rowcount, rows

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._reader.execute(self._render(sql), params).fetchall()

    async def commit_batch(self, plans: list[CommitPlan], *, durable: bool) -> list[bool]:
        db = self._writer
        sync = "FULL" if durable else self._sync
        async with self._write_lock():
            if sync != self._sync:
                db.execute(f"PRAGMA synchronous={sync}")
            try:
                db.execute("BEGIN IMMEDIATE")
                try:
                    passed = [self._apply(db, plan) for plan in plans]
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
                if sync == "FULL" and self.sync_in_thread and len(plans) > 1:
                    # Others are committing: let the loop drive them during the fsync. A lone
                    # commit's fsync stays here, where it costs no thread hop (≈10% measured).
                    await _in_thread(db.execute, "COMMIT")
                else:
                    db.execute("COMMIT")
            finally:
                if sync != self._sync:
                    db.execute(f"PRAGMA synchronous={self._sync}")
        return passed

    def _apply(self, db: sqlite3.Connection, plan: CommitPlan) -> bool:
        if db.execute(self._render(plan.gate_sql), plan.gate_params).rowcount != 1:
            return False
        for write in plan.writes:
            if len(write.rows) == 1:
                db.execute(self._render(write.sql), write.rows[0])
            else:
                db.executemany(self._render(write.sql), write.rows)
        return True

    def is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, sqlite3.IntegrityError)

    async def notify(self, tx: Any, run_id: str) -> None:
        """SQLite has no notifications: idle workers poll."""

    async def lock_workflow(self, tx: Any, workflow: str) -> None:
        """The transaction already holds the file's write lock."""

    async def prepare_to_wait(self) -> None:
        """Nothing to prepare: workers poll."""

    async def wait_for_work(self, timeout: float) -> None:
        """SQLite has no notifications: workers poll, at most every 0.2 s."""
        await asyncio.sleep(max(0.0, min(timeout, 0.2)))

    def close(self) -> None:
        self._reader.close()
        self._writer.close()

    async def aclose(self) -> None:
        self.close()


class _Tx:
    """The writer connection inside a transaction; `sqlite3` called directly (no thread hop)."""

    def __init__(self, db: sqlite3.Connection, render: Callable[[str], str]) -> None:
        self._db, self._render = db, render

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return self._db.execute(self._render(sql), params).rowcount

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return self._db.execute(self._render(sql), params).fetchall()

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._db.executemany(self._render(sql), rows)


async def _in_thread(fn: Callable[..., Any], *args: Any) -> None:
    """Run `fn` in a thread and wait for it to finish, even if the waiter is cancelled: the
    connection must not be used again while the thread still has it."""
    done = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        await asyncio.shield(done)
    except asyncio.CancelledError:
        await asyncio.wait([done])
        raise

