"""The governed step: refusals are recorded and never executed; approvals are bound tickets."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conftest import Shop, call, run, step_rows
from tether import Budget, ReasonCode, Runtime, ScriptedModel, TicketError
from tether.journal import Journal, bodies, verify_chain
from tether.journal.sqlite import SQLiteJournal


def steps(journal: Journal, run_id: str) -> list[dict[str, Any]]:
    return step_rows(journal, run_id)


def start(journal: Journal, shop: Shop, script: list[Any], **kw: Any) -> Any:
    return run(Runtime(journal).start(shop.workflow(**kw), ScriptedModel(script)))


@pytest.mark.parametrize(
    ("proposal", "code"),
    [
        ({"raw": "I think I'll refund them"}, ReasonCode.MALFORMED_OUTPUT),
        ({"raw": "[1, 2]"}, ReasonCode.MALFORMED_OUTPUT),
        ({"kind": "launch_rocket"}, ReasonCode.MALFORMED_OUTPUT),
        (call("wire_money", to="me"), ReasonCode.UNKNOWN_TOOL),
        (call("delete_order", order_id="A1"), ReasonCode.OUT_OF_SCOPE),
        (call("refund", order_id="A1", amount="ten"), ReasonCode.INVALID_ARGUMENTS),
        (call("refund", order_id="A1"), ReasonCode.INVALID_ARGUMENTS),
        (call("refund", order_id="A1", amount=5.0, note="extra"), ReasonCode.INVALID_ARGUMENTS),
        ({"kind": "exit", "exit": "teleport"}, ReasonCode.OUT_OF_SCOPE),
        ({"kind": "handoff", "to": "the-internet"}, ReasonCode.OUT_OF_SCOPE),
    ],
)
def test_malformed_or_out_of_scope_is_recorded_fed_back_and_never_executed(
    journal: Journal, shop: Shop, proposal: dict[str, Any], code: ReasonCode
) -> None:
    result = start(journal, shop, [proposal, {"kind": "exit", "exit": "done"}])

    assert result.status == "completed"
    assert shop.executed == [] and shop.refunds == []
    refused = steps(journal, result.run_id)[0]
    assert refused["outcome"] == "refused"
    assert refused["reason_code"] == code
    assert refused["decision"]["decision"] == "deny"
    assert refused["decision"]["rule_id"].startswith("runtime:")
    # The model was told why, in the next turn's transcript.
    assert refused["observation"]["reason_code"] == code


def test_refused_proposals_count_against_the_step_budget(journal: Journal, shop: Shop) -> None:
    result = start(journal, shop, [{"raw": "nonsense"}] * 5, budget=Budget(max_steps=3))

    assert result.status == "escalated"
    assert result.reason_code == ReasonCode.BUDGET_EXHAUSTED
    assert result.owner == "supervisor"
    assert len(steps(journal, result.run_id)) == 3


def test_budget_can_fail_the_run_instead(journal: Journal, shop: Shop) -> None:
    result = start(
        journal,
        shop,
        [call("read_order", order_id="A1")] * 3,
        budget=Budget(max_steps=10, max_tool_calls=2),
        on_budget_exhausted="fail",
    )

    assert result.status == "failed"
    assert result.reason_code == ReasonCode.BUDGET_EXHAUSTED
    assert shop.executed == ["read_order", "read_order"]


def test_same_call_repeated_is_stopped_as_a_loop(journal: Journal, shop: Shop) -> None:
    result = start(
        journal,
        shop,
        [call("read_order", order_id="A1")] * 6,
        budget=Budget(max_steps=10, max_tool_calls=10, max_repeats=3),
    )

    assert result.status == "escalated"
    assert result.reason_code == ReasonCode.LOOP_DETECTED
    assert shop.executed.count("read_order") == 3


def test_write_tools_are_denied_by_default(journal: Journal, shop: Shop) -> None:
    result = start(
        journal,
        shop,
        [call("refund", order_id="A1", amount=1.0), {"kind": "exit", "exit": "done"}],
        policy={"rules": []},
    )

    step = steps(journal, result.run_id)[0]
    assert (step["decision"]["decision"], step["decision"]["rule_id"]) == ("deny", "default:write")
    assert shop.refunds == []


def test_allowed_write_commits_an_intent_then_the_verified_result(journal: Journal, shop: Shop) -> None:
    result = start(journal, shop, [call("refund", order_id="A1", amount=20.0), {"kind": "finish"}])

    assert result.status == "completed"
    entries = run(journal.read_entries(result.run_id))
    kinds = [e.kind for e in entries]
    assert kinds.index("intent") < kinds.index("executed", kinds.index("intent"))
    intent = next(e for e in entries if e.kind == "intent")
    done = next(e for e in entries if e.kind == "executed")
    assert intent.step_id == done.step_id
    record = done.body
    assert isinstance(record, bodies.Executed) and record.tool == "refund"
    assert record.decision.rule_id == "refund-ok"
    assert record.verification is not None and record.verification["ok"] is True
    assert record.args_hash == intent.body.args_hash  # type: ignore[union-attr]
    assert shop.keys == [f"{result.run_id}:{done.step_id}"]  # the idempotency key the tool got
    assert verify_chain(entries) == []


def test_a_write_without_a_verifier_is_recorded_as_unshown(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow()
    wf.states["shop"].tools[1].verifier = None
    result = run(
        Runtime(journal).start(
            wf, ScriptedModel([call("refund", order_id="A1", amount=9.0), {"kind": "finish"}])
        )
    )
    executed = next(s for s in steps(journal, result.run_id) if s["outcome"] == "executed")
    assert executed["verification"]["reason_code"] == ReasonCode.EVIDENCE_MISSING
    assert executed["verification"]["ok"] is None


def test_failed_verification_is_recorded_and_escalates_when_declared(journal: Journal, shop: Shop) -> None:
    shop.refunds.append(("nothing", 0.0))  # noise the verifier must not be fooled by
    wf = shop.workflow(on_verification_failed="escalate")
    original = wf.states["shop"].tools[1].fn
    wf.states["shop"].tools[1].fn = lambda order_id, amount, ctx: {"ok": True}  # claims success, does nothing
    try:
        result = run(Runtime(journal).start(wf, ScriptedModel([call("refund", order_id="A1", amount=9.0)])))
    finally:
        wf.states["shop"].tools[1].fn = original

    assert result.status == "escalated"
    assert result.reason_code == ReasonCode.VERIFICATION_FAILED
    step = [s for s in steps(journal, result.run_id) if s["outcome"] == "verification_failed"]
    assert step and step[0]["verification"]["ok"] is False


def test_a_tool_that_raises_is_a_tool_error_the_model_can_react_to(journal: Journal, shop: Shop) -> None:
    result = start(journal, shop, [call("read_order", order_id="ZZZ"), {"kind": "exit", "exit": "done"}])

    assert result.status == "completed"
    step = steps(journal, result.run_id)[0]
    assert step["reason_code"] == ReasonCode.TOOL_ERROR and "KeyError" in step["error"]


def test_a_condition_that_cannot_be_evaluated_denies(journal: Journal, shop: Shop) -> None:
    policy = {
        "rules": [
            {"id": "needs-fact", "tool": "refund", "when": "facts.approved_limit > 0.0", "decision": "allow"}
        ]
    }
    result = start(
        journal,
        shop,
        [call("refund", order_id="A1", amount=1.0), {"kind": "exit", "exit": "done"}],
        policy=policy,
    )

    step = steps(journal, result.run_id)[0]
    assert step["reason_code"] == ReasonCode.POLICY_ERROR
    assert "approved_limit" in step["decision"]["reason"]
    assert shop.refunds == []


def test_facts_from_verified_steps_feed_later_policy(journal: Journal, shop: Shop) -> None:
    policy = {
        "rules": [
            {
                "id": "within-total",
                "tool": "refund",
                "decision": "allow",
                "when": "has(facts.order_total) && args.amount <= facts.order_total",
            }
        ]
    }
    script = [
        call("refund", order_id="A1", amount=30.0),
        call("read_order", order_id="A1"),
        call("refund", order_id="A1", amount=30.0),
        {"kind": "exit", "exit": "done"},
    ]
    result = start(journal, shop, script, policy=policy)

    decided = [s["decision"]["rule_id"] for s in steps(journal, result.run_id)]
    assert decided[:3] == ["default:write", "default:read", "within-total"]
    assert shop.refunds == [("A1", 30.0)]
    assert run(journal.get_run(result.run_id)).facts == {"order_total": 80.0}


def test_ask_pauses_and_an_approval_runs_exactly_the_approved_call(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow()
    script = ScriptedModel([call("refund", order_id="A1", amount=70.0), {"kind": "finish"}])
    runtime = Runtime(journal)
    paused = run(runtime.start(wf, script))

    assert paused.status == "paused" and paused.ticket_id and shop.refunds == []
    ticket = run(journal.get_ticket(paused.ticket_id))
    assert ticket.args == {"order_id": "A1", "amount": 70.0} and ticket.approver == "supervisor"
    # Still paused while nobody decided.
    assert run(runtime.resume(paused.run_id, wf, script)).status == "paused"

    run(journal.decide_ticket(ticket.ticket_id, approve=True, by="sam", now=time.time()))
    done = run(runtime.resume(paused.run_id, wf, script))

    assert done.status == "completed"
    assert shop.refunds == [("A1", 70.0)]
    assert run(journal.get_ticket(ticket.ticket_id)).status == "consumed"
    assert done.reason_code is None and done.owner is None


def test_a_ticket_is_single_use_and_bound_to_its_arguments(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow()
    paused = run(Runtime(journal).start(wf, ScriptedModel([call("refund", order_id="A1", amount=70.0)])))
    ticket = run(journal.get_ticket(paused.ticket_id))
    run(journal.decide_ticket(ticket.ticket_id, approve=True, by="sam", now=time.time()))
    record = run(journal.get_run(paused.run_id))

    from tether.journal import Commit

    other = Commit(
        run_id=record.run_id,
        expected_seq=record.last_seq,
        expected_hash=record.last_hash,
        consume=(ticket.ticket_id, "sha256:other-arguments"),
    )
    with pytest.raises(TicketError, match="other arguments"):
        run(journal.commit(other))
    assert run(journal.get_ticket(ticket.ticket_id)).status == "approved"  # refused commit changed nothing

    ok = msgspec.structs.replace(other, consume=(ticket.ticket_id, ticket.args_hash))
    run(journal.commit(ok))
    record = run(journal.get_run(paused.run_id))
    again = msgspec.structs.replace(ok, expected_seq=record.last_seq, expected_hash=record.last_hash)
    with pytest.raises(TicketError, match="consumed"):
        run(journal.commit(again))
    with pytest.raises(TicketError, match="already consumed"):
        run(journal.decide_ticket(ticket.ticket_id, approve=True, by="sam", now=time.time()))


def test_a_denied_approval_is_fed_back_and_nothing_runs(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow()
    script = ScriptedModel([call("refund", order_id="A1", amount=70.0), {"kind": "exit", "exit": "done"}])
    paused = run(Runtime(journal).start(wf, script))
    run(
        journal.decide_ticket(
            paused.ticket_id, approve=False, by="sam", reason="not eligible", now=time.time()
        )
    )
    done = run(Runtime(journal).resume(paused.run_id, wf, script))

    assert done.status == "completed" and shop.refunds == []
    denial = next(s for s in steps(journal, done.run_id) if s["outcome"] == "refused")
    assert denial["reason_code"] == ReasonCode.APPROVAL_DENIED
    assert "not eligible" in denial["observation"]["reason"]


def test_an_expired_approval_is_recorded_as_such(tmp_path: Path, shop: Shop) -> None:
    clock = [1_800_000_000.0]
    journal = SQLiteJournal(tmp_path / "j.db", clock=lambda: clock[0])  # the store decides expiry
    runtime = Runtime(journal)
    wf = shop.workflow()
    script = ScriptedModel([call("refund", order_id="A1", amount=70.0), {"kind": "exit", "exit": "done"}])
    paused = run(runtime.start(wf, script))
    clock[0] += 25 * 3600

    done = run(runtime.resume(paused.run_id, wf, script))

    assert done.status == "completed" and shop.refunds == []
    assert run(journal.get_ticket(paused.ticket_id)).status == "expired"
    expired = next(s for s in steps(journal, done.run_id) if s["outcome"] == "refused")
    assert expired["reason_code"] == ReasonCode.APPROVAL_EXPIRED


def test_a_question_pauses_until_a_person_answers(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow()
    seen: list[Any] = []

    async def model_fn(ctx: Any) -> Any:
        seen.append([m.model_dump() for m in ctx.transcript])
        if ctx.proposals_made == 0:
            return {"kind": "question", "question": "Which order?"}
        return {"kind": "exit", "exit": "done", "update": {"order": ctx.transcript[-1].content["answer"]}}

    from tether import FunctionModel

    paused = run(Runtime(journal).start(wf, FunctionModel(model_fn)))
    ticket = run(journal.get_ticket(paused.ticket_id))
    assert paused.status == "paused" and ticket.kind == "question" and ticket.question == "Which order?"

    run(journal.decide_ticket(ticket.ticket_id, approve=True, by="customer", answer="A1", now=time.time()))
    done = run(Runtime(journal).resume(paused.run_id, wf, FunctionModel(model_fn)))

    assert done.status == "completed" and done.data["order"] == "A1"
    assert seen[-1][-1] == {
        "role": "person",
        # A decision given with a free-text name is the local admin's (tether.identity).
        "content": {"step_id": "s1", "outcome": "answered", "answer": "A1", "by": "local:customer"}
        | {"reason": ""},
    }


def test_handoff_and_defer_name_an_owner_and_keep_the_state_handed_over(journal: Journal, shop: Shop) -> None:
    result = start(journal, shop, [{"kind": "handoff", "to": "billing", "note": "invoice question"}])
    assert (result.status, result.owner) == ("handed_off", "billing")
    handoff = next(e for e in run(journal.read_entries(result.run_id)) if e.kind == "handoff")
    record = handoff.body
    assert isinstance(record, bodies.HandedOff)
    assert (record.handoff.owner, record.handoff.state) == ("billing", "shop")
    assert handoff.step_id == "s1"

    policy = {
        "rules": [
            {
                "id": "big-to-finance",
                "tool": "refund",
                "when": "args.amount > 60.0",
                "decision": "defer",
                "owner": "finance",
            }
        ]
    }
    deferred = start(journal, Shop(), [call("refund", order_id="A1", amount=70.0)], policy=policy)
    assert (deferred.status, deferred.owner) == ("handed_off", "finance")


def test_most_restrictive_matching_rule_wins(journal: Journal, shop: Shop) -> None:
    policy = {
        "rules": [
            {"id": "allow-all", "tool": "refund", "decision": "allow"},
            {"id": "ask-big", "tool": "refund", "when": "args.amount > 10.0", "decision": "ask"},
            {"id": "deny-huge", "tool": "refund", "when": "args.amount > 75.0", "decision": "deny"},
        ]
    }
    result = start(
        journal,
        shop,
        [
            call("refund", order_id="A1", amount=5.0),
            call("refund", order_id="A1", amount=80.0),
            call("refund", order_id="A1", amount=20.0),
        ],
        policy=policy,
    )
    decided = [(s["decision"]["decision"], s["decision"]["rule_id"]) for s in steps(journal, result.run_id)]
    assert decided[:3] == [("allow", "allow-all"), ("deny", "deny-huge"), ("ask", "ask-big")]


def test_async_tools_and_a_function_model_from_a_model_string(
    journal: Journal, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tether import AgentState, Terminal, Workflow, tool
    from tether.models import resolve_model

    @tool(effect="read")
    async def slow_read(key: str) -> str:
        """An async tool."""
        return key.upper()

    (tmp_path / "my_agent.py").write_text(
        "def propose(ctx):\n"
        "    if ctx.proposals_made == 0:\n"
        "        return {'kind': 'tool_call', 'tool': 'slow_read', 'args': {'key': 'abc'}}\n"
        "    return {'kind': 'finish', 'update': {'seen': ctx.transcript[-1].content['result']}}\n"
    )
    model = resolve_model("function:my_agent:propose", base=tmp_path)
    wf = Workflow("w", "1", "a", [AgentState("a", "Read.", (slow_read,), {"finish": "end"}), Terminal("end")])

    result = run(Runtime(journal).start(wf, model))

    assert (result.status, result.data) == ("completed", {"seen": "ABC"})


def test_a_run_budget_spans_every_state(journal: Journal, shop: Shop) -> None:
    from tether import RunBudget

    script = {
        "shop": [call("read_order", order_id="A1"), {"kind": "exit", "exit": "to_admin"}],
        "admin": [{"raw": "thinking..."}, {"raw": "still thinking..."}],
    }
    wf = shop.workflow(run_budget=RunBudget(max_steps=3))
    result = run(Runtime(journal).start(wf, ScriptedModel(script)))

    assert (result.status, result.state, result.reason_code) == ("escalated", "admin", "budget_exhausted")
    assert result.message == "the run's step budget of 3 is spent"
    assert run(journal.get_run(result.run_id)).checkpoint["totals"]["steps"] == 3
