"""What governing a LangGraph agent's tool calls costs per call: `GovernedToolNode` against
LangGraph's own `ToolNode`, for a read tool, at tether's default durability (the SQLite
journal, `open_journal(PATH)`).

The same one-node graph (START -> tools) is invoked with one AIMessage carrying one call of
a read tool (`lookup_order`, returning ~40 bytes) per invocation, the call id new each
time, on one thread (`thread_id` in the config, no checkpointer: LangGraph's checkpointing
costs the same either way and is not what is measured). Bare: the node is `ToolNode`.
Governed: the node is `GovernedToolNode` over a fresh journal file, so each call is a
governed step of the thread's one tether run (scope, arguments, policy, execution,
verification, the step and its exchange recorded and committed).

For reference, the same read as a tether tool taken by `tether.external.GovernedCalls` with no
LangGraph at all: the governed step's own share of the overhead.

Measured interleaved: bare, core, governed, bare, core, governed ... (--repeat, default 5), each batch
--calls invocations after a warm-up; the overhead of a repetition is governed − bare µs per
call, and the table shows medians with the lowest and highest in brackets. No timing is
asserted anywhere: this is a report. Goal (issue 15): under 1 ms per call.

Run: .venv/bin/python bench/integrations_langgraph.py [--calls 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any, TypedDict

from benchkit import Spread, describe_machine, goal_line
from langchain_core.messages import AIMessage, AnyMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.prebuilt import ToolNode

from tether import tool as tether_tool
from tether.external import GovernedCalls
from tether.integrations.langgraph import GovernedToolNode
from tether.journal import open_journal

GOAL_MS = 1.0
CONFIG: Any = {"configurable": {"thread_id": "bench"}}


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


@tool
def lookup_order(order_id: str) -> dict[str, Any]:
    """Look an order up."""
    return {"order_id": order_id, "total": 80.0, "status": "paid"}


TOOLS: list[BaseTool] = [lookup_order]


def one_node(node: ToolNode) -> Any:
    graph = StateGraph(State)
    graph.add_node("tools", node)
    graph.add_edge(START, "tools")
    return graph.compile()


async def per_call(graph: Any, calls: int, prefix: str) -> float:
    """Seconds per invocation of `graph`, each with one new call of the read tool."""
    start = time.perf_counter()
    for i in range(calls):
        call = {"name": "lookup_order", "args": {"order_id": "A1"}, "id": f"{prefix}{i}", "type": "tool_call"}
        result = await graph.ainvoke({"messages": [AIMessage(content="", tool_calls=[call])]}, CONFIG)
        assert result["messages"][-1].status == "success", result["messages"][-1]
    return (time.perf_counter() - start) / calls


@tether_tool(effect="read")
def tether_lookup(order_id: str) -> dict[str, Any]:
    """Look an order up."""
    return {"order_id": order_id, "total": 80.0, "status": "paid"}


async def core_per_call(journal_path: Path, calls: int) -> float:
    """Seconds per call of tether.external alone (no LangGraph): the governed step's share."""
    journal = open_journal(str(journal_path))
    try:
        async with GovernedCalls(journal, [tether_lookup], name="bench", source="bench") as governed:
            for i in range(20):
                await governed.call("bench", "tether_lookup", {"order_id": "A1"}, call_id=f"warm-{i}")
            start = time.perf_counter()
            for i in range(calls):
                outcome = await governed.call("bench", "tether_lookup", {"order_id": "A1"}, call_id=f"c{i}")
                assert outcome.executed, outcome
            return (time.perf_counter() - start) / calls
    finally:
        await journal.aclose()


async def measure(tmp: Path, calls: int, repeat: int) -> tuple[list[float], list[float], list[float]]:
    bare_graph = one_node(ToolNode(TOOLS))
    bare: list[float] = []
    governed: list[float] = []
    core: list[float] = []
    for rep in range(repeat):
        bare.append(await per_call(bare_graph, calls, f"b{rep}-"))
        core.append(await core_per_call(tmp / f"core-{rep}.db", calls))
        journal = open_journal(str(tmp / f"journal-{rep}.db"))  # tether's default durability
        try:
            async with GovernedToolNode(
                TOOLS, journal=journal, workflow="bench", effects={"lookup_order": "read"}
            ) as node:
                graph = one_node(node)
                await per_call(graph, 20, "warm-")
                governed.append(await per_call(graph, calls, f"g{rep}-"))
        finally:
            await journal.aclose()
    return bare, governed, core


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        print(describe_machine(tmp, ["langgraph", "langchain-core"]))
        asyncio.run(per_call(one_node(ToolNode(TOOLS)), 50, "warm-"))  # imports, first compile
        bare, governed, core = asyncio.run(measure(tmp, args.calls, args.repeat))
    overhead = Spread.of([(g - b) * 1e6 for b, g in zip(bare, governed, strict=True)])
    print(
        f"\nLangGraph tool calls, one read tool, {args.calls} calls x {args.repeat} interleaved repetitions\n"
    )
    print("| node | µs per call |\n|---|---|")
    print(f"| ToolNode (bare LangGraph) | {Spread.of([b * 1e6 for b in bare]).show()} |")
    print(f"| GovernedToolNode (tether, SQLite journal) | {Spread.of([g * 1e6 for g in governed]).show()} |")
    print(f"| overhead per call (governed − bare) | {overhead.show()} |")
    alone = Spread.of([c * 1e6 for c in core]).show()
    print(f"| for reference: tether.external alone (GovernedCalls.call) | {alone} |")
    print("\n| goal (issue 15) | figure | met? |\n|---|---|---|")
    figure = f"{overhead.median / 1000:.2f} ms per read call"
    print(goal_line("LangGraph integration under 1 ms per call", figure, overhead.median / 1000 < GOAL_MS))


if __name__ == "__main__":
    main()
