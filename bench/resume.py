"""How long resuming a long run takes, in-process: from `Runtime.resume` until the model is
asked for its next proposal.

For each shape, a run of 10,000 journal entries is built once on SQLite (default durability)
and paused on an approval ticket at its end: the last proposal calls an idempotent write tool
whose policy rule says `ask`. The ticket is approved, the journal closed and its file kept.
Each repetition copies that file, opens the copy (not timed), and times
`Runtime.resume(run_id, workflow, model)`:

* to the tool: from the call until the approved tool's function is entered: acquiring the
  lease, reading the run, its entries and the ticket, rebuilding the transcript, and
  committing the intent (synced to disk before any effect);
* to the model: from the call until the model's `propose` is entered: the above, then the
  tool, its result committed, and the model's context built. The model (a `FunctionModel`)
  records the time and raises, which escalates the run; that is not timed.

Shapes (both exactly 10,000 entries, counted from the journal after building):
* one visit: a single agent state: the run's start, 9,997 read steps, the write asked and
  the approval (an entry of its own);
* 100 visits: two agent states taking turns, 100 visits of 100 entries each (99 read steps
  and an exit; the last: 97 reads, the write and the approval; the start is in the first),
  so that most entries belong to earlier visits.

The first resume in a process pays one-time costs (imports, schemas): one untimed resume
of a copy comes first.

The issue's goal: ≤ 20 ms. Median of the repetitions (low–high). No timing is asserted.

Run:  .venv-bench/bin/python bench/resume.py [--quick] [--entries 10000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchkit import GOALS_HEADER, Spread, describe_machine, goal_line, load_average

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

PAYLOAD = "x" * 80
GOAL_MS = 20.0


class Clock:
    """When the approved tool and the model were entered, in perf_counter seconds."""

    tool: float | None = None
    model: float | None = None


@tool(effect="read")
def probe(i: int) -> dict[str, Any]:
    """Read something small; returns about 100 bytes."""
    return {"i": i, "payload": PAYLOAD}


@tool(effect="write", idempotent=True)
def commit_change(i: int) -> dict[str, Any]:
    """The write a person approves at the end of the run."""
    Clock.tool = Clock.tool or time.perf_counter()
    return {"i": i, "done": True}


def workflow(visits: int, per_visit: int) -> Workflow:
    """One agent state (visits == 1) or two taking turns; `probe` allowed, the write asked.
    The exit `done` is never taken (a workflow must be able to finish)."""
    policy = Policy.from_dict(
        {
            "rules": [
                {"id": "reads", "tool": "probe", "decision": "allow"},
                {
                    "id": "approve-writes",
                    "tool": "commit_change",
                    "decision": "ask",
                    "approver": "supervisor",
                },
                {"id": "turns", "exit": "next", "decision": "allow"},
            ]
        },
        "resume-bench",
    )
    budget = Budget(max_steps=per_visit + 5, max_tool_calls=per_visit + 5, max_seconds=3600)
    names = ["a"] if visits == 1 else ["a", "b"]
    states: list[Any] = [
        AgentState(
            name,
            "Read, then hand over to the other state (or write, at the end).",
            (probe, commit_change),
            {"next": names[(k + 1) % len(names)], "done": "done"},
            budget=budget,
        )
        for k, name in enumerate(names)
    ]
    return Workflow(f"resume-{visits}", "1", "a", [*states, Terminal("done")], policy=policy)


def plan(visits: int, per_visit: int) -> list[dict[str, Any]]:
    """The proposals that give visits × per_visit entries and end on the write: each visit but
    the last is (per_visit − 1) reads and the exit; the last holds the run's start, its reads,
    the write asked, and the person's decision on it."""
    proposals: list[dict[str, Any]] = []
    i = 0
    for visit in range(visits):
        last = visit == visits - 1
        reads = per_visit - 3 if last else per_visit - 1
        for _ in range(reads):
            proposals.append({"kind": "tool_call", "tool": "probe", "args": {"i": i}})
            i += 1
        proposals.append(
            {"kind": "tool_call", "tool": "commit_change", "args": {"i": i}}
            if last
            else {"kind": "exit", "exit": "next"}
        )
    return proposals


def scripted(proposals: list[dict[str, Any]]) -> FunctionModel:
    turn = 0

    def propose(ctx: ModelContext) -> dict[str, Any]:
        nonlocal turn
        turn += 1
        return proposals[turn - 1]

    return FunctionModel(propose, name="resume-bench-builder")


class Resumed(Exception):
    """Raised by the timing model: the measurement is over."""


def timing_model() -> FunctionModel:
    def propose(ctx: ModelContext) -> dict[str, Any]:
        Clock.model = time.perf_counter()
        raise Resumed

    return FunctionModel(propose, name="resume-bench-timer")


@dataclass
class Shape:
    name: str
    visits: int
    per_visit: int


