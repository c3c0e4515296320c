"""LangGraph agents governed by tether (tether.integrations.langgraph), offline with LangChain's
fake chat model and the real langgraph package: the example's agent, restarted between turns."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import BaseTool, tool
from langgraph.graph import START, StateGraph
from langgraph.types import Command
from typer.testing import CliRunner

from tether.audit import verify_journal
from tether.cli import app
from tether.identity import Principal
from tether.integrations.langgraph import GovernedToolNode
from tether.journal import RunRecord, open_journal
from tether.journal import bodies as b
from tether.proposals import ToolCall
from tether.replay import replay_run

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "integrations" / "langgraph"
sys.path.insert(0, str(EXAMPLE))

import support_agent as agent  # noqa: E402  (the example, from its directory)

PERSON = Principal(
    principal_id="person:ana", name="ana", kind="person", role="approver", approver_for=("supervisor",)
)
QUESTION = {"messages": [HumanMessage("Please refund 70 on order A1.")]}


def session(workdir: Path, graph_input: Any, script: Sequence[Any] = agent.SCRIPT, **kw: Any) -> Any:
    """One "process" of the thread: everything rebuilt from the journal and checkpoint files."""
    return asyncio.run(agent.session(workdir, graph_input, list(script), **kw))


def refunds(workdir: Path) -> list[tuple[str, float]]:
    return [(r["order_id"], r["amount"]) for r in agent.Shop(workdir / "ledger.jsonl").refunds()]


def show(run_id: str, db: Path) -> str:
    """`tether show RUN --db DB`, the CLI's own command (in this process: it costs no start-up)."""
    env = {"COLUMNS": "500", "NO_COLOR": "1"}
    shown = CliRunner().invoke(app, ["show", run_id, "--db", str(db)], env=env)
    assert shown.exit_code == 0, shown.output
    return " ".join(shown.output.split())


