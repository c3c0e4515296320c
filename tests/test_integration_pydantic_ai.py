"""tether.integrations.pydantic_ai: a pydantic-ai agent (the real package, its FunctionModel
scripted) whose tool calls are governed steps. Each agent turn runs as a fresh process would:
its own journal connection, Governance and Agent, the conversation carried as JSON."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation, ConversationTypeAdapter
from pydantic_ai.exceptions import ModelRetry
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.tools import DeferredToolRequests, DeferredToolResults, ToolApproved
from pydantic_ai.toolsets import FunctionToolset

from conftest import run, step_rows
from tether import Policy
from tether.external import conversation_run_id
from tether.identity import Principal
from tether.integrations.pydantic_ai import Governance, resume_results
from tether.journal import bodies as b
from tether.journal import open_journal
from tether.proposals import ToolCall
from tether.tools import Effect

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "integrations" / "pydantic_ai"


def _example() -> ModuleType:
    spec = importlib.util.spec_from_file_location("tether_example_pydantic_ai", EXAMPLE / "support_agent.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


example = _example()


class Turn:
    """One agent run of the example's support agent, as a fresh process makes it."""

    def __init__(self, tmp_path: Path) -> None:
        self.db = str(tmp_path / "tether.db")
        self.shop = example.Shop(tmp_path / "shop.json")

    def __call__(
        self,
        prompt: str | None = None,
        saved: bytes | None = None,
        results: DeferredToolResults | None = None,
    ) -> tuple[str | DeferredToolRequests, bytes]:
        async def go() -> tuple[str | DeferredToolRequests, bytes]:
            journal = open_journal(self.db)
            try:
                async with example.governance(journal, self.shop) as governed:
                    agent = example.build_agent(governed, self.shop)
                    conversation = ConversationTypeAdapter.validate_json(saved) if saved else None
                    result = await agent.run(prompt, conversation=conversation, deferred_tool_results=results)
                    return result.output, ConversationTypeAdapter.dump_json(result.conversation)
            finally:
                await journal.aclose()

        done: tuple[str | DeferredToolRequests, bytes] = run(go())
        return done

    def refunds(self) -> list[dict[str, Any]]:
        refunds: list[dict[str, Any]] = self.shop.load()["refunds"]
        return refunds

    def tether(self, *args: str) -> str:
        done = subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", self.db],
            env=os.environ | {"COLUMNS": "500", "NO_COLOR": "1"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout


def conversation(saved: bytes) -> Conversation:
    loaded: Conversation = ConversationTypeAdapter.validate_json(saved)
    return loaded


def returns(saved: bytes) -> dict[str, ToolReturnPart]:
    """The conversation's tool returns by tool name (the last of each)."""
    parts = [p for m in conversation(saved).messages for p in m.parts if isinstance(p, ToolReturnPart)]
    return {p.tool_name: p for p in parts}


def test_allowed_calls_run_and_a_denied_one_reaches_the_model_as_a_denial(tmp_path: Path) -> None:
    turn = Turn(tmp_path)
    output, saved = turn("delete order A1; refund 10 on order B2")
    assert isinstance(output, str)
    denied = returns(saved)["delete_order"]
    assert denied.outcome == "denied"
    assert "refused (policy_denied): the assistant never deletes orders" in str(denied.content)
    assert returns(saved)["refund"].outcome == "success"
    assert turn.shop.load()["deleted"] == []  # never executed
    run_id = conversation_run_id("support-agent", conversation(saved).conversation_id)
    assert turn.refunds() == [{"order_id": "B2", "amount": 10.0, "key": f"{run_id}:s3"}]

    journal = open_journal(turn.db)
    rows = step_rows(journal, run_id)
    journal.close()
    seen = [(r["proposal"]["tool"], r["observation"]["outcome"], r["decision"]["rule_id"]) for r in rows]
    assert seen == [
        ("delete_order", "refused", "no-deletes"),
        ("read_order", "executed", "reads-ok"),
        ("refund", "executed", "refund-small"),
    ]
    assert rows[2]["record"].verification["ok"] is True  # the refund's verifier re-read the ledger


def test_an_ask_pauses_survives_a_restart_and_runs_the_approved_arguments_once(tmp_path: Path) -> None:
    turn = Turn(tmp_path)
    paused, saved = turn("refund 70 on order A1")
    assert isinstance(paused, DeferredToolRequests) and [c.tool_name for c in paused.approvals] == ["refund"]
    call_id, args = paused.approvals[0].tool_call_id, paused.approvals[0].args_as_dict()
    ticket = paused.metadata[call_id]["tether"]["ticket_id"]
    run_id = paused.metadata[call_id]["tether"]["run_id"]
    assert conversation(saved).deferred_tool_requests == paused

    # Resumed before anyone decided: the framework's "approved" decides nothing; it pauses again.
    again, _ = turn(saved=saved, results=resume_results(paused))
    assert isinstance(again, DeferredToolRequests)
    assert again.metadata[call_id]["tether"]["ticket_id"] == ticket
    assert turn.refunds() == []

    assert "approved" in turn.tether("approve", ticket, "--reason", "customer is right")

    # Tampered resumes: other arguments than the ticket's, by the framework's override or an
    # edited history. Refused, nothing runs; the model reads why.
    edited = json.loads(saved)
    for part in edited["messages"][-1]["parts"]:
        if part.get("tool_call_id") == call_id:
            part["args"]["amount"] = 700.0
    tampered = [
        (
            saved,
            DeferredToolResults(approvals={call_id: ToolApproved(override_args={**args, "amount": 80.0})}),
        ),
        (json.dumps(edited).encode(), resume_results(paused)),
    ]
    for state, results in tampered:
        output, after = turn(saved=state, results=results)
        assert isinstance(output, str) and "refund: denied: refused (approval_mismatch)" in output
        assert returns(after)["refund"].outcome == "denied"
    assert turn.refunds() == []
    # Each attempt is on the record, with the arguments presented, refused by the ticket; the
    # run still waits on the same ticket, for the call as it was approved.
    journal = open_journal(turn.db)
    entries = run(journal.read_entries(run_id))
    record = run(journal.get_run(run_id))
    journal.close()
    attempts = [(e.step_id, e.body) for e in entries if e.kind == "refused"]
    assert [(step, r.proposal) for step, r in attempts] == [
        ("s3", ToolCall("refund", {**args, "amount": 80.0})),
        ("s4", ToolCall("refund", {**args, "amount": 700.0})),
    ]
    for _, attempt in attempts:
        assert isinstance(attempt, b.Refused) and attempt.call_id is None
        decision = attempt.decision
        assert (decision.decision, decision.rule_id, decision.reason_code) == (
            "deny",
            f"approval:{ticket}",
            "approval_mismatch",
        )
        assert decision.reason.endswith(f"(presented as call id {json.dumps(call_id)})")
    assert (record.status, record.checkpoint["pending"]["step_id"]) == ("paused", "s2")

    done, after = turn(saved=saved, results=resume_results(paused))
    assert isinstance(done, str) and returns(after)["refund"].outcome == "success"
    assert turn.refunds() == [{"order_id": "A1", "amount": 70.0, "key": f"{run_id}:s2"}]
    # The same resume delivered twice (a retried request): the recorded outcome, no second refund.
    twice, _ = turn(saved=saved, results=resume_results(paused))
    assert isinstance(twice, str) and "refund: success" in twice
    assert len(turn.refunds()) == 1

    shown = turn.tether("show", run_id)
    for line in (
        f"{run_id}  support-agent 1  status running",
        "model pydantic-ai  journal intact",
        'read_order(order_id="A1")',
        "allow by reads-ok",
        'refund(amount=70.0, order_id="A1")',
        "ask by refund-over-50-asks — refunds above 50 need a supervisor",
        f"→ awaiting_approval (ticket {ticket})",
        f"→ approved: {ticket} by local:",
        'refund(amount=80.0, order_id="A1")',
        'refund(amount=700.0, order_id="A1")',
        f"deny by approval:{ticket} — ticket {ticket} approved refund with other arguments",
        f"→ refused (approval_mismatch): ticket {ticket} approved refund with other arguments",
        "→ intent recorded, effect starting",
        f'→ executed (ticket {ticket}): {{"refunded": 70.0}}',
    ):
        assert line in shown, line
    assert shown.count("→ executed") == 2  # the read and the refund, once
    assert shown.count("→ refused (approval_mismatch)") == 2
    # `tether audit verify` finds the run intact, rows and tickets agreeing with the chain, and
    # `tether replay` no divergence (each exits 0 only then).
    turn.tether("audit", "verify", run_id)
    replayed = json.loads(turn.tether("replay", run_id, "--json"))
    assert replayed["ok"] and replayed["summary"]["diverged"] == 0
    by_ticket = [d for d in replayed["decisions"] if d["recorded"]["rule_id"] == f"approval:{ticket}"]
    assert [d["status"] for d in by_ticket] == ["not re-evaluated"] * 2


def test_a_person_s_denial_reaches_the_model_and_the_conversation_goes_on(tmp_path: Path) -> None:
    turn = Turn(tmp_path)
    paused, saved = turn("refund 70 on order A1")
    assert isinstance(paused, DeferredToolRequests)
    ticket = paused.metadata[paused.approvals[0].tool_call_id]["tether"]["ticket_id"]
    person = Principal(principal_id="person:ana", name="ana", kind="person", role="approver")
    journal = open_journal(turn.db)
    run(journal.decide_ticket(ticket, approve=False, by=person, reason="already refunded by phone"))
    journal.close()

    output, saved = turn(saved=saved, results=resume_results(paused))
    assert isinstance(output, str)
    assert "refund: denied: refused (approval_denied)" in output and "already refunded by phone" in output
    output, _ = turn("refund 5 on order A1", saved=saved)  # the same conversation, a new request
    assert isinstance(output, str) and "refund: success" in output
    assert [r["amount"] for r in turn.refunds()] == [5.0]


def test_the_capability_governs_every_tool_of_the_agent(tmp_path: Path) -> None:
    shop = example.Shop(tmp_path / "shop.json")
    db = str(tmp_path / "tether.db")

    async def go() -> tuple[str | DeferredToolRequests, str]:
        journal = open_journal(db)
        async with example.governance(journal, shop) as governed:
            agent = Agent(
                FunctionModel(example.support_model),
                toolsets=[shop.toolset()],
                capabilities=[governed.capability()],
                output_type=[str, DeferredToolRequests],
            )
            result = await agent.run("delete order A1; read order B2", conversation_id="ticket-4711")
            # The agent run over, its tether run is let go: another process can take the next turn.
            assert (await journal.get_run(governed.run_id_for("ticket-4711"))).lease_owner is None
            ended = await governed.end("ticket-4711", "answered")
        await journal.aclose()
        return result.output, ended.outcome

    output, ended = run(go())
    assert isinstance(output, str) and "delete_order: denied: refused (policy_denied)" in output
    assert ended == "completed"
    journal = open_journal(db)
    rows = step_rows(journal, conversation_run_id("support-agent", "ticket-4711"))
    journal.close()
    assert [r["observation"]["outcome"] for r in rows[:2]] == ["refused", "executed"]
    assert shop.load()["deleted"] == []


def test_a_tool_s_failure_is_recorded_and_told_the_framework_s_way(tmp_path: Path) -> None:
    tries: list[str] = []

    def flaky(order_id: str) -> str:
        """Fails once, asking the model to try again."""
        tries.append(order_id)
        if len(tries) == 1:
            raise ModelRetry("the order system is busy, try again")
        return "ok"

    def broken(order_id: str) -> str:
        """Always crashes."""
        raise RuntimeError("disk on fire")

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returned = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if not any(p.tool_name == "flaky" and p.outcome == "success" for p in returned):
            return ModelResponse(parts=[ToolCallPart("flaky", {"order_id": "A1"})])
        if not any(p.tool_name == "broken" for p in returned):
            return ModelResponse(parts=[ToolCallPart("broken", {"order_id": "A1"})])
        said = [f"{p.tool_name}:{p.outcome}:{p.content}" for p in returned]
        return ModelResponse(parts=[TextPart(" | ".join(said))])

    db = str(tmp_path / "tether.db")
    effects: dict[str, Effect] = {"flaky": "read", "broken": "read"}

    async def go() -> str:
        journal = open_journal(db)
        policy = Policy.from_dict({"rules": [{"id": "ok", "tool": "*", "decision": "allow"}]}, "p")
        async with Governance(journal, name="flaky", policy=policy, effects=effects) as governed:
            agent = Agent(FunctionModel(model), toolsets=[governed.wrap(FunctionToolset([flaky, broken]))])
            result = await agent.run("go", conversation_id="c")
        await journal.aclose()
        return result.output

    output = run(go())
    journal = open_journal(db)
    outcomes = [r["observation"]["outcome"] for r in step_rows(journal, conversation_run_id("flaky", "c"))]
    journal.close()
    assert tries == ["A1", "A1"]  # the model retried after the tool's own ModelRetry
    assert "flaky:success:ok" in output
    assert "broken:failed:tool_error (tool_error): RuntimeError: disk on fire" in output
    assert outcomes == ["tool_error", "executed", "tool_error"]


def test_a_declaration_for_a_tool_the_agent_lacks_is_refused(tmp_path: Path) -> None:
    shop = example.Shop(tmp_path / "shop.json")

    async def go() -> None:
        journal = open_journal(str(tmp_path / "tether.db"))
        try:
            governed = Governance(journal, name="typo", effects={"refnud": "write"})
            agent = Agent(FunctionModel(example.support_model), toolsets=[governed.wrap(shop.toolset())])
            await agent.run("read order A1")
        finally:
            await journal.aclose()

    with pytest.raises(ValueError, match=r"declared for tool\(s\) refnud, which the agent does not have"):
        run(go())


def test_a_conversation_continued_with_other_tools_is_stopped_not_run(tmp_path: Path) -> None:
    shop = example.Shop(tmp_path / "shop.json")

    async def go() -> str:
        journal = open_journal(str(tmp_path / "tether.db"))
        async with example.governance(journal, shop) as governed:
            agent = example.build_agent(governed, shop)
            first = await agent.run("read order A1", conversation_id="c-1")
            assert isinstance(first.output, str) and "read_order: success" in first.output
        fewer = shop.toolset().filtered(lambda ctx, tool: tool.name != "delete_order")
        reads = Policy.from_dict(
            {"rules": [{"id": "reads-ok", "tool": "read_order", "decision": "allow"}]}, "p"
        )
        async with Governance(journal, name="support-agent", policy=reads) as other:
            agent = Agent(FunctionModel(example.support_model), toolsets=[other.wrap(fewer)])
            second = await agent.run("refund 5 on order A1", conversation_id="c-1")
        await journal.aclose()
        return second.output

    output = run(go())
    assert output.startswith("read_order: failed:")
    assert "stopped (stopped): the conversation's run is stopped" in output
    assert "pinned to support-agent 1" in output and "load the version the run started on" in output
    assert shop.load()["refunds"] == []
