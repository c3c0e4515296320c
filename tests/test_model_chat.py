"""The conversation every function-calling adapter sends, and what a reply becomes."""

from __future__ import annotations

import pytest

from tether.models import BudgetLeft, ExitSpec, Message, ModelContext, ToolSpec
from tether.models.chat import functions, proposal_from_calls, system_prompt, turns
from tether.proposals import MalformedProposal, parse_proposal


def context(*transcript: Message, tools: tuple[str, ...] = ("lookup",)) -> ModelContext:
    return ModelContext(
        run_id="r1",
        state="resolve",
        instructions="Refund what is justified.",
        transcript=list(transcript),
        tools=[
            ToolSpec(name=t, description="Look an order up.", effect="read", parameters={"type": "object"})
            for t in tools
        ],
        exits=[ExitSpec(name="refunded", target="done"), ExitSpec(name="declined", target="rejected")],
        budget_left=BudgetLeft(steps=5, tool_calls=3, seconds=60),
        data={"order_id": "A1"},
    )


def test_the_envelope_is_offered_as_functions() -> None:
    ctx = context()
    offered = {f.name: f for f in functions(ctx)}
    assert list(offered) == ["lookup", "take_exit", "ask_person"]
    assert offered["take_exit"].parameters["properties"]["exit"]["enum"] == ["refunded", "declined"]
    assert "refunded (to done)" in system_prompt(ctx) and "Refund what is justified." in system_prompt(ctx)
    with pytest.raises(ValueError, match="clash with the functions tether offers"):
        functions(context(tools=("take_exit",)))


def test_the_transcript_becomes_calls_results_and_messages() -> None:
    ctx = context(
        Message(role="proposal", content={"kind": "tool_call", "tool": "lookup", "args": {"id": "A1"}}),
        Message(role="observation", content={"outcome": "executed", "result": {"total": 80}}),
        Message(role="proposal", content="I think I am done"),
        Message(role="observation", content={"outcome": "refused", "reason_code": "malformed_output"}),
        Message(role="proposal", content={"kind": "question", "question": "Full refund?"}),
        Message(role="observation", content={"outcome": "awaiting_answer"}),
        Message(role="person", content={"answer": "yes"}),
    )
    got = [(t.kind, t.call_id, t.name) for t in turns(ctx)]
    assert got == [
        ("user", "", ""),
        ("call", "call_0", "lookup"),
        ("result", "call_0", ""),
        ("assistant_text", "", ""),
        ("user", "", ""),
        ("call", "call_4", "ask_person"),
        ("result", "call_4", ""),
        ("user", "", ""),
    ]
    text = [t.text for t in turns(ctx)]
    assert '"order_id": "A1"' in text[0] and "malformed_output" in text[4] and "A person answered" in text[7]


def test_whatever_the_model_sends_reaches_the_kernel_which_refuses_garbage() -> None:
    assert parse_proposal(proposal_from_calls([("lookup", '{"id": "A1"}')], None)).tool == "lookup"  # type: ignore[union-attr]
    exit_ = parse_proposal(
        proposal_from_calls([("take_exit", {"exit": "refunded", "update": {"n": 1}})], None)
    )
    assert (exit_.exit, exit_.update) == ("refunded", {"n": 1})  # type: ignore[union-attr]
    for calls, text, message in [
        ([("lookup", '{"id": ')], None, "args: Expected `object`, got `str`"),
        ([("lookup", "{}"), ("lookup", "{}")], None, "2 proposals in one reply"),
        ([], "Sure, I will refund it.", "output is not JSON"),
        ([("take_exit", '{"exit": ')], None, "unknown field `arguments`"),
        ([("ask_person", "[1]")], None, "unknown field `arguments`"),
    ]:
        with pytest.raises(MalformedProposal, match=message):
            parse_proposal(proposal_from_calls(calls, text))
