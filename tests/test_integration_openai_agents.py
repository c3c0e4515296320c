"""tether.integrations.openai_agents: an OpenAI Agents SDK agent's tool calls governed by tether.

The real SDK (openai-agents 0.24.0) drives the agent; its own `ScriptedModel` stands in for the
model's choices. A "restart" is a fresh journal connection, fresh GovernedTools and a fresh
Agent that resumes from the RunState serialized to disk; the person approves in another
process (`python -m tether approve`), and `tether show` (the CLI, in this process) reads the run.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from agents import Agent, FunctionTool, RunConfig, Runner, RunResult, RunState, function_tool
from agents._tool_invocation import tool_invocation_identity_and_scope
from agents.testing import ScriptedModel, assistant_message, function_call
from agents.tool_guardrails import ToolGuardrailFunctionOutput, tool_input_guardrail
from typer.testing import CliRunner

from conftest import run, step_rows
from tether import Policy
from tether.audit import verify_journal
from tether.cli import app
from tether.identity import Principal
from tether.integrations.openai_agents import ConversationKeyError, GovernedTools, idempotency_key
from tether.journal import Journal, RunRecord, open_journal
from tether.journal import bodies as b
from tether.proposals import ToolCall
from tether.replay import replay_run

ROOT = Path(__file__).resolve().parent.parent
POLICY = {
    "rules": [
        {"id": "refund-ask", "tool": "refund", "when": "args.amount > 50.0", "decision": "ask"},
        {"id": "refund-ok", "tool": "refund", "decision": "allow"},
        {
            "id": "no-deletes",
            "tool": "delete_order",
            "decision": "deny",
            "reason": "orders are never deleted",
        },
    ]
}
EFFECTS: dict[str, Any] = {"read_order": "read", "refund": "write", "delete_order": "write"}
CONTEXT = {"conversation_id": "chat-42"}
NO_TRACES = RunConfig(tracing_disabled=True)
PERSON = Principal(principal_id="person:ana", name="ana", kind="person", role="approver")


class Shop:
    """The SDK tools of a small shop, recording every real execution."""

    def __init__(self) -> None:
        self.executed: list[tuple[Any, ...]] = []
        self.keys: list[str | None] = []

        @function_tool
        def read_order(order_id: str) -> dict[str, Any]:
            """Read an order."""
            self.executed.append(("read_order", order_id))
            return {"order_id": order_id, "total": 80.0, "status": "paid"}

        @function_tool
        def refund(order_id: str, amount: float) -> str:
            """Refund part of an order."""
            self.keys.append(idempotency_key())
            self.executed.append(("refund", order_id, amount))
            return f"refunded {amount:.2f} on {order_id}"

        @function_tool
        def delete_order(order_id: str) -> str:
            """Delete an order."""
            self.executed.append(("delete_order", order_id))
            return "deleted"

        self.tools: list[FunctionTool] = [read_order, refund, delete_order]

    def governed(self, journal: Journal) -> GovernedTools:
        return GovernedTools(
            journal, self.tools, name="support", policy=Policy.from_dict(POLICY, "p"), effects=EFFECTS
        )


def agent(governed: GovernedTools, steps: Sequence[Any]) -> Agent[Any]:
    return Agent(name="support", tools=list(governed.tools), model=ScriptedModel(steps))


def outputs(result: RunResult) -> list[Any]:
    return [item.output for item in result.new_items if item.type == "tool_call_output_item"]


def cli(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin", "NO_COLOR": "1", "COLUMNS": "200"},
        check=False,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def tampered(state: dict[str, Any], call_id: str, tool: str, args: dict[str, Any]) -> dict[str, Any]:
    """The saved state with one call's arguments rewritten everywhere, the SDK's own fingerprint
    of the call included: an edit the SDK itself cannot notice."""
    text = json.dumps(args, separators=(",", ":"))

    def edit(value: Any) -> None:
        if isinstance(value, dict):
            if value.get("call_id") == call_id and "arguments" in value:
                value["arguments"] = text
            for inner in value.values():
                edit(inner)
        elif isinstance(value, list):
            for inner in value:
                edit(inner)

    edited = json.loads(json.dumps(state))
    edit(edited)
    raw = {"type": "function_call", "call_id": call_id, "id": call_id, "name": tool, "arguments": text}
    identity = tool_invocation_identity_and_scope(raw, tool_name=tool)
    assert identity is not None
    recorded = edited["context"]["tool_invocations"][call_id]
    assert recorded["approval_scope"] == identity[2]
    recorded["fingerprint"] = identity[3]
    return edited


async def resume(db: Path, shop: Shop, state: dict[str, Any], steps: Sequence[Any]) -> RunResult:
    """A fresh process's resume: its own journal connection, GovernedTools and Agent."""
    journal = open_journal(str(db))
    try:
        async with shop.governed(journal) as governed:
            support = agent(governed, steps)
            restored = await RunState.from_json(support, state)
            assert await governed.apply_decisions(restored) == []
            return await Runner.run(support, restored, run_config=NO_TRACES)
    finally:
        await journal.aclose()


