"""The PostgreSQL journal: the SQLite journal's tables and meaning, for many workers.

psycopg 3 in async mode with a connection pool. Bodies are stored as their canonical JSON
text (the text the hash chain covers), other JSON as text too, timestamps as the same
float seconds as SQLite; the store's clock is the server's `clock_timestamp()`.

Commits: each is one statement — its gate (the conditional UPDATE of its run) and the writes
that follow it as data-modifying CTEs that run only if the gate returned the run — so a lone
commit is one round trip, and a batch of them (group commit) is one transaction sent as one
pipeline on one connection.

Durability mirrors SQLite's: with `durability="normal"` commits are asynchronous
(`synchronous_commit=off`: nothing is lost if tether crashes; a crash of the server may
lose its last fraction of a second), and a batch carrying a `durable` commit (an intent)
waits for its WAL flush, which flushes every earlier commit too. `durability="full"` keeps
the server's setting for every commit.

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
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any, Literal
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import psycopg
from psycopg_pool import AsyncConnectionPool

from tether.errors import JournalError
from tether.journal import integrity, migrations
from tether.journal.common import GATED, NOW, WORK_CHANNEL
from tether.journal.store import CommitPlan, SQLStore, Tx

DEFAULT_POOL_SIZE = 4
_SCHEMA_KEY = "hashtext('tether.' || coalesce(current_schema(), ''))"
_NOW_SQL = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)"
# A transaction the server rolled back to resolve a conflict: retrying it may succeed.
_LOST_A_CONFLICT = (
    psycopg.errors.DeadlockDetected,
    psycopg.errors.SerializationFailure,
    psycopg.errors.TransactionRollback,
)


class PostgresJournal(SQLStore):
    def __init__(
        self, url: str, *, durability: str = "normal", migrate: bool = True, pool_size: int | None = None
    ) -> None:
        dialect = PostgresDialect(url, durability=durability, migrate=migrate, pool_size=pool_size)
        self.url, self.pool_size = dialect.where, dialect.pool_size
        super().__init__(dialect)


class PostgresDialect:
    store: Literal["sqlite", "postgres"] = "postgres"
    triggers_sql = integrity.POSTGRES_TRIGGERS_SQL
    trigger_sql = (migrations.POSTGRES_APPEND_ONLY_FUNCTION, *migrations.POSTGRES_AUDIT_TRIGGERS)
    row_lock = " FOR UPDATE"
    skip_locked = " FOR UPDATE OF r SKIP LOCKED"
    runs_to_claim = "runs r"
    unsynced_commits_block = False

    def __init__(self, url: str, *, durability: str, migrate: bool, pool_size: int | None) -> None:
        if durability not in ("normal", "full"):
            raise JournalError(f"durability must be 'normal' or 'full', not {durability!r}")
        self._conninfo, url_pool_size = _split_pool_size(url)
        self.where = _redact(url)
        self.durability = durability
        self.pool_size = pool_size or url_pool_size or DEFAULT_POOL_SIZE
        self._pool: AsyncConnectionPool[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._listener: psycopg.AsyncConnection[Any] | None = None
        self._listen_lock: asyncio.Lock | None = None
        self._connections: weakref.WeakSet[psycopg.AsyncConnection[Any]] = weakref.WeakSet()
        self._closing: set[asyncio.Task[None]] = set()
        self._sql: dict[str, str] = {}
        self.migrated = self._migrate(apply=migrate)

    def clock(self) -> float:
        return time.time()

    def _migrate(self, *, apply: bool) -> tuple[int, int]:
        try:
            with psycopg.connect(self._conninfo, autocommit=True) as conn, conn.transaction():
                conn.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_KEY}, 0)")
                conn.execute(migrations.META_SQL)
                row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
                current = int(row[0]) if row else 0
                todo = migrations.pending(migrations.POSTGRES, current, self.where)
                if todo and not apply:
                    raise JournalError(
                        f"journal {self.where} has schema version {current}; this tether needs "
                        f"{migrations.LATEST}: run `tether db upgrade --db URL`"
                    )
                for migration in todo:
                    migrations.apply(conn, migration, "%s")
                # Every opening checks the append-only triggers (tether.journal.integrity).
                rows = conn.execute(integrity.POSTGRES_TRIGGERS_SQL).fetchall()
                self.trigger_problems = integrity.trigger_findings("postgres", rows)
        except psycopg.Error as exc:
            raise JournalError(f"cannot open journal {self.where}: {exc}") from None
        return current, migrations.LATEST if todo else current

    def _render(self, sql: str) -> str:
        rendered = self._sql.get(sql)
        if rendered is None:
            rendered = sql.replace("%", "%%").replace("?", "%s").replace(NOW, _NOW_SQL)
            rendered = self._sql[sql] = rendered.replace(GATED, "EXISTS (SELECT 1 FROM gate)")
        return rendered

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
            # Every connection opened up front: a pool that grows does it in a background task,
            # and a loop closing while that task connects never finishes cancelling it.
            min_size=self.pool_size,
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
            raise JournalError(f"cannot connect to journal {self.where}: {exc}") from None
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
        except _LOST_A_CONFLICT:
            raise  # a deadlock or serialization conflict: the transaction may be retried
        except psycopg.OperationalError as exc:
            raise JournalError(f"journal {self.where}: {exc}") from exc

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[_Tx]:
        async with self._connection() as conn, conn.transaction():
            yield _Tx(conn, self._render)

    async def write(self, sql: str, params: Sequence[Any] = ()) -> tuple[int, list[tuple[Any, ...]]]:
        async with self._connection() as conn:
            cursor = await conn.execute(self._render(sql), params)
            rows = await cursor.fetchall() if cursor.description else []
            return cursor.rowcount, rows

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        async with self._connection() as conn:
            return await (await conn.execute(self._render(sql), params)).fetchall()

    async def commit_batch(self, plans: list[CommitPlan], *, durable: bool) -> list[bool]:
        wait_for_flush = durable and self.durability == "normal"
        async with self._connection() as conn:
            if len(plans) == 1:  # one statement, its own transaction: one round trip
                sql, params = self._statement(plans[0], wait_for_flush=wait_for_flush)
                return [bool(await (await conn.execute(sql, params)).fetchall())]
            statements = [self._statement(plan) for plan in plans]
            try:
                async with conn.pipeline(), conn.transaction():
                    if wait_for_flush:
                        await conn.execute("SET LOCAL synchronous_commit = on")
                    cursors = [await conn.execute(sql, params) for sql, params in statements]
            except psycopg.Error:
                # Back to the pool clean, not discarded (a replacement is made in the background).
                if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    await conn.rollback()
                raise
            return [bool(await cursor.fetchall()) for cursor in cursors]

    def _statement(self, plan: CommitPlan, *, wait_for_flush: bool = False) -> tuple[str, list[Any]]:
        """A commit as one statement: its gate, then each write as a CTE conditioned on it.
        `wait_for_flush`: the statement's own transaction commits with its WAL flushed."""
        ctes = [f"gate AS ({self._render(plan.gate_sql)} RETURNING runs.run_id)"]
        if wait_for_flush:
            ctes.insert(0, "synced AS (SELECT set_config('synchronous_commit', 'on', true))")
        params: list[Any] = list(plan.gate_params)
        for write in plan.writes:
            for row in write.rows:
                ctes.append(f"w{len(ctes)} AS ({self._render(write.sql)})")
                params += row
        main = "SELECT 1 FROM gate"
        if plan.notify:  # delivered when the transaction commits
            main = "SELECT pg_notify(%s, gate.run_id) FROM gate"
            params.append(WORK_CHANNEL)
        if wait_for_flush:
            main += ", synced"
        return f"WITH {', '.join(ctes)} {main}", params

    def is_conflict(self, exc: BaseException) -> bool:
        return isinstance(exc, (psycopg.errors.IntegrityError, *_LOST_A_CONFLICT))

    async def notify(self, tx: Tx | None, run_id: str) -> None:
        """Wake idle workers when the transaction commits (never before: NOTIFY is transactional)."""
        sql, params = "SELECT pg_notify(?, ?)", (WORK_CHANNEL, run_id)
        if tx is not None:
            await tx.execute(sql, params)
        else:
            await self.write(sql, params)

    async def lock_workflow(self, tx: Tx, workflow: str) -> None:
        await tx.execute(f"SELECT pg_advisory_xact_lock({_SCHEMA_KEY}, hashtext(?))", (workflow,))

    async def prepare_to_wait(self) -> None:
        await self._listen()  # listen before looking, so no wake-up is missed after a miss

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
                    raise JournalError(f"cannot listen on journal {self.where}: {exc}") from None
                self._connections.add(conn)
                await conn.execute(f"LISTEN {WORK_CHANNEL}")
                self._listener = conn
            return self._listener

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


class _Tx:
    def __init__(self, conn: psycopg.AsyncConnection[Any], render: Callable[[str], str]) -> None:
        self._conn, self._render = conn, render

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        return (await self._conn.execute(self._render(sql), params)).rowcount

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        return await (await self._conn.execute(self._render(sql), params)).fetchall()

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if len(rows) == 1:  # the usual case: cheaper than executemany's pipeline
            await self._conn.execute(self._render(sql), rows[0])
        elif rows:
            async with self._conn.cursor() as cursor:
                await cursor.executemany(self._render(sql), rows)


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
