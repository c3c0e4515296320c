"""Measure tether's own cost per governed step against LangGraph and the raw SQLite floor.

What it measures, all on real files on this disk (in a temporary directory):

* tether: one agent state whose scripted proposer calls one trivial tool N times (the
  argument `i` changes every step, so loop detection never fires) and then exits. The
  tool returns about 100 bytes. A 20-rule policy: 10 rules on the tool itself, evaluated
  on every call (9 CEL conditions that are false, one allow rule), and 10 on the exit and
  on four envelope tools that are never called. Two loops: a `read` tool (one commit per
  step) and a `write` idempotent tool (an intent commit, always synced FULL, plus a
  result commit per step), each with the journal's durability "full" and "normal".
* LangGraph: a StateGraph with an "agent" node and a "tool" node cycling N times, the
  state holding a list of ~100-byte results with an `operator.add` reducer (as a message
  list would), checkpointed by `SqliteSaver` on a file; one agent+tool cycle is a step.
* the raw floor: one small INSERT + COMMIT per transaction into a WAL-mode SQLite file.

Columns: steps/s is N divided by the wall time of one run (`Runtime.start` for tether,
`graph.invoke` for LangGraph); bytes/step is the growth of the database file (after
folding the WAL back in) over an empty store, divided by N; io/step is the bytes the
process handed to write() during the run (/proc/self/io `wchar`, Linux only), which
counts rewrites that do not stay in the file. No timing is asserted: this is a report.

Run:  .venv/bin/python bench/step_overhead.py [--steps 100,1000] [--repeat 3] [--profile]
(`pip install -e '.[dev,bench]'` first, for langgraph and langgraph-checkpoint-sqlite.)
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import operator
import os
import platform
import pstats
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal, TypedDict

from tether import AgentState, Budget, FunctionModel, ModelContext, Policy, Runtime, Terminal, Workflow, tool
from tether.journal.sqlite import SQLiteJournal

Durability = Literal["full", "normal"]
Effect = Literal["read", "write"]
DURABILITIES: tuple[Durability, ...] = ("full", "normal")
EFFECTS: tuple[Effect, ...] = ("read", "write")
PAYLOAD = "x" * 80  # with the key names and `i`, a result serializes to about 100 bytes
SYNC_PRAGMA: dict[Durability, str] = {"full": "FULL", "normal": "NORMAL"}


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


def tether_workflow(effect: Effect, n: int) -> Workflow:
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


async def _tether_run(path: Path, effect: Effect, durability: Durability, n: int) -> float:
    workflow, model = tether_workflow(effect, n), scripted_proposer(n)
    journal = SQLiteJournal(path, durability=durability)
    try:
        start = time.perf_counter()
        result = await Runtime(journal).start(workflow, model)
        elapsed = time.perf_counter() - start
    finally:
        journal.close()
    if result.status != "completed":  # the loop itself must be right, or the figures mean nothing
        raise RuntimeError(f"tether run ended {result.status}: {result.reason_code} {result.message}")
    return elapsed


def tether_empty(path: Path) -> None:
    SQLiteJournal(path).close()


# -- LangGraph ---------------------------------------------------------------------------


class LoopState(TypedDict):
    i: int
    proposal: dict[str, Any]
    results: Annotated[list[dict[str, Any]], operator.add]


def langgraph_graph(n: int, saver: Any) -> Any:
    from langgraph.graph import END, START, StateGraph

    def agent(state: LoopState) -> dict[str, Any]:
        return {"proposal": {"tool": "probe", "args": {"i": state["i"]}}}

    def run_tool(state: LoopState) -> dict[str, Any]:
        i = state["proposal"]["args"]["i"]
        return {"i": i + 1, "results": [{"i": i, "payload": PAYLOAD}]}

    def route(state: LoopState) -> str:
        return "tool" if state["i"] < n else END

    graph = StateGraph(LoopState)
    graph.add_node("agent", agent)
    graph.add_node("tool", run_tool)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", route, ["tool", END])
    graph.add_edge("tool", "agent")
    return graph.compile(checkpointer=saver)


def _langgraph_saver(path: Path, durability: Durability) -> tuple[sqlite3.Connection, Any]:
    from langgraph.checkpoint.sqlite import SqliteSaver

    conn = sqlite3.connect(path, check_same_thread=False)
    conn.execute(f"PRAGMA synchronous={SYNC_PRAGMA[durability]}")
    saver = SqliteSaver(conn)
    saver.setup()  # SqliteSaver.setup runs `PRAGMA journal_mode=WAL` itself
    mode = conn.execute("PRAGMA journal_mode").fetchone()[0]
    sync = conn.execute("PRAGMA synchronous").fetchone()[0]
    if mode != "wal" or sync != {"full": 2, "normal": 1}[durability]:
        raise RuntimeError(f"LangGraph connection is journal_mode={mode}, synchronous={sync}")
    return conn, saver


def langgraph_run(path: Path, durability: Durability, n: int, mode: str = "sync") -> float:
    conn, saver = _langgraph_saver(path, durability)
    try:
        graph = langgraph_graph(n, saver)
        config = {"configurable": {"thread_id": "bench"}, "recursion_limit": 2 * n + 10}
        start = time.perf_counter()
        # durability="sync": each step's checkpoint is written before the next step starts,
        # which is what tether does. LangGraph's default ("async") overlaps the write with
        # the next step on another thread; see the extra rows printed for it.
        out = graph.invoke({"i": 0, "results": []}, config, durability=mode)
        elapsed = time.perf_counter() - start
    finally:
        conn.close()
    if out["i"] != n or len(out["results"]) != n:
        raise RuntimeError(f"LangGraph loop ran {out['i']} steps, expected {n}")
    return elapsed


def langgraph_empty(path: Path) -> None:
    conn, _ = _langgraph_saver(path, "normal")
    conn.close()


# -- the raw floor -----------------------------------------------------------------------


def raw_floor(path: Path, durability: Durability, n: int) -> float:
    """Seconds for n transactions of one ~100-byte INSERT each into a WAL-mode file."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={SYNC_PRAGMA[durability]}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        body = "x" * 100
        start = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (body) VALUES (?)", (body,))
            db.execute("COMMIT")
        return time.perf_counter() - start
    finally:
        db.close()


