"""A LangGraph support agent whose tool calls tether governs (offline: a scripted chat model).

    python examples/integrations/langgraph/support_agent.py [WORKDIR]

The graph is LangGraph's usual agent loop (model -> tools_condition -> tools -> model) with
`GovernedToolNode` in place of `ToolNode`. The scripted model looks an order up (allowed),
tries to delete it (denied by policy: the model gets the refusal as the tool's error), then
refunds 70 (the policy asks a supervisor: the thread is interrupted with the tether ticket).
The process then "restarts": fresh journal connection, node, model and graph, the thread's
state read back from the checkpointer's file. A supervisor approves from another process
(`tether approve`), and `Command(resume=...)` finishes the thread: the refund runs once.
`tether show RUN --db WORKDIR/tether.db` prints the run's timeline.
"""

from __future__ import annotations

import asyncio
import json
import os
import pickle
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, ClassVar, TypedDict

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models.fake_chat_models import FakeMessagesListChatModel
from langchain_core.messages import AIMessage, AnyMessage, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatResult
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool, tool
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph import START, StateGraph
from langgraph.graph.message import add_messages
from langgraph.graph.state import CompiledStateGraph
from langgraph.prebuilt import ToolNode, tools_condition
from langgraph.types import Command

from tether import Policy
from tether.integrations.langgraph import GovernedToolNode, idempotency_key
from tether.journal import Journal, open_journal

HERE = Path(__file__).resolve().parent
POLICY = HERE / "policy.yaml"
EFFECTS: dict[str, Any] = {"lookup_order": "read", "refund": "write", "delete_order": "write"}


def calls(name: str, args: dict[str, Any], call_id: str) -> AIMessage:
    """A model turn that calls one tool."""
    return AIMessage(
        content="", tool_calls=[{"name": name, "args": args, "id": call_id, "type": "tool_call"}]
    )


SCRIPT: list[BaseMessage] = [
    calls("lookup_order", {"order_id": "A1"}, "call_lookup"),
    calls("delete_order", {"order_id": "A1"}, "call_delete"),
    calls("refund", {"order_id": "A1", "amount": 70.0}, "call_refund"),
    AIMessage(content="Order A1 was refunded 70.00."),
]


class ScriptedChat(FakeMessagesListChatModel):
    """LangChain's fake chat model, choosing its reply by the turn the conversation is at
    (so a model rebuilt after a restart continues the script), and taking bound tools."""

    def bind_tools(self, tools: Sequence[Any], *, tool_choice: str | None = None, **kwargs: Any) -> Any:
        return self

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        turn = sum(isinstance(m, AIMessage) for m in messages)
        reply = self.responses[min(turn, len(self.responses) - 1)]
        return ChatResult(generations=[ChatGeneration(message=reply)])


class Shop:
    """The systems the agent's tools act on: an order book and a refunds ledger (a file, so
    that every process sees every refund that was really made)."""

    ORDERS: ClassVar[dict[str, dict[str, Any]]] = {"A1": {"total": 80.0, "status": "paid"}}

    def __init__(self, ledger: Path) -> None:
        self.ledger = ledger

    def refunds(self) -> list[dict[str, Any]]:
        if not self.ledger.exists():
            return []
        return [json.loads(line) for line in self.ledger.read_text().splitlines()]

    def tools(self) -> list[BaseTool]:
        ledger = self.ledger

        @tool
        def lookup_order(order_id: str) -> dict[str, Any]:
            """Look an order up."""
            return Shop.ORDERS[order_id]

        @tool
        def refund(order_id: str, amount: float) -> str:
            """Refund part of an order."""
            with ledger.open("a") as out:  # the effect
                out.write(
                    json.dumps({"order_id": order_id, "amount": amount, "key": idempotency_key()}) + "\n"
                )
            return f"refunded {amount:.2f} on {order_id}"

        @tool
        def delete_order(order_id: str) -> str:
            """Delete an order."""
            raise AssertionError("never allowed: tether refuses it before it runs")

        return [lookup_order, refund, delete_order]


