"""The PostgreSQL journal: the SQLite journal's tables and meaning, for many workers.

psycopg 3 in async mode with a connection pool, so many runs driven in one process commit
at once; each `commit` is one transaction. Bodies are stored as their canonical JSON
text (the text the hash chain covers), other JSON as text too, timestamps as the same
float seconds as SQLite.

Durability mirrors SQLite's: with `durability="normal"` commits are asynchronous
(`synchronous_commit=off`: nothing is lost if tether crashes; a crash of the server may
lose its last fraction of a second), and a `durable` commit (an intent) waits for its
WAL flush, which flushes every earlier commit too. `durability="full"` keeps the server's
setting for every commit.

Workers: `claim` takes a run with `SELECT … FOR UPDATE SKIP LOCKED` (concurrent claimers
never wait for or double-claim a run); a per-workflow advisory lock makes `limits` hold
under concurrency; and a NOTIFY on `tether_work` wakes idle workers LISTENing in
`wait_for_work`.

The pool belongs to the event loop that first used it; used from a later loop (a CLI
calling `asyncio.run` several times) the journal drops the old connections and opens a
new pool there.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections.abc import AsyncIterator, Collection, Mapping
from contextlib import asynccontextmanager
from typing import Any, Self
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg_pool import AsyncConnectionPool

from tether.errors import JournalError, RunNotFound, TicketError
from tether.journal import migrations
from tether.journal.common import (
    ENTRY_COLUMNS,
    EXCHANGE_COLUMNS,
    RUN_COLUMNS,
    TICKET_COLUMNS,
    WORK_CHANNEL,
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

DEFAULT_POOL_SIZE = 4
_RUNS = ", ".join(RUN_COLUMNS)
_TICKETS = ", ".join(TICKET_COLUMNS)
_TICKET_VALUES = ", ".join(["%s"] * len(TICKET_COLUMNS))
_SCHEMA_KEY = "hashtext('tether.' || coalesce(current_schema(), ''))"


class PostgresJournal:
    def __init__(
        self, url: str, *, durability: str = "normal", migrate: bool = True, pool_size: int | None = None
    ) -> None:
        if durability not in ("normal", "full"):
            raise JournalError(f"durability must be 'normal' or 'full', not {durability!r}")
        self._conninfo, url_pool_size = _split_pool_size(url)
        self.url = _redact(url)
        self.durability = durability
        self.pool_size = pool_size or url_pool_size or DEFAULT_POOL_SIZE
        self._pool: AsyncConnectionPool[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._listen_lock: asyncio.Lock | None = None
        self._connections: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()
        self._closing: set[asyncio.Task[None]] = set()
        self.migrated: tuple[int, int] = self._migrate(apply=migrate)

    def _migrate(self, *, apply: bool) -> tuple[int, int]:
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn, conn.transaction():
                conn.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_KEY}, 0)")
                conn.execute(migrations.META_SQL)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                current = int(row[0]) if row else 0
                todo = migrations.pending(migrations.POSTGRES, current, self.url)
                if todo and not apply:
                    raise JournalError(
                        f"journal {self.url} has schema version {current}; this tether needs "
                        f"{migrations.LATEST}: run `tether db upgrade --db URL`"
                    )
                for migration in todo:
                    migrations.apply(conn, migration, "%s")
        except psycopg.Error as exc:
            raise JournalError(f"cannot open journal {self.url}: {exc}") from None
        return current, migrations.LATEST if todo else current

    # -- connections -----------------------------------------------------------------

    async def _get_pool(self) -> AsyncConnectionPool[Any]:
        loop = asyncio.get_running_loop()
        if self._pool is not None and self._loop is loop:
            return self._pool
        if self._loop is not None and self._loop is not loop and self._loop.is_running():
            raise JournalError("a PostgreSQL journal serves one event loop at a time")
        self._drop_connections()  # those of a loop that has finished
        pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
            self._conninfo,
            min_size=1,
            max_size=self.pool_size,
            kwargs={"autocommit": True},
            configure=self._configure,
            open=False,
            name="tether-journal",
        )
        self._pool, self._loop, self._listen_lock = pool, loop, asyncio.Lock()
        try:
            await pool.open(wait=True, timeout=30.0)
        except psycopg.OperationalError as exc:
            self._pool = None
            await pool.close()
            raise JournalError(f"cannot connect to journal {self.url}: {exc}") from None
        return pool

    async def _configure(self, conn: psycopg.AsyncConnection[Any]) -> None:
        self._connections.add(conn)
        if self.durability == "normal":
            await conn.execute("SET synchronous_commit = off")

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        pool = await self._get_pool()
        try:
            async with pool.connection() as conn:
                yield conn
        except psycopg.OperationalError as exc:
            raise JournalError(f"journal {self.url}: {exc}") from exc

    @asynccontextmanager
    async def _transaction(self, *, durable: bool = False) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        async with self._connection() as conn, conn.transaction():
            if durable and self.durability == "normal":
                await conn.execute("SET LOCAL synchronous_commit = on")
            yield conn

    def _drop_connections(self) -> None:
        for conn in list(self._connections):
            if not conn.closed:
                conn.pgconn.finish()
        self._pool = self._loop = self._listener = None

    def close(self) -> None:
        pool, loop = self._pool, self._loop
        self._drop_connections()
        if pool is not None and loop is not None and loop.is_running():
            # Closed from inside its own loop: stop the pool's tasks there too.
            task = loop.create_task(pool.close(timeout=1.0))
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    async def aclose(self) -> None:
        if self._pool is not None and self._loop is asyncio.get_running_loop():
            pool, self._pool = self._pool, None
            if self._listener is not None:
                await self._listener.close()
            await pool.close()
        self._drop_connections()

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
        async with self._transaction() as conn:
            try:
                await conn.execute(
                    f"INSERT INTO runs ({', '.join(values)}) VALUES ({', '.join(['%s'] * len(values))})",
                    tuple(values.values()),
                )
            except psycopg.errors.UniqueViolation:
                raise JournalError(f"run {run.run_id} already exists in {self.url}") from None
            await _insert_entries(conn, written)
            if run.status == "queued":
                await _notify(conn, run.run_id)
        return written

    async def commit(self, commit: Commit) -> list[Entry]:
        now = time.time()
        written = chain(commit.run_id, commit.expected_seq, commit.expected_hash, commit.entries, now)
        sets = commit_values(commit, written, now)
        fence, fence_args = fence_sql(commit.lease_owner, now, "%s")
        async with self._transaction(durable=commit.durable) as conn:
            cursor = await conn.execute(
                f"UPDATE runs SET {', '.join(f'{k} = %s' for k in sets)} "
                f"WHERE run_id = %s AND last_seq = %s AND {fence}",
                (*sets.values(), commit.run_id, commit.expected_seq, *fence_args),
            )
            if cursor.rowcount != 1:
                cursor = await conn.execute(
                    "SELECT last_seq, lease_owner, lease_expires_at FROM runs WHERE run_id = %s",
                    (commit.run_id,),
                )
                row = await cursor.fetchone()
                if row is None:
                    raise RunNotFound(f"no run {commit.run_id!r} in {self.url}")
                raise refused_commit(commit.run_id, commit.expected_seq, commit.lease_owner, row, now)
            await _insert_entries(conn, written)
            if commit.exchanges:
                async with conn.cursor() as cursor:
                    await cursor.executemany(
                        f"INSERT INTO exchanges ({', '.join(EXCHANGE_COLUMNS)}) "
                        f"VALUES ({', '.join(['%s'] * len(EXCHANGE_COLUMNS))})",
                        [exchange_row(x) for x in commit.exchanges],
                    )
            for ticket in commit.new_tickets:
                try:
                    await conn.execute(
                        f"INSERT INTO tickets ({_TICKETS}) VALUES ({_TICKET_VALUES})",
                        [encode(k, getattr(ticket, k)) for k in TICKET_COLUMNS],
                    )
                except psycopg.errors.UniqueViolation:
                    raise TicketError(f"ticket {ticket.ticket_id} already exists") from None
            if commit.consume is not None:
                await _consume(conn, *commit.consume, now=now)
        return written

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
        async with self._transaction() as conn:
            # Lock the run, then the ticket: the order a commit consuming a ticket takes them in.
            run = await self._run(conn, (await self._ticket(conn, ticket_id)).run_id, lock=True)
            ticket = await self._ticket(conn, ticket_id, lock=True)
            if ticket.status != "pending":
                raise TicketError(f"ticket {ticket_id} is already {ticket.status}")
            if ticket.expires_at <= now:
                raise TicketError(f"ticket {ticket_id} expired; the run will record it as expired")
            status = decided_status(ticket, approve)
            await conn.execute(
                "UPDATE tickets SET status=%s, decided_at=%s, decided_by=%s, reason=%s, answer=%s "
                "WHERE ticket_id=%s",
                (status, now, by, reason, answer, ticket_id),
            )
            entry = decision_entry(ticket, run, status, by, reason, answer)
            written = chain(run.run_id, run.last_seq, run.last_hash, [entry], now)
            await conn.execute(
                "UPDATE runs SET last_seq=%s, last_hash=%s, updated_at=%s WHERE run_id=%s",
                (written[-1].seq, written[-1].hash, now, run.run_id),
            )
            await _insert_entries(conn, written)
            await _notify(conn, run.run_id)
            return await self._ticket(conn, ticket_id)

    async def expire_ticket(self, ticket_id: str, now: float) -> Ticket:
        async with self._transaction() as conn:
            await conn.execute(
                "UPDATE tickets SET status='expired' "
                "WHERE ticket_id=%s AND status='pending' AND expires_at<=%s",
                (ticket_id, now),
            )
            return await self._ticket(conn, ticket_id)

    # -- leases ----------------------------------------------------------------------

    async def acquire(self, run_id: str, worker_id: str, *, lease_seconds: float, now: float) -> RunRecord:
        async with self._transaction() as conn:
            cursor = await conn.execute(
                "SELECT lease_owner, lease_expires_at FROM runs WHERE run_id = %s FOR UPDATE", (run_id,)
            )
            row = await cursor.fetchone()
            if row is None:
                raise RunNotFound(f"no run {run_id!r} in {self.url}")
            if row[0] != worker_id and lease_is_live(row[0], row[1], now):
                raise lease_held(run_id, row[0], row[1])
            return await _lease(conn, run_id, worker_id, now + lease_seconds)

    async def claim(
        self,
        worker_id: str,
        *,
        lease_seconds: float,
        now: float,
        limits: Mapping[str, int] | None = None,
        skip_runs: Collection[str] = (),
    ) -> RunRecord | None:
        await self._listen()  # listen before looking, so no wake-up is missed after a miss
        limits = dict(limits or {})
        skip: list[str] = []
        while True:
            async with self._transaction() as conn:
                skip += await _workflows_at_limit(conn, limits, now, skip)
                cursor = await conn.execute(
                    f"SELECT r.run_id, r.workflow_name FROM runs r WHERE {runnable_sql('%s')} "
                    "AND r.workflow_name <> ALL(%s) AND r.run_id <> ALL(%s) ORDER BY r.updated_at, r.run_id "
                    "LIMIT 1 FOR UPDATE OF r SKIP LOCKED",
                    (now, now, skip, list(skip_runs)),
                )
                row = await cursor.fetchone()
                if row is None:
                    return None
                run_id, workflow = row
                if workflow in limits:
                    # Claimers of one limited workflow count and lease one at a time.
                    await conn.execute(
                        f"SELECT pg_advisory_xact_lock({_SCHEMA_KEY}, hashtext(%s))", (workflow,)
                    )
                    if await _workflows_at_limit(conn, {workflow: limits[workflow]}, now, []):
                        skip.append(workflow)
                        continue
                return await _lease(conn, run_id, worker_id, now + lease_seconds)

    async def heartbeat(self, run_id: str, worker_id: str, *, lease_seconds: float, now: float) -> bool:
        async with self._connection() as conn:
            cursor = await conn.execute(
                "UPDATE runs SET lease_expires_at = %s WHERE run_id = %s AND lease_owner = %s",
                (now + lease_seconds, run_id, worker_id),
            )
            return cursor.rowcount == 1

    async def release(self, run_id: str, worker_id: str) -> None:
        async with self._transaction() as conn:
            now = time.time()
            cursor = await conn.execute(
                "UPDATE runs AS r SET lease_owner = NULL, lease_expires_at = NULL "
                f"WHERE run_id = %s AND lease_owner = %s RETURNING {runnable_sql('%s')}",
                (run_id, worker_id, now, now),
            )
            row = await cursor.fetchone()
            if row is not None and row[0]:
                await _notify(conn, run_id)

    async def wait_for_work(self, timeout: float) -> None:
        """Return at the first NOTIFY on `tether_work` (or after `timeout` seconds)."""
        listener = await self._listen()
        try:
            async for _ in listener.notifies(timeout=max(0.0, timeout), stop_after=1):
                pass
        except psycopg.OperationalError:
            self._listener = None  # reconnected on the next call; the caller polls again anyway

    async def _listen(self) -> psycopg.AsyncConnection[Any]:
        await self._get_pool()  # the listener belongs to the same loop as the pool
        assert self._listen_lock is not None
        async with self._listen_lock:  # one listener, however many tasks start at once
            if self._listener is None or self._listener.closed:
                try:
                    conn = await psycopg.AsyncConnection.connect(self._conninfo, autocommit=True)
                except psycopg.OperationalError as exc:
                    raise JournalError(f"cannot listen on journal {self.url}: {exc}") from None
                self._connections.add(conn)
                await conn.execute(f"LISTEN {WORK_CHANNEL}")
                self._listener = conn
            return self._listener

    # -- reading ---------------------------------------------------------------------

    async def get_run(self, run_id: str) -> RunRecord:
        async with self._connection() as conn:
            return await self._run(conn, run_id)

    async def list_runs(
        self, status: str | None = None, limit: int = 100, *, workflow: str | None = None
    ) -> list[RunRecord]:
        filters = {"status": status, "workflow_name": workflow}
        given = {k: v for k, v in filters.items() if v is not None}
        where = ("WHERE " + " AND ".join(f"{k} = %s" for k in given)) if given else ""
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {_RUNS} FROM runs {where} ORDER BY created_at DESC, run_id DESC LIMIT %s",
                (*given.values(), limit),
            )
            return [decode_run(r) for r in await cursor.fetchall()]

    async def read_entries(self, run_id: str, after_seq: int = 0) -> list[Entry]:
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries WHERE run_id = %s AND seq > %s ORDER BY seq",
                (run_id, after_seq),
            )
            return [decode_entry(r) for r in await cursor.fetchall()]

    async def read_exchanges(self, run_id: str) -> list[ModelExchange]:
        async with self._connection() as conn:
            cursor = await conn.execute(
                f"SELECT {', '.join(EXCHANGE_COLUMNS)} FROM exchanges WHERE run_id = %s ORDER BY seq",
                (run_id,),
            )
            return [decode_exchange(r) for r in await cursor.fetchall()]

    async def prune_exchanges(self, before: float) -> int:
        async with self._transaction() as conn:
            cursor = await conn.execute("DELETE FROM exchanges WHERE created_at < %s", (before,))
            return cursor.rowcount

    async def get_ticket(self, ticket_id: str) -> Ticket:
        async with self._connection() as conn:
            return await self._ticket(conn, ticket_id)

    async def list_tickets(self, status: str | None = "pending") -> list[Ticket]:
        where, params = ("WHERE status = %s", [status]) if status else ("", [])
        async with self._connection() as conn:
            cursor = await conn.execute(f"SELECT {_TICKETS} FROM tickets {where} ORDER BY created_at", params)
            return [decode_ticket(r) for r in await cursor.fetchall()]

    async def _run(self, conn: psycopg.AsyncConnection[Any], run_id: str, *, lock: bool = False) -> RunRecord:
        sql = f"SELECT {_RUNS} FROM runs WHERE run_id = %s" + (" FOR UPDATE" if lock else "")
        row = await (await conn.execute(sql, (run_id,))).fetchone()
        if row is None:
            raise RunNotFound(f"no run {run_id!r} in {self.url}")
        return decode_run(row)

    async def _ticket(
        self, conn: psycopg.AsyncConnection[Any], ticket_id: str, *, lock: bool = False
    ) -> Ticket:
        sql = f"SELECT {_TICKETS} FROM tickets WHERE ticket_id = %s" + (" FOR UPDATE" if lock else "")
        row = await (await conn.execute(sql, (ticket_id,))).fetchone()
        if row is None:
            raise TicketError(f"no ticket {ticket_id!r} in {self.url}")
        return decode_ticket(row)


async def _insert_entries(conn: psycopg.AsyncConnection[Any], entries: list[Entry]) -> None:
    sql = f"INSERT INTO entries ({', '.join(ENTRY_COLUMNS)}) VALUES ({', '.join(['%s'] * 9)})"
    if len(entries) == 1:  # the usual case: cheaper than executemany's pipeline
        await conn.execute(sql, entry_row(entries[0]))
    elif entries:
        async with conn.cursor() as cursor:
            await cursor.executemany(sql, [entry_row(e) for e in entries])


async def _consume(conn: psycopg.AsyncConnection[Any], ticket_id: str, args_hash: str, *, now: float) -> None:
    cursor = await conn.execute(
        "UPDATE tickets SET status = 'consumed', consumed_at = %s "
        "WHERE ticket_id = %s AND status = 'approved' AND args_hash = %s",
        (now, ticket_id, args_hash),
    )
    if cursor.rowcount == 1:
        return
    cursor = await conn.execute("SELECT status, args_hash FROM tickets WHERE ticket_id = %s", (ticket_id,))
    row = await cursor.fetchone()
    if row is None:
        raise TicketError(f"no ticket {ticket_id}")
    if row[1] != args_hash:
        raise TicketError(f"ticket {ticket_id} approves other arguments ({row[1]}), not {args_hash}")
    raise TicketError(f"ticket {ticket_id} is {row[0]}, not approved: it cannot be used")


async def _lease(
    conn: psycopg.AsyncConnection[Any], run_id: str, worker_id: str, expires_at: float
) -> RunRecord:
    cursor = await conn.execute(
        f"UPDATE runs SET lease_owner = %s, lease_expires_at = %s WHERE run_id = %s RETURNING {_RUNS}",
        (worker_id, expires_at, run_id),
    )
    row = await cursor.fetchone()
    assert row is not None
    return decode_run(row)


async def _workflows_at_limit(
    conn: psycopg.AsyncConnection[Any], limits: Mapping[str, int], now: float, skip: list[str]
) -> list[str]:
    names = [name for name in limits if name not in skip]
    if not names:
        return []
    cursor = await conn.execute(
        "SELECT workflow_name, count(*) FROM runs WHERE lease_owner IS NOT NULL "
        "AND lease_expires_at > %s AND workflow_name = ANY(%s) GROUP BY workflow_name",
        (now, names),
    )
    counts = dict(await cursor.fetchall())
    return [name for name in names if counts.get(name, 0) >= limits[name]]


async def _notify(conn: psycopg.AsyncConnection[Any], run_id: str) -> None:
    """Wake idle workers when this transaction commits (never before: NOTIFY is transactional)."""
    await conn.execute("SELECT pg_notify(%s, %s)", (WORK_CHANNEL, run_id))


def _split_pool_size(url: str) -> tuple[str, int | None]:
    """Take tether's own `pool_size` out of the URL's query; libpq would refuse it."""
    parts = urlsplit(url)
    query = parse_qsl(parts.query, keep_blank_values=True)
    sizes = [v for k, v in query if k == "pool_size"]
    rest = urlencode([(k, v) for k, v in query if k != "pool_size"])
    try:
        size = int(sizes[-1]) if sizes else None
    except ValueError:
        raise JournalError(f"pool_size must be a number, not {sizes[-1]!r}") from None
    return urlunsplit(parts._replace(query=rest)), size


def _redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))