def tether(*args: str, db: Path) -> str:
    """The CLI in another process (a person at a shell)."""
    done = subprocess.run(
        [sys.executable, "-m", "tether", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        env={**os.environ, "COLUMNS": "500", "NO_COLOR": "1"},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return " ".join(done.stdout.split())


def decide(workdir: Path, ticket_id: str, *, approve: bool, reason: str = "ok") -> None:
    """A person decides, on a journal connection of their own."""

    async def decided() -> None:
        journal = open_journal(str(workdir / "tether.db"))
        await journal.decide_ticket(ticket_id, approve=approve, by=PERSON, reason=reason)
        await journal.aclose()

    asyncio.run(decided())


def graph_of(workdir: Path) -> Any:
    """The thread's graph as a client reads and edits it (state only, nothing run)."""
    saver = agent.FileSaver(workdir / "checkpoints.pickle")
    return agent.agent_graph(agent.ScriptedChat(responses=[]), agent.ToolNode([]), saver)


def tool_message(result: dict[str, Any], call_id: str) -> ToolMessage:
    [message] = [m for m in result["messages"] if isinstance(m, ToolMessage) and m.tool_call_id == call_id]
    return message


# -- allowed, denied, asked; approved from another process; tampered; `tether show` ---------------


def test_a_thread_pauses_on_the_ticket_and_runs_exactly_the_approved_call_once(tmp_path: Path) -> None:
    db = tmp_path / "tether.db"
    paused = session(tmp_path, QUESTION)
    looked = tool_message(paused, "call_lookup")
    assert looked.status == "success" and '"total": 80.0' in str(looked.content)
    denied = tool_message(paused, "call_delete")  # the agent sees the refusal as the tool's error
    assert denied.status == "error" and "refused (policy_denied)" in str(denied.content)
    assert "orders are never deleted" in str(denied.content)
    [asked] = paused["__interrupt__"]  # paused the LangGraph way, on the tether ticket
    ticket = asked.value["ticket_id"]
    assert asked.value["tool"] == "refund" and asked.value["args"] == {"order_id": "A1", "amount": 70.0}
    assert asked.value["approver"] == "supervisor" and asked.value["args_hash"].startswith("sha256:")
    assert refunds(tmp_path) == []

    # A resume value decides nothing: before anyone decided, the thread pauses again on the same ticket.
    early = session(tmp_path, Command(resume={"approved": True}))
    assert [i.value["ticket_id"] for i in early["__interrupt__"]] == [ticket]
    assert refunds(tmp_path) == []

    assert f"ticket {ticket} approved" in tether("approve", ticket, "--by", "supervisor", db=db)

    # The checkpoint the thread paused at, kept to resume from after the tampered branch.
    checkpoint = asyncio.run(graph_of(tmp_path).aget_state(agent.CONFIG)).config

    # The thread's state rewritten to refund 700 under the same call id: refused, nothing runs.
    async def tamper() -> None:
        graph = graph_of(tmp_path)
        state = await graph.aget_state(agent.CONFIG)
        [asking] = [m for m in state.values["messages"] if isinstance(m, AIMessage) and m.tool_calls][-1:]
        forged = agent.calls("refund", {"order_id": "A1", "amount": 700.0}, "call_refund")
        await graph.aupdate_state(agent.CONFIG, {"messages": [forged.model_copy(update={"id": asking.id})]})

    asyncio.run(tamper())
    tampered = session(tmp_path, Command(resume={"ticket_id": ticket}))
    refused = tool_message(tampered, "call_refund")
    assert refused.status == "error" and "refused (approval_mismatch)" in str(refused.content)
    assert refunds(tmp_path) == []
    # The attempt is on the record: the presented arguments, refused by the ticket; the tether
    # run still waits on the same ticket, for the call as it was approved.
    attempt, record = recorded(db, tampered["run_id"])
    assert attempt.proposal == ToolCall("refund", {"order_id": "A1", "amount": 700.0})
    assert (attempt.decision.rule_id, attempt.decision.reason_code) == (
        f"approval:{ticket}",
        "approval_mismatch",
    )
    assert 'presented as call id "call_refund"' in attempt.decision.reason and attempt.call_id is None
    assert (record.status, record.checkpoint["pending"]["ticket_id"]) == ("paused", ticket)

    # Resumed from the checkpoint it paused at: exactly the approved arguments, once.
    approved = session(tmp_path, Command(resume={"ticket_id": ticket}), config=checkpoint)
    assert tool_message(approved, "call_refund").content == "refunded 70.00 on A1"
    assert approved["messages"][-1].content == "Order A1 was refunded 70.00."
    # The same branch resumed once more: the recorded result, no second refund.
    again = session(tmp_path, Command(resume={"ticket_id": ticket}), config=checkpoint)
    assert tool_message(again, "call_refund").content == "refunded 70.00 on A1"
    [made] = agent.Shop(tmp_path / "ledger.jsonl").refunds()
    assert (made["order_id"], made["amount"], made["key"]) == ("A1", 70.0, f"{approved['run_id']}:s3")

    shown = show(approved["run_id"], db)
    for line in (
        "support-agent 1 status running state agent",
        "model langgraph journal intact",
        'lookup_order(order_id="A1") allow by default:read',
        '→ executed: {"total": 80.0, "status": "paid"}',
        'delete_order(order_id="A1") deny by no-deletes — orders are never deleted by the agent',
        "→ refused (policy_denied)",
        'refund(amount=70.0, order_id="A1") ask by refund-over-50-needs-approval',
        f"→ awaiting_approval (ticket {ticket})",
        f"ticket_decided → approved: {ticket}",
        f'refund(amount=700.0, order_id="A1") deny by approval:{ticket} — ticket {ticket} approved refund',
        f"→ refused (approval_mismatch): ticket {ticket} approved refund with other arguments",
        f"→ executed (ticket {ticket}): refunded 70.00 on A1",
    ):
        assert line in shown, line
    assert shown.count("→ executed") == 2 and shown.count("700") == 1  # the refused attempt only
    assert run_verified(db, approved["run_id"])


# -- a node re-run after a crash: plain LangGraph repeats the effect, the governed node does not --

REFUND_20 = [agent.calls("refund", {"order_id": "A1", "amount": 20.0}, "call_r"), AIMessage(content="Done.")]


class CrashAtCheckpoint(agent.FileSaver):
    """The process dies when LangGraph is about to save the tools node's result: after the
    tool's effect, before LangGraph's checkpoint holds it."""

    def put_writes(
        self, config: Any, writes: Sequence[tuple[str, Any]], task_id: str, task_path: str = ""
    ) -> None:
        if any(isinstance(m, ToolMessage) for _, value in writes for m in _listed(value)):
            os._exit(3)
        super().put_writes(config, writes, task_id, task_path)


def _listed(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list) else [value]


def crash_in_the_tool(shop_tools: Any) -> Any:
    """The shop's tools, with a refund that makes its effect and then the process dies."""

    def tools(self: agent.Shop) -> list[BaseTool]:
        real = {t.name: t for t in shop_tools(self)}

        @tool
        def refund(order_id: str, amount: float) -> str:
            """Refund part of an order."""
            real["refund"].invoke({"order_id": order_id, "amount": amount})
            os._exit(3)

        return [real["lookup_order"], refund, real["delete_order"]]

    return tools


def crashed_then_resumed(workdir: Path, *, governed: bool, crash: str) -> Any:
    """The thread started in a process that dies (`crash`), then resumed from LangGraph's last
    checkpoint by a fresh process: what the agent got for the refund."""

    def doomed() -> None:  # a forked process: what it patches dies with it
        if crash == "in the tool":
            agent.Shop.tools = crash_in_the_tool(agent.Shop.tools)  # type: ignore[method-assign]
        saver = CrashAtCheckpoint if crash == "at the checkpoint" else None
        session(workdir, QUESTION, REFUND_20, saver=saver, governed=governed)

    child = multiprocessing.get_context("fork").Process(target=doomed)
    child.start()
    child.join(60)
    assert child.exitcode == 3, "the process was to die after the refund was made"
    assert refunds(workdir) == [("A1", 20.0)]
    assert asyncio.run(graph_of(workdir).aget_state(agent.CONFIG)).next == ("tools",)  # LangGraph re-runs it
    resumed = session(workdir, None, REFUND_20, governed=governed)
    assert resumed["messages"][-1].content == "Done."
    return resumed


def test_a_crash_between_the_effect_and_langgraphs_checkpoint_repeats_it_only_without_tether(
    tmp_path: Path,
) -> None:
    plain, governed = tmp_path / "plain", tmp_path / "governed"
    plain.mkdir(), governed.mkdir()
    again = crashed_then_resumed(plain, governed=False, crash="at the checkpoint")
    assert tool_message(again, "call_r").content == "refunded 20.00 on A1"
    assert refunds(plain) == [("A1", 20.0), ("A1", 20.0)]  # LangGraph ran the refund again

    got = tool_message(crashed_then_resumed(governed, governed=True, crash="at the checkpoint"), "call_r")
    assert (got.status, got.content) == ("success", "refunded 20.00 on A1")  # what was recorded
    assert refunds(governed) == [("A1", 20.0)]  # once


def test_a_crash_during_the_effect_is_in_doubt_with_tether_and_repeated_without(tmp_path: Path) -> None:
    plain, governed = tmp_path / "plain", tmp_path / "governed"
    plain.mkdir(), governed.mkdir()
    crashed_then_resumed(plain, governed=False, crash="in the tool")
    assert refunds(plain) == [("A1", 20.0), ("A1", 20.0)]

    resumed = crashed_then_resumed(governed, governed=True, crash="in the tool")
    got = tool_message(resumed, "call_r")
    assert got.status == "error" and "effect_in_doubt" in str(got.content)
    assert refunds(governed) == [("A1", 20.0)]
    # A person settles it with tether (`tether resolve`); the run says so meanwhile.
    assert "status effect_in_doubt" in show(resumed["run_id"], governed / "tether.db")


# -- a node re-run after an interrupt; what is refused before anything runs --------------------


def counting_lookups(shop_tools: Any, seen: list[str]) -> Any:
    def tools(self: agent.Shop) -> list[BaseTool]:
        real = {t.name: t for t in shop_tools(self)}

        @tool
        def lookup_order(order_id: str) -> dict[str, Any]:
            """Look an order up."""
            seen.append(order_id)
            result: dict[str, Any] = real["lookup_order"].invoke({"order_id": order_id})
            return result

        return [lookup_order, real["refund"], real["delete_order"]]

    return tools


def test_calls_made_before_an_interrupt_are_not_run_again_when_the_node_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    monkeypatch.setattr(agent.Shop, "tools", counting_lookups(agent.Shop.tools, seen))
    both = AIMessage(
        content="",
        tool_calls=[
            {"name": "lookup_order", "args": {"order_id": "A1"}, "id": "c_read", "type": "tool_call"},
            {
                "name": "refund",
                "args": {"order_id": "A1", "amount": 70.0},
                "id": "c_refund",
                "type": "tool_call",
            },
        ],
    )
    script = [both, AIMessage(content="Done.")]
    paused = session(tmp_path, QUESTION, script)
    [asked] = paused["__interrupt__"]
    assert seen == ["A1"]

    decide(tmp_path, asked.value["ticket_id"], approve=True)
    done = session(tmp_path, Command(resume=True), script)
    assert tool_message(done, "c_read").content == '{"total": 80.0, "status": "paid"}'
    assert tool_message(done, "c_refund").content == "refunded 70.00 on A1"
    assert seen == ["A1"], "LangGraph re-ran the node; tether returned the recorded read"
    assert refunds(tmp_path) == [("A1", 70.0)]


def test_calls_refused_while_the_thread_waits_are_recorded_and_run_when_the_node_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The model asks for a refund and a lookup in one turn: the refund pauses the thread, the
    lookup is refused (`approval_pending`) and that is recorded, not under its call id: when
    the node re-runs after the decision, the lookup is taken, once."""
    seen: list[str] = []
    monkeypatch.setattr(agent.Shop, "tools", counting_lookups(agent.Shop.tools, seen))
    both = AIMessage(
        content="",
        tool_calls=[
            {
                "name": "refund",
                "args": {"order_id": "A1", "amount": 70.0},
                "id": "c_refund",
                "type": "tool_call",
            },
            {"name": "lookup_order", "args": {"order_id": "A1"}, "id": "c_read", "type": "tool_call"},
        ],
    )
    script = [both, AIMessage(content="Done.")]
    paused = session(tmp_path, QUESTION, script)
    [asked] = paused["__interrupt__"]
    ticket = asked.value["ticket_id"]
    assert seen == []
    db = tmp_path / "tether.db"
    attempt, record = recorded(db, paused["run_id"])
    assert attempt.proposal == ToolCall("lookup_order", {"order_id": "A1"})
    assert (attempt.decision.rule_id, attempt.decision.reason_code) == (
        f"approval:{ticket}",
        "approval_pending",
    )
    assert attempt.call_id is None and 'presented as call id "c_read"' in attempt.decision.reason
    assert (record.status, record.checkpoint["pending"]["ticket_id"]) == ("paused", ticket)

    # Resumed before anyone decided: both calls presented again, nothing new to record.
    early = session(tmp_path, Command(resume=True), script)
    assert [i.value["ticket_id"] for i in early["__interrupt__"]] == [ticket]
    assert len(refusals(db, paused["run_id"])) == 1 and seen == []

    decide(tmp_path, ticket, approve=True)
    done = session(tmp_path, Command(resume=True), script)
    assert tool_message(done, "c_refund").content == "refunded 70.00 on A1"
    assert tool_message(done, "c_read").content == '{"total": 80.0, "status": "paid"}'
    assert seen == ["A1"] and refunds(tmp_path) == [("A1", 70.0)]
    assert done["messages"][-1].content == "Done."
    shown = show(done["run_id"], db)
    assert f'lookup_order(order_id="A1") deny by approval:{ticket}' in shown
    assert "→ refused (approval_pending): cannot take lookup_order" in shown
    assert shown.count("→ executed") == 2
    assert run_verified(db, done["run_id"])


def recorded(db: Path, run_id: str) -> tuple[b.Refused, RunRecord]:
    """The last call refused while the run waited, and the run's row."""
    journal = open_journal(str(db))
    try:
        record = asyncio.run(journal.get_run(run_id))
    finally:
        journal.close()
    return refusals(db, run_id)[-1], record


def refusals(db: Path, run_id: str) -> list[b.Refused]:
    """The run's refusals of calls presented while it waited on a ticket."""
    journal = open_journal(str(db))
    try:
        entries = asyncio.run(journal.read_entries(run_id))
    finally:
        journal.close()
    found = [e.body for e in entries if e.kind == "refused"]
    return [r for r in found if isinstance(r, b.Refused) and r.decision.rule_id.startswith("approval:")]


def run_verified(db: Path, run_id: str) -> bool:
    """`tether audit verify` finds nothing wrong with the run, and replay no divergence."""

    async def verified() -> bool:
        journal = open_journal(str(db))
        try:
            report = await verify_journal(journal, [run_id])
            replayed = await replay_run(journal, run_id)
        finally:
            await journal.aclose()
        assert report.findings == [], report.findings
        assert replayed.ok, replayed.as_dict()
        return True

    return asyncio.run(verified())


def test_a_denied_ticket_is_the_tools_error_and_the_thread_goes_on(tmp_path: Path) -> None:
    paused = session(tmp_path, QUESTION)
    [asked] = paused["__interrupt__"]
    decide(tmp_path, asked.value["ticket_id"], approve=False, reason="not without a receipt")
    done = session(tmp_path, Command(resume="decided"))
    denied = tool_message(done, "call_refund")
    assert denied.status == "error" and "approval_denied" in str(denied.content)
    assert "not without a receipt" in str(denied.content)
    assert denied.additional_kwargs["tether"] == {"outcome": "refused", "reason_code": "approval_denied"}
    assert refunds(tmp_path) == []


def test_a_synchronous_run_or_a_thread_without_an_id_runs_nothing(tmp_path: Path) -> None:
    asking = {"messages": [agent.calls("refund", {"order_id": "A1", "amount": 20.0}, "c1")]}

    async def refused() -> None:
        journal = open_journal(str(tmp_path / "tether.db"))
        async with agent.governed_tools(journal, agent.Shop(tmp_path / "ledger.jsonl")) as node:
            graph = StateGraph(agent.State)
            graph.add_node("tools", node)
            graph.add_edge(START, "tools")
            with pytest.raises(ValueError, match=r"needs the thread's id \(config\['configurable'\]"):
                await graph.compile().ainvoke(asking)
            with pytest.raises(TypeError, match="async graphs only"):
                graph.compile(checkpointer=agent.InMemorySaver()).invoke(asking, agent.CONFIG)
        await journal.aclose()

    asyncio.run(refused())
    assert refunds(tmp_path) == []


def test_declarations_must_name_the_nodes_tools(tmp_path: Path) -> None:
    journal = open_journal(str(tmp_path / "tether.db"))
    tools = agent.Shop(tmp_path / "ledger.jsonl").tools()
    with pytest.raises(ValueError, match="effects names no tool of this node: refnud"):
        GovernedToolNode(tools, journal=journal, workflow="w", effects={"refnud": "write"})
    with pytest.raises(ValueError, match="effects must be one of read, write, external"):
        GovernedToolNode(tools, journal=journal, workflow="w", effects={"refund": "delete"})  # type: ignore[dict-item]
    journal.close()


def test_the_example_runs_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_id = agent.main(tmp_path)
    printed = capsys.readouterr().out
    assert "refused (policy_denied)" in printed and "tether approve tkt_" in printed
    assert "agent: Order A1 was refunded 70.00." in printed
    assert refunds(tmp_path) == [("A1", 70.0)]
    assert "status running" in show(run_id, tmp_path / "tether.db")