def raw_empty(path: Path) -> None:
    db = sqlite3.connect(path, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
    db.close()


# -- measuring ---------------------------------------------------------------------------


def stored_bytes(path: Path) -> int:
    """Size of the database file once the WAL is folded back in and truncated.

    File size (not the `dbstat` virtual table) because it is what the store costs on disk,
    free pages included: a design that rewrites a growing row leaves them behind. Pages
    are 4 KiB, so at small N the figure is rounded to a page over N steps.
    """
    db = sqlite3.connect(path)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        db.close()
    return path.stat().st_size


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
class Row:
    system: str
    durability: str
    effect: str
    steps: int
    seconds: float
    stored: int
    written: int | None
    commits_per_step: float = 1.0

    @property
    def per_second(self) -> float:
        return self.steps / self.seconds

    @property
    def bytes_per_step(self) -> float:
        return self.stored / self.steps

    @property
    def io_per_step(self) -> float | None:
        return None if self.written is None else self.written / self.steps


class Bench:
    def __init__(self, tmp: Path, repeat: int) -> None:
        self.tmp = tmp
        self.repeat = repeat
        self._count = 0
        self._empty: dict[str, int] = {}

    def _path(self, name: str) -> Path:
        self._count += 1
        return self.tmp / f"{self._count:03d}-{name}.db"

    def empty(self, system: str, make: Callable[[Path], None]) -> int:
        if system not in self._empty:
            path = self._path(f"{system}-empty")
            make(path)
            self._empty[system] = stored_bytes(path)
        return self._empty[system]

    def measure(
        self,
        system: str,
        durability: str,
        effect: str,
        n: int,
        run: Callable[[Path], float],
        empty: int,
        commits_per_step: float = 1.0,
    ) -> Row:
        """Median wall time of `repeat` runs, each on a fresh file; bytes of the last one."""
        times: list[float] = []
        stored, written = 0, None
        for _ in range(self.repeat):
            path = self._path(f"{system}-{durability}-{effect}-{n}")
            before = written_bytes()
            times.append(run(path))
            after = written_bytes()
            written = None if before is None or after is None else after - before
            stored = stored_bytes(path) - empty
            path.unlink()
        return Row(system, durability, effect, n, statistics.median(times), stored, written, commits_per_step)


def run_all(
    bench: Bench, sizes: list[int], langgraph_async: bool
) -> tuple[list[Row], list[Row], dict[str, Row]]:
    """Every row, in order; the floor is measured first and last, since the disk drifts."""
    empty_tether = bench.empty("tether", tether_empty)
    empty_lg = bench.empty("langgraph", langgraph_empty)
    empty_raw = bench.empty("raw", raw_empty)
    commits = max(1000, max(sizes))
    floors: list[Row] = []

    def measure_floor(when: str) -> None:
        for durability in DURABILITIES:
            floors.append(
                bench.measure(
                    f"raw sqlite ({when})",
                    durability,
                    "commit",
                    commits,
                    lambda p, d=durability: raw_floor(p, d, commits),
                    empty_raw,
                )
            )
            print(_line(floors[-1]), file=sys.stderr, flush=True)

    rows: list[Row] = []

    def add(row: Row) -> None:
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)

    measure_floor("start")
    for n in sizes:
        for durability in DURABILITIES:
            for effect in EFFECTS:
                add(
                    bench.measure(
                        "tether",
                        durability,
                        effect,
                        n,
                        lambda p, e=effect, d=durability, k=n: asyncio.run(_tether_run(p, e, d, k)),
                        empty_tether,
                        commits_per_step=1 if effect == "read" else 2,
                    )
                )
            add(
                bench.measure(
                    "langgraph",
                    durability,
                    "-",
                    n,
                    lambda p, d=durability, k=n: langgraph_run(p, d, k),
                    empty_lg,
                )
            )
            if langgraph_async:
                add(
                    bench.measure(
                        "langgraph(async)",
                        durability,
                        "-",
                        n,
                        lambda p, d=durability, k=n: langgraph_run(p, d, k, mode="async"),
                        empty_lg,
                    )
                )
    measure_floor("end")
    # The floor is the fastest this disk has shown, so the ratios to it are not flattered.
    best = {
        d: max((f for f in floors if f.durability == d), key=lambda f: f.per_second) for d in DURABILITIES
    }
    return rows, floors, best


