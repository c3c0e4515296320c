"""Measure the journal store: group commit against the single-commit floor, a lone run's
commit latency, claim, and the cost of the async wrapper around SQLite statements.

    PYTHONPATH=src python bench/store.py [--store sqlite|postgres|both] [--repeat 3]

Group commit: N runs in one process each make C commits of a typical step (one ~300-byte
entry and a checkpoint update), all at FULL durability (every commit synced before it
returns); the figure is commits per second. The floor is one small INSERT per synced
transaction on the same database (SQLite: WAL, synchronous=FULL; PostgreSQL:
synchronous_commit on), measured before and after each repetition's rows and averaged, so
a drifting disk moves both. Only the calls that exist on every release (create_run, commit
and claim with `now=`) are used, so the same script measures an earlier tether too.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import sqlite3
import statistics
import tempfile
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from tether.journal import Commit, Journal, NewEntry, RunRecord, RunUpdate, open_journal

PG = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
CONCURRENCY = (1, 10, 100, 1000)
BODY = {"outcome": "executed", "tool": "lookup", "result": "x" * 200}


def entry(kind: str, body: dict[str, Any], step_id: str | None = None, state: str | None = None) -> NewEntry:
    """An entry of any body: `NewEntry.of` takes typed records since kernel v2, so the text
    is made here (the store neither parses nor checks it)."""
    if "body_json" in getattr(NewEntry, "__struct_fields__", ()):
        text = json.dumps(body, separators=(",", ":"), sort_keys=True)
        return NewEntry(kind, text, step_id, state)
    return NewEntry.of(kind, body, step_id=step_id, state=state)  # type: ignore[arg-type,call-arg]


def record(run_id: str, status: str = "running", age: float = 0.0) -> RunRecord:
    at = time.time() - 1000 + age
    return RunRecord(
        run_id=run_id,
        workflow_name="bench",
        workflow_version="1",
        workflow_hash="sha256:wf",
        workflow_ref="bench",
        policy_hash="sha256:policy",
        status=status,  # type: ignore[arg-type]
        state="work",
        input={"order": "A1"},
        data={"order": "A1"},
        checkpoint={"steps": 0},
        created_at=at,
        updated_at=at,
    )


# -- the stores -----------------------------------------------------------------------------


class Target:
    """A fresh journal location per measurement, and the floor measured on the same database."""

    def __init__(self, kind: str, tmp: Path) -> None:
        self.kind, self.tmp, self._schemas = kind, tmp, []

    def fresh(self) -> str:
        if self.kind == "sqlite":
            return str(self.tmp / f"{secrets.token_hex(4)}.db")
        import psycopg

        schema = "bench_store_" + secrets.token_hex(4)
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        self._schemas.append(schema)
        return f"{PG}?options=-csearch_path%3D{schema}"

    def floor(self, n: int) -> float:
        """Synced transactions per second, one ~100-byte INSERT each."""
        if self.kind == "sqlite":
            db = sqlite3.connect(self.fresh(), isolation_level=None)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
            start = time.perf_counter()
            for _ in range(n):
                db.execute("BEGIN IMMEDIATE")
                db.execute("INSERT INTO t (body) VALUES (?)", ("x" * 100,))
                db.execute("COMMIT")
            elapsed = time.perf_counter() - start
            db.close()
            return n / elapsed
        import psycopg

        with psycopg.connect(self.fresh(), autocommit=True) as conn:
            conn.execute("CREATE TABLE t (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)")
            conn.execute("SET synchronous_commit = on")
            start = time.perf_counter()
            for _ in range(n):
                conn.execute("INSERT INTO t (body) VALUES (%s)", ("x" * 100,))
            return n / (time.perf_counter() - start)

    def cleanup(self) -> None:
        if self._schemas:
            import psycopg

            with psycopg.connect(PG, autocommit=True) as conn:
                for schema in self._schemas:
                    conn.execute(f"DROP SCHEMA {schema} CASCADE")


# -- measurements ---------------------------------------------------------------------------


def busy(us: float) -> None:
    """Hold the event loop for `us` µs, as a governed step's own Python work does."""
    end = time.perf_counter() + us / 1e6
    while time.perf_counter() < end:
        pass


async def concurrent_commits(journal: Journal, runs: int, commits_each: int, work_us: float = 0.0) -> float:
    """Commits per second with `runs` runs committing at once, each waiting for its own and
    spending `work_us` of Python before each commit."""
    records = []
    for i in range(runs):
        r = record(f"r{i:05}")
        written = await journal.create_run(r, [entry("run_started", {"i": i})])
        records.append((r.run_id, written[-1].seq, written[-1].hash))

    async def drive(run_id: str, seq: int, prev: str) -> None:
        for i in range(commits_each):
            busy(work_us)
            written = await journal.commit(
                Commit(
                    run_id=run_id,
                    expected_seq=seq,
                    expected_hash=prev,
                    entries=[entry("step", BODY | {"i": i}, step_id=f"s{i}", state="work")],
                    update=RunUpdate(checkpoint={"steps": i + 1}),
                )
            )
            seq, prev = written[-1].seq, written[-1].hash

    start = time.perf_counter()
    await asyncio.gather(*(drive(*r) for r in records))
    return runs * commits_each / (time.perf_counter() - start)


