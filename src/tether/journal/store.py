"""One SQL store for every database: the journal's logic written once, over a dialect.

`SQLStore` decides what is read and written and what a refusal says; a `Dialect` says only
how to talk to its database: its placeholders and clock (it renders the shared SQL), its
connections and transactions, row locks, notifications and sync levels. SQLite's and
PostgreSQL's dialects are `journal/sqlite.py` and `journal/postgres.py`.

**Time is the store's.** Every time a decision depends on — a ticket's decision, expiry and
use, a lease's expiry, fencing and claims — is the store's clock (`{now}` in the SQL:
PostgreSQL's `clock_timestamp()`, SQLite's process clock read inside the store), never a
caller's. The `now=` arguments some methods still accept are ignored.

**Group commit.** `commit` puts its commit on a queue; one flusher task applies everything
queued in one transaction (one sync at FULL), in queue order, then answers each caller: a
lone commit waits one event-loop turn. On SQLite a lone commit that needs no sync is applied
at once instead (its transaction never yields to the loop, so nothing could join it). Each
commit is gated by one conditional UPDATE of its run (sequence, lease fence, the ticket it
uses, the tickets it adds): a refused commit writes nothing and fails alone, the others in
its batch apply. Its other writes run only when its gate passed. A batch that the database
fails as a whole (a constraint the gate could not foresee) is retried one commit per
transaction, so that failure too stays with its commit. A new run is queued the same way,
its insert as its gate; and a run about to take a step waits for room while a whole batch
is queued (`wait_for_room`: backpressure).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, Self

import msgspec

from tether.errors import (
    ConcurrentWriteError,
    Forbidden,
    JournalError,
    JournalTampered,
    RunNotFound,
    TicketConflict,
    TicketError,
    TicketExpired,
)
from tether.hashing import encode_json
from tether.identity import Principal, TokenInfo
from tether.journal import integrity
from tether.journal.bodies import ApprovalGiven, TicketDecided
from tether.journal.common import (
    ACTIVE_STATUSES,
    ENTRY_COLUMNS,
    ENTRY_SELECT,
    ENTRY_SELECT_LINKED,
    EXCHANGE_COLUMNS,
    GATED,
    INSERT_ENTRY,
    NOW,
    RUN_COLUMNS,
    RUN_FIELDS_SQL,
    RUN_SELECT,
    TICKET_COLUMNS,
    TICKET_SELECT,
    VALUE_NAMES,
    decided_status,
    decode_entries,
    decode_exchange,
    decode_linked,
    decode_run,
    decode_ticket,
    entry_row,
    exchange_row,
    fence_refusal,
    fence_sql,
    hash_hex,
    lease_held,
    lease_is_live,
    new_ticket_row,
    placeholders,
    run_row,
    runnable_sql,
    update_values,
    value_rows,
    when,
)
from tether.journal.integrity import Finding
from tether.journal.outbox import ENQUEUE_GATED, OutboxStore, event_row
from tether.journal.records import (
    Commit,
    Definition,
    Entry,
    ModelExchange,
    NewEntry,
    RunRecord,
    RunUpdate,
    Ticket,
    chain,
)
from tether.reasons import ReasonCode

# The reason code of a run no worker can drive (set aside by a worker: tether.worker).
STUCK_REASON = ReasonCode.NOT_DRIVABLE.value

# A run's row for listings: its input, data and facts (run_values) left out, read as empty.
_RUN_SUMMARY_SELECT = (
    "SELECT " + ", ".join("'{}'" if c in VALUE_NAMES else c for c in RUN_COLUMNS) + " FROM runs"
)
# The most commits one transaction carries; more wait for the next.
MAX_BATCH = 1000


def _gated_insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) SELECT {placeholders(len(columns))} WHERE {GATED}"


_INSERT_ENTRY_GATED = _gated_insert("entries", ENTRY_COLUMNS)
_INSERT_EXCHANGE_GATED = _gated_insert("exchanges", EXCHANGE_COLUMNS)
_INSERT_VALUE_GATED = _gated_insert("run_values", ("run_id", "name", "value"))
# A new ticket's times are the store's: created now, expiring after the lifetime the step gave.
_INSERT_TICKET_GATED = (
    f"INSERT INTO tickets ({', '.join(TICKET_COLUMNS)}) SELECT "
    + ", ".join(
        NOW if c == "created_at" else f"{NOW} + ?" if c == "expires_at" else "?" for c in TICKET_COLUMNS
    )
    + f" WHERE {GATED}"
)
_WITHDRAW = (
    f"UPDATE tickets SET status = 'withdrawn', decided_at = {NOW} "
    f"WHERE ticket_id = ? AND run_id = ? AND status = 'pending' AND {GATED}"
)
_CONSUME = f"UPDATE tickets SET status = 'consumed', consumed_at = {NOW} WHERE ticket_id = ? AND {GATED}"
# Rewritten only if it changed: an unchanged 50 MB `data` costs a comparison, not a copy.
_SET_VALUE = (
    "UPDATE run_values SET value = given.v FROM (SELECT ? AS v) AS given "
    f"WHERE run_values.run_id = ? AND run_values.name = ? AND run_values.value <> given.v AND {GATED}"
)


class Tx(Protocol):
    """Statements inside one transaction, in the shared SQL dialect."""

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> int:
        """Run a statement; return how many rows it changed."""
        ...

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    async def executemany(self, sql: str, rows: Sequence[Sequence[Any]]) -> None: ...


@dataclass
class Write:
    """One statement of a commit that runs only if the commit's gate passed, once per row."""

    sql: str
    rows: list[tuple[Any, ...]]


@dataclass
class NewRun:
    """A run to record (`create_run`), queued with the commits: its gate is its insert."""

    run: RunRecord
    entries: list[NewEntry]
    lease_seconds: float | None
    durable = False  # synced as its batch is: at FULL, or with an intent it shares it with

    @property
    def run_id(self) -> str:
        return self.run.run_id


@dataclass
class CommitPlan:
    """A commit as statements: the gate (one UPDATE of the run, or a new run's INSERT) and
    what follows it."""

    commit: Commit | NewRun
    written: list[Entry]
    gate_sql: str
    gate_params: tuple[Any, ...]
    writes: list[Write]
    # The run is released to a status a worker may claim: wake the idle workers.
    notify: bool


