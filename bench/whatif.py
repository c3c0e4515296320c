"""How fast replay and what-if go over recorded history: runs per minute, one core.

The history: 10,000 recorded runs of 10 governed steps each, on SQLite (default
durability). A few template runs are driven for real by the runtime (a scripted model,
the shop's tools): seven order reads, two refunds — a resolver in the policy looks the
order's status up, `history` counts the refunds, the larger refund is asked and approved —
and the exit. Each template differs in its refund amounts, so decisions differ between runs.
The 10,000 runs are copies of the templates written through the store (`create_run`, one
transaction per run, every entry chained and hashed as the runtime writes it): building
history at the runtime's speed would measure the runtime, not replay.

Then, timed, in this one process (replay uses one core; nothing runs in parallel):

* replay: every run rebuilt from the journal and every decision evaluated again under
  the policy recorded with it (resolvers answered from the recorded values), compared field
  by field with the record;
* what-if: every recorded proposal decided under a changed policy (the approval threshold
  moved), the changed decisions collected;
* the same what-if with the two rules over `history` left out, to show what converting
  `history` into the policy engine's values costs (the goal is judged on the first two).

Both read every run's entries from the database and decode them: that is part of the figure.
The issue's goal: ≥ 10,000 runs per minute of 10-step runs on one core. No timing is asserted.

Run:  .venv/bin/python bench/whatif.py [--runs 10000] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import GOALS_HEADER, describe_machine, goal_line, load_average

from tether import AgentState, Budget, Policy, Runtime, ScriptedModel, Terminal, Workflow, open_journal, tool
from tether.journal import Journal, NewEntry, RunRecord
from tether.journal.records import GENESIS_HASH
from tether.replay import Replayer, what_if

GOAL_RUNS_PER_MINUTE = 10_000
# (first refund, second refund) per template: allowed, asked, denied, over history's limit.
TEMPLATES = [(20.0, 30.0), (40.0, 80.0), (60.0, 700.0), (10.0, 15.0), (90.0, 45.0)]
ORDERS = [f"A{i}" for i in range(1, 8)]


def policy(ask_over: float, *, history: bool = True) -> dict[str, Any]:
    rules = [
        {"id": "refund-deny", "tool": "refund", "when": "args.amount > 500.0", "decision": "deny"},
        {
            "id": "refund-twice",
            "tool": "refund",
            "when": 'history.filter(h, h.tool == "refund").size() >= 2',
            "decision": "deny",
        },
        {
            "id": "refund-ask",
            "tool": "refund",
            "when": f'status(args.order_id) == "paid" && args.amount > {ask_over}',
            "decision": "ask",
            "approver": "supervisor",
        },
        {"id": "refund-ok", "tool": "refund", "decision": "allow"},
        {"id": "done-after-read", "exit": "done", "when": "size(history) == 0", "decision": "deny"},
    ]
    return {"rules": [r for r in rules if history or "history" not in r.get("when", "")]}


def shop() -> Workflow:
    @tool(effect="read")
    def read_order(order_id: str) -> dict[str, Any]:
        """Read an order."""
        return {"order_id": order_id, "total": 100.0, "status": "paid"}

    @tool(effect="write", idempotent=True)
    def refund(order_id: str, amount: float) -> dict[str, Any]:
        """Refund part of an order."""
        return {"ok": True, "amount": amount}

    state = AgentState(
        "shop",
        "Help the customer.",
        (read_order, refund),
        {"done": "done"},
        budget=Budget(max_steps=20, max_tool_calls=20),
        escalate_to="supervisor",
    )
    return Workflow(
        "shop",
        "1",
        "shop",
        [state, Terminal("done")],
        policy=Policy.from_dict(policy(50.0)),
        resolvers={"status": lambda ctx, order_id: "paid"},
    )


async def templates(journal: Journal, workflow: Workflow) -> list[tuple[RunRecord, list[NewEntry]]]:
    """Each template run driven for real, then read back as entries to copy."""
    made = []
    for first, second in TEMPLATES:
        script: list[dict[str, Any]] = [
            {"kind": "tool_call", "tool": "read_order", "args": {"order_id": o}} for o in ORDERS
        ]
        script += [
            {"kind": "tool_call", "tool": "refund", "args": {"order_id": "A1", "amount": first}},
            {"kind": "tool_call", "tool": "refund", "args": {"order_id": "A2", "amount": second}},
            {"kind": "exit", "exit": "done"},
        ]
        runtime = Runtime(journal)
        result = await runtime.start(workflow, ScriptedModel(script))
        while result.status == "paused":
            await journal.decide_ticket(result.ticket_id or "", approve=True, by="supervisor")
            result = await runtime.resume(result.run_id, workflow, ScriptedModel(script))
        record = await journal.get_run(result.run_id)
        entries = await journal.read_entries(result.run_id)
        made.append((record, [NewEntry(e.kind, e.body_json, e.step_id, e.state) for e in entries]))
    return made


async def build(journal: Journal, runs: int) -> tuple[int, int]:
    """`runs` recorded runs, copies of the templates; returns (governed steps, entries) per run."""
    workflow = shop()
    made = await templates(journal, workflow)
    for i in range(runs - len(made)):
        record, entries = made[i % len(made)]
        copy = record.model_copy(
            update={"run_id": f"run_bench{i:08d}", "last_seq": 0, "last_hash": GENESIS_HASH}
        )
        await journal.create_run(copy, entries)
    record, entries = made[0]
    steps = len({e.step_id for e in entries if e.step_id})
    return steps, len(entries)


async def measure(journal: Journal, new: Policy | None) -> tuple[float, int, int]:
    """(seconds, runs, decisions) to replay every run (what-if with `new`)."""
    started = time.perf_counter()
    if new is not None:
        found = await what_if(journal, new)
        return time.perf_counter() - started, found.runs, found.decisions
    replayer = Replayer(journal)
    runs = decisions = 0
    for record in await journal.list_runs(None, limit=2**62):
        report = await replayer.replay(record.run_id, record)
        if not report.ok:
            raise SystemExit(f"replay diverged on {record.run_id}: {report.as_dict()}")
        runs += 1
        decisions += len(report.decisions)
    return time.perf_counter() - started, runs, decisions


async def bench(path: Path, runs: int) -> None:
    journal = open_journal(str(path))
    try:
        started = time.perf_counter()
        steps, entries = await build(journal, runs)
        built = time.perf_counter() - started
        print(
            f"built {runs:,} runs of {steps} governed steps ({entries} entries each) in {built:.1f}s",
            flush=True,
        )
        rows = []
        for mode, new in (
            ("replay (recorded policy)", None),
            ("what-if (ask over 100)", Policy.from_dict(policy(100.0))),
            ("what-if, a policy not reading `history`", Policy.from_dict(policy(100.0, history=False))),
        ):
            seconds, done, decisions = await measure(journal, new)
            rows.append((mode, done, decisions, seconds))
    finally:
        journal.close()
    print("\n== replay and what-if over recorded runs, one process, SQLite ==")
    print("| mode | runs | decisions | seconds | runs per minute | decisions per second |")
    print("|---|---|---|---|---|---|")
    for mode, done, decisions, seconds in rows:
        rate = f"{done / seconds * 60:,.0f} | {decisions / seconds:,.0f}"
        print(f"| {mode} | {done:,} | {decisions:,} | {seconds:.1f} | {rate} |")
    print("\n== goal of issue 11 measured here ==")
    print(GOALS_HEADER.replace("issue 9", "issue 11"))
    slowest = min(done / seconds * 60 for _, done, _, seconds in rows[:2])
    goal = f"what-if ≥ {GOAL_RUNS_PER_MINUTE:,} runs/min of {steps}-step runs, one core"
    print(goal_line(goal, f"{slowest:,.0f} runs/min (the slower mode)", slowest >= GOAL_RUNS_PER_MINUTE))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--quick", action="store_true", help="1,000 runs")
    args = parser.parse_args()
    runs = 1_000 if args.quick else args.runs
    with tempfile.TemporaryDirectory(prefix="tether-whatif-") as tmp:
        print(describe_machine(Path(tmp), ("msgspec", "common-expression-language")))
        print(f"load average at the start: {load_average()}", flush=True)
        asyncio.run(bench(Path(tmp) / "journal.db", runs))
    print(f"load average at the end: {load_average()}", file=sys.stderr)


if __name__ == "__main__":
    main()