def test_allowed_denied_and_asked_then_approved_elsewhere_runs_once(tmp_path: Path) -> None:
    db, shop = tmp_path / "j.db", Shop()

    async def first() -> tuple[RunResult, str, str]:
        journal = open_journal(str(db))
        async with shop.governed(journal) as governed:
            support = agent(
                governed,
                [
                    [function_call("read_order", {"order_id": "A1"}, call_id="c1")],
                    [function_call("delete_order", {"order_id": "A1"}, call_id="c2")],
                    [function_call("refund", {"order_id": "A1", "amount": 70.0}, call_id="c3")],
                ],
            )
            result = await Runner.run(support, "refund A1", context=CONTEXT, run_config=NO_TRACES)
            (pending,) = await governed.pending(result)
            run_id = governed.run_id("chat-42")
        await journal.aclose()
        return result, pending.ticket_id, run_id

    result, ticket, run_id = run(first())
    read, denied = outputs(result)
    assert json.loads(read) == {"order_id": "A1", "total": 80.0, "status": "paid"}
    assert denied.startswith("tether: refused (policy_denied): orders are never deleted")
    # The ask paused the SDK run its own way: an interruption of the refund call.
    assert [(i.tool_name, i.call_id) for i in result.interruptions] == [("refund", "c3")]
    assert shop.executed == [("read_order", "A1")]
    saved = tmp_path / "state.json"
    saved.write_text(json.dumps(result.to_state().to_json()))

    assert f"ticket {ticket} approved" in cli("approve", ticket, "--db", str(db), "--reason", "ok")

    state = json.loads(saved.read_text())
    forged_state = tampered(state, "c3", "refund", {"order_id": "A1", "amount": 700.0})
    forged = run(resume(db, shop, forged_state, [[assistant_message("could not refund")]]))
    assert outputs(forged)[-1].startswith("tether: refused (approval_mismatch): ticket")
    assert outputs(forged)[-1].endswith(f"[run {run_id}, step s4]")  # the refusal's own step
    assert shop.executed == [("read_order", "A1")]
    # On the record: the forged arguments, refused by the ticket; the run still waits on it.
    attempt, record = refusal_and_run(db, run_id)
    assert attempt.proposal == ToolCall("refund", {"order_id": "A1", "amount": 700.0})
    assert (attempt.decision.rule_id, attempt.decision.reason_code) == (
        f"approval:{ticket}",
        "approval_mismatch",
    )
    assert attempt.call_id is None and 'presented as call id "c3"' in attempt.decision.reason
    assert (record.status, record.checkpoint["pending"]["step_id"]) == ("paused", "s3")

    done = run(resume(db, shop, state, [[assistant_message("refunded 70 on A1")]]))
    assert outputs(done)[-1] == "refunded 70.00 on A1" and done.final_output == "refunded 70 on A1"
    assert shop.executed == [("read_order", "A1"), ("refund", "A1", 70.0)]
    # The same saved state resumed again: the call id was seen before, it does not run twice.
    again = run(resume(db, shop, state, [[assistant_message("done")]]))
    assert outputs(again)[-1] == "refunded 70.00 on A1"
    assert len(shop.executed) == 2

    journal = open_journal(str(db))
    rows = step_rows(journal, run_id)
    journal.close()
    assert [(r["step_id"], r["observation"]["outcome"]) for r in rows] == [
        ("s1", "executed"),
        ("s2", "refused"),
        ("s3", "awaiting_approval"),
        ("s4", "refused"),  # the forged resume
        ("s3", "executed"),  # once: the repeated resume added no step
    ]
    assert shop.keys == [f"{run_id}:s3"]  # the tool got tether's idempotency key for the step

    shown = CliRunner().invoke(app, ["show", run_id, "--db", str(db)], env={"NO_COLOR": "1"}).output
    for line in (
        'read_order(order_id="A1")',
        "deny by no-deletes",
        "refused (policy_denied): orders are never deleted",
        'refund(amount=70.0, order_id="A1")',
        "ask by refund-ask",
        f"awaiting_approval (ticket {ticket})",
        f"approved: {ticket}",
        'refund(amount=700.0, order_id="A1")',
        f"deny by approval:{ticket}",
        f"refused (approval_mismatch): ticket {ticket} approved refund with other arguments",
        f"executed (ticket {ticket}): refunded 70.00 on A1",
    ):
        assert line in shown, line
    assert "model openai-agents" in shown and "journal intact" in shown
    assert verified(db, run_id)


