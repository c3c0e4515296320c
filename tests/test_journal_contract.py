"""One contract, every store: each test runs against SQLite and against PostgreSQL.

PostgreSQL is `$TETHER_TEST_PG` (default postgresql://postgres@127.0.0.1:5432/test), one
fresh schema per test, dropped afterwards. Unreachable, its tests are skipped, except
under CI=true, where they fail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import secrets
import sqlite3
import sys
import time
from collections.abc import Callable, Coroutine, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import msgspec
import pytest
from msgspec import UNSET
from typer.testing import CliRunner

from tether.cli import db as db_cli
from tether.errors import ConcurrentWriteError, JournalError, RunNotFound, TicketError
from tether.hashing import encode_json
from tether.journal import (
    Commit,
    Journal,
    LeaseHeld,
    ModelExchange,
    NewEntry,
    RunRecord,
    RunUpdate,
    Ticket,
    integrity,
    migrations,
    open_journal,
    upgrade_journal,
    verify_chain,
)
from tether.journal.records import GENESIS_HASH, Entry, chain

T = TypeVar("T")
PG_URL = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def raw_entry(kind: str, body: Any, *, step_id: str | None = None, state: str | None = None) -> NewEntry:
    """An entry of any kind and body: the store keeps and hashes the text it is given."""
    return NewEntry(kind, encode_json(body), step_id, state)


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


# -- the stores ----------------------------------------------------------------------


@dataclass
class Store:
    """Where a journal lives, and a back door to its database for what tether must refuse."""

    kind: str
    target: str
    path: Path | None = None
    opened: list[Journal] = field(default_factory=list)

    @property
    def ph(self) -> str:
        return "?" if self.kind == "sqlite" else "%s"

    def open(self, **kw: Any) -> Journal:
        journal = open_journal(self.target, **kw)
        self.opened.append(journal)
        return journal

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """One statement on a connection of the database's own driver, committed."""
        if self.kind == "sqlite":
            db = sqlite3.connect(str(self.path), isolation_level=None)
            try:
                return db.execute(sql, params).fetchall()
            finally:
                db.close()
        import psycopg

        with psycopg.connect(self.target, autocommit=True) as conn:
            cursor = conn.execute(sql, params)
            return cursor.fetchall() if cursor.description else []

    def size(self) -> int:
        """Bytes the journal's tables take (SQLite: the file, after a WAL checkpoint)."""
        if self.kind == "sqlite":
            self.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            assert self.path is not None
            return self.path.stat().st_size
        rows = self.execute(
            "SELECT sum(pg_total_relation_size(to_regclass(t))) "
            "FROM unnest(array['runs', 'run_values', 'entries', 'tickets']) t"
        )
        return int(rows[0][0])

    def written(self) -> int:
        """Bytes on disk without folding the WAL back (SQLite: the file and its WAL)."""
        if self.kind == "postgres":
            return self.size()
        assert self.path is not None
        wal = self.path.with_name(self.path.name + "-wal")
        return self.path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)

    def close(self) -> None:
        for journal in self.opened:
            journal.close()


@pytest.fixture(scope="session")
def postgres_url() -> str:
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:
        message = f"PostgreSQL not reachable at {PG_URL} ({exc}); set TETHER_TEST_PG to a URL"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return PG_URL


