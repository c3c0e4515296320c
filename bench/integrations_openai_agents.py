"""What tether.integrations.openai_agents adds to each tool call of an OpenAI Agents SDK agent.

The same agent runs twice per repetition, interleaved: bare (the SDK's `@function_tool` read
tool as it is) and governed (the same tool through `GovernedTools`, every call a governed step
recorded in a SQLite journal file at tether's default durability). The SDK's `ScriptedModel`
plays the model: one read call per turn, CALLS turns, then a final message, so the model and
the SDK's own loop cost the same in both. A fresh conversation (a new tether run) per run.

Per call: time of `Runner.run` / CALLS, wall and CPU (process time: what the machine's other
load does not inflate), summed over RUNS runs of each kind per repetition, the two kinds
alternating run by run. Overhead = governed − bare within one repetition; the table shows the
median over the repetitions with the lowest and highest in brackets. Runs are kept short
(20 calls) because the SDK's own cost per call grows with the conversation's length. The
governed figure includes tether's whole step for a read: scope, argument validation, policy
(three rules on the tool, two false conditions evaluated), the step's record and checkpoint committed, and the
exchange kept for replay. No timing is asserted anywhere: this is a report.

Run:  .venv/bin/python bench/integrations_openai_agents.py [--calls 20] [--runs 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from agents import Agent, FunctionTool, RunConfig, Runner, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call
from benchkit import Spread, describe_machine, goal_line

from tether import Policy
from tether.integrations.openai_agents import GovernedTools
from tether.journal import open_journal

POLICY = {  # three rules on the tool, two conditions false on every call
    "rules": [
        {"id": "closed-orders", "tool": "read_order", "when": "args.order_id == 'X0'", "decision": "deny"},
        {
            "id": "vip-orders",
            "tool": "read_order",
            "when": "args.order_id.startsWith('VIP')",
            "decision": "ask",
        },
        {"id": "reads-ok", "tool": "read_order", "decision": "allow"},
    ]
}
RUN_CONFIG = RunConfig(tracing_disabled=True)


@function_tool
def read_order(order_id: str) -> dict[str, Any]:
    """Read an order."""
    return {"order_id": order_id, "total": 80.0, "status": "paid", "note": "x" * 60}


def script(calls: int) -> ScriptedModel:
    steps: list[Any] = [
        [function_call("read_order", {"order_id": f"A{i}"}, call_id=f"call_{i}")] for i in range(calls)
    ]
    return ScriptedModel([*steps, [assistant_message("done")]])


async def timed(tools: list[FunctionTool], calls: int, context: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one run."""
    agent = Agent(name="support", tools=tools, model=script(calls))
    wall, cpu = time.perf_counter(), time.process_time()
    result = await Runner.run(agent, "go", context=context, run_config=RUN_CONFIG, max_turns=calls + 2)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert result.final_output == "done"
    return wall, cpu


async def measure(calls: int, runs: int, repeat: int, folder: Path) -> dict[str, list[float]]:
    """Per repetition: `runs` bare and `runs` governed runs, alternating; µs per call of each."""
    journal = open_journal(str(folder / "journal.db"))
    figures: dict[str, list[float]] = {
        "bare wall": [],
        "governed wall": [],
        "bare cpu": [],
        "governed cpu": [],
    }
    async with GovernedTools(
        journal,
        [read_order],
        name="bench",
        policy=Policy.from_dict(POLICY, "p"),
        effects={"read_order": "read"},
    ) as tools:
        await timed(tools.tools, calls, {"conversation_id": "warm-up"})  # imports, caches, the schema
        await timed([read_order], calls, {"conversation_id": "warm-up"})
        for rep in range(repeat):
            sums = dict.fromkeys(figures, 0.0)
            for i in range(runs):
                for kind, given in (("bare", [read_order]), ("governed", tools.tools)):
                    wall, cpu = await timed(given, calls, {"conversation_id": f"{kind}-{rep}-{i}"})
                    sums[f"{kind} wall"] += wall
                    sums[f"{kind} cpu"] += cpu
            for key, total in sums.items():
                figures[key].append(total / (runs * calls) * 1e6)
    await journal.aclose()
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20, help="tool calls per run")
    parser.add_argument("--runs", type=int, default=10, help="runs of each kind per repetition")
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print(describe_machine(folder, ["openai-agents"]))
        figures = asyncio.run(measure(args.calls, args.runs, args.repeat, folder))
    runs = f"{args.calls} calls per run, {args.runs} runs of each per repetition, {args.repeat} repetitions"
    print(f"\nOpenAI Agents SDK, a read tool, {runs}, bare and governed runs alternating")
    print("| µs per tool call | wall | CPU |\n|---|---|---|")
    rows = {}
    for kind, label in (("bare", "bare SDK"), ("governed", "governed (SQLite journal, default durability)")):
        rows[kind] = [Spread.of(figures[f"{kind} {clock}"]) for clock in ("wall", "cpu")]
        print(f"| {label} | {rows[kind][0].show()} | {rows[kind][1].show()} |")
    added = [
        Spread.of([g - b for b, g in zip(figures[f"bare {c}"], figures[f"governed {c}"], strict=True)])
        for c in ("wall", "cpu")
    ]
    print(f"| overhead tether adds | {added[0].show()} | {added[1].show()} |")
    print("\n| goal (issue 15) | figure | met? |\n|---|---|---|")
    figure = f"{added[0].median / 1000:.2f} ms wall ({added[1].median / 1000:.2f} ms CPU)"
    print(goal_line("overhead per read tool call under 1 ms", figure, added[0].median < 1000))


if __name__ == "__main__":
    main()