# -- reporting ---------------------------------------------------------------------------

HEADER = (
    f"{'system':<18} {'durability':<10} {'effect':<7} {'steps':>6} {'steps/s':>9} "
    f"{'bytes/step':>11} {'io/step':>10}"
)


def _line(row: Row) -> str:
    io_step = "n/a" if row.io_per_step is None else f"{row.io_per_step:,.0f}"
    return (
        f"{row.system:<18} {row.durability:<10} {row.effect:<7} {row.steps:>6} {row.per_second:>9,.0f} "
        f"{row.bytes_per_step:>11,.0f} {io_step:>10}"
    )


def _yes(ok: bool) -> str:
    return "yes" if ok else "no"


def report(rows: list[Row], floors: list[Row], floor: dict[str, Row], sizes: list[int]) -> None:
    print("\n== results (raw sqlite: a step is one INSERT+COMMIT of ~100 bytes) ==")
    print(HEADER)
    for row in [*rows, *floors]:
        print(_line(row))

    def find(system: str, durability: str, effect: str, n: int) -> Row | None:
        return next(
            (
                r
                for r in rows
                if (r.system, r.durability, r.effect, r.steps) == (system, durability, effect, n)
            ),
            None,
        )

    print("\n== ratios; goals: tether >= 10x LangGraph, and within 2x of the floor (ratio >= 0.5) ==")
    print("vs LangGraph: tether steps/s / LangGraph (durability='sync') steps/s at the same synchronous=")
    print("vs floor: tether steps/s / (raw commits/s / commits per step: read 1, write 2), raw = fastest row")
    print("w/ FULL intent: under 'normal' a write's intent is synced FULL anyway: floor 1 FULL + 1 NORMAL")
    print(
        f"{'durability':<10} {'effect':<7} {'steps':>6} {'tether/s':>9} {'LG/s':>7} {'vs LangGraph':>13} "
        f"{'10x?':>5} {'floor/s':>8} {'vs floor':>9} {'2x?':>4} {'w/ FULL intent':>15}"
    )
    for n in sizes:
        for durability in DURABILITIES:
            lg = find("langgraph", durability, "-", n)
            for effect in EFFECTS:
                row = find("tether", durability, effect, n)
                if row is None or lg is None:
                    continue
                vs_lg = row.per_second / lg.per_second
                floor_steps = floor[durability].per_second / row.commits_per_step
                vs_floor = row.per_second / floor_steps
                mixed = ""
                if effect == "write" and durability == "normal":
                    step_time = 1 / floor["full"].per_second + 1 / floor["normal"].per_second
                    mixed = f"{row.per_second * step_time:.2f}x"
                print(
                    f"{durability:<10} {effect:<7} {n:>6} {row.per_second:>9,.0f} {lg.per_second:>7,.0f} "
                    f"{vs_lg:>12.1f}x {_yes(vs_lg >= 10):>5} {floor_steps:>8,.0f} {vs_floor:>8.2f}x "
                    f"{_yes(vs_floor >= 0.5):>4} {mixed:>15}"
                )

    if len(sizes) > 1:
        lo, hi = min(sizes), max(sizes)
        print(f"\n== growth of bytes/step and io/step from {lo} to {hi} steps (flat is 1.0) ==")
        for system, durability, effect in sorted({(r.system, r.durability, r.effect) for r in rows}):
            a, b = find(system, durability, effect, lo), find(system, durability, effect, hi)
            if a is None or b is None:
                continue
            io_growth = f"{b.io_per_step / a.io_per_step:.2f}" if a.io_per_step and b.io_per_step else "n/a"
            growth = b.bytes_per_step / a.bytes_per_step
            print(
                f"{system:<18} {durability:<10} {effect:<7} bytes/step x{growth:.2f}   io/step x{io_growth}"
            )