def asked(db: Path, shop: Shop) -> tuple[dict[str, Any], str]:
    """A conversation paused on a refund of 70 (a streamed run): its saved state and the ticket."""

    async def go() -> tuple[dict[str, Any], str]:
        journal = open_journal(str(db))
        async with shop.governed(journal) as governed:
            support = agent(
                governed, [[function_call("refund", {"order_id": "A1", "amount": 70.0}, call_id="c1")]]
            )
            # Streamed, this time: the SDK pauses a streamed run the same way.
            result = Runner.run_streamed(support, "refund A1", context=CONTEXT, run_config=NO_TRACES)
            async for _ in result.stream_events():
                pass
            (pending,) = await governed.pending(result)
        await journal.aclose()
        return result.to_state().to_json(), pending.ticket_id

    state: tuple[dict[str, Any], str] = run(go())
    return state


def test_a_denial_reaches_the_model_as_the_tools_output_and_the_conversation_goes_on(tmp_path: Path) -> None:
    db, shop = tmp_path / "j.db", Shop()
    state, ticket = asked(db, shop)
    journal = open_journal(str(db))
    run(journal.decide_ticket(ticket, approve=False, by=PERSON, reason="too much"))
    journal.close()

    result = run(
        resume(
            db,
            shop,
            state,
            [
                [function_call("refund", {"order_id": "A1", "amount": 20.0}, call_id="c2")],
                [assistant_message("refunded 20 instead")],
            ],
        )
    )
    denied, smaller = outputs(result)[-2:]
    assert denied.startswith("tether: refused (approval_denied)") and "too much" in denied
    assert smaller == "refunded 20.00 on A1"
    assert shop.executed == [("refund", "A1", 20.0)]