class FileSaver(InMemorySaver):
    """LangGraph's InMemorySaver written to a file on every save, read back when opened: a
    checkpointer that survives the process for this offline demo (use langgraph's SQLite or
    PostgreSQL savers in production)."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        if path.exists():
            saved = pickle.loads(path.read_bytes())
            for thread, spaces in saved["storage"].items():
                for ns, checkpoints in spaces.items():
                    self.storage[thread][ns].update(checkpoints)
            for key, writes in saved["writes"].items():
                self.writes[key].update(writes)
            self.blobs.update(saved["blobs"])

    def put(
        self, config: RunnableConfig, checkpoint: Any, metadata: Any, new_versions: Any
    ) -> RunnableConfig:
        saved = super().put(config, checkpoint, metadata, new_versions)
        self.save()
        return saved

    def put_writes(
        self, config: RunnableConfig, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        super().put_writes(config, writes, task_id, task_path)
        self.save()

    def save(self) -> None:
        storage = {t: {ns: dict(c) for ns, c in spaces.items()} for t, spaces in self.storage.items()}
        state = {"storage": storage, "writes": dict(self.writes), "blobs": dict(self.blobs)}
        partial = self.path.with_suffix(".tmp")
        partial.write_bytes(pickle.dumps(state))
        os.replace(partial, self.path)


class State(TypedDict):
    messages: Annotated[list[AnyMessage], add_messages]


def agent_graph(
    model: Any, tools: ToolNode, checkpointer: InMemorySaver
) -> CompiledStateGraph[Any, Any, Any, Any]:
    """LangGraph's agent loop: the model proposes, the tools node runs, until the model answers."""

    async def agent(state: State) -> dict[str, Any]:
        return {"messages": [await model.ainvoke(state["messages"])]}

    graph = StateGraph(State)
    graph.add_node("agent", agent)
    graph.add_node("tools", tools)
    graph.add_edge(START, "agent")
    graph.add_conditional_edges("agent", tools_condition)
    graph.add_edge("tools", "agent")
    return graph.compile(checkpointer=checkpointer)


CONFIG: RunnableConfig = {"configurable": {"thread_id": "customer-42"}}


def governed_tools(journal: Journal, shop: Shop) -> GovernedToolNode:
    return GovernedToolNode(
        shop.tools(),
        journal=journal,
        workflow="support-agent",
        policy=Policy.from_file(POLICY),
        effects=EFFECTS,
    )


async def session(
    workdir: Path,
    graph_input: Any,
    script: list[BaseMessage] = SCRIPT,
    *,
    saver: type[FileSaver] | None = None,
    governed: bool = True,
    config: RunnableConfig | None = None,
) -> dict[str, Any]:
    """One process's share of the thread: journal, tools node, model, graph and checkpointer
    built afresh (the thread's state read back from the checkpointer's file), the input run.
    `governed=False` runs the same graph with LangGraph's plain ToolNode; `config` names the
    thread (and, to resume from an earlier checkpoint, the checkpoint)."""
    config = config or CONFIG
    shop = Shop(workdir / "ledger.jsonl")
    checkpointer = (saver or FileSaver)(workdir / "checkpoints.pickle")
    if not governed:
        graph = agent_graph(ScriptedChat(responses=script), ToolNode(shop.tools()), checkpointer)
        return dict(await graph.ainvoke(graph_input, config))
    journal = open_journal(str(workdir / "tether.db"))
    try:
        async with governed_tools(journal, shop) as tools:
            graph = agent_graph(ScriptedChat(responses=script), tools, checkpointer)
            result: dict[str, Any] = await graph.ainvoke(graph_input, config)
            result["run_id"] = tools.run_id(config)
            return result
    finally:
        await journal.aclose()


def main(workdir: Path) -> str:
    """The demo (see the module's docstring); returns the tether run's id."""
    question = {"messages": [HumanMessage("Please refund 70 on order A1 and close it.")]}
    paused = asyncio.run(session(workdir, question))
    [asked] = paused["__interrupt__"]
    ticket = asked.value["ticket_id"]
    for message in paused["messages"][1:]:
        print(f"{message.type:>5}: {message.content or message.tool_calls}")
    print(f"interrupted: {asked.value['reason']}\n  {asked.value['decide']}")

    db = str(workdir / "tether.db")
    approve = [sys.executable, "-m", "tether", "approve", ticket, "--db", db, "--by", "supervisor"]
    subprocess.run(approve, check=True)

    done = asyncio.run(session(workdir, Command(resume={"ticket_id": ticket})))
    print(f"agent: {done['messages'][-1].content}")
    print(f"refunds made: {Shop(workdir / 'ledger.jsonl').refunds()}")
    print(f"the run's timeline: tether show {done['run_id']} --db {db}")
    return str(done["run_id"])


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="tether-langgraph-")))