# (file name, function name) as cProfile names them; "~" is a built-in or C method.
PROFILE_AREAS: list[tuple[str, str, str]] = [
    ("runtime.py", "_agent_turn", "one agent turn (the whole step)"),
    ("workflow.py", "hash", "Workflow.hash (recomputed: describe, json_schema, getsource)"),
    ("policy.py", "decide", "Policy.decide (20 rules, 10 CEL conditions run)"),
    ("~", "<method 'execute' of 'builtins.Program' objects>", "  of which CEL Program.execute"),
    ("run.py", "commit", "RunCursor.commit (checkpoint + entry, one transaction)"),
    ("sqlite.py", "_encode", "  of which JSON of run fields (checkpoint)"),
    ("records.py", "chain", "  of which chain: entry hash (canonical JSON + sha256)"),
    ("~", "<method 'execute' of 'sqlite3.Connection' objects>", "  of which sqlite3 execute"),
    ("tools.py", "call", "Tool.call (validate again, run, to_jsonable)"),
    ("tools.py", "validate", "Tool.validate (arguments)"),
    ("proposals.py", "parse_proposal", "parse_proposal"),
]


def profile_tether(tmp: Path, n: int, top: int) -> None:
    """cProfile of the read loop at `n` steps, normal durability: where tether's time goes."""
    path = tmp / "profile.db"
    profiler = cProfile.Profile()
    profiler.enable()
    asyncio.run(_tether_run(path, "read", "normal", n))
    profiler.disable()
    stats = pstats.Stats(profiler)
    print(f"\n== cProfile, tether read loop, {n} steps, normal durability: time per step by area ==")
    print(f"{'area':<62} {'us/step':>8} {'calls/step':>11}")
    table: dict[tuple[str, str], tuple[int, float]] = {}
    for (file, _line_no, func), (_cc, calls, _tt, cum, _callers) in stats.stats.items():
        key = (os.path.basename(file), func)
        prev_calls, prev_cum = table.get(key, (0, 0.0))
        table[key] = (prev_calls + calls, prev_cum + cum)
    for file, func, label in PROFILE_AREAS:
        if (file, func) in table:
            calls, cum = table[(file, func)]
            print(f"{label:<62} {cum / n * 1e6:>8,.0f} {calls / n:>11.1f}")
        else:
            print(f"{label:<62} {'n/a':>8}")
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(top)
        print(f"\n== cProfile, tether read loop, {n} steps, normal durability, top {top} by {key} ==")
        print(out.getvalue().split("\n", 4)[-1].rstrip())


def describe_machine() -> str:
    """Versions and load, so a table can be compared with another one."""
    try:
        rev = (
            subprocess.run(
                ["git", "describe", "--always", "--dirty"],
                capture_output=True,
                text=True,
                timeout=10,
                cwd=Path(__file__).parent,
                check=False,
            ).stdout.strip()
            or "?"
        )
    except OSError:
        rev = "?"
    try:
        from importlib.metadata import version

        langgraph = version("langgraph")
    except Exception:  # not installed: the LangGraph rows will fail with the import error
        langgraph = "?"
    load = "n/a" if not hasattr(os, "getloadavg") else ", ".join(f"{x:.2f}" for x in os.getloadavg())
    return (
        f"tether {rev}; Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}; "
        f"langgraph {langgraph}; {os.cpu_count()} cpus; load average {load}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", default="100,1000", help="comma-separated run sizes (default 100,1000)")
    parser.add_argument("--repeat", type=int, default=3, help="runs per row; the median time is shown")
    parser.add_argument(
        "--no-langgraph-async",
        action="store_true",
        help="skip the rows for LangGraph's default durability='async'",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of tether's read loop at the largest size",
    )
    parser.add_argument("--top", type=int, default=30, help="functions shown by --profile")
    args = parser.parse_args()
    sizes = sorted({int(s) for s in args.steps.split(",") if s.strip()})
    with tempfile.TemporaryDirectory(prefix="tether-bench-") as tmp:
        print(describe_machine())
        print(f"temp dir {tmp}; sizes {sizes}; median of {args.repeat} run(s) per row")
        print(f"progress (the same rows, as they finish):\n{HEADER}", file=sys.stderr, flush=True)
        rows, floors, floor = run_all(Bench(Path(tmp), args.repeat), sizes, not args.no_langgraph_async)
        report(rows, floors, floor, sizes)
        if args.profile:
            profile_tether(Path(tmp), max(sizes), args.top)
        if hasattr(os, "getloadavg"):
            print(f"\nload average at the end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
