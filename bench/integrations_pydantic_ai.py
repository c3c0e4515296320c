"""What governing a pydantic-ai agent's tool calls costs (tether.integrations.pydantic_ai):
the time per tool call the integration adds over the bare framework, for a read tool, at
tether's default durability (a SQLite journal, synchronous=NORMAL).

The loop: an agent run of pydantic-ai's FunctionModel that calls a trivial read tool N
times, one call per model response (the argument changes every call), then answers. Bare:
the tool in a FunctionToolset. Governed: the same toolset wrapped by `Governance.wrap`
(one Governance and one open journal for the process, as an application keeps them), with
a policy of 10 rules on the tool (9 CEL conditions that are false, one allow) deciding
every call; each agent run is a new conversation, so the figure includes creating its
tether run (and holding and releasing it), spread over its N calls. A repetition runs M
agent runs of each kind alternately (bare, governed, bare, governed ...); the overhead per
call = (governed time − bare time) / (M × N) within a repetition, in wall time and in CPU
time of the process (all threads: pydantic-ai runs a sync tool in a worker thread), which
waiting for a core on a busy machine does not inflate. The table shows the median over the
repetitions with the lowest and highest in brackets.

No timing is asserted: this is a report, ending with the goal it measures.

Run:  .venv/bin/python bench/integrations_pydantic_ai.py [--calls 20] [--runs 10] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchkit import Spread, describe_machine, goal_line, load_average
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.toolsets import FunctionToolset
from pydantic_ai.usage import UsageLimits

from tether import Policy, open_journal
from tether.integrations.pydantic_ai import Governance

GOAL_MS = 1.0
RULES = [
    {"id": f"never-{i}", "tool": "lookup", "when": f"args.key == 'forbidden-{i}'", "decision": "deny"}
    for i in range(9)
] + [{"id": "lookup-ok", "tool": "lookup", "decision": "allow"}]


def lookup(key: str) -> dict[str, Any]:
    """Look a key up."""
    return {"key": key, "value": "x" * 64}


def model_of(calls: int) -> FunctionModel:
    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        made = sum(1 for m in messages for p in m.parts if isinstance(p, ToolReturnPart))
        if made < calls:
            return ModelResponse(parts=[ToolCallPart("lookup", {"key": f"k{made}"})])
        return ModelResponse(parts=[TextPart("done")])

    return FunctionModel(respond)


Seconds = tuple[float, float]  # wall, CPU (this process, all threads)


def clock() -> Seconds:
    return time.perf_counter(), time.process_time()


def since(start: Seconds) -> Seconds:
    now = clock()
    return now[0] - start[0], now[1] - start[1]


async def bare(calls: int) -> Seconds:
    agent = Agent(model_of(calls), toolsets=[FunctionToolset([lookup])])
    started = clock()
    await agent.run("go", usage_limits=UsageLimits(request_limit=calls + 1))
    return since(started)


async def governed(calls: int, governance: Governance, conversation: str) -> Seconds:
    agent = Agent(model_of(calls), toolsets=[governance.wrap(FunctionToolset([lookup]))])
    started = clock()
    await agent.run("go", conversation_id=conversation, usage_limits=UsageLimits(request_limit=calls + 1))
    return since(started)


async def main(calls: int, runs: int, repeat: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        print(describe_machine(Path(tmp), ["pydantic-ai-slim"]))
        journal = open_journal(str(Path(tmp) / "tether.db"))  # the default: SQLite, synchronous=NORMAL
        policy = Policy.from_dict({"rules": RULES}, "bench")
        governance = Governance(journal, name="bench", policy=policy, effects={"lookup": "read"})
        try:
            await bare(5)  # warm both paths (imports, schema building) before measuring
            await governed(5, governance, "warm-up")
            # per repetition, ms per call: (bare, governed, overhead) for wall time and for CPU time
            wall: list[tuple[float, float, float]] = []
            cpu: list[tuple[float, float, float]] = []
            for i in range(repeat):
                b = [0.0, 0.0]
                g = [0.0, 0.0]
                for j in range(runs):  # bare, governed, bare, governed ...
                    for total, took in (
                        (b, await bare(calls)),
                        (g, await governed(calls, governance, f"c{i}-{j}")),
                    ):
                        total[0] += took[0]
                        total[1] += took[1]
                per = 1000 / (calls * runs)
                wall.append((b[0] * per, g[0] * per, (g[0] - b[0]) * per))
                cpu.append((b[1] * per, g[1] * per, (g[1] - b[1]) * per))
        finally:
            await governance.aclose()
            await journal.aclose()
    print(f"\nload average after: {load_average()}")
    print(
        f"\n{runs} agent runs of {calls} read-tool calls each per repetition, bare and governed "
        f"interleaved; {repeat} repetitions (median, [low–high])\n"
    )
    print("| pydantic-ai, ms per tool call | wall | CPU |")
    print("|---|---|---|")
    for k, label in enumerate(("bare", "governed by tether", "**overhead**")):
        shown = [Spread.of([r[k] for r in rows]).show(".3f") for rows in (wall, cpu)]
        print(f"| {label} | {shown[0]} | {shown[1]} |")
    median = statistics.median(r[2] for r in wall)
    print("\n| goal (issue 15) | figure | met? |\n|---|---|---|")
    figure = f"{median:.3f} ms wall (CPU {statistics.median(r[2] for r in cpu):.3f} ms)"
    print(goal_line(f"pydantic-ai: overhead per read-tool call < {GOAL_MS:g} ms", figure, median < GOAL_MS))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--calls", type=int, default=20, help="tool calls per agent run")
    parser.add_argument("--runs", type=int, default=10, help="agent runs of each kind per repetition")
    parser.add_argument("--repeat", type=int, default=5, help="repetitions")
    options = parser.parse_args()
    asyncio.run(main(options.calls, options.runs, options.repeat))