def with_schema(url: str, schema: str) -> str:
    return f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}"


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Store]:
    if request.param == "sqlite":
        path = tmp_path / "journal.db"
        sqlite_store = Store("sqlite", str(path), path)
        yield sqlite_store
        sqlite_store.close()
        return
    import psycopg

    base = request.getfixturevalue("postgres_url")
    schema = "tether_test_" + secrets.token_hex(6)
    with psycopg.connect(base, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    pg_store = Store("postgres", with_schema(base, schema))
    try:
        yield pg_store
    finally:
        pg_store.close()
        with psycopg.connect(base, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture
def journal(store: Store) -> Journal:
    return store.open()


# -- records to write ------------------------------------------------------------------

NOW = time.time()


def record(
    run_id: str, *, status: str = "queued", workflow: str = "w", age: float = 0.0, ref: str = "tests"
) -> RunRecord:
    """A run last touched `age` seconds ago (claim takes the oldest first)."""
    at = NOW - 1000 - age
    return RunRecord(
        run_id=run_id,
        workflow_name=workflow,
        workflow_version="1",
        workflow_hash="sha256:wf",
        workflow_ref=ref,
        policy_hash="sha256:policy",
        status=status,  # type: ignore[arg-type]
        state="start",
        input={"order": "A1"},
        checkpoint={"steps": 0},
        created_at=at,
        updated_at=at,
    )


def ticket(ticket_id: str, run_id: str, *, kind: str = "approval", expires_in: float = 3600) -> Ticket:
    return Ticket(
        ticket_id=ticket_id,
        run_id=run_id,
        step_id="s1",
        kind=kind,  # type: ignore[arg-type]
        subject="refund 80",
        args={"amount": 80.0},
        args_hash="sha256:args",
        approver="supervisor",
        created_at=time.time(),
        expires_at=time.time() + expires_in,
    )


async def start(j: Journal, run_id: str, **kw: Any) -> RunRecord:
    await j.create_run(record(run_id, **kw), [raw_entry("run_started", {"input": {"order": "A1"}})])
    return await j.get_run(run_id)


async def step(j: Journal, run: RunRecord, body: dict[str, Any] | None = None, **kw: Any) -> RunRecord:
    await j.commit(
        Commit(
            run_id=run.run_id,
            expected_seq=run.last_seq,
            expected_hash=run.last_hash,
            entries=[raw_entry("step", body or {"n": run.last_seq}, step_id="s1", state=run.state)],
            **kw,
        )
    )
    return await j.get_run(run.run_id)


async def pause_on(j: Journal, run: RunRecord, t: Ticket, **kw: Any) -> RunRecord:
    """What the runtime writes when a step asks for approval: the ticket, and a paused run."""
    checkpoint = {**run.checkpoint, "pending": {"ticket_id": t.ticket_id, "step_id": t.step_id}}
    return await step(j, run, new_tickets=[t], update=RunUpdate(status="paused", checkpoint=checkpoint), **kw)


def expire_lease(store: Store, run_id: str) -> None:
    """Move a run's lease a minute into the past, as if its holder had stopped renewing it."""
    ph = store.ph
    store.execute(f"UPDATE runs SET lease_expires_at = {ph} WHERE run_id = {ph}", (time.time() - 60, run_id))


def leased_for(r: RunRecord, seconds: float) -> bool:
    """The run's lease ends `seconds` from now by the store's clock (this machine's, here)."""
    return r.lease_expires_at is not None and abs(r.lease_expires_at - (time.time() + seconds)) < 5


# -- runs, commits and the chain -------------------------------------------------------


def test_runs_are_created_and_read_back(journal: Journal) -> None:
    async def scenario() -> None:
        written = await journal.create_run(
            record("r1", status="running", age=1),
            [raw_entry("run_started", {"é": 0.1}, state="start")],
        )
        await start(journal, "r2", workflow="other")
        got = await journal.get_run("r1")
        assert got.model_dump(exclude={"last_seq", "last_hash"}) == record(
            "r1", status="running", age=1
        ).model_dump(exclude={"last_seq", "last_hash"})
        assert (got.last_seq, got.last_hash) == (1, written[0].hash)
        assert [r.run_id for r in await journal.list_runs()] == ["r2", "r1"]  # newest first
        assert [r.run_id for r in await journal.list_runs(status="running")] == ["r1"]
        assert [r.run_id for r in await journal.list_runs(workflow="other")] == ["r2"]
        assert len(await journal.list_runs(limit=1)) == 1
        with pytest.raises(RunNotFound):
            await journal.get_run("nope")
        with pytest.raises(JournalError, match="run r1 already exists"):
            await journal.create_run(record("r1"), [])
        assert await journal.get_run("r1") == got

    run(scenario())


def test_commits_extend_a_hash_chain_over_the_exact_stored_text(journal: Journal) -> None:
    body = {
        "text": "kettle arrived broken — ünïcode",
        "amount": 0.1,
        "big": 2**60,
        "nested": {"b": [1, None]},
    }

    async def scenario() -> None:
        r = await start(journal, "r1")
        for i in range(3):
            r = await step(journal, r, {**body, "i": i}, update=RunUpdate(data={"i": i}), durable=i == 1)
        entries = await journal.read_entries("r1")
        assert [e.seq for e in entries] == [1, 2, 3, 4]
        assert verify_chain(entries) == []
        assert entries[-1].hash == r.last_hash and r.data == {"i": 2}
        assert msgspec.json.decode(entries[2].body_json) == {**body, "i": 1}
        assert entries[2].body_json == encode_json({**body, "i": 1})
        assert [e.seq for e in await journal.read_entries("r1", after_seq=2)] == [3, 4]

    run(scenario())


def test_entries_are_read_by_kind_and_from_the_end(journal: Journal) -> None:
    async def scenario() -> None:
        r = await start(journal, "r1")
        for kind in ("intent", "step", "note", "step"):
            await journal.commit(
                Commit(
                    run_id="r1",
                    expected_seq=r.last_seq,
                    expected_hash=r.last_hash,
                    entries=[raw_entry(kind, {"kind": kind})],
                )
            )
            r = await journal.get_run("r1")
        everything = await journal.read_entries("r1")
        assert [e.kind for e in everything] == ["run_started", "intent", "step", "note", "step"]
        assert [e.seq for e in await journal.read_entries("r1", kinds={"step"})] == [3, 5]
        later = await journal.read_entries("r1", after_seq=3, kinds=["step", "note"])
        assert [e.seq for e in later] == [4, 5]
        assert await journal.read_entries("r1", kinds=()) == []
        assert await journal.read_last_entries("r1") == everything[-1:]
        assert await journal.read_last_entries("r1", 3) == everything[-3:]  # oldest first
        assert await journal.read_last_entries("r1", 99) == everything
        assert await journal.read_last_entries("nope") == []

    run(scenario())


def test_a_stale_commit_is_refused_and_changes_nothing(journal: Journal) -> None:
    async def scenario() -> None:
        r = await step(journal, await start(journal, "r1"))
        await pause_on(journal, await journal.get_run("r1"), ticket("t0", "r1"))
        before = await journal.get_run("r1")
        stale = Commit(
            run_id="r1",
            expected_seq=r.last_seq,  # one behind
            expected_hash=r.last_hash,
            entries=[raw_entry("note", {"x": 1})],
            update=RunUpdate(status="failed"),
            new_tickets=[ticket("t1", "r1")],
        )
        with pytest.raises(ConcurrentWriteError, match=r"moved on .* another process is working on it"):
            await journal.commit(stale)
        assert await journal.get_run("r1") == before
        assert len(await journal.read_entries("r1")) == before.last_seq
        assert [t.ticket_id for t in await journal.list_tickets()] == ["t0"]
        with pytest.raises(RunNotFound):
            await journal.commit(msgspec.structs.replace(stale, run_id="nope"))

    run(scenario())


def exchange(run_id: str, seq: int, *, age: float = 0.0, **kw: Any) -> ModelExchange:
    values: dict[str, Any] = {
        "run_id": run_id,
        "seq": seq,
        "step_id": f"s{seq}",
        "state": "resolve",
        "model": "openai:small",
        "created_at": time.time() - age,
        "output": {"kind": "tool_call", "tool": "lookup", "args": {"id": "A1"}},
        "usage": {"input_tokens": 120, "output_tokens": 9, "cost": 0.0},
        "request": {"messages": [{"role": "user", "content": "ünïcode — look A1 up"}]},
        "attempts": [{"number": 1, "seconds": 0.2, "reason_code": "model_rate_limited"}, {"number": 2}],
    }
    return ModelExchange(**values | kw)


def test_model_exchanges_are_written_with_their_step_and_pruned_on_their_own(journal: Journal) -> None:
    async def scenario() -> None:
        r = await step(journal, await start(journal, "r1"), exchanges=[exchange("r1", 1, age=100)])
        r = await step(
            journal,
            r,
            exchanges=[exchange("r1", 2, error="overloaded", reason_code="model_unavailable", output=None)],
        )
        got = await journal.read_exchanges("r1")
        assert [x.seq for x in got] == [1, 2]
        assert got[0] == exchange("r1", 1).model_copy(update={"created_at": got[0].created_at})
        assert (got[1].reason_code, got[1].output) == ("model_unavailable", None)
        # A refused commit writes none of its exchanges.
        stale = Commit(run_id="r1", expected_seq=1, expected_hash=GENESIS_HASH, exchanges=[exchange("r1", 3)])
        with pytest.raises(ConcurrentWriteError):
            await journal.commit(stale)
        assert [x.seq for x in await journal.read_exchanges("r1")] == [1, 2]
        # Retention removes old exchanges only; the hash-chained entries stay whole.
        entries = await journal.read_entries("r1")
        assert await journal.prune_exchanges(before=time.time() - 50) == 1
        assert [x.seq for x in await journal.read_exchanges("r1")] == [2]
        assert await journal.read_entries("r1") == entries and verify_chain(entries) == []
        assert await journal.read_exchanges("nope") == []

    run(scenario())


def test_entries_are_append_only_in_the_database_itself(store: Store, journal: Journal) -> None:
    run(step(journal, run(start(journal, "r1"))))
    error: Any = sqlite3.IntegrityError
    if store.kind == "postgres":
        import psycopg

        error = psycopg.errors.IntegrityError
    ph = store.ph
    with pytest.raises(error, match="append-only"):
        store.execute(f"UPDATE entries SET body = '{{}}' WHERE run_id = {ph}", ("r1",))
    with pytest.raises(error, match="append-only"):
        store.execute(f"DELETE FROM entries WHERE run_id = {ph}", ("r1",))
    if store.kind == "postgres":
        with pytest.raises(error, match="append-only"):
            store.execute("TRUNCATE entries")
    assert verify_chain(run(journal.read_entries("r1"))) == []


# -- tickets ---------------------------------------------------------------------------


def test_a_ticket_is_decided_once_and_used_once_for_its_own_arguments(journal: Journal) -> None:
    async def scenario() -> None:
        r = await pause_on(journal, await start(journal, "r1"), ticket("t1", "r1"))
        decided = await journal.decide_ticket("t1", approve=True, by="sam", reason="ok")
        assert (decided.status, decided.decided_by, decided.reason) == ("approved", "local:sam", "ok")
        with pytest.raises(TicketError, match="already approved"):
            await journal.decide_ticket("t1", approve=False, by="eve")
        entries = await journal.read_entries("r1")
        assert entries[-1].kind == "ticket_decided" and entries[-1].body.status == "approved"  # type: ignore[union-attr]
        assert verify_chain(entries) == []

        r = await journal.get_run("r1")
        with pytest.raises(TicketError, match="approves other arguments"):
            await step(journal, r, consume=("t1", "sha256:other"), update=RunUpdate(status="running"))
        assert await journal.get_run("r1") == r  # nothing of that commit was applied
        r = await step(journal, r, consume=("t1", "sha256:args"), update=RunUpdate(status="running"))
        used = await journal.get_ticket("t1")
        assert used.status == "consumed" and used.consumed_at is not None
        with pytest.raises(TicketError, match="is consumed, not approved"):
            await step(journal, r, consume=("t1", "sha256:args"))
        with pytest.raises(TicketError, match="no ticket"):
            await step(journal, r, consume=("t9", "sha256:args"))
        with pytest.raises(TicketError, match="no ticket"):
            await journal.get_ticket("t9")
        # An approval is used by the run it was asked for, never by another.
        other = await pause_on(journal, await start(journal, "r2"), ticket("t2", "r2"))
        await journal.decide_ticket("t2", approve=True, by="sam")
        r = await journal.get_run("r1")
        with pytest.raises(TicketError, match="ticket t2 belongs to run r2, not r1"):
            await step(journal, r, consume=("t2", "sha256:args"))
        assert (await journal.get_ticket("t2")).status == "approved"
        await step(journal, await journal.get_run(other.run_id), consume=("t2", "sha256:args"))

        await pause_on(journal, await journal.get_run("r1"), ticket("q1", "r1", kind="question"))
        answered = await journal.decide_ticket("q1", approve=True, by="sam", answer="yes")
        assert (answered.status, answered.answer) == ("answered", "yes")
        assert [t.ticket_id for t in await journal.list_tickets(status=None)] == ["t1", "t2", "q1"]
        assert await journal.list_tickets() == []
        with pytest.raises(TicketError, match="ticket q1 already exists"):
            await step(journal, await journal.get_run("r1"), new_tickets=[ticket("q1", "r1")])

    run(scenario())


def test_an_expired_ticket_cannot_be_decided(journal: Journal) -> None:
    async def scenario() -> None:
        await pause_on(journal, await start(journal, "r1"), ticket("t1", "r1", expires_in=-1))
        with pytest.raises(TicketError, match="expired"):
            await journal.decide_ticket("t1", approve=True, by="sam")
        assert (await journal.get_ticket("t1")).status == "pending"
        assert (await journal.expire_ticket("t1", time.time())).status == "expired"
        with pytest.raises(TicketError, match="already expired"):
            await journal.decide_ticket("t1", approve=True, by="sam")

    run(scenario())


# -- group commit ----------------------------------------------------------------------


def test_more_runs_at_once_than_a_batch_or_the_pool_all_start_wait_and_complete(
    store: Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Many runs started at once on two connections, five commits to a transaction: their
    creates share transactions with the commits, runs past a full queue wait for room, and
    every run completes, each with its own whole chain."""
    from tether import AgentState, Runtime, Terminal, Workflow, tool
    from tether.journal import store as sql_store
    from tether.models import FunctionModel

    monkeypatch.setattr(sql_store, "MAX_BATCH", 5)
    journal = store.open(pool_size=2) if store.kind == "postgres" else store.open()

    @tool(effect="read")
    def look(i: int) -> int:
        """Looks an item up."""
        return i * 2

    async def propose(ctx: Any) -> dict[str, Any]:
        await asyncio.sleep(0.01)  # a model: every run is in its call at once
        if ctx.proposals_made < 2:
            return {"kind": "tool_call", "tool": "look", "args": {"i": ctx.proposals_made}}
        return {"kind": "finish", "update": {"looked": ctx.proposals_made}}

    wf = Workflow("w", "1", "a", [AgentState("a", "Look.", (look,), {"finish": "end"}), Terminal("end")])
    runtime = Runtime(journal)

    async def scenario() -> list[Any]:
        return await asyncio.gather(*(runtime.start(wf, FunctionModel(propose)) for _ in range(60)))

    results = run(scenario())

    assert [(r.status, r.data) for r in results] == [("completed", {"looked": 2})] * 60
    assert len({r.run_id for r in results}) == 60
    for r in results:
        entries = run(journal.read_entries(r.run_id))
        assert [e.kind for e in entries][:1] == ["run_started"] and verify_chain(entries) == []


def test_concurrent_commits_of_many_runs_share_transactions_and_keep_each_runs_order(store: Store) -> None:
    journal = store.open(durability="full")  # every commit synced: what group commit is for

    async def drive(run_id: str, steps: int) -> None:
        r = await start(journal, run_id)
        for i in range(steps):
            r = await step(journal, r, {"i": i}, update=RunUpdate(data={"i": i}), durable=i == 2)

    async def scenario() -> None:
        before = dataclasses.replace(journal.stats)
        await asyncio.gather(*(drive(f"r{n:02}", 6) for n in range(40)))
        commits = journal.stats.commits - before.commits
        transactions = journal.stats.transactions - before.transactions
        assert commits == 40 * 6
        assert transactions <= commits / 4, (commits, transactions)
        for n in range(40):
            entries = await journal.read_entries(f"r{n:02}")
            bodies = [msgspec.json.decode(e.body_json) for e in entries[1:]]
            assert [b.get("i") for b in bodies] == list(range(6)) and verify_chain(entries) == []
            assert (await journal.get_run(f"r{n:02}")).data == {"i": 5}

        # Two commits of one run queued together: the first applies, the second (stale) fails.
        runs = [await journal.get_run(f"r{n:02}") for n in range(40)]
        outcomes = await asyncio.gather(
            *(step(journal, r, {"first": True}) for r in runs),
            *(step(journal, r, {"second": True}) for r in runs),
            return_exceptions=True,
        )
        assert all(isinstance(o, RunRecord) for o in outcomes[:40])
        assert all(isinstance(o, ConcurrentWriteError) for o in outcomes[40:])
        for r in runs:
            last = await journal.read_last_entries(r.run_id)
            assert [msgspec.json.decode(e.body_json) for e in last] == [{"first": True}]

    run(scenario())


def test_a_commit_refused_in_a_batch_fails_alone(store: Store) -> None:
    journal = store.open(durability="full")

    async def scenario() -> None:
        good = [await start(journal, f"good{n}") for n in range(5)]
        stale = await step(journal, await start(journal, "stale"))
        fenced = await journal.acquire((await start(journal, "fenced")).run_id, "w1", lease_seconds=60)
        paused = await pause_on(journal, await start(journal, "paused"), ticket("t1", "paused"))
        await journal.decide_ticket("t1", approve=True, by="sam")
        paused = await journal.get_run("paused")
        dup = await start(journal, "dup")
        before = {r.run_id: r for r in await journal.list_runs()}
        batches = journal.stats.transactions

        outcomes = await asyncio.gather(
            *(step(journal, r, update=RunUpdate(data={"ok": True})) for r in good[:3]),
            journal.commit(Commit(run_id="stale", expected_seq=1, expected_hash=GENESIS_HASH)),
            step(journal, fenced, lease_owner="w2", update=RunUpdate(status="failed")),
            step(journal, paused, consume=("t1", "sha256:other"), update=RunUpdate(status="running")),
            step(journal, dup, new_tickets=[ticket("t1", "dup")], exchanges=[exchange("dup", 1)]),
            step(journal, stale, update=RunUpdate(data={"ok": True})),
            *(step(journal, r, update=RunUpdate(data={"ok": True})) for r in good[3:]),
            return_exceptions=True,
        )
        assert journal.stats.transactions == batches + 1  # one transaction carried them all
        refused = outcomes[3:7]
        assert isinstance(refused[0], ConcurrentWriteError) and "moved on" in str(refused[0])
        assert isinstance(refused[1], LeaseHeld) and "not to w2" in str(refused[1])
        assert isinstance(refused[2], TicketError) and "approves other arguments" in str(refused[2])
        assert isinstance(refused[3], TicketError) and "ticket t1 already exists" in str(refused[3])
        for run_id in ("fenced", "paused", "dup"):
            assert await journal.get_run(run_id) == before[run_id]  # nothing of a refused commit
        assert (await journal.get_ticket("t1")).status == "approved"
        assert await journal.read_exchanges("dup") == []
        applied = [o for i, o in enumerate(outcomes) if i not in range(3, 7)]
        assert all(isinstance(o, RunRecord) and o.data == {"ok": True} for o in applied), applied
        assert [e.seq for e in await journal.read_entries("stale")] == [1, 2, 3]

    run(scenario())


def test_a_commit_the_database_refuses_is_retried_alone_and_fails_alone(store: Store) -> None:
    journal = store.open(durability="full")

    async def scenario() -> None:
        runs = [await start(journal, f"r{n}") for n in range(4)]
        taken = await step(journal, runs[0], exchanges=[exchange("r0", 1)])
        retried = journal.stats.retried_alone
        outcomes = await asyncio.gather(
            step(journal, runs[1]),
            step(journal, taken, exchanges=[exchange("r0", 1)]),  # exchange 1 is already stored
            step(journal, runs[2]),
            step(journal, runs[3]),
            return_exceptions=True,
        )
        assert isinstance(outcomes[1], JournalError) and "refused the commit" in str(outcomes[1])
        assert await journal.get_run("r0") == taken
        assert all(isinstance(o, RunRecord) and o.last_seq == 2 for i, o in enumerate(outcomes) if i != 1)
        assert journal.stats.retried_alone == retried + 4

    run(scenario())


def test_lease_renewal_and_a_batch_of_commits_never_deadlock(store: Store) -> None:
    journal, renewer = store.open(durability="full"), store.open()

    async def scenario() -> None:
        runs = []
        for n in range(30):
            r = await start(journal, f"r{n:02}")
            runs.append(await journal.acquire(r.run_id, "w1", lease_seconds=30))
        for _ in range(10):

            async def renew() -> set[str]:
                for _ in range(5):
                    held = await renewer.renew_leases("w1", lease_seconds=30)
                return held

            # Queued in the reverse of the order renewal meets the rows: locks taken in
            # opposite orders would deadlock, and a lost deadlock fails a whole batch.
            outcomes = await asyncio.gather(
                renew(), *(step(journal, r, lease_owner="w1", lease_seconds=30) for r in reversed(runs))
            )
            assert outcomes[0] == {r.run_id for r in runs}
            runs = list(reversed(outcomes[1:]))

    run(scenario())


# -- leases ----------------------------------------------------------------------------


def test_commits_are_fenced_by_the_runs_lease(store: Store, journal: Journal) -> None:
    async def scenario() -> None:
        r = await start(journal, "r1")
        r = await journal.acquire("r1", "w1", lease_seconds=30)
        assert r.lease_owner == "w1"

        r = await step(journal, r, lease_owner="w1", lease_seconds=120)
        assert r.lease_owner == "w1" and r.lease_expires_at is not None
        assert r.lease_expires_at > time.time() + 100  # renewed by the commit

        for writer, message in [
            ("w2", "leased to w1 .*not to w2"),
            (None, "leased to w1 .*only that worker"),
        ]:
            with pytest.raises(LeaseHeld, match=message) as refused:
                await step(journal, r, lease_owner=writer, update=RunUpdate(status="failed"))
            assert (refused.value.holder, refused.value.run_id) == ("w1", "r1")
            assert isinstance(refused.value, ConcurrentWriteError)
            assert await journal.get_run("r1") == r

        # Once the lease has expired, a writer without one may go on; the old holder may not.
        expire_lease(store, "r1")
        r = await step(journal, await journal.get_run("r1"))
        await journal.acquire("r1", "w2", lease_seconds=60)
        with pytest.raises(LeaseHeld, match="leased to w2"):
            await step(journal, r, lease_owner="w1")
        await journal.release("r1", "w2")
        with pytest.raises(LeaseHeld, match="leased to nobody"):
            await step(journal, r, lease_owner="w1")

    run(scenario())


def test_create_run_stores_the_lease_it_is_given(journal: Journal) -> None:
    async def scenario() -> None:
        leased = record("r1").model_copy(update={"lease_owner": "w1", "lease_expires_at": time.time() + 60})
        await journal.create_run(leased, [])
        got = await journal.get_run("r1")
        assert (got.lease_owner, got.lease_expires_at) == (leased.lease_owner, leased.lease_expires_at)
        assert await journal.claim("w2", lease_seconds=30) is None
        # Given a length, the lease runs from the store's clock, whatever the record says.
        skewed = record("r2").model_copy(update={"lease_owner": "w1", "lease_expires_at": 1.0})
        await journal.create_run(skewed, [], lease_seconds=600)
        assert leased_for(await journal.get_run("r2"), 600)
        assert await journal.claim("w2", lease_seconds=30) is None

    run(scenario())


def test_acquire_heartbeat_and_release(store: Store, journal: Journal) -> None:
    async def scenario() -> None:
        await start(journal, "r1")
        r = await journal.acquire("r1", "w1", lease_seconds=30)
        assert r.lease_owner == "w1" and leased_for(r, 30)
        with pytest.raises(LeaseHeld, match="r1 is leased to w1 until") as held:
            await journal.acquire("r1", "w2", lease_seconds=30)
        assert (held.value.holder, held.value.expires_at) == ("w1", r.lease_expires_at)
        assert leased_for(await journal.acquire("r1", "w1", lease_seconds=600), 600)

        assert await journal.heartbeat("r1", "w1", lease_seconds=30) is True
        assert leased_for(await journal.get_run("r1"), 30)
        assert await journal.heartbeat("r1", "w2", lease_seconds=30) is False

        await journal.release("r1", "w2")  # not the holder: nothing happens
        assert (await journal.get_run("r1")).lease_owner == "w1"
        expire_lease(store, "r1")
        r = await journal.acquire("r1", "w2", lease_seconds=30)  # w1's lease expired
        assert r.lease_owner == "w2"
        assert await journal.heartbeat("r1", "w1", lease_seconds=30) is False
        await journal.release("r1", "w2")
        r = await journal.get_run("r1")
        assert (r.lease_owner, r.lease_expires_at) == (None, None)
        with pytest.raises(RunNotFound):
            await journal.acquire("nope", "w1", lease_seconds=30)

    run(scenario())


def test_a_worker_renews_all_its_leases_in_one_call(store: Store, journal: Journal) -> None:
    async def scenario() -> None:
        for run_id, worker in [("r0", "w1"), ("r1", "w1"), ("r2", "w1"), ("other", "w2")]:
            await start(journal, run_id)
            await journal.acquire(run_id, worker, lease_seconds=30)
            expire_lease(store, run_id)
        others = (await journal.get_run("other")).lease_expires_at

        assert await journal.renew_leases("w1", lease_seconds=30) == {"r0", "r1", "r2"}
        for run_id in ("r0", "r1", "r2"):
            assert leased_for(await journal.get_run(run_id), 30)
        assert (await journal.get_run("other")).lease_expires_at == others  # not w1's
        await journal.release("r1", "w1")
        assert await journal.renew_leases("w1", lease_seconds=30) == {"r0", "r2"}
        assert await journal.renew_leases("nobody", lease_seconds=30) == set()

    run(scenario())


def test_a_commit_may_give_the_lease_up_in_the_same_transaction(journal: Journal) -> None:
    async def scenario() -> None:
        r = await journal.acquire((await start(journal, "r1")).run_id, "w1", lease_seconds=30)
        r = await step(journal, r, lease_owner="w1", lease_seconds=30, release=True)
        assert (r.lease_owner, r.lease_expires_at, r.last_seq) == (None, None, 2)
        claimed = await journal.claim("w2", lease_seconds=30)
        assert claimed is not None and claimed.run_id == "r1"
        # A refused commit releases nothing.
        with pytest.raises(LeaseHeld, match="leased to w2"):
            await step(journal, r, lease_owner="w1", release=True)
        assert (await journal.get_run("r1")).lease_owner == "w2"

    run(scenario())


def test_claim_takes_the_oldest_runnable_run(store: Store, journal: Journal) -> None:
    async def scenario() -> None:
        await start(journal, "queued-young", age=1)
        await start(journal, "queued-old", age=5)
        await start(journal, "leased", age=9)
        await journal.acquire("leased", "other", lease_seconds=60)
        await start(journal, "lease-expired", age=3)
        await journal.acquire("lease-expired", "gone", lease_seconds=30)
        expire_lease(store, "lease-expired")
        await start(journal, "running", status="running", age=2)
        for status in ("completed", "failed", "escalated", "handed_off", "effect_in_doubt"):
            await start(journal, status, status=status, age=10)
        waiting = await pause_on(
            journal, await start(journal, "waiting", status="running"), ticket("t1", "waiting")
        )
        decided = await pause_on(
            journal, await start(journal, "decided", status="running"), ticket("t2", "decided")
        )
        lapsed = await pause_on(
            journal, await start(journal, "lapsed", status="running"), ticket("t3", "lapsed", expires_in=-1)
        )
        assert waiting.status == decided.status == lapsed.status == "paused"

        claimed = []
        while (r := await journal.claim("w1", lease_seconds=30)) is not None:
            assert r.lease_owner == "w1" and leased_for(r, 30)
            claimed.append(r.run_id)
        assert claimed == ["queued-old", "lease-expired", "running", "queued-young", "lapsed"]
        await journal.decide_ticket("t2", approve=False, by="sam", reason="no")
        assert (await journal.claim("w1", lease_seconds=30)).run_id == "decided"  # type: ignore[union-attr]
        assert await journal.claim("w1", lease_seconds=30) is None

        await journal.release("queued-old", "w1")  # released runs are claimable again
        assert (await journal.claim("w2", lease_seconds=30)).run_id == "queued-old"  # type: ignore[union-attr]

    run(scenario())


def test_claim_passes_over_runs_a_worker_cannot_drive(journal: Journal) -> None:
    async def scenario() -> None:
        await start(journal, "gone-workflow", age=9)
        await start(journal, "gateway", age=8, ref="<mcp-gateway>")  # driven by its own process
        await start(journal, "young", age=1)
        claimed = await journal.claim("w1", lease_seconds=30, skip_runs={"gone-workflow"})
        assert claimed is not None and claimed.run_id == "young"
        assert await journal.claim("w1", lease_seconds=30, skip_runs={"gone-workflow"}) is None
        assert (await journal.claim("w2", lease_seconds=30)).run_id == "gone-workflow"  # type: ignore[union-attr]
        assert (await journal.get_run("gateway")).lease_owner is None

    run(scenario())


def test_claim_respects_per_workflow_limits(store: Store, journal: Journal) -> None:
    async def scenario() -> None:
        for i in range(4):
            await start(journal, f"a{i}", workflow="a", age=10 - i)
            await start(journal, f"b{i}", workflow="b", age=5 - i)
        await start(journal, "z0", workflow="z")
        await journal.acquire("a0", "elsewhere", lease_seconds=60)
        limits = {"a": 2, "b": 3, "z": 0}
        claimed = []
        while (r := await journal.claim("w1", lease_seconds=30, limits=limits)) is not None:
            claimed.append(r.run_id)
        assert claimed == ["a1", "b0", "b1", "b2"]
        await journal.release("a1", "w1")
        assert (await journal.claim("w1", lease_seconds=30, limits=limits)).run_id == "a1"  # type: ignore[union-attr]
        # Expired leases do not count against the limit.
        expire_lease(store, "a0")
        assert (await journal.claim("w1", lease_seconds=30, limits=limits)).run_id == "a0"  # type: ignore[union-attr]

    run(scenario())


def test_concurrent_claimers_never_get_the_same_run(store: Store) -> None:
    journals = [store.open(pool_size=4) for _ in range(3)]

    async def scenario() -> None:
        for i in range(30):
            await start(journals[0], f"r{i:02}", workflow="limited" if i % 3 == 0 else "free")

        async def claimer(j: Journal, worker: str) -> list[str]:
            got = []
            while (r := await j.claim(worker, lease_seconds=60, limits={"limited": 4})) is not None:
                got.append(r.run_id)
            return got

        results = await asyncio.gather(*(claimer(journals[i % 3], f"w{i}") for i in range(12)))
        claimed = [run_id for got in results for run_id in got]
        assert len(claimed) == len(set(claimed)) == 20 + 4
        runs = {r.run_id: r for r in await journals[0].list_runs()}
        assert sum(1 for r in runs.values() if r.workflow_name == "limited" and r.lease_owner) == 4
        for worker, got in zip((f"w{i}" for i in range(12)), results, strict=True):
            assert all(runs[run_id].lease_owner == worker for run_id in got)

    run(scenario())


def test_wait_for_work_wakes_when_work_appears(store: Store) -> None:
    waiter, writer = store.open(), store.open()
    expected_wake = 0.4 if store.kind == "sqlite" else 1.0  # SQLite polls every 0.2 s

    async def woken_by(action: Callable[[], Coroutine[Any, Any, Any]]) -> float:
        await waiter.wait_for_work(0)  # start listening
        t0 = time.monotonic()

        async def later() -> None:
            await asyncio.sleep(0.05)
            await action()

        await asyncio.gather(waiter.wait_for_work(10), later())
        return time.monotonic() - t0

    async def scenario() -> None:
        t0 = time.monotonic()
        await waiter.wait_for_work(0.1)
        # It waited (no work: no early return) and came back at its timeout, not the 10 s of
        # the calls below; loose bounds, as the machine may be loaded (psycopg's timeout can
        # end a few ms early).
        assert 0.05 <= time.monotonic() - t0 < 2
        assert await woken_by(lambda: start(writer, "r1")) < expected_wake
        r = await pause_on(writer, await start(writer, "r2", status="running"), ticket("t1", "r2"))
        assert await woken_by(lambda: writer.decide_ticket("t1", approve=True, by="sam")) < expected_wake
        await writer.acquire(r.run_id, "w1", lease_seconds=60)
        assert await woken_by(lambda: writer.release(r.run_id, "w1")) < expected_wake
        r = await writer.acquire(r.run_id, "w1", lease_seconds=60)
        update = RunUpdate(status="running")  # given up by its last commit: runnable at once
        assert (
            await woken_by(lambda: step(writer, r, update=update, lease_owner="w1", release=True))
            < expected_wake
        )

    run(scenario())


def test_a_journal_is_usable_from_one_event_loop_after_another(store: Store, journal: Journal) -> None:
    run(start(journal, "r1"))
    run(journal.acquire("r1", "w1", lease_seconds=30))
    assert run(journal.get_run("r1")).lease_owner == "w1"

    async def closed_inside_the_loop() -> None:
        assert (await journal.get_run("r1")).run_id == "r1"
        await journal.aclose()

    run(closed_inside_the_loop())


# -- migrations ------------------------------------------------------------------------

V1_SQLITE = """
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
INSERT INTO meta VALUES ('schema_version', '1');
"""


def make_old_journal(store: Store, version: int) -> None:
    """A journal as release `version` left it (SQLite version 1: that release's exact schema),
    holding a running run and a run paused on a pending ticket, with data and facts."""
    if store.kind == "sqlite" and version == 1:
        db = sqlite3.connect(str(store.path))
        db.executescript(V1_SQLITE)
        db.close()
    elif store.kind == "sqlite":
        with sqlite3.connect(str(store.path)) as db:
            db.execute(migrations.META_SQL)
            for migration in migrations.SQLITE[:version]:
                migrations.apply(db, migration, "?")
    else:
        import psycopg

        with psycopg.connect(store.target, autocommit=True) as conn, conn.transaction():
            conn.execute(migrations.META_SQL)
            for migration in migrations.POSTGRES[:version]:
                migrations.apply(conn, migration, "%s")
    ph = store.ph
    for run_id, status, ticket_id in [("old-running", "running", None), ("old-paused", "paused", "t1")]:
        rec = record(run_id, status=status).model_copy(
            update={
                "checkpoint": {"pending": {"ticket_id": ticket_id}} if ticket_id else {},
                "data": {"customer": "c1"},
                "facts": {"verified": True},
            }
        )
        entries = chain(run_id, 0, GENESIS_HASH, [raw_entry("run_started", {"v": 1})], rec.created_at)
        rec = rec.model_copy(update={"last_seq": 1, "last_hash": entries[0].hash})
        row = rec.model_dump(exclude={"lease_owner", "lease_expires_at", "started_by"})
        for k in ("input", "data", "facts", "checkpoint"):
            row[k] = json.dumps(row[k])
        if version >= 2:
            row |= {"lease_owner": None, "lease_expires_at": None, "pending_ticket_id": ticket_id}
        store.execute(
            f"INSERT INTO runs ({', '.join(row)}) VALUES ({', '.join([ph] * len(row))})", tuple(row.values())
        )
        e = entries[0]  # as releases before schema 9 stored it: hex hashes, and the link
        store.execute(
            "INSERT INTO entries (run_id, seq, kind, step_id, state, body, prev_hash, hash, created_at) "
            f"VALUES ({', '.join([ph] * 9)})",
            (e.run_id, e.seq, e.kind, e.step_id, e.state, e.body_json, e.prev_hash, e.hash, e.created_at),
        )
    t = ticket("t1", "old-paused")
    store.execute(
        "INSERT INTO tickets (ticket_id, run_id, step_id, kind, subject, args, args_hash, approver, status, "
        f"created_at, expires_at) VALUES ({', '.join([ph] * 11)})",
        (
            t.ticket_id,
            t.run_id,
            t.step_id,
            t.kind,
            t.subject,
            "{}",
            t.args_hash,
            t.approver,
            "pending",
            t.created_at,
            t.expires_at,
        ),
    )


def run_columns(store: Store) -> set[str]:
    if store.kind == "sqlite":
        return {row[1] for row in store.execute("PRAGMA table_info(runs)")}
    rows = store.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'runs' AND table_schema = current_schema()"
    )
    return {row[0] for row in rows}


def test_a_fresh_journal_gets_the_latest_schema(store: Store) -> None:
    assert store.open().migrated == (0, migrations.LATEST)
    assert store.open().migrated == (migrations.LATEST, migrations.LATEST)
    rows = dict(store.execute("SELECT key, value FROM meta"))
    assert rows["schema_version"] == str(migrations.LATEST)
    assert rows["migration:2"].startswith("run leases for workers; 20")
    assert not run_columns(store) & {"input", "data", "facts"}  # kept apart from the run's row


@pytest.mark.parametrize("version", [1, 3])
def test_an_older_journal_is_upgraded_in_place(store: Store, version: int) -> None:
    make_old_journal(store, version)
    with pytest.raises(
        JournalError,
        match=f"has schema version {version}; this tether needs {migrations.LATEST}: run `tether db upgrade",
    ):
        store.open(migrate=False)
    journal = store.open()
    assert journal.migrated == (version, migrations.LATEST)
    assert not run_columns(store) & {"input", "data", "facts"}

    async def scenario() -> None:
        old = await journal.get_run("old-running")
        assert (old.status, old.lease_owner, old.lease_expires_at) == ("running", None, None)
        assert (old.input, old.data, old.facts) == ({"order": "A1"}, {"customer": "c1"}, {"verified": True})
        assert verify_chain(await journal.read_entries("old-paused")) == []
        assert (await journal.claim("w1", lease_seconds=30)).run_id == "old-running"  # type: ignore[union-attr]
        assert await journal.claim("w1", lease_seconds=30) is None  # still waiting on t1
        await journal.decide_ticket("t1", approve=True, by="sam")
        assert (await journal.claim("w1", lease_seconds=30)).run_id == "old-paused"  # type: ignore[union-attr]
        r = await step(journal, old, update=RunUpdate(data={"customer": "c2"}), lease_owner="w1")
        assert (r.input, r.data, r.facts) == ({"order": "A1"}, {"customer": "c2"}, {"verified": True})

    run(scenario())


def schema_8(store: Store) -> None:
    """An empty journal as schema version 8 left it."""
    if store.kind == "sqlite":
        with sqlite3.connect(str(store.path)) as db:
            db.execute(migrations.META_SQL)
            for migration in migrations.SQLITE[:8]:
                migrations.apply(db, migration, "?")
    else:
        import psycopg

        with psycopg.connect(store.target, autocommit=True) as conn, conn.transaction():
            conn.execute(migrations.META_SQL)
            for migration in migrations.POSTGRES[:8]:
                migrations.apply(conn, migration, "%s")


def old_chain(store: Store, run_id: str, count: int) -> list[Entry]:
    """`count` chained entries of a run, inserted as schema 8 stores them (hex hashes, and
    each entry's prev_hash), into a journal left at version 8."""
    entries = chain(
        run_id, 0, GENESIS_HASH, [raw_entry("step_done", {"n": n}) for n in range(count)], 1_700_000_000.5
    )
    for e in entries:
        store.execute(
            "INSERT INTO entries (run_id, seq, kind, step_id, state, body, prev_hash, hash, created_at) "
            f"VALUES ({', '.join([store.ph] * 9)})",
            (e.run_id, e.seq, e.kind, e.step_id, e.state, e.body_json, e.prev_hash, e.hash, e.created_at),
        )
    return entries


def entry_columns(store: Store) -> list[str]:
    if store.kind == "sqlite":
        return [row[1] for row in store.execute("PRAGMA table_info(entries)")]
    rows = store.execute(
        "SELECT column_name FROM information_schema.columns "
        "WHERE table_name = 'entries' AND table_schema = current_schema() ORDER BY ordinal_position"
    )
    return [row[0] for row in rows]


def test_schema_9_keeps_every_hash_byte_for_byte_and_the_chain_verifies(store: Store) -> None:
    schema_8(store)
    written = old_chain(store, "old-chain", 5)
    journal = store.open()
    assert journal.migrated == (8, migrations.LATEST)
    assert entry_columns(store) == ["run_id", "seq", "kind", "step_id", "state", "body", "hash", "created_at"]
    # Stored as the 32 bytes of the very hash that was written, nothing recomputed.
    stored = store.execute(f"SELECT hash FROM entries WHERE run_id = {store.ph} ORDER BY seq", ("old-chain",))
    assert [bytes(h) for (h,) in stored] == [bytes.fromhex(e.hash) for e in written]
    read = run(journal.read_entries("old-chain"))
    assert [(e.seq, e.prev_hash, e.hash, e.body_json) for e in read] == [
        (e.seq, e.prev_hash, e.hash, e.body_json) for e in written
    ]
    assert verify_chain(read) == [] and integrity.chain_findings("old-chain", read) == []
    tail = run(journal.read_entries("old-chain", 2))
    assert [(e.prev_hash, e.hash) for e in tail] == [(e.prev_hash, e.hash) for e in written[2:]]
    last = run(journal.read_last_entries("old-chain", 2))
    assert [(e.prev_hash, e.hash) for e in last] == [(e.prev_hash, e.hash) for e in written[3:]]
    # The append-only triggers came through the rebuild: present, and still refusing.
    assert journal.trigger_problems == []
    with pytest.raises(Exception, match="append-only"):
        store.execute(f"UPDATE entries SET body = 'x' WHERE run_id = {store.ph}", ("old-chain",))
    with pytest.raises(Exception, match="append-only"):
        store.execute(f"DELETE FROM entries WHERE run_id = {store.ph}", ("old-chain",))


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        (
            "UPDATE entries SET prev_hash = hash WHERE run_id = 'old-chain' AND seq = 3",
            "its prev_hash is not",
        ),
        ("UPDATE entries SET hash = upper(hash) WHERE run_id = 'old-chain' AND seq = 2", "not 64 hex"),
    ],
)
def test_schema_9_refuses_a_chain_it_would_hide_and_leaves_the_journal_as_it_was(
    store: Store, damage: str, says: str
) -> None:
    schema_8(store)
    old_chain(store, "old-chain", 5)
    if store.kind == "sqlite":
        store.execute("DROP TRIGGER entries_no_update")
    else:
        store.execute("ALTER TABLE entries DISABLE TRIGGER USER")
    store.execute(damage)
    before = store.execute("SELECT * FROM entries ORDER BY run_id, seq")
    with pytest.raises(
        JournalError, match=f"cannot upgrade the journal to schema version 9: run old-chain seq .*{says}"
    ):
        store.open()
    # The transaction rolled back: still version 8, prev_hash and the hex hashes as they were.
    assert dict(store.execute("SELECT key, value FROM meta"))["schema_version"] == "8"
    assert "prev_hash" in entry_columns(store)
    assert store.execute("SELECT * FROM entries ORDER BY run_id, seq") == before


def test_tether_db_upgrade_says_what_it_did(store: Store) -> None:
    make_old_journal(store, 1)
    runner = CliRunner()
    first = runner.invoke(db_cli.app, ["upgrade", "--db", store.target])
    assert first.exit_code == 0, first.output
    assert f"schema version 1 → {migrations.LATEST}" in first.output
    again = runner.invoke(db_cli.app, ["upgrade", "--db", store.target])
    assert f"is at schema version {migrations.LATEST}; nothing to do" in again.output
    assert upgrade_journal(store.target) == (migrations.LATEST, migrations.LATEST)


def test_a_journal_from_a_newer_tether_is_refused(store: Store) -> None:
    store.open()
    store.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(JournalError, match="schema version 99, newer than this tether understands"):
        store.open()
    result = CliRunner().invoke(db_cli.app, ["upgrade", "--db", store.target])
    assert result.exit_code == 2 and "newer than this tether" in result.output


# -- storage ---------------------------------------------------------------------------


def test_storage_grows_linearly_with_the_payload(store: Store, journal: Journal) -> None:
    async def scenario() -> tuple[int, int]:
        r = await start(journal, "r1", status="running")
        before, payload = store.size(), 0
        for i in range(1000):
            body = {"i": i, "result": secrets.token_hex(500)}  # ~1 KB of new data per step
            payload += len(encode_json(body).encode())
            checkpoint = {"steps": i, "visit": {"state": "s", "steps": i, "tool_calls": i}}
            written = await journal.commit(
                Commit(
                    run_id="r1",
                    expected_seq=r.last_seq,
                    expected_hash=r.last_hash,
                    entries=[raw_entry("step", body, step_id=f"s{i}", state="s")],
                    update=RunUpdate(checkpoint=checkpoint, data={"last": i}),
                )
            )
            r = r.model_copy(update={"last_seq": written[-1].seq, "last_hash": written[-1].hash})
        return store.size() - before, payload

    grown, payload = run(scenario())
    assert grown <= 2.5 * payload, f"{store.kind}: {grown} bytes stored for {payload} bytes of payload"


def test_a_large_input_is_not_rewritten_by_every_commit(store: Store, journal: Journal) -> None:
    large = {"document": secrets.token_hex(500_000)}  # 1 MB
    size = len(encode_json(large))
    # A reader with an open snapshot keeps SQLite from reusing its WAL: every byte written stays.
    snapshot = sqlite3.connect(str(store.path), isolation_level=None) if store.path else None

    async def scenario() -> int:
        # As the runtime starts a run: its data begins as a copy of its input.
        await journal.create_run(record("r1").model_copy(update={"input": large, "data": large}), [])
        r = await journal.get_run("r1")
        if snapshot is not None:
            snapshot.execute("BEGIN")
            snapshot.execute("SELECT count(*) FROM runs").fetchall()
        before = store.written()
        for i in range(100):
            # Every other commit hands the unchanged data back, as a state transition does.
            update = RunUpdate(checkpoint={"steps": i}, data=large if i % 2 else UNSET)
            r = await step(journal, r, {"i": i}, update=update)
        return store.written() - before

    try:
        grown = run(scenario())
    finally:
        if snapshot is not None:
            snapshot.close()
    assert grown < 5 * size, f"{store.kind}: {grown} bytes written for 100 commits of a {size}-byte run"
    got = run(journal.get_run("r1"))
    assert got.input == got.data == large


# -- choosing a store ------------------------------------------------------------------


def test_urls_choose_the_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.journal.sqlite import SQLiteJournal

    monkeypatch.setenv("TETHER_DB", str(tmp_path / "env.db"))
    journal = open_journal()
    assert isinstance(journal, SQLiteJournal) and journal.path == tmp_path / "env.db"
    journal.close()
    with pytest.raises(JournalError, match="unsupported journal URL scheme 'mysql'"):
        open_journal("mysql://localhost/x")

    monkeypatch.setitem(sys.modules, "psycopg", None)  # as if the extra were not installed
    monkeypatch.delitem(sys.modules, "tether.journal.postgres", raising=False)
    for url in ("postgresql://localhost/x", "postgres://localhost/x"):
        with pytest.raises(JournalError, match=r"pip install 'tether\[postgres\]'"):
            open_journal(url)


def test_an_unreachable_server_is_a_journal_error() -> None:
    pytest.importorskip("psycopg")
    with pytest.raises(JournalError, match=r"cannot open journal postgresql://tether:\*\*\*@127.0.0.1:1/x"):
        open_journal("postgresql://tether:secret@127.0.0.1:1/x?connect_timeout=2&pool_size=2")