class Dialect(Protocol):
    where: str  # the journal's location, for messages (a URL without its password)
    store: Literal["sqlite", "postgres"]
    # The append-only triggers: the query that reads them, the statements that make them,
    # and what was wrong with them when this journal was opened (tether.journal.integrity).
    triggers_sql: str
    trigger_sql: tuple[str, ...]
    trigger_problems: list[Finding]
    durability: str
    migrated: tuple[int, int]
    row_lock: str  # appended to a SELECT of rows about to be changed
    skip_locked: str  # appended to claim's SELECT: other claimers' rows are passed over
    runs_to_claim: str  # `runs r`, read through the partial index of unfinished runs
    # A transaction that is not synced runs to its end without yielding to the event loop
    # (SQLite): a lone commit gains nothing from waiting for company, so it is applied at once.
    unsynced_commits_block: bool

    def clock(self) -> float:
        """This process's clock: the timestamps of entries (recorded, never decided on)."""
        ...

    def transaction(self) -> AbstractAsyncContextManager[Tx]: ...

    async def write(self, sql: str, params: Sequence[Any] = ()) -> tuple[int, list[tuple[Any, ...]]]:
        """One statement as its own transaction: (rows changed, rows returned)."""
        ...

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]: ...

    async def commit_batch(self, plans: list[CommitPlan], *, durable: bool) -> list[bool]:
        """Apply the plans in one transaction, in order; which gates passed. `durable`: synced
        before it returns. Raises if the database failed the transaction as a whole."""
        ...

    def is_conflict(self, exc: BaseException) -> bool:
        """A constraint refused a statement, or the transaction lost a deadlock or a
        serialization conflict: the batch is retried commit by commit."""
        ...

    async def notify(self, tx: Tx | None, run_id: str) -> None:
        """Wake idle workers (at the transaction's commit); nothing where workers poll."""
        ...

    async def lock_workflow(self, tx: Tx, workflow: str) -> None:
        """Serialize claimers of one workflow under a limit until the transaction ends."""
        ...

    async def prepare_to_wait(self) -> None:
        """Called before claim looks: a wake-up sent after a miss must not be lost."""
        ...

    async def wait_for_work(self, timeout: float) -> None: ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...


@dataclass
class StoreStats:
    """What the store did, for tests and benchmarks."""

    commits: int = 0  # commits applied or refused
    transactions: int = 0  # transactions that carried commits
    synced: int = 0  # of which synced to disk before returning (durable)
    retried_alone: int = 0  # commits retried in a transaction of their own


@dataclass
class _Queue:
    waiting: list[tuple[Commit | NewRun, asyncio.Future[list[Entry]]]] = field(default_factory=list)
    flusher: asyncio.Task[None] | None = None
    # Runs waiting for room in the queue (`wait_for_room`), woken whenever a batch leaves it.
    blocked: list[asyncio.Future[None]] = field(default_factory=list)


