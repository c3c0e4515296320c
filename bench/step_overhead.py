"""What one governed step costs tether, against LangGraph at the same durability and the raw
SQLite commit floor measured between them; and the bytes a step stores, against DBOS.

The loops, all on real files in a temporary directory:

* tether: one agent state whose proposer (a `FunctionModel` counting turns) calls one trivial
  tool N times (the argument `i` changes every step, so loop detection never fires), then
  exits. The tool returns about 100 bytes. A 20-rule policy: 10 rules on the tool, all
  evaluated on every call (9 CEL conditions that are false, one allow rule), 10 on the exit
  and four envelope tools never called. Read steps: a read tool. Write steps: an idempotent
  write tool, so a step records an intent (synced before the effect, whatever the
  durability) and then its result.
* LangGraph: a StateGraph cycling an "agent" node and a "tool" node N times, checkpointed by
  `SqliteSaver` on a WAL file with the same `synchronous` as tether's journal, invoked with
  `durability="sync"` (each checkpoint written before the next node runs, as tether
  commits before it moves on). One agent+tool cycle is one step, and writes two
  checkpoints. Two states: "growing" keeps every ~100-byte result in a list with an
  `operator.add` reducer (as a message list grows in an agent), so every checkpoint
  re-stores the whole list and a step costs more the longer the run; "flat" keeps only the
  last result, which isolates that effect.
* the floor: one ~100-byte INSERT + COMMIT per transaction into a fresh WAL file, one writer.
* DBOS (bytes only): one workflow of N `@DBOS.step`s each returning the same ~100 bytes, on
  DBOS's own SQLite defaults, in a child process (DBOS is one instance per process).

Each repetition measures, for each run length and durability in turn: the floor, tether read,
tether write, LangGraph growing, LangGraph flat; so every ratio divides figures taken
seconds apart, and is computed within one repetition. Tables show the median over the
repetitions with the lowest and highest in brackets.

Columns:
* steps/s: N / wall time of one run (`Runtime.start` for tether, `graph.invoke` for
  LangGraph); µs/step its inverse.
* SQL µs/step: time spent inside SQLite calls per step (execute, fetch and commit of every
  connection the run opens, fsync included), measured by giving `sqlite3.connect` a
  connection class that times each call (this also counts commits/step).
* Python µs/step = µs/step − SQL µs/step: what the system costs on top of SQLite itself,
  whatever the durability (so it should agree between NORMAL and FULL). It includes the
  timing wrapper, about 1 µs per SQL call (printed at the start).
* bytes/step: growth of the database file (WAL folded back in) over an empty store, divided
  by N; at 100 steps it carries the run's fixed records (start, finish) over fewer steps.
  "marginal": (size at the longest run − size at the shortest) / (difference in steps),
  the cost of one more step. io/step: bytes handed to write() (/proc/self/io wchar).

No timing is asserted: this is a report. It ends with the goals of issue 9 it measures.

Run:  .venv-bench/bin/python bench/step_overhead.py [--quick] [--steps 100,1000] [--repeat 5] [--profile]
(the bench extra: `pip install -e '.[dev,bench]'`, for langgraph, its SQLite saver and dbos.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import io
import json
import operator
import pstats
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from benchkit import (
    GOALS_HEADER,
    Spread,
    describe_machine,
    goal_line,
    load_average,
    print_result,
    run_child,
    sqlite_commit_seconds,
)

from tether import (
    AgentState,
    Budget,
    FunctionModel,
    ModelContext,
    Policy,
    Runtime,
    Terminal,
    Workflow,
    open_journal,
    tool,
)

Durability = Literal["normal", "full"]
DURABILITIES: tuple[Durability, ...] = ("normal", "full")
SYNC_PRAGMA: dict[str, str] = {"full": "FULL", "normal": "NORMAL"}
PAYLOAD = "x" * 80  # with the key names and `i`, a result serializes to about 100 bytes
SCRIPT = Path(__file__).resolve()
WORKLOAD = SCRIPT.parent / "workload"
# (system, variant) in the order each repetition measures them
SYSTEMS: tuple[tuple[str, str], ...] = (
    ("floor", "commit"),
    ("tether", "read"),
    ("tether", "write"),
    ("langgraph", "growing"),
    ("langgraph", "flat"),
)


# -- timing SQLite calls ------------------------------------------------------------------


class SqlClock:
    """Time spent inside SQLite calls (wall, and CPU of the calling thread), calls and commits."""

    seconds = 0.0
    cpu_seconds = 0.0
    calls = 0
    commits = 0

    @classmethod
    def reset(cls) -> None:
        cls.seconds, cls.cpu_seconds, cls.calls, cls.commits = 0.0, 0.0, 0, 0

    @classmethod
    def add(cls, start: tuple[float, float], commit: bool = False) -> None:
        cls.seconds += time.perf_counter() - start[0]
        cls.cpu_seconds += time.thread_time() - start[1]
        cls.calls += 1
        cls.commits += commit


def _now() -> tuple[float, float]:
    return time.perf_counter(), time.thread_time()


def _is_commit(sql: str) -> bool:
    return sql.lstrip()[:6].upper() in ("COMMIT", "END")


class TimedCursor(sqlite3.Cursor):
    def execute(self, sql: str, parameters: Any = (), /) -> TimedCursor:
        start = _now()
        try:
            return super().execute(sql, parameters)
        finally:
            SqlClock.add(start, _is_commit(sql))

    def executemany(self, sql: str, seq: Any, /) -> TimedCursor:
        start = _now()
        try:
            return super().executemany(sql, seq)
        finally:
            SqlClock.add(start)

    def fetchone(self) -> Any:
        start = _now()
        try:
            return super().fetchone()
        finally:
            SqlClock.add(start)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        start = _now()
        try:
            return super().fetchmany(self.arraysize if size is None else size)
        finally:
            SqlClock.add(start)

    def fetchall(self) -> list[Any]:
        start = _now()
        try:
            return super().fetchall()
        finally:
            SqlClock.add(start)

    def __next__(self) -> Any:
        start = _now()
        try:
            return super().__next__()
        finally:
            SqlClock.add(start)


class TimedConnection(sqlite3.Connection):
    """Every statement goes through a TimedCursor; commits and rollbacks are timed too."""

    def cursor(self, factory: Any = TimedCursor) -> Any:  # type: ignore[override]
        return super().cursor(factory)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return self.cursor().execute(sql, parameters)

    def executemany(self, sql: str, seq: Any, /) -> Any:
        return self.cursor().executemany(sql, seq)

    def commit(self) -> None:
        start = _now()
        try:
            super().commit()
        finally:
            SqlClock.add(start, commit=True)

    def rollback(self) -> None:
        start = _now()
        try:
            super().rollback()
        finally:
            SqlClock.add(start)


@contextlib.contextmanager
def timed_sqlite() -> Iterator[None]:
    """Connections opened meanwhile by any code (a store's own) are TimedConnections."""
    original = sqlite3.connect

    def connect(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        kwargs.setdefault("factory", TimedConnection)
        return original(*args, **kwargs)

    sqlite3.connect = connect  # type: ignore[assignment]
    try:
        yield
    finally:
        sqlite3.connect = original


def wrapper_cost(tmp: Path, calls: int = 20_000) -> float:
    """Microseconds the timing wrapper adds to one SQL call (a `SELECT 1`)."""
    plain = sqlite3.connect(tmp / "wrapper.db")
    timed = sqlite3.connect(tmp / "wrapper.db", factory=TimedConnection)
    try:
        costs = []
        for db in (plain, timed):
            start = time.perf_counter()
            for _ in range(calls):
                db.execute("SELECT 1")
            costs.append(time.perf_counter() - start)
    finally:
        plain.close()
        timed.close()
    SqlClock.reset()
    return (costs[1] - costs[0]) / calls * 1e6


# -- tether ------------------------------------------------------------------------------


@tool(effect="read")
def probe(i: int) -> dict[str, Any]:
    """Read something small; returns about 100 bytes."""
    return {"i": i, "payload": PAYLOAD}


@tool(name="probe", effect="write", idempotent=True)
def probe_write(i: int) -> dict[str, Any]:
    """Write something small (idempotently); returns about 100 bytes."""
    return {"i": i, "payload": PAYLOAD}


@tool(effect="read")
def lookup_customer(customer_id: str) -> dict[str, Any]:
    """In the envelope and the policy, never called."""
    return {"customer_id": customer_id}


@tool(effect="read")
def list_orders(customer_id: str, limit: int = 10) -> list[str]:
    """In the envelope and the policy, never called."""
    return []


@tool(effect="write")
def update_address(customer_id: str, address: str) -> None:
    """In the envelope and the policy, never called."""


@tool(effect="write")
def cancel_order(order_id: str) -> None:
    """In the envelope and the policy, never called."""


UNUSED_TOOLS = (lookup_customer, list_orders, update_address, cancel_order)


def policy_rules() -> list[dict[str, Any]]:
    """20 rules: on `probe`, 9 whose conditions are false and 1 allow; 10 on other targets.

    All 10 rules on `probe` are evaluated on every step (a rule's CEL condition runs only
    when the rule names the tool proposed); the others are skipped by name.
    """
    on_probe: list[tuple[str, str, dict[str, Any]]] = [
        ("args.i < 0", "deny", {}),
        ("args.i > 1000000000", "ask", {"approver": "supervisor"}),
        ("has(data.blocked)", "deny", {}),
        ("has(facts.frozen) && facts.frozen", "deny", {}),
        ("tool.effect == 'external'", "deny", {}),
        ("run.state == 'elsewhere'", "defer", {"owner": "operator"}),
        ("size(run.id) == 0", "deny", {}),
        ("args.i == -1 || args.i == -2", "ask", {}),
        ("tool.name.startsWith('admin')", "deny", {}),
        ("args.i >= 0", "allow", {}),
    ]
    elsewhere: list[tuple[str, str, str | None, str]] = [
        ("tool", "lookup_customer", "args.customer_id == ''", "deny"),
        ("tool", "lookup_customer", None, "allow"),
        ("tool", "list_orders", "args.limit > 100", "deny"),
        ("tool", "list_orders", None, "allow"),
        ("tool", "update_address", "has(facts.frozen)", "deny"),
        ("tool", "update_address", None, "ask"),
        ("tool", "cancel_order", "has(facts.shipped)", "deny"),
        ("tool", "cancel_order", None, "ask"),
        ("exit", "done", "has(data.blocked)", "deny"),
        ("exit", "done", None, "allow"),
    ]
    rules: list[dict[str, Any]] = [
        {"id": f"probe-{k}", "tool": "probe", "when": when, "decision": decision, **extra}
        for k, (when, decision, extra) in enumerate(on_probe)
    ]
    for k, (kind, target, when, decision) in enumerate(elsewhere):
        rule = {"id": f"{target}-{k}", kind: target, "decision": decision}
        rules.append(rule if when is None else {**rule, "when": when})
    assert len(rules) == 20, len(rules)
    return rules


def tether_workflow(effect: str, n: int) -> Workflow:
    main = probe if effect == "read" else probe_write
    work = AgentState(
        "work",
        "Call probe once per step, then take the exit 'done'.",
        (main, *UNUSED_TOOLS),
        {"done": "done"},
        budget=Budget(max_steps=n + 5, max_tool_calls=n + 5, max_seconds=3600),
    )
    policy = Policy.from_dict({"rules": policy_rules()}, "bench-policy")
    return Workflow(f"bench-{effect}", "1", "work", [work, Terminal("done")], policy=policy)


def scripted_proposer(n: int) -> FunctionModel:
    """N tool calls with i = 0..N-1, then the exit. A counter, so the model costs ~nothing."""
    turn = 0

    def propose(ctx: ModelContext) -> dict[str, Any]:
        nonlocal turn
        i, turn = turn, turn + 1
        if i < n:
            return {"kind": "tool_call", "tool": "probe", "args": {"i": i}}
        return {"kind": "exit", "exit": "done"}

    return FunctionModel(propose, name="bench-proposer")


async def _tether_run(path: Path, effect: str, durability: str, n: int) -> tuple[float, float]:
    workflow, model = tether_workflow(effect, n), scripted_proposer(n)
    journal = open_journal(str(path), durability=durability)
    try:
        runtime = Runtime(journal)
        SqlClock.reset()
        start, cpu = time.perf_counter(), time.process_time()
        result = await runtime.start(workflow, model)
        times = time.perf_counter() - start, time.process_time() - cpu
    finally:
        journal.close()
    if result.status != "completed":  # the loop itself must be right, or the figures mean nothing
        raise RuntimeError(f"tether run ended {result.status}: {result.reason_code} {result.message}")
    return times


def tether_run(path: Path, variant: str, durability: str, n: int) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    with timed_sqlite():
        return asyncio.run(_tether_run(path, variant, durability, n))


def tether_empty(path: Path) -> None:
    open_journal(str(path)).close()


# -- LangGraph ---------------------------------------------------------------------------


class GrowingState(TypedDict):
    i: int
    proposal: dict[str, Any]
    results: Annotated[list[dict[str, Any]], operator.add]


class FlatState(TypedDict):
    i: int
    proposal: dict[str, Any]
    result: dict[str, Any]


def langgraph_graph(n: int, saver: Any, variant: str) -> Any:
    from langgraph.graph import END, START, StateGraph

    def agent(state: dict[str, Any]) -> dict[str, Any]:
        return {"proposal": {"tool": "probe", "args": {"i": state["i"]}}}

    def run_tool(state: dict[str, Any]) -> dict[str, Any]:
        i = state["proposal"]["args"]["i"]
        result = {"i": i, "payload": PAYLOAD}
        return {"i": i + 1, "results": [result]} if variant == "growing" else {"i": i + 1, "result": result}

    def route(state: dict[str, Any]) -> str:
        return "tool" if state["i"] < n else END

    graph = StateGraph(GrowingState if variant == "growing" else FlatState)  # type: ignore[type-var]
    graph.add_node("agent", agent)
    graph.add_node("tool", run_tool)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tool", END])
    graph.add_edge("tool", "agent")
    return graph.compile(checkpointer=saver)


def _langgraph_saver(path: Path, durability: str) -> tuple[sqlite3.Connection, Any]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(path, check_same_thread=False, factory=TimedConnection)
    conn.execute(f"PRAGMA synchronous={SYNC_PRAGMA[durability]}")
    saver = SqliteSaver(conn)
    saver.setup()  # SqliteSaver.setup runs `PRAGMA journal_mode=WAL` itself
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    if mode != "wal" or sync != {"full": 2, "normal": 1}[durability]:
        raise RuntimeError(f"LangGraph connection is journal_mode={mode}, synchronous={sync}")
    return conn, saver


def langgraph_run(path: Path, variant: str, durability: str, n: int) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    conn, saver = _langgraph_saver(path, durability)
    try:
        graph = langgraph_graph(n, saver, variant)
        config = {"configurable": {"thread_id": "bench"}, "recursion_limit": 2 * n + 10}
        first: dict[str, Any] = {"i": 0, "results": []} if variant == "growing" else {"i": 0, "result": {}}
        SqlClock.reset()
        start, cpu = time.perf_counter(), time.process_time()
        out = graph.invoke(first, config, durability="sync")
        times = time.perf_counter() - start, time.process_time() - cpu
    finally:
        conn.close()
    if out["i"] != n or (variant == "growing" and len(out["results"]) != n):
        raise RuntimeError(f"LangGraph loop ran {out['i']} steps, expected {n}")
    return times


def langgraph_empty(path: Path) -> None:
    conn, _ = _langgraph_saver(path, "normal")
    conn.close()


# -- DBOS (bytes) --------------------------------------------------------------------------


def dbos_bytes(path: Path, n: int) -> dict[str, Any]:
    """Child: file growth of one DBOS workflow of N steps on DBOS's SQLite defaults, and how much
    of it is the operation_outputs table (its step records) with its indexes."""
    sys.path.insert(0, str(WORKLOAD))
    from dbos import DBOS
    from dbos_workload import config, run_steps

    DBOS(config=config(f"sqlite:///{path}", executor="bytes", durability="default"))  # type: ignore[arg-type]
    DBOS.launch()
    try:
        empty = stored_bytes(path)
        empty_tables = table_bytes(path)
        run_steps(n)
    finally:
        DBOS.destroy()
    grown = stored_bytes(path)
    tables = table_bytes(path)
    return {
        "bytes": grown - empty,
        "tables": {t: b - empty_tables.get(t, 0) for t, b in tables.items() if b != empty_tables.get(t, 0)},
    }


# -- measuring -------------------------------------------------------------------------------


def stored_bytes(path: Path) -> int:
    """Size of the database file once the WAL is folded back in and truncated.

    File size (not `dbstat`) because it is what the store costs on disk, free pages
    included: a design that rewrites a growing row leaves them behind. Pages are 4 KiB, so
    at small N the figure is rounded to a page over N steps.
    """
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return path.stat().st_size


def table_bytes(path: Path) -> dict[str, int]:
    """Bytes of each table with its indexes (SQLite's dbstat: pages in use)."""
    db = sqlite3.connect(path)
    try:
        rows = db.execute(
            "SELECT coalesce(m.tbl_name, s.name), sum(s.pgsize) FROM dbstat s "
            "LEFT JOIN sqlite_master m ON m.name = s.name GROUP BY 1"
        ).fetchall()
    finally:
        db.close()
    return {name: size for name, size in rows}


def written_bytes() -> int | None:
    """Bytes this process has passed to write() so far (Linux /proc/self/io `wchar`)."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("wchar:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


@dataclass
class Sample:
    """One run of one row."""

    seconds: float  # per step (per commit for the floor)
    cpu_seconds: float  # per step, the process's
    sql_seconds: float  # per step
    sql_cpu_seconds: float  # per step
    sql_calls: float  # per step
    commits: float  # per step
    stored: int | None  # bytes over an empty store, whole run
    tables: dict[str, int]  # bytes over an empty store, by table
    written: int | None  # bytes passed to write(), whole run


Key = tuple[str, str, str, int]  # system, variant, durability, steps


class Bench:
    def __init__(self, tmp: Path, floor_commits: int) -> None:
        self.tmp = tmp
        self.floor_commits = floor_commits
        self.samples: dict[Key, list[Sample]] = {}
        self._count = 0
        self._empty: dict[str, tuple[int, dict[str, int]]] = {}
        for system, make in (("tether", tether_empty), ("langgraph", langgraph_empty)):
            path = self._path(f"{system}-empty")
            make(path)
            self._empty[system] = (stored_bytes(path), table_bytes(path))

    def _path(self, name: str) -> Path:
        self._count += 1
        return self.tmp / f"{self._count:04d}-{name}.db"

    def measure(self, key: Key) -> Sample:
        system, variant, durability, n = key
        path = self._path(f"{system}-{variant}-{durability}-{n}")
        before = written_bytes()
        if system == "floor":
            per_commit = sqlite_commit_seconds(path, SYNC_PRAGMA[durability], self.floor_commits)
            sample = Sample(per_commit, 0.0, 0.0, 0.0, 0, 1, None, {}, None)
        else:
            run = tether_run if system == "tether" else langgraph_run
            seconds, cpu = run(path, variant, durability, n)
            after = written_bytes()
            empty, empty_tables = self._empty[system]
            tables = table_bytes(path)
            sample = Sample(
                seconds / n,
                cpu / n,
                SqlClock.seconds / n,
                SqlClock.cpu_seconds / n,
                SqlClock.calls / n,
                SqlClock.commits / n,
                stored_bytes(path) - empty,
                {t: b - empty_tables.get(t, 0) for t, b in tables.items() if b != empty_tables.get(t, 0)},
                None if before is None or after is None else after - before,
            )
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
        self.samples.setdefault(key, []).append(sample)
        return sample

    def spread(self, key: Key, figure: Callable[[Sample], float]) -> Spread | None:
        samples = self.samples.get(key)
        return Spread.of([figure(s) for s in samples]) if samples else None

    def ratio(self, top: Key, bottom: Key, figure: Callable[[Sample, Sample], float]) -> Spread | None:
        """A figure of two rows, computed within each repetition (they were measured together)."""
        pairs = list(zip(self.samples.get(top, []), self.samples.get(bottom, []), strict=False))
        return Spread.of([figure(a, b) for a, b in pairs]) if pairs else None


def run_all(bench: Bench, sizes: list[int], repeat: int) -> None:
    for rep in range(repeat):
        for n in sizes:
            for durability in DURABILITIES:
                for system, variant in SYSTEMS:
                    key = (system, variant, durability, n)
                    sample = bench.measure(key)
                    rate = 1 / sample.seconds
                    print(
                        f"  rep {rep + 1}/{repeat}: {system:<9} {variant:<7} {durability:<6} {n:>5}: "
                        f"{rate:>9,.0f} {'commits' if system == 'floor' else 'steps'}/s",
                        file=sys.stderr,
                        flush=True,
                    )


# -- reporting ---------------------------------------------------------------------------


def show(spread: Spread | None, fmt: str = ",.0f", suffix: str = "") -> str:
    return "-" if spread is None else spread.show(fmt, suffix)


def python_micros(s: Sample) -> float:
    """CPU µs per step outside SQLite calls."""
    return (s.cpu_seconds - s.sql_cpu_seconds) * 1e6


def report_rows(bench: Bench, sizes: list[int]) -> None:
    print("\n== each row: median (low–high) over the repetitions ==")
    print(
        "| system | sync | steps | steps/s | µs/step | SQL µs/step | Python µs/step | "
        "SQL calls/step | commits/step | bytes/step | io/step |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for n in sizes:
        for durability in DURABILITIES:
            sync = SYNC_PRAGMA[durability]
            for system, variant in SYSTEMS:
                key = (system, variant, durability, n)
                samples = bench.samples.get(key)
                if not samples:
                    continue
                rate = show(bench.spread(key, lambda s: 1 / s.seconds))
                if system == "floor":
                    per_commit = show(bench.spread(key, lambda s: s.seconds * 1e6), ",.1f")
                    print(
                        f"| floor (INSERT+COMMIT) | {sync} | {bench.floor_commits} commits "
                        f"| {rate} commits/s | {per_commit} per commit | | | | | | |"
                    )
                    continue
                last = samples[-1]
                timed = last.sql_calls > 0
                sql = show(bench.spread(key, lambda s: s.sql_seconds * 1e6)) if timed else "n/a"
                python = show(bench.spread(key, python_micros)) if timed else "n/a"
                io_step = "n/a" if last.written is None else f"{last.written / n:,.0f}"
                stored = "n/a" if last.stored is None else f"{last.stored / n:,.0f}"
                micro = show(bench.spread(key, lambda s: s.seconds * 1e6))
                print(
                    f"| {system} {variant} | {sync} | {n:,} | {rate} | {micro} | {sql} | {python} | "
                    f"{last.sql_calls:.1f} | {last.commits:.2f} | {stored} | {io_step} |"
                )
    if any(s.sql_calls == 0 for k, v in bench.samples.items() if k[0] != "floor" for s in v):
        print("n/a: the store opened no connection through sqlite3.connect, so its SQL was not timed")


def tether_vs(bench: Bench, variant: str, durability: str, n: int, against: Key) -> Spread | None:
    return bench.ratio(("tether", variant, durability, n), against, lambda a, b: b.seconds / a.seconds)


def vs_floor(bench: Bench, variant: str, durability: str, n: int) -> Spread | None:
    """tether steps/s ÷ the floor's steps/s for the commits its step needs: one commit for a
    read; for a write, an intent synced FULL plus the result at the row's durability."""
    top: Key = ("tether", variant, durability, n)
    at: Key = ("floor", "commit", durability, n)
    if variant == "read":
        return bench.ratio(top, at, lambda a, b: b.seconds / a.seconds)
    pairs = zip(
        bench.samples.get(top, []),
        bench.samples.get(at, []),
        bench.samples.get(("floor", "commit", "full", n), []),
        strict=False,
    )
    values = [(full.seconds + floor.seconds) / row.seconds for row, floor, full in pairs]
    return Spread.of(values) if values else None


def report_ratios(bench: Bench, sizes: list[int]) -> None:
    print("\n== ratios, each computed within one repetition: median (low–high) ==")
    print("vs LangGraph: tether steps/s ÷ LangGraph steps/s, same durability and run length")
    print("vs floor: tether steps/s ÷ the floor's rate for the commits a step needs (read: 1; write: an")
    print("intent synced FULL + the result at the row's durability); 1.0 would be SQLite's cost alone")
    print("| sync | steps | tether | vs LangGraph, growing state | vs LangGraph, flat state | vs floor |")
    print("|---|---|---|---|---|---|")
    for n in sizes:
        for durability in DURABILITIES:
            for variant in ("read", "write"):
                growing = tether_vs(bench, variant, durability, n, ("langgraph", "growing", durability, n))
                flat = tether_vs(bench, variant, durability, n, ("langgraph", "flat", durability, n))
                floor = vs_floor(bench, variant, durability, n)
                print(
                    f"| {SYNC_PRAGMA[durability]} | {n:,} | {variant} | {show(growing, '.2f', '×')} | "
                    f"{show(flat, '.2f', '×')} | {show(floor, '.2f', '×')} |"
                )


def report_growth(bench: Bench, sizes: list[int]) -> None:
    """LangGraph's growing state, stated: the cost of a step at the longest run over the shortest."""
    if len(sizes) < 2:
        return
    lo, hi = min(sizes), max(sizes)
    print(f"\n== the effect of run length: a step at {hi:,} steps ÷ a step at {lo:,} (1.0: the same) ==")
    print("| system | sync | µs/step | bytes/step |")
    print("|---|---|---|---|")
    for system, variant in SYSTEMS[1:]:
        for durability in DURABILITIES:
            a, b = (bench.samples.get((system, variant, durability, n)) for n in (lo, hi))
            if not a or not b:
                continue
            time_growth = Spread.of([y.seconds / x.seconds for x, y in zip(a, b, strict=False)])
            stored_a, stored_b = a[-1].stored, b[-1].stored
            growth = "n/a" if not stored_a or not stored_b else f"{stored_b / hi / (stored_a / lo):.2f}×"
            sync = SYNC_PRAGMA[durability]
            print(f"| {system} {variant} | {sync} | {time_growth.show('.2f', '×')} | {growth} |")


@dataclass
class Stored:
    """Bytes per step of one system at each run length, and by table at the longest."""

    name: str
    per_step: dict[int, float]
    tables: dict[str, int]

    def marginal(self) -> float | None:
        """Bytes one more step costs: the growth from the shortest run to the longest, per step."""
        if len(self.per_step) < 2:
            return None
        lo, hi = min(self.per_step), max(self.per_step)
        return (self.per_step[hi] * hi - self.per_step[lo] * lo) / (hi - lo)


def stored_figures(bench: Bench, sizes: list[int], dbos: dict[int, dict[str, Any] | str]) -> list[Stored]:
    out = []
    for system, variant in SYSTEMS[1:]:
        per_step = {}
        tables: dict[str, int] = {}
        for n in sizes:
            samples = bench.samples.get((system, variant, "normal", n)) or []
            if samples and samples[-1].stored is not None:
                per_step[n] = samples[-1].stored / n
                tables = samples[-1].tables
        out.append(Stored(f"{system} {variant}", per_step, tables))
    measured = {n: r for n, r in dbos.items() if isinstance(r, dict)}
    if measured:
        longest = measured[max(measured)]
        out.append(Stored("DBOS step", {n: r["bytes"] / n for n, r in measured.items()}, longest["tables"]))
    return out


def report_bytes(figures: list[Stored], sizes: list[int], dbos: dict[int, dict[str, Any] | str]) -> None:
    print("\n== bytes stored per step: file growth over an empty store ÷ steps (a ~100-byte result) ==")
    print(f"| system | {' | '.join(f'{n:,} steps' for n in sizes)} | marginal | by table, longest run |")
    print(f"|---|{'---|' * len(sizes)}---|---|")
    for s in figures:
        longest = max(s.per_step) if s.per_step else 0
        cells = " | ".join(f"{s.per_step[n]:,.0f}" if n in s.per_step else "-" for n in sizes)
        m = s.marginal()
        by_table = ", ".join(
            f"{t} {b / longest:,.0f}" for t, b in sorted(s.tables.items(), key=lambda kv: -kv[1]) if b > 0
        )
        print(f"| {s.name} | {cells} | {'-' if m is None else f'{m:,.0f}'} | {by_table} |")
    for n, r in dbos.items():
        if isinstance(r, str):
            print(f"DBOS at {n} steps: {r}")


def report_goals(bench: Bench, sizes: list[int], figures: list[Stored]) -> None:
    print("\n== goals of issue 9 measured here ==")
    print(GOALS_HEADER)
    short, long = min(sizes), max(sizes)
    timed = all(s.sql_calls > 0 for s in bench.samples.get(("tether", "read", "normal", long), []))
    python = {
        (d, n): bench.spread(("tether", "read", d, n), python_micros) for d in DURABILITIES for n in sizes
    }
    p = python["normal", long]
    others = "; ".join(
        f"{SYNC_PRAGMA[d]} {n:,} steps {show(v)}"
        for (d, n), v in python.items()
        if (d, n) != ("normal", long)
    )
    print(
        goal_line(
            "Python per read step ≤ 100 µs",
            f"{show(p)} µs (NORMAL, {long:,} steps); {others}" if timed else "n/a",
            None if p is None or not timed else p.median <= 100,
        )
    )
    reads = [tether_vs(bench, "read", d, short, ("langgraph", "growing", d, short)) for d in DURABILITIES]
    print(
        goal_line(
            f"read steps ≥ 10× LangGraph at {short:,} steps per run, same durability",
            "; ".join(
                f"{SYNC_PRAGMA[d]} {show(r, '.2f', '×')}" for d, r in zip(DURABILITIES, reads, strict=True)
            ),
            None if None in reads else all(r is not None and r.median >= 10 for r in reads),
        )
    )
    writes = {n: tether_vs(bench, "write", "full", n, ("langgraph", "growing", "full", n)) for n in sizes}
    print(
        goal_line(
            "write steps ≥ 3× LangGraph at FULL",
            "; ".join(f"{n:,} steps {show(r, '.2f', '×')}" for n, r in writes.items()),
            None if writes[short] is None else writes[short].median >= 3,
        )
    )
    by_name = {s.name: s for s in figures}
    ours, theirs = by_name.get("tether read"), by_name.get("DBOS step")
    both = sorted(set(ours.per_step) & set(theirs.per_step)) if ours and theirs else []
    if not ours or not theirs or not both:
        print(goal_line("bytes stored per step ≤ DBOS's, flat in run length", "not measured", None))
        return
    at, m = both[-1], ours.marginal()
    flat = m is not None and m <= 1.1 * ours.per_step[short]
    figure = (
        f"tether read {ours.per_step[at]:,.0f} B vs DBOS {theirs.per_step[at]:,.0f} B at {at:,} steps; "
        f"tether {ours.per_step[short]:,.0f} B at {short:,} steps, "
        f"{'-' if m is None else f'{m:,.0f}'} B marginal (flat: within 10%)"
    )
    ok = ours.per_step[at] <= theirs.per_step[at] and flat
    print(goal_line("bytes stored per step ≤ DBOS's, flat in run length", figure, ok))


def profile_tether(tmp: Path, n: int, top: int) -> str:
    """cProfile of the read loop at `n` steps, NORMAL: where tether's time goes."""
    profiler = cProfile.Profile()
    profiler.enable()
    tether_run(tmp / "profile.db", "read", "normal", n)
    profiler.disable()
    text = []
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(top)
        text.append(f"\n== cProfile, tether read loop, {n:,} steps, NORMAL, top {top} by {key} ==")
        text.append(out.getvalue().split("\n", 4)[-1].rstrip())
    return "\n".join(text)


# -- main ------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="2 repetitions, a shorter floor (about a minute)"
    )
    parser.add_argument("--steps", default="100,1000", help="comma-separated run lengths (default 100,1000)")
    parser.add_argument("--repeat", type=int, help="repetitions (default 5; quick 2)")
    parser.add_argument(
        "--floor-commits", type=int, help="commits per floor measurement (default 1000; quick 300)"
    )
    parser.add_argument("--no-dbos", action="store_true", help="skip DBOS's bytes per step")
    parser.add_argument(
        "--profile", action="store_true", help="also cProfile tether's read loop, longest run"
    )
    parser.add_argument("--top", type=int, default=30, help="functions shown by --profile")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    return parser.parse_args()


def main() -> None:
    args = parse_args()
    if args.child:
        arg = json.loads(args.child[1])
        print_result(dbos_bytes(Path(arg["path"]), arg["n"]))
        return
    sizes = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    repeat = args.repeat or (2 if args.quick else 5)
    floor_commits = args.floor_commits or (300 if args.quick else 1000)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as name:
        tmp = Path(name)
        print(describe_machine(tmp, ("langgraph", "langgraph-checkpoint-sqlite", "dbos")))
        print(
            f"run lengths {sizes}; {repeat} repetitions; floor {floor_commits} commits; "
            f"timing wrapper {wrapper_cost(tmp):.2f} µs per SQL call"
        )
        dbos: dict[int, dict[str, Any] | str] = {}
        if not args.no_dbos:
            for n in sizes:
                try:
                    dbos[n] = run_child(SCRIPT, "dbos-bytes", {"path": str(tmp / f"dbos-{n}.db"), "n": n})
                except Exception as exc:
                    dbos[n] = f"FAILED: {type(exc).__name__}: {exc}"[:400]
        bench = Bench(tmp, floor_commits)
        run_all(bench, sizes, repeat)
        profile = profile_tether(tmp, max(sizes), args.top) if args.profile else ""
    report_rows(bench, sizes)
    report_ratios(bench, sizes)
    report_growth(bench, sizes)
    figures = stored_figures(bench, sizes, dbos)
    report_bytes(figures, sizes, dbos)
    report_goals(bench, sizes, figures)
    if profile:
        print(profile)
    print(f"\nload average at the end: {load_average()}; total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