@dataclass
class Built:
    path: Path
    run_id: str
    entries: int
    seconds: float


async def build(shape: Shape, path: Path) -> Built:
    """Drive the run to its pause, approve the ticket; the file then holds the approved run."""
    wf = workflow(shape.visits, shape.per_visit)
    journal = open_journal(str(path))
    try:
        runtime = Runtime(journal)
        start = time.perf_counter()
        result = await runtime.start(wf, scripted(plan(shape.visits, shape.per_visit)))
        seconds = time.perf_counter() - start
        if result.status != "paused" or result.ticket_id is None:
            raise RuntimeError(f"the run ended {result.status} ({result.reason_code}: {result.message})")
        await journal.decide_ticket(result.ticket_id, approve=True, by="bench")
        entries = len(await journal.read_entries(result.run_id))
    finally:
        await journal.aclose()
    return Built(path, result.run_id, entries, seconds)


async def resume_once(shape: Shape, built: Built, copy: Path) -> tuple[float, float]:
    """Milliseconds from the resume call to the approved tool, and to the model."""
    for suffix in ("", "-wal"):
        if Path(f"{built.path}{suffix}").exists():
            shutil.copyfile(f"{built.path}{suffix}", f"{copy}{suffix}")
    wf = workflow(shape.visits, shape.per_visit)
    journal = open_journal(str(copy))
    try:
        runtime = Runtime(journal)
        Clock.tool = Clock.model = None
        start = time.perf_counter()
        result = await runtime.resume(built.run_id, wf, timing_model())
    finally:
        await journal.aclose()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{copy}{suffix}").unlink(missing_ok=True)
    if Clock.tool is None or Clock.model is None:
        raise RuntimeError(f"the resumed run never reached the model: {result.status} {result.message}")
    return (Clock.tool - start) * 1000, (Clock.model - start) * 1000


def measure(shape: Shape, tmp: Path, repeat: int) -> tuple[Built, list[tuple[float, float]]]:
    built = asyncio.run(build(shape, tmp / f"{shape.visits}-visits.db"))
    print(
        f"  built {shape.name}: {built.entries:,} entries in {built.seconds:.1f}s",
        file=sys.stderr,
        flush=True,
    )
    asyncio.run(resume_once(shape, built, tmp / "warm-up.db"))
    times = []
    for k in range(repeat):
        times.append(asyncio.run(resume_once(shape, built, tmp / f"copy-{k}.db")))
        print(f"  {shape.name}: resume {k + 1}/{repeat}: {times[-1][1]:,.1f} ms", file=sys.stderr, flush=True)
    return built, times


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 repetitions (well under a minute)")
    parser.add_argument("--entries", type=int, default=10_000, help="entries in the run (default 10000)")
    parser.add_argument("--repeat", type=int, help="resumes timed per shape (default 5; quick 3)")
    args = parser.parse_args()
    repeat = args.repeat or (3 if args.quick else 5)
    visits = 100 if args.entries >= 10_000 else 10
    shapes = [
        Shape("one visit", 1, args.entries),
        Shape(f"{visits} visits", visits, args.entries // visits),
    ]
    started = time.perf_counter()
    results: list[tuple[Shape, Built, list[tuple[float, float]]]] = []
    with tempfile.TemporaryDirectory(prefix="tether-resume-") as name:
        tmp = Path(name)
        print(describe_machine(tmp, ()))
        print(f"{repeat} resumes per shape; SQLite, default durability", flush=True)
        for shape in shapes:
            built, times = measure(shape, tmp, repeat)
            results.append((shape, built, times))

    def spread(times: list[tuple[float, float]], pick: Callable[[tuple[float, float]], float]) -> Spread:
        return Spread.of([pick(t) for t in times])

    print("\n== resume of a long run, in-process: ms from Runtime.resume, median (low–high) ==")
    print("| shape | entries | built in | to the approved tool | to the model's next propose |")
    print("|---|---|---|---|---|")
    for shape, built, times in results:
        to_tool, to_model = spread(times, lambda t: t[0]), spread(times, lambda t: t[1])
        print(
            f"| {shape.name} | {built.entries:,} | {built.seconds:.1f} s | "
            f"{to_tool.show(',.1f')} ms | {to_model.show(',.1f')} ms |"
        )
    print("\n== goals of issue 9 measured here ==")
    print(GOALS_HEADER)
    worst = max(spread(times, lambda t: t[1]).median for _, _, times in results)
    figures = "; ".join(
        f"{shape.name} {spread(times, lambda t: t[1]).show(',.1f')} ms" for shape, _, times in results
    )
    goal = f"resume of a {args.entries:,}-entry run ≤ {GOAL_MS:g} ms in-process"
    print(goal_line(goal, figures, worst <= GOAL_MS))
    print(f"\nload average at the end: {load_average()}; total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