def test_an_undecided_ticket_keeps_the_run_paused_and_an_sdk_approval_alone_runs_nothing(
    tmp_path: Path,
) -> None:
    db, shop = tmp_path / "j.db", Shop()
    state, ticket = asked(db, shop)

    async def go() -> RunResult:
        journal = open_journal(str(db))
        async with shop.governed(journal) as governed:
            support = agent(governed, [[assistant_message("ok")]])
            restored = await RunState.from_json(support, state)
            (waiting,) = await governed.apply_decisions(restored)
            assert (waiting.ticket_id, waiting.decided, waiting.call_id) == (ticket, False, "c1")
            for item in restored.get_interruptions():
                restored.approve(item)  # approved in the SDK only: tether's ticket decides
            result = await Runner.run(support, restored, run_config=NO_TRACES)
        await journal.aclose()
        return result

    shown = outputs(run(go()))[-1]
    assert shown.startswith(f"tether: waiting for a person to approve (ticket {ticket})")
    assert shop.executed == []


def test_a_call_made_while_the_conversation_waits_is_refused_and_recorded_once(tmp_path: Path) -> None:
    """A new SDK run of a conversation that waits on a ticket: its call is refused
    (`approval_pending`), recorded once although the SDK presents it twice (`needs_approval`,
    then the tool), and the conversation still waits on the same ticket."""
    db, shop = tmp_path / "j.db", Shop()
    _, ticket = asked(db, shop)

    async def go() -> RunResult:
        journal = open_journal(str(db))
        async with shop.governed(journal) as governed:
            support = agent(
                governed,
                [
                    [function_call("read_order", {"order_id": "A1"}, call_id="c9")],
                    [assistant_message("later")],
                ],
            )
            result = await Runner.run(support, "read A1", context=CONTEXT, run_config=NO_TRACES)
        await journal.aclose()
        return result

    said = outputs(run(go()))[-1]
    assert said.startswith("tether: refused (approval_pending): cannot take read_order: the conversation")
    assert f"waits on ticket {ticket} (refund)" in said
    assert shop.executed == []
    journal = open_journal(str(db))
    run_id = run(journal.list_runs(None))[0].run_id
    journal.close()
    attempt, record = refusal_and_run(db, run_id)
    assert attempt.proposal == ToolCall("read_order", {"order_id": "A1"})
    assert (attempt.decision.rule_id, attempt.decision.reason_code) == (
        f"approval:{ticket}",
        "approval_pending",
    )
    assert (record.status, record.checkpoint["pending"]["ticket_id"]) == ("paused", ticket)
    journal = open_journal(str(db))
    rows = step_rows(journal, run_id)
    journal.close()
    assert [(r["step_id"], r["outcome"]) for r in rows] == [("s1", "awaiting_approval"), ("s2", "refused")]
    assert verified(db, run_id)


def refusal_and_run(db: Path, run_id: str) -> tuple[b.Refused, RunRecord]:
    """The last call refused while the run waited on a ticket, and the run's row."""
    journal = open_journal(str(db))
    try:
        entries = run(journal.read_entries(run_id))
        record = run(journal.get_run(run_id))
    finally:
        journal.close()
    [*_, last] = [e.body for e in entries if e.kind == "refused" and '"rule_id":"approval:' in e.body_json]
    assert isinstance(last, b.Refused) and not last.continuation
    return last, record


def verified(db: Path, run_id: str) -> bool:
    """`tether audit verify` finds nothing wrong with the run, and replay no divergence."""
    journal = open_journal(str(db))
    try:
        report = run(verify_journal(journal, [run_id]))
        replayed = run(replay_run(journal, run_id))
    finally:
        journal.close()
    assert report.findings == [], report.findings
    assert replayed.ok, replayed.as_dict()
    return True