class SQLStore(OutboxStore):
    """The journal on any SQL database a `Dialect` speaks (see the module's docstring)."""

    def __init__(self, dialect: Dialect) -> None:
        self._d = dialect
        # (schema version found, schema version now): what opening this journal upgraded.
        self.migrated = dialect.migrated
        self.stats = StoreStats()
        self._queue = _Queue()
        # Found when the journal was opened: nothing is written while a trigger is missing.
        self.trigger_problems: list[Finding] = list(dialect.trigger_problems)
        # Signs a checkpoint after each decision (tether.audit.Auditor), when a key is set.
        self.auditor: Any = None
        self._defined: set[str] = set()  # definition hashes this store has written

    def close(self) -> None:
        self._d.close()

    async def aclose(self) -> None:
        await self._d.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- runs ------------------------------------------------------------------------

    async def create_run(
        self, run: RunRecord, entries: list[NewEntry], *, lease_seconds: float | None = None
    ) -> list[Entry]:
        """Record a new run with its first entries. With `lease_seconds` (and the record's
        `lease_owner`) the lease runs that long from the store's clock; without, the
        record's `lease_expires_at` is stored as given.

        Queued with the commits (group commit): many runs started at once share transactions,
        and wait for them holding only their record, not a connection each."""
        return await self._queued(NewRun(run, entries, lease_seconds))

    async def get_run(self, run_id: str) -> RunRecord:
        rows = await self._d.read(f"{RUN_SELECT} WHERE run_id = ?", (run_id,))
        if not rows:
            raise RunNotFound(f"no run {run_id!r} in {self._d.where}")
        return decode_run(rows[0])

    async def list_runs(
        self, status: str | None = None, limit: int = 100, *, workflow: str | None = None
    ) -> list[RunRecord]:
        filters = {"status": status, "workflow_name": workflow}
        given = {k: v for k, v in filters.items() if v is not None}
        where = ("WHERE " + " AND ".join(f"{k} = ?" for k in given)) if given else ""
        rows = await self._d.read(
            f"{RUN_SELECT} {where} ORDER BY created_at DESC, run_id DESC LIMIT ?", (*given.values(), limit)
        )
        return [decode_run(r) for r in rows]

    async def page_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        workflows: Collection[str] | None = None,
        owner: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        """Runs newest first, filtered (created in [since, until)); `after` is the
        (created_at, run_id) of the last run of the previous page: keyset pagination."""
        where: list[str] = []
        params: list[Any] = []
        for column, value in (("status", status), ("workflow_name", workflow), ("owner", owner)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if workflows is not None:  # a caller allowed only some workflows sees only theirs
            where.append(f"workflow_name IN ({placeholders(len(workflows))})" if workflows else "1 = 0")
            params += list(workflows)
        if since is not None:
            where.append("created_at >= ?")
            params.append(since)
        if until is not None:
            where.append("created_at < ?")
            params.append(until)
        if after is not None:
            where.append("(created_at < ? OR (created_at = ? AND run_id < ?))")
            params += [after[0], after[0], after[1]]
        # The page's ids are chosen first, sorting only (created_at, run_id): without an index
        # on created_at (unfiltered listings) that sorts far less than whole rows.
        order = "ORDER BY created_at DESC, run_id DESC"
        page = f"SELECT run_id FROM runs {'WHERE ' + ' AND '.join(where) if where else ''} {order} LIMIT ?"
        rows = await self._d.read(f"{_RUN_SUMMARY_SELECT} WHERE run_id IN ({page}) {order}", (*params, limit))
        return [decode_run(r) for r in rows]

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        """Several runs by id in one query, without their input, data and facts (listings)."""
        if not run_ids:
            return {}
        rows = await self._d.read(
            f"{_RUN_SUMMARY_SELECT} WHERE run_id IN ({placeholders(len(run_ids))})", list(run_ids)
        )
        return {r.run_id: r for r in map(decode_run, rows)}

    async def last_seqs(self, run_ids: Collection[str]) -> dict[str, tuple[int, str]]:
        """Each run's last entry number and status, in one query (what a watcher polls)."""
        if not run_ids:
            return {}
        rows = await self._d.read(
            f"SELECT run_id, last_seq, status FROM runs WHERE run_id IN ({placeholders(len(run_ids))})",
            list(run_ids),
        )
        return {run_id: (seq, status) for run_id, seq, status in rows}

    # -- commits ---------------------------------------------------------------------

    async def commit(self, commit: Commit) -> list[Entry]:
        """Apply `commit` whole or not at all (with whatever else is queued: group commit)."""
        return await self._queued(commit)

    async def _queued(self, commit: Commit | NewRun) -> list[Entry]:
        if self.trigger_problems:
            doing = "record a new run" if isinstance(commit, NewRun) else f"write to run {commit.run_id}"
            self._require_triggers(doing)
        loop = asyncio.get_running_loop()
        done: asyncio.Future[list[Entry]] = loop.create_future()
        queue = self._queue
        idle = queue.flusher is None
        if idle and self._d.unsynced_commits_block and not commit.durable and self._d.durability != "full":
            # Nothing to wait for and nothing to share a sync with: apply it now, in this task.
            # It cannot be interrupted half-way: the dialect does not yield once it has begun.
            await self._apply_batch([(commit, done)])
            return done.result()
        queue.waiting.append((commit, done))
        if idle:
            queue.flusher = loop.create_task(self._flush())
        return await done

    async def wait_for_room(self) -> None:
        """Return once the commit queue holds fewer than a batch of commits (at once, mostly).

        A run calls it before preparing a commit: when the runs in flight outpace the store,
        the others wait here holding what they have (a model's reply), not a step's working
        state and its commit, and the queue stays about one transaction long."""
        queue = self._queue
        # A full queue has a flusher, which wakes every waiter as it takes a batch off: each
        # looks again (a step runs to its commit without yielding, so the first to wake
        # fill the queue before the next look).
        while len(queue.waiting) >= MAX_BATCH:
            room: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            queue.blocked.append(room)
            await room

    def _make_room(self) -> None:
        blocked, self._queue.blocked = self._queue.blocked, []
        for room in blocked:
            if not room.done():  # its waiter was cancelled
                room.set_result(None)

    async def _flush(self) -> None:
        queue = self._queue
        try:
            while queue.waiting:
                batch, queue.waiting = queue.waiting[:MAX_BATCH], queue.waiting[MAX_BATCH:]
                self._make_room()
                try:
                    await self._apply_batch(batch)
                except BaseException as exc:  # cancelled (the loop is closing): nobody waits forever
                    for _, done in [*batch, *queue.waiting]:
                        _settle(done, JournalError(f"the journal stopped while committing ({exc!r})"))
                    queue.waiting = []
                    raise
        finally:
            # Gone as soon as it stops taking commits: the next commit starts a new flusher.
            queue.flusher = None
            self._make_room()

    async def _apply_batch(self, batch: list[tuple[Commit | NewRun, asyncio.Future[list[Entry]]]]) -> None:
        planned: list[tuple[CommitPlan, asyncio.Future[list[Entry]]]] = []
        for commit, done in batch:
            try:
                plan = self._plan_run(commit) if isinstance(commit, NewRun) else self._plan(commit)
                planned.append((plan, done))
            except Exception as exc:  # a value that cannot be stored: this commit's problem only
                _settle(done, exc)
        if not planned:
            return
        # Runs locked in one order by every batch and by lease renewal: no deadlock between
        # them. The sort is stable: a run's commits keep their order.
        planned.sort(key=lambda item: item[0].commit.run_id)
        self.stats.commits += sum(isinstance(p.commit, Commit) for p, _ in planned)  # runs created are not
        plans = [p for p, _ in planned]
        try:
            passed = await self._transact(plans)
        except Exception as exc:
            if not self._d.is_conflict(exc):
                for _, done in planned:
                    _settle(done, exc if isinstance(exc, JournalError) else _database_error(exc))
                return
            passed = []
            for plan, done in planned:  # find the commit the database refused; apply the others
                self.stats.retried_alone += 1
                try:
                    passed += await self._transact([plan])
                except Exception as alone:
                    _settle(done, alone if isinstance(alone, JournalError) else _database_error(alone))
                    passed.append(True)  # settled: nothing more to say about it
        for (plan, done), ok in zip(planned, passed, strict=True):
            if done.done():
                continue
            if ok:
                _settle(done, plan.written)
            else:
                _settle(done, await self._refusal(plan.commit))

    async def _transact(self, plans: list[CommitPlan]) -> list[bool]:
        durable = self._d.durability == "full" or any(p.commit.durable for p in plans)
        passed = await self._d.commit_batch(plans, durable=durable)
        self.stats.transactions += 1
        self.stats.synced += durable
        return passed

    def _plan_run(self, new: NewRun) -> CommitPlan:
        """A new run: its row inserted (the gate: refused if the run id is taken), then its
        values and first entries."""
        run = new.run
        written = chain(run.run_id, 0, run.last_hash, new.entries, run.created_at)
        row = run_row(run)
        if written:
            row |= {"last_seq": written[-1].seq, "last_hash": written[-1].hash}
        values, params = ["?"] * len(row), list(row.values())
        if new.lease_seconds is not None and run.lease_owner is not None:
            lease = list(row).index("lease_expires_at")
            values[lease], params[lease] = f"{NOW} + ?", new.lease_seconds
        gate = (
            f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join(values)}) "
            "ON CONFLICT (run_id) DO NOTHING"
        )
        writes = [
            Write(_INSERT_VALUE_GATED, value_rows(run)),
            Write(_INSERT_ENTRY_GATED, [entry_row(e) for e in written]),
        ]
        queued = run.status == "queued"  # a worker may take it on: wake the idle workers
        return CommitPlan(new, written, gate, tuple(params), [w for w in writes if w.rows], queued)

    def _plan(self, commit: Commit) -> CommitPlan:
        written = chain(
            commit.run_id, commit.expected_seq, commit.expected_hash, commit.entries, self._d.clock()
        )
        sets, values = update_values(commit.update)
        if written:
            sets |= {"last_seq": written[-1].seq, "last_hash": written[-1].hash}
        assignments = [f"{k} = ?" for k in sets]
        params: list[Any] = list(sets.values())
        assignments.append(f"updated_at = {NOW}")
        if commit.release:
            assignments += ["lease_owner = NULL", "lease_expires_at = NULL"]
        elif commit.lease_owner is not None and commit.lease_seconds is not None:
            assignments.append(f"lease_expires_at = {NOW} + ?")
            params.append(commit.lease_seconds)
        fence, fence_params = fence_sql(commit.lease_owner)
        where = f"run_id = ? AND last_seq = ? AND {fence}"
        params += [commit.run_id, commit.expected_seq, *fence_params]
        writes = [Write(_INSERT_ENTRY_GATED, [entry_row(e) for e in written])]
        if commit.new_tickets:
            ids = [t.ticket_id for t in commit.new_tickets]
            where += f" AND NOT EXISTS (SELECT 1 FROM tickets WHERE ticket_id IN ({placeholders(len(ids))}))"
            params += ids
            writes.append(Write(_INSERT_TICKET_GATED, [new_ticket_row(t) for t in commit.new_tickets]))
            # Their webhook notifications, in the same transaction (journal/outbox.py).
            opened = [
                event_row("ticket.opened", t.ticket_id, commit.run_id, t.status) for t in commit.new_tickets
            ]
            writes.append(Write(ENQUEUE_GATED, opened))
        if commit.consume is not None:
            where += (
                " AND EXISTS (SELECT 1 FROM tickets t WHERE t.ticket_id = ? AND t.run_id = runs.run_id "
                f"AND t.status = 'approved' AND t.args_hash = ? AND t.expires_at > {NOW})"
            )
            params += commit.consume
            writes.append(Write(_CONSUME, [(commit.consume[0],)]))
        if commit.withdraw is not None:
            writes.append(Write(_WITHDRAW, [(commit.withdraw, commit.run_id)]))
        if commit.exchanges:
            writes.append(Write(_INSERT_EXCHANGE_GATED, [exchange_row(x) for x in commit.exchanges]))
        if values:
            writes.append(Write(_SET_VALUE, [(v, commit.run_id, k) for k, v in values.items()]))
        # Released, and a worker may take it on (a run that pauses waits for its ticket first).
        notify = commit.release and sets.get("status", "running") in ACTIVE_STATUSES
        return CommitPlan(
            commit,
            written,
            f"UPDATE runs SET {', '.join(assignments)} WHERE {where}",
            tuple(params),
            [w for w in writes if w.rows],
            notify,
        )

    async def _refusal(self, commit: Commit | NewRun) -> Exception:
        """Why a commit's gate did not pass, read after the fact (a refused commit wrote nothing)."""
        if isinstance(commit, NewRun):
            return JournalError(f"run {commit.run_id} already exists in {self._d.where}")
        rows = await self._d.read(
            f"SELECT last_seq, lease_owner, lease_expires_at, {NOW} FROM runs WHERE run_id = ?",
            (commit.run_id,),
        )
        if not rows:
            return RunNotFound(f"no run {commit.run_id!r} in {self._d.where}")
        last_seq, holder, expires_at, now = rows[0]
        fenced = fence_refusal(commit, last_seq, holder, expires_at, now)
        if fenced is not None:
            return fenced
        if commit.new_tickets:
            ids = [t.ticket_id for t in commit.new_tickets]
            found = await self._d.read(
                f"SELECT ticket_id FROM tickets WHERE ticket_id IN ({placeholders(len(ids))})", ids
            )
            if found:
                return TicketError(f"ticket {found[0][0]} already exists")
        if commit.consume is not None:
            refused = await self._unusable(commit.run_id, *commit.consume)
            if refused is not None:
                return refused
        return ConcurrentWriteError(
            f"run {commit.run_id} changed while this commit was applied; another process is working on it"
        )

    async def _unusable(self, run_id: str, ticket_id: str, args_hash: str) -> TicketError | None:
        rows = await self._d.read(
            f"SELECT run_id, status, args_hash, expires_at, {NOW} FROM tickets WHERE ticket_id = ?",
            (ticket_id,),
        )
        if not rows:
            return TicketError(f"no ticket {ticket_id}")
        owner, status, bound_to, expires_at, now = rows[0]
        if owner != run_id:
            return TicketError(f"ticket {ticket_id} belongs to run {owner}, not {run_id}")
        if bound_to != args_hash:
            return TicketError(f"ticket {ticket_id} approves other arguments ({bound_to}), not {args_hash}")
        if status != "approved":
            return TicketError(f"ticket {ticket_id} is {status}, not approved: it cannot be used")
        if expires_at <= now:
            return TicketExpired(
                f"ticket {ticket_id} expired at {when(expires_at)} before it was used; "
                "the approval no longer holds",
                ticket_id=ticket_id,
                expires_at=expires_at,
            )
        return None

    # -- entries and exchanges -------------------------------------------------------

    async def read_entries(
        self, run_id: str, after_seq: int = 0, *, kinds: Collection[str] | None = None
    ) -> list[Entry]:
        """A run's entries after `after_seq`, in order; only those of `kinds` if given."""
        if kinds is None:
            return decode_entries(await self._d.read(ENTRY_SELECT, (run_id, after_seq)), after_seq)
        if not kinds:
            return []
        sql = f"{ENTRY_SELECT_LINKED} AND kind IN ({placeholders(len(kinds))}) ORDER BY seq"
        return decode_linked(await self._d.read(sql, (run_id, after_seq, after_seq, *kinds)), after_seq)

    async def read_last_entries(self, run_id: str, count: int = 1) -> list[Entry]:
        """A run's last `count` entries, in order (the newest last)."""
        # One more row than asked: the entry before the first gives it its link.
        rows = await self._d.read(
            f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries WHERE run_id = ? ORDER BY seq DESC LIMIT ?",
            (run_id, count + 1),
        )
        rows.reverse()
        return decode_entries(rows, rows[0][1] if len(rows) > count else 0)

    async def read_exchanges(self, run_id: str) -> list[ModelExchange]:
        rows = await self._d.read(
            f"SELECT {', '.join(EXCHANGE_COLUMNS)} FROM exchanges WHERE run_id = ? ORDER BY seq", (run_id,)
        )
        return [decode_exchange(r) for r in rows]

    async def prune_exchanges(self, before: float) -> int:
        changed, _ = await self._d.write("DELETE FROM exchanges WHERE created_at < ?", (before,))
        return changed

    # -- definitions (content-addressed: replay reads the texts runs were pinned to) ---

    async def put_definitions(self, definitions: Collection[Definition]) -> None:
        """Keep definitions by hash; one already kept is left as it is (once per hash per
        process: a run start pays nothing for a definition this store already wrote)."""
        new = [d for d in definitions if d.hash not in self._defined]
        if not new:
            return
        async with self._d.transaction() as tx:
            await tx.executemany(
                f"INSERT INTO definitions (hash, kind, body, created_at) VALUES (?, ?, ?, {NOW}) "
                "ON CONFLICT (hash) DO NOTHING",
                [(d.hash, d.kind, d.body) for d in new],
            )
        self._defined.update(d.hash for d in new)

    async def get_definition(self, hash: str) -> Definition | None:
        rows = await self._d.read("SELECT hash, kind, body FROM definitions WHERE hash = ?", (hash,))
        if not rows:
            return None
        found = Definition(rows[0][0], rows[0][1], rows[0][2])
        if not found.intact():
            raise JournalError(
                f"definition {hash[:19]}… in {self._d.where} does not hash to its key: it was edited "
                "after it was written, and is not used"
            )
        return found

    # -- tickets ---------------------------------------------------------------------

    async def get_ticket(self, ticket_id: str) -> Ticket:
        rows = await self._d.read(f"{TICKET_SELECT} WHERE ticket_id = ?", (ticket_id,))
        if not rows:
            raise TicketError(f"no ticket {ticket_id!r} in {self._d.where}")
        return decode_ticket(rows[0])

    async def list_tickets(self, status: str | None = "pending") -> list[Ticket]:
        where, params = ("WHERE status = ?", [status]) if status else ("", [])
        rows = await self._d.read(f"{TICKET_SELECT} {where} ORDER BY created_at", params)
        return [decode_ticket(r) for r in rows]

    async def decide_ticket(
        self,
        ticket_id: str,
        *,
        approve: bool,
        by: Principal | str,
        reason: str = "",
        answer: str | None = None,
        edited: tuple[dict[str, Any], str] | None = None,
        now: float | None = None,
    ) -> Ticket:
        """Approve or deny (answer) a pending ticket, before its expiry by the store's clock,
        as principal `by`, in one transaction that locks the run, then the ticket.

        The rule's separation of duties is enforced here: a ticket that forbids
        self-approval refuses the principal who started the run (`Forbidden`); one needing
        N approvals records each distinct principal's approval (`approval_given`) and is
        decided at the Nth, refusing a second approval by the same principal
        (`TicketConflict`); any denial decides it. `edited` is (arguments, their hash) an
        approver set, already checked by the caller (`Runtime.decide`): the ticket is then
        bound to them. A ticket no longer pending refuses with `TicketConflict`.
        `by` as a string (the earlier signature, used by code that opens the journal itself)
        is recorded as `Principal.legacy(by)`: a local admin, as whoever writes the database
        is. `now` is accepted for callers of the earlier signature and ignored.
        """
        if isinstance(by, str):
            by = Principal.legacy(by)
        self._require_triggers(f"decide ticket {ticket_id}")
        async with self._d.transaction() as tx:
            run, ticket, store_now = await self._locked_ticket(tx, ticket_id)
            await self._check_decidable(tx, ticket, store_now)
            if approve and ticket.forbid_self_approval and run.started_by == by.principal_id:
                raise Forbidden(
                    f"{by.describe()} started run {run.run_id}: the rule that asked forbids approving "
                    "one's own run (forbid_self_approval); another approver must decide"
                )
            args, args_hash, original = ticket.args, ticket.args_hash, ticket.original_args_hash
            if edited is not None:
                if ticket.approvals:
                    raise TicketConflict(
                        f"ticket {ticket_id} already has {ticket.approvals} approval(s) of its arguments; "
                        "an edit would void them: approve it as it is, or deny it"
                    )
                args, args_hash, original = edited[0], edited[1], ticket.args_hash
            edited_args = args if edited is not None else None
            edited_from = original if edited is not None else None
            status: str = decided_status(ticket, approve)
            count, approvers = ticket.approvals, [by.principal_id]
            entries: list[NewEntry] = []
            if approve and ticket.approvals_required > 1:
                approvers = await self._approval(tx, ticket, by, args_hash)
                count = len(approvers)
                given_entry = ApprovalGiven(
                    ticket_id=ticket_id,
                    by=by,
                    args_hash=args_hash,
                    count=count,
                    required=ticket.approvals_required,
                    reason=reason,
                    edited_args=edited_args,
                    original_args_hash=edited_from,
                )
                entries.append(NewEntry.of(given_entry, step_id=ticket.step_id, state=run.state))
                if count < ticket.approvals_required:
                    status = "pending"
            decided = status != "pending"
            await tx.execute(
                "UPDATE tickets SET status = ?, decided_at = ?, decided_by = ?, reason = ?, answer = ?, "
                "approvals = ?, args = ?, args_hash = ?, original_args_hash = ? WHERE ticket_id = ?",
                (
                    status,
                    store_now if decided else None,
                    by.principal_id if decided else None,
                    reason if decided else None,
                    answer,
                    count,
                    encode_json(args),
                    args_hash,
                    original,
                    ticket_id,
                ),
            )
            if decided:
                await self._enqueue_events(tx, "ticket.decided", ticket_id, run.run_id, status)
                record = TicketDecided(
                    ticket_id=ticket_id,
                    status=status,
                    by=by,
                    reason=reason,
                    answer=answer,
                    args_hash=args_hash,
                    approvers=approvers if ticket.approvals_required > 1 and approve else [],
                    # The arguments this ticket was edited to, by this approver or an earlier one.
                    edited_args=args if original is not None else None,
                    original_args_hash=original,
                )
                entries.append(NewEntry.of(record, step_id=ticket.step_id, state=run.state))
            written = chain(run.run_id, run.last_seq, run.last_hash, entries, store_now)
            await tx.execute(
                "UPDATE runs SET last_seq = ?, last_hash = ?, updated_at = ? WHERE run_id = ?",
                (written[-1].seq, written[-1].hash, store_now, run.run_id),
            )
            await tx.executemany(INSERT_ENTRY, [entry_row(e) for e in written])
            if decided:
                await self._d.notify(tx, run.run_id)
            rows = await tx.fetch(f"{TICKET_SELECT} WHERE ticket_id = ?", (ticket_id,))
        if self.auditor is not None:  # the decision is signed before anyone can act on it
            await self.auditor.checkpoint_run(self, run.run_id)
        return decode_ticket(rows[0])

    async def _locked_ticket(self, tx: Tx, ticket_id: str) -> tuple[RunRecord, Ticket, float]:
        """A ticket, its run and the store's clock, the run locked and then the ticket: the
        order a commit using a ticket takes them in (no deadlock between the two)."""
        found = await tx.fetch("SELECT run_id FROM tickets WHERE ticket_id = ?", (ticket_id,))
        if not found:
            raise TicketError(f"no ticket {ticket_id!r} in {self._d.where}")
        run = await self._run(tx, found[0][0], lock=True)
        rows = await tx.fetch(
            f"SELECT {', '.join(TICKET_COLUMNS)}, {NOW} FROM tickets WHERE ticket_id = ?{self._d.row_lock}",
            (ticket_id,),
        )
        return run, decode_ticket(rows[0][:-1]), rows[0][-1]

    async def _check_decidable(self, tx: Tx, ticket: Ticket, store_now: float) -> None:
        """Refuse to decide a ticket that is no longer pending (by its row or by the chain) or
        has expired by the store's clock."""
        if ticket.status != "pending":
            raise TicketConflict(f"ticket {ticket.ticket_id} is already {ticket.status}")
        await self._check_undecided(tx, ticket)
        if ticket.expires_at <= store_now:
            raise TicketExpired(
                f"ticket {ticket.ticket_id} expired at {when(ticket.expires_at)}; "
                "the run will record it as expired",
                ticket_id=ticket.ticket_id,
                expires_at=ticket.expires_at,
            )

    async def _approval(self, tx: Tx, ticket: Ticket, by: Principal, args_hash: str) -> list[str]:
        """Record `by`'s approval of a ticket needing several; return every approver so far.
        The table's key (ticket, principal) keeps them distinct even between racing deciders."""
        given = await tx.fetch(
            "SELECT principal_id FROM ticket_approvals WHERE ticket_id = ? ORDER BY created_at",
            (ticket.ticket_id,),
        )
        approvers = [r[0] for r in given]
        if by.principal_id in approvers:
            raise TicketConflict(
                f"{by.describe()} already approved ticket {ticket.ticket_id}; it needs "
                f"{ticket.approvals_required} distinct approvers"
            )
        await tx.execute(
            "INSERT INTO ticket_approvals (ticket_id, principal_id, args_hash, created_at) "
            f"VALUES (?, ?, ?, {NOW})",
            (ticket.ticket_id, by.principal_id, args_hash),
        )
        return [*approvers, by.principal_id]

    async def expire_ticket(self, ticket_id: str, now: float | None = None) -> Ticket:
        """Mark a ticket expired if its expiry has passed by the store's clock and it was not
        used (pending, or approved too late); return it. `now` is ignored."""
        async with self._d.transaction() as tx:
            expired = await tx.fetch(
                "UPDATE tickets SET status = 'expired' "
                f"WHERE ticket_id = ? AND status IN ('pending', 'approved') AND expires_at <= {NOW} "
                "RETURNING run_id",
                (ticket_id,),
            )
            if expired:
                await self._enqueue_events(tx, "ticket.expired", ticket_id, expired[0][0], "expired")
        return await self.get_ticket(ticket_id)

    # -- tokens (tether.identity) ----------------------------------------------------

    async def insert_token(self, info: TokenInfo, token_hash: str, expires_in: float | None) -> TokenInfo:
        """Store a new token (its hash only), created now and expiring `expires_in` seconds
        from now by the store's clock (None: never); return it as stored."""
        expiry = f"{NOW} + ?" if expires_in is not None else "NULL"
        params = [
            info.token_id,
            info.principal_id,
            info.name,
            info.kind,
            info.role,
            encode_json(list(info.approver_for)),
            encode_json(list(info.workflows)),
            token_hash,
        ]
        async with self._d.transaction() as tx:
            await tx.execute(
                f"INSERT INTO tokens ({', '.join(_TOKEN_COLUMNS[:7])}, token_hash, created_at, expires_at) "
                f"VALUES ({placeholders(8)}, {NOW}, {expiry})",
                params + ([expires_in] if expires_in is not None else []),
            )
            rows = await tx.fetch(f"{_TOKEN_SELECT} WHERE token_id = ?", (info.token_id,))
        return _decode_token(rows[0])

    async def find_token(self, token_hash: str) -> tuple[TokenInfo, float] | None:
        """The token with this hash and the store's now, or None."""
        rows = await self._d.read(
            f"SELECT {', '.join(_TOKEN_COLUMNS)}, {NOW} FROM tokens WHERE token_hash = ?", (token_hash,)
        )
        return (_decode_token(rows[0][:-1]), rows[0][-1]) if rows else None

    async def list_tokens(self) -> list[TokenInfo]:
        rows = await self._d.read(f"{_TOKEN_SELECT} ORDER BY created_at, token_id")
        return [_decode_token(r) for r in rows]

    async def revoke_token(self, token_id: str, by: str) -> TokenInfo:
        """Revoke a token now (store's clock); revoking it again changes nothing."""
        async with self._d.transaction() as tx:
            await tx.execute(
                f"UPDATE tokens SET revoked_at = {NOW}, revoked_by = ? "
                "WHERE token_id = ? AND revoked_at IS NULL",
                (by, token_id),
            )
            rows = await tx.fetch(f"{_TOKEN_SELECT} WHERE token_id = ?", (token_id,))
        if not rows:
            raise JournalError(f"no token {token_id!r} in {self._d.where}")
        return _decode_token(rows[0])

    async def due_tickets(self, limit: int = 100) -> list[str]:
        """Pending tickets past their deadline by the store's clock, the oldest deadline first."""
        rows = await self._d.read(
            f"SELECT ticket_id FROM tickets WHERE status = 'pending' AND expires_at <= {NOW} "
            "ORDER BY expires_at, ticket_id LIMIT ?",
            (limit,),
        )
        return [ticket_id for (ticket_id,) in rows]

    async def sweep_ticket(
        self,
        ticket_id: str,
        consequence: Callable[[Ticket, RunRecord, float], tuple[list[NewEntry], RunUpdate | None]],
    ) -> Ticket | None:
        """Expire a pending ticket whose deadline has passed (by the store's clock), in one
        transaction with what `consequence(ticket, run, now)` appends to its run (entries, and
        an update of the run's row: never its data). None, and nothing written, when it is not
        due, was decided meanwhile, or its run is leased to a live process (which settles the
        ticket itself when it resumes the run)."""
        async with self._d.transaction() as tx:
            run, ticket, store_now = await self._locked_ticket(tx, ticket_id)
            if ticket.status != "pending" or ticket.expires_at > store_now:
                return None
            if lease_is_live(run.lease_owner, run.lease_expires_at, store_now):
                return None
            await tx.execute(
                "UPDATE tickets SET status = 'expired', decided_at = ? WHERE ticket_id = ?",
                (store_now, ticket_id),
            )
            entries, update = consequence(ticket, run, store_now)
            sets, values = update_values(update)
            if values:
                raise JournalError("an expired ticket's consequence cannot change a run's data")
            written = chain(run.run_id, run.last_seq, run.last_hash, entries, store_now)
            if written:
                sets |= {"last_seq": written[-1].seq, "last_hash": written[-1].hash}
            sets["updated_at"] = store_now
            await tx.execute(
                f"UPDATE runs SET {', '.join(f'{k} = ?' for k in sets)} WHERE run_id = ?",
                (*sets.values(), run.run_id),
            )
            await tx.executemany(INSERT_ENTRY, [entry_row(e) for e in written])
            await self._d.notify(tx, run.run_id)
        return ticket.model_copy(update={"status": "expired", "decided_at": store_now})

    async def list_actionable(self, *, owner: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Runs waiting for a person to act on them (tether.operations): escalated, with an
        effect in doubt, or stuck (a run no worker can drive, set aside with a reason code);
        newest first, only those escalated to `owner` if given."""
        sql = (
            f"{RUN_SELECT} WHERE (status IN ('escalated', 'effect_in_doubt') "
            "OR (status IN ('queued', 'running') AND reason_code = ?))"
        )
        params: list[Any] = [STUCK_REASON]
        if owner is not None:
            sql += " AND owner = ?"
            params.append(owner)
        rows = await self._d.read(f"{sql} ORDER BY updated_at DESC, run_id DESC LIMIT ?", (*params, limit))
        return [decode_run(r) for r in rows]

    # -- leases ----------------------------------------------------------------------

    async def acquire(
        self, run_id: str, worker_id: str, *, lease_seconds: float, now: float | None = None
    ) -> RunRecord:
        """Lease this run to `worker_id` (renewed if it already holds it); LeaseHeld if another
        worker holds a live lease. `now` is ignored: leases run on the store's clock."""
        self._require_triggers(f"lease run {run_id}")
        async with self._d.transaction() as tx:
            rows = await tx.fetch(
                f"SELECT lease_owner, lease_expires_at, {NOW} FROM runs WHERE run_id = ?{self._d.row_lock}",
                (run_id,),
            )
            if not rows:
                raise RunNotFound(f"no run {run_id!r} in {self._d.where}")
            holder, expires_at, store_now = rows[0]
            if holder != worker_id and lease_is_live(holder, expires_at, store_now):
                raise lease_held(run_id, holder, expires_at)
            return await self._lease(tx, run_id, worker_id, lease_seconds)

    async def claim(
        self,
        worker_id: str,
        *,
        lease_seconds: float,
        now: float | None = None,
        limits: Mapping[str, int] | None = None,
        skip_runs: Collection[str] = (),
    ) -> RunRecord | None:
        """Lease the oldest runnable run to `worker_id` and return it (leased: no acquire
        needed), or None. `now` is ignored."""
        self._require_triggers("claim a run")
        await self._d.prepare_to_wait()
        limits = dict(limits or {})
        if not limits:  # one statement: the oldest runnable run, locked, leased and returned
            oldest, params = self._runnable(["r.run_id"], [], skip_runs)
            _, rows = await self._d.write(
                f"UPDATE runs SET lease_owner = ?, lease_expires_at = {NOW} + ? WHERE run_id = ({oldest}) "
                f"RETURNING {RUN_FIELDS_SQL}",
                (worker_id, lease_seconds, *params),
            )
            return decode_run(rows[0]) if rows else None
        skip: list[str] = []
        while True:
            async with self._d.transaction() as tx:
                skip += await self._workflows_at_limit(tx, limits, skip)
                oldest, params = self._runnable(["r.run_id", "r.workflow_name"], skip, skip_runs)
                rows = await tx.fetch(oldest, params)
                if not rows:
                    return None
                run_id, workflow = rows[0]
                if workflow in limits:
                    # Claimers of one limited workflow count and lease one at a time.
                    await self._d.lock_workflow(tx, workflow)
                    if await self._workflows_at_limit(tx, {workflow: limits[workflow]}, []):
                        skip.append(workflow)
                        continue
                return await self._lease(tx, run_id, worker_id, lease_seconds)

    def _runnable(
        self, columns: list[str], skip_workflows: list[str], skip_runs: Collection[str]
    ) -> tuple[str, list[Any]]:
        """The oldest runnable run's `columns`, locked (other claimers pass it over)."""
        sql = f"SELECT {', '.join(columns)} FROM {self._d.runs_to_claim} WHERE {runnable_sql('r')}"
        params: list[Any] = []
        if skip_workflows:
            sql += f" AND r.workflow_name NOT IN ({placeholders(len(skip_workflows))})"
            params += skip_workflows
        if skip_runs:
            sql += f" AND r.run_id NOT IN ({placeholders(len(skip_runs))})"
            params += skip_runs
        return f"{sql} ORDER BY r.created_at, r.run_id LIMIT 1{self._d.skip_locked}", params

    async def _workflows_at_limit(self, tx: Tx, limits: Mapping[str, int], skip: list[str]) -> list[str]:
        names = [name for name in limits if name not in skip]
        if not names:
            return []
        rows = await tx.fetch(
            "SELECT workflow_name, count(*) FROM runs WHERE lease_owner IS NOT NULL "
            f"AND lease_expires_at > {NOW} AND workflow_name IN ({placeholders(len(names))}) "
            "GROUP BY workflow_name",
            names,
        )
        counts = dict(rows)
        return [name for name in names if counts.get(name, 0) >= limits[name]]

    async def _lease(self, tx: Tx, run_id: str, worker_id: str, lease_seconds: float) -> RunRecord:
        rows = await tx.fetch(
            f"UPDATE runs SET lease_owner = ?, lease_expires_at = {NOW} + ? WHERE run_id = ? "
            f"RETURNING {RUN_FIELDS_SQL}",
            (worker_id, lease_seconds, run_id),
        )
        return decode_run(rows[0])

    async def heartbeat(
        self, run_id: str, worker_id: str, *, lease_seconds: float, now: float | None = None
    ) -> bool:
        """Renew the lease if `worker_id` still holds it; False if it was lost. `now` is ignored."""
        changed, _ = await self._d.write(
            f"UPDATE runs SET lease_expires_at = {NOW} + ? WHERE run_id = ? AND lease_owner = ?",
            (lease_seconds, run_id, worker_id),
        )
        return changed == 1

    async def renew_leases(self, worker_id: str, *, lease_seconds: float) -> set[str]:
        """Renew every lease `worker_id` holds, in one statement; the runs it still holds."""
        # Rows locked in run-id order, as batches of commits lock them.
        _, rows = await self._d.write(
            f"UPDATE runs SET lease_expires_at = {NOW} + ? WHERE run_id IN (SELECT run_id FROM runs "
            f"WHERE lease_owner = ? ORDER BY run_id{self._d.row_lock}) RETURNING run_id",
            (lease_seconds, worker_id),
        )
        return {run_id for (run_id,) in rows}

    async def release(self, run_id: str, worker_id: str) -> None:
        """Give the lease up (if `worker_id` holds it): the run is claimable at once."""
        _, rows = await self._d.write(
            "UPDATE runs SET lease_owner = NULL, lease_expires_at = NULL "
            f"WHERE run_id = ? AND lease_owner = ? RETURNING {runnable_sql('runs')}",
            (run_id, worker_id),
        )
        if rows and rows[0][0]:
            await self._d.notify(None, run_id)

    async def prepare_to_wait(self) -> None:
        """Listen for wake-ups from now on (a wake-up sent after the caller's next look is kept)."""
        await self._d.prepare_to_wait()

    async def wait_for_work(self, timeout: float) -> None:
        """Return when work may have appeared (a queued run, a decided ticket, a released
        run), or after `timeout` seconds; may return early."""
        await self._d.wait_for_work(timeout)

    # -- audit: the chain is the truth (tether.journal.integrity, tether.audit) ----------

    def _require_triggers(self, doing: str) -> None:
        if self.trigger_problems:
            raise JournalTampered(self.trigger_problems, doing=doing)

    async def _check_undecided(self, tx: Tx, ticket: Ticket) -> None:
        """A pending ticket about to be decided is decided nowhere in its run's chain yet: a
        decided ticket set back to pending by hand is refused, not decided twice."""
        rows = await tx.fetch(
            f"{ENTRY_SELECT_LINKED} AND kind = 'ticket_decided' ORDER BY seq", (ticket.run_id, 0, 0)
        )
        decided = integrity.derive(decode_linked(rows, 0)).decided.get(ticket.ticket_id, [])
        final = [d for d in decided if d[2].status in integrity.FINAL_DECISIONS]
        if final:
            seq, _, record = final[0]
            finding = Finding(
                "row_disagrees",
                f"ticket {ticket.ticket_id}: pending, but the chain records it {record.status} at seq {seq}",
                ticket.run_id,
                seq,
            )
            raise JournalTampered([finding], doing=f"decide ticket {ticket.ticket_id}")

    async def check_triggers(self) -> list[Finding]:
        """The append-only triggers as the database has them now."""
        return integrity.trigger_findings(self._d.store, await self._d.read(self._d.triggers_sql))

    async def restore_triggers(self) -> list[Finding]:
        """Make the append-only triggers again (after `tether audit verify` found the chains
        sound): what was wrong before."""
        before = await self.check_triggers()
        async with self._d.transaction() as tx:
            if self._d.store == "postgres":
                for table in ("entries", "checkpoints"):
                    for name in ("no_update_or_delete", "no_truncate"):
                        await tx.execute(f"DROP TRIGGER IF EXISTS {table}_{name} ON {table}")
            else:
                for name in (
                    "entries_no_update",
                    "entries_no_delete",
                    "checkpoints_no_update",
                    "checkpoints_no_delete",
                ):
                    await tx.execute(f"DROP TRIGGER IF EXISTS {name}")
            for sql in self._d.trigger_sql:
                await tx.execute(sql)
        self.trigger_problems = await self.check_triggers()
        return before

    async def add_checkpoint(
        self,
        kind: str,
        run_id: str | None,
        seq: int | None,
        hash_: str | None,
        body: str,
        key_id: str,
        signature: str,
    ) -> None:
        """Store a signed checkpoint (append-only, like the entries)."""
        self._require_triggers("store a checkpoint")
        await self._d.write(
            "INSERT INTO checkpoints (kind, run_id, seq, hash, body, key_id, signature, created_at) "
            f"VALUES (?, ?, ?, ?, ?, ?, ?, {NOW})",
            (kind, run_id, seq, hash_, body, key_id, signature),
        )

    async def read_checkpoints(
        self, run_id: str | None = None, *, kind: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Stored checkpoints, oldest first: (id, kind, run_id, seq, hash, body, key_id,
        signature, created_at); a run's only, or one kind's only, if given."""
        where, params = [], []
        if run_id is not None:
            where.append("run_id = ?")
            params.append(run_id)
        if kind is not None:
            where.append("kind = ?")
            params.append(kind)
        clause = f" WHERE {' AND '.join(where)}" if where else ""
        return await self._d.read(
            "SELECT id, kind, run_id, seq, hash, body, key_id, signature, created_at "
            f"FROM checkpoints{clause} ORDER BY id",
            params,
        )

    async def run_tickets(self, run_id: str) -> list[Ticket]:
        """Every ticket row of a run, oldest first."""
        rows = await self._d.read(f"{TICKET_SELECT} WHERE run_id = ? ORDER BY created_at", (run_id,))
        return [decode_ticket(r) for r in rows]

    async def run_heads(self) -> list[tuple[str, int, str]]:
        """Every run's head as its chain has it: (run_id, last seq, its hash), by run id."""
        rows = await self._d.read(
            "SELECT e.run_id, e.seq, e.hash FROM entries e JOIN "
            "(SELECT run_id, max(seq) AS seq FROM entries GROUP BY run_id) m "
            "ON m.run_id = e.run_id AND m.seq = e.seq ORDER BY e.run_id"
        )
        return [(r, int(s), hash_hex(h)) for r, s, h in rows]

    async def run_ids(self) -> list[str]:
        """Every run's id, in the rows and in the chains."""
        rows = await self._d.read(
            "SELECT run_id FROM runs UNION SELECT DISTINCT run_id FROM entries ORDER BY 1"
        )
        return [r for (r,) in rows]

    # -- helpers ---------------------------------------------------------------------

    async def now(self) -> float:
        """The store's clock, in seconds since the epoch: the time a policy's `now` is."""
        rows = await self._d.read(f"SELECT {NOW}")
        return float(rows[0][0])

    async def _run(self, tx: Tx, run_id: str, *, lock: bool = False) -> RunRecord:
        rows = await tx.fetch(
            f"{RUN_SELECT} WHERE run_id = ?" + (self._d.row_lock if lock else ""), (run_id,)
        )
        if not rows:
            raise RunNotFound(f"no run {run_id!r} in {self._d.where}")
        return decode_run(rows[0])


_TOKEN_COLUMNS = (
    "token_id",
    "principal_id",
    "name",
    "kind",
    "role",
    "approver_for",
    "workflows",
    "created_at",
    "expires_at",
    "revoked_at",
    "revoked_by",
)
_TOKEN_SELECT = f"SELECT {', '.join(_TOKEN_COLUMNS)} FROM tokens"


def _decode_token(row: tuple[Any, ...]) -> TokenInfo:
    values = dict(zip(_TOKEN_COLUMNS, row, strict=True))
    for k in ("approver_for", "workflows"):
        values[k] = tuple(json.loads(values[k]))
    return msgspec.convert(values, TokenInfo)


def _settle(done: asyncio.Future[list[Entry]], outcome: list[Entry] | BaseException) -> None:
    if done.done():  # its caller was cancelled; the commit itself was applied or refused
        return
    if isinstance(outcome, BaseException):
        done.set_exception(outcome)
    else:
        done.set_result(outcome)


def _database_error(exc: Exception) -> JournalError:
    error = JournalError(f"the database refused the commit: {exc}")
    error.__cause__ = exc
    return error