async def lone_latency(journal: Journal, commits: int, direct: bool) -> float:
    """µs per commit of one run at the default durability; `direct` bypasses the commit queue."""
    r = record("lone")
    written = await journal.create_run(r, [entry("run_started", {})])
    seq, prev = written[-1].seq, written[-1].hash
    store: Any = journal
    start = time.perf_counter()
    for i in range(commits):
        commit = Commit(
            run_id="lone",
            expected_seq=seq,
            expected_hash=prev,
            entries=[entry("step", BODY | {"i": i}, step_id=f"s{i}", state="work")],
            update=RunUpdate(checkpoint={"steps": i + 1}),
        )
        if direct:
            plan = store._plan(commit)
            assert (await store._transact([plan])) == [True]
            written = plan.written
        else:
            written = await journal.commit(commit)
        seq, prev = written[-1].seq, written[-1].hash
    return (time.perf_counter() - start) / commits * 1e6


async def claim_cost(journal: Journal, queued: int, claims: int) -> float:
    """µs per claim with `queued` runs waiting (claimed runs stay leased, as a busy worker's)."""
    for i in range(queued):
        queued_run = record(f"q{i:05}", "queued", age=i * 0.001)
        await journal.create_run(queued_run, [entry("run_started", {})])
    start = time.perf_counter()
    for _ in range(claims):
        assert await journal.claim("bench", lease_seconds=60, now=time.time()) is not None
    return (time.perf_counter() - start) / claims * 1e6


async def wrapper_overhead(target: str, n: int = 50_000) -> tuple[float, float]:
    """µs per `SELECT 1` on SQLite's writer: sqlite3 called directly, and through the async Tx."""
    journal: Any = open_journal(target)
    db, tx = journal._d._writer, journal._d._tx
    try:
        start = time.perf_counter()
        for _ in range(n):
            db.execute("SELECT 1")
        direct = (time.perf_counter() - start) / n * 1e6
        start = time.perf_counter()
        for _ in range(n):
            await tx.execute("SELECT 1")
        return direct, (time.perf_counter() - start) / n * 1e6
    finally:
        journal.close()


def with_journal(
    target: str, durability: str, measure: Callable[[Journal], Coroutine[Any, Any, float]]
) -> float:
    async def go() -> float:
        journal = open_journal(target, durability=durability)
        try:
            return await measure(journal)
        finally:
            await journal.aclose()

    return asyncio.run(go())


# -- the report -----------------------------------------------------------------------------


def set_sync_in_thread(value: bool) -> bool:
    """Choose where SQLite's synced COMMIT runs; False on a tether without the switch."""
    try:
        from tether.journal.sqlite import SQLiteDialect
    except ImportError:
        return False
    SQLiteDialect.sync_in_thread = value
    return True


def group_commit(kind: str, target: Target, repeat: int, label: str, work_us: float = 0.0) -> None:
    floor_n = 200 if kind == "sqlite" else 500
    ratios: dict[int, list[float]] = {n: [] for n in CONCURRENCY}
    floors: list[float] = []
    for _ in range(repeat):
        before = target.floor(floor_n)
        got = {}
        for n in CONCURRENCY:
            each = max(3, (600 if kind == "sqlite" else 1500) // n)
            got[n] = with_journal(
                target.fresh(), "full", lambda j, n=n, each=each: concurrent_commits(j, n, each, work_us)
            )
        floor = (before + target.floor(floor_n)) / 2
        floors.append(floor)
        for n in CONCURRENCY:
            ratios[n].append(got[n] / floor)
    work = f", {work_us:.0f} µs of Python per step" if work_us else ""
    floor = statistics.median(floors)
    print(f"\n{kind}, every commit synced{label}{work}: floor {floor:,.0f} synced commits/s")
    print("| concurrent runs | commits/s ÷ floor: median (min–max) |")
    print("|---|---|")
    for n in CONCURRENCY:
        v = ratios[n]
        print(f"| {n:,} | {statistics.median(v):.2f}× ({min(v):.2f}–{max(v):.2f}) |")


def latency(kind: str, target: Target, repeat: int) -> None:
    for durability in ("normal", "full"):
        row = []
        for direct in (False, True):
            runs = [
                with_journal(target.fresh(), durability, lambda j, d=direct: lone_latency(j, 300, d))
                for _ in range(repeat)
            ]
            row.append(statistics.median(runs))
        print(f"{kind} {durability}: a lone run's commit {row[0]:.0f} µs (bypassing the queue: {row[1]:.0f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--only", choices=["group", "thread", "latency", "claim", "wrapper"], action="append")
    args = parser.parse_args()
    kinds = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    only = set(args.only or ["group", "thread", "latency", "claim", "wrapper"])
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            target = Target(kind, Path(tmp))
            try:
                if "group" in only:
                    group_commit(kind, target, args.repeat, "")
                if "thread" in only and kind == "sqlite" and set_sync_in_thread(False):
                    for work_us in (0.0, 100.0):
                        group_commit(kind, target, args.repeat, ", fsync on the loop's thread", work_us)
                        set_sync_in_thread(True)
                        group_commit(kind, target, args.repeat, ", fsync in a thread", work_us)
                        set_sync_in_thread(False)
                    set_sync_in_thread(True)
                if "latency" in only:
                    latency(kind, target, args.repeat)
                if "claim" in only:
                    costs = [
                        with_journal(target.fresh(), "normal", lambda j: claim_cost(j, 1000, 200))
                        for _ in range(args.repeat)
                    ]
                    print(f"{kind}: claim with 1,000 queued runs {statistics.median(costs):.0f} µs")
                if "wrapper" in only and kind == "sqlite":
                    direct, wrapped = asyncio.run(wrapper_overhead(target.fresh()))
                    print(f"sqlite: SELECT 1 {direct:.2f} µs direct, {wrapped:.2f} µs through the async Tx")
            finally:
                target.cleanup()


if __name__ == "__main__":
    main()