def test_a_tool_failure_is_recorded_and_told_to_the_model(tmp_path: Path) -> None:
    @function_tool
    def flaky(order_id: str) -> str:
        """Fails."""
        raise RuntimeError(f"warehouse down for {order_id}")

    async def go() -> tuple[RunResult, str]:
        journal = open_journal(str(tmp_path / "j.db"))
        async with GovernedTools(journal, [flaky], name="t", effects={"flaky": "read"}) as governed:
            support = agent(
                governed,
                [[function_call("flaky", {"order_id": "A1"}, call_id="c1")], [assistant_message("sorry")]],
            )
            result = await Runner.run(support, "x", context=CONTEXT, run_config=NO_TRACES)
            run_id = governed.run_id("chat-42")
        await journal.aclose()
        return result, run_id

    result, run_id = run(go())
    (told,) = outputs(result)
    assert told.startswith("tether: tool_error (tool_error): RuntimeError: warehouse down for A1")
    journal = open_journal(str(tmp_path / "j.db"))
    assert [r["observation"]["outcome"] for r in step_rows(journal, run_id)] == ["tool_error"]
    journal.close()


def test_an_undeclared_tool_counts_as_external_and_the_default_policy_refuses_it(tmp_path: Path) -> None:
    shop = Shop()

    async def go() -> RunResult:
        journal = open_journal(str(tmp_path / "j.db"))
        async with GovernedTools(journal, shop.tools, name="t", effects={"read_order": "read"}) as governed:
            support = agent(
                governed,
                [
                    [function_call("delete_order", {"order_id": "A1"}, call_id="c1")],
                    [assistant_message("no")],
                ],
            )
            result = await Runner.run(support, "x", context=CONTEXT, run_config=NO_TRACES)
        await journal.aclose()
        return result

    (told,) = outputs(run(go()))
    assert told.startswith("tether: refused (policy_denied)") and shop.executed == []


def test_a_run_without_a_conversation_key_fails_and_runs_nothing(tmp_path: Path) -> None:
    shop = Shop()

    async def go() -> None:
        journal = open_journal(str(tmp_path / "j.db"))
        async with shop.governed(journal) as governed:
            support = agent(governed, [[function_call("read_order", {"order_id": "A1"}, call_id="c1")]])
            with pytest.raises(ConversationKeyError, match="conversation_id"):
                await Runner.run(support, "x", context={"user": "ana"}, run_config=NO_TRACES)
        assert await journal.run_ids() == []
        await journal.aclose()

    run(go())
    assert shop.executed == []


def test_tools_tether_cannot_govern_as_they_are_are_refused_at_wrapping(tmp_path: Path) -> None:
    @tool_input_guardrail
    def anything(data: Any) -> ToolGuardrailFunctionOutput:
        return ToolGuardrailFunctionOutput.allow()

    async def plain(name: str) -> str:
        """A tool."""
        return name

    journal = open_journal(str(tmp_path / "j.db"))
    cases = {
        "needs_approval": function_tool(plain, needs_approval=True),
        "input guardrails": function_tool(plain, tool_input_guardrails=[anything]),
        "timeout": function_tool(plain, timeout=5.0),
    }
    for problem, tool in cases.items():
        with pytest.raises(ValueError, match=problem):
            GovernedTools(journal, [tool], name="t")
    with pytest.raises(ValueError, match="effects names no tool of the agent: refnud"):
        GovernedTools(journal, Shop().tools, name="t", effects={"refnud": "write"})
    journal.close()


def test_the_example_runs_offline(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = ROOT / "examples" / "integrations" / "openai_agents" / "support_agent.py"
    spec = importlib.util.spec_from_file_location("support_agent", path)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    db = str(tmp_path / "shop.db")
    ticket = run(example.start(db))
    assert "refused (policy_denied): orders are kept for the accounts" in capsys.readouterr().out
    assert run(example.resume(db)) is None  # undecided: nothing runs
    journal = open_journal(db)
    run(journal.decide_ticket(ticket, approve=True, by=PERSON, reason="ok"))
    journal.close()
    assert run(example.resume(db)) == "I refunded 70.00 on order A1."
    assert "refunds in the shop: [('A1', 70.0)]" in capsys.readouterr().out
    journal = open_journal(db)
    (record,) = run(journal.list_runs())
    journal.close()
    assert record.status == "completed"
