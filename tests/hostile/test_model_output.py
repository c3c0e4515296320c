"""Hostile model output never crashes a run: whatever arrives is recorded and refused."""

from __future__ import annotations

import json
from typing import Any

import pytest

from conftest import Shop, call, run, step_rows
from tether import Budget, ModelReply, Runtime, ScriptedModel, Usage
from tether.journal import Journal
from tether.models import FunctionModel, ModelContext


def deep(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    "raw",
    [
        deep(1_000),
        deep(100_000),
        '{"kind": "tool_call", "tool": "read_order", "args": {"order_id": ' + deep(5_000) + "}}",
        '{"kind": "tool_call", "tool": "read_order", "args": {"order_id": "A1", "x": NaN}}',
        '{"kind": "tool_call", "tool": "read_order", "args": {"order_id": "A1"}, "n": 1e999}',
        "x" * 2_000_000,
        '{"kind": "tool_call", "tool": "read_order", "args": {"order_id": "' + "\\ud800" + '"}}',
    ],
    ids=["1k-deep", "100k-deep", "deep-args", "nan", "huge-number", "2MB", "lone-surrogate"],
)
def test_any_raw_output_is_recorded_and_refused_and_the_run_goes_on(
    journal: Journal, shop: Shop, raw: str
) -> None:
    result = run(Runtime(journal).start(shop.workflow(), ScriptedModel([{"raw": raw}, {"kind": "finish"}])))

    assert result.status == "completed", result
    (refused, _) = step_rows(journal, result.run_id)
    assert (refused["outcome"], refused["reason_code"]) == ("refused", "malformed_output")
    assert shop.executed == []


def test_a_value_that_is_not_json_from_an_in_process_model_is_refused(journal: Journal, shop: Shop) -> None:
    nested: Any = []
    for _ in range(5_000):
        nested = [nested]
    script = [
        call("read_order", order_id=nested),
        call("refund", order_id="A1", amount=float("-inf")),
        call("refund", order_id="A1", amount=float("nan")),
        call("read_order", order_id={1, 2}),
        {"kind": "finish"},
    ]
    result = run(Runtime(journal).start(shop.workflow(), ScriptedModel(script)))

    assert result.status == "completed", result
    codes = [row["reason_code"] for row in step_rows(journal, result.run_id)][:4]
    assert codes == ["malformed_output"] * 4
    assert shop.executed == [] and shop.refunds == []


def test_minus_infinity_cannot_slip_under_a_deny_rule(journal: Journal, shop: Shop) -> None:
    """On main before kernel v2, -Infinity passed `args.amount > 100.0` and executed."""
    policy = {
        "rules": [
            {"id": "big", "tool": "refund", "when": "args.amount > 100.0", "decision": "deny"},
            {"id": "ok", "tool": "refund", "decision": "allow"},
        ]
    }

    def propose(ctx: ModelContext) -> Any:
        if ctx.proposals_made == 0:  # as JSON text, the way a vendor adapter hands it over
            return (
                json.dumps({"kind": "tool_call", "tool": "refund", "args": {"order_id": "A1", "amount": 1}})[
                    :-3
                ]
                + "-Infinity}}"
            )
        return {"kind": "finish"}

    result = run(Runtime(journal).start(shop.workflow(policy=policy), FunctionModel(propose)))

    assert result.status == "completed"
    assert shop.refunds == []
    assert step_rows(journal, result.run_id)[0]["reason_code"] == "malformed_output"


def test_an_adapter_reporting_negative_usage_is_an_error_not_a_refund(journal: Journal, shop: Shop) -> None:
    def propose(ctx: ModelContext) -> ModelReply:
        return ModelReply(output=call("read_order", order_id="A1"), usage=Usage(input_tokens=-1_000_000))

    result = run(Runtime(journal).start(shop.workflow(), FunctionModel(propose)))

    assert (result.status, result.reason_code) == ("escalated", "model_error")
    assert "greater than or equal to 0" in (result.message or "")


def test_negative_usage_that_bypassed_validation_never_refunds_the_budget(
    journal: Journal, shop: Shop
) -> None:
    """On main before kernel v2, negative usage refunded the budget: 20 calls instead of 2."""
    calls = 0

    def propose(ctx: ModelContext) -> ModelReply:
        nonlocal calls
        calls += 1
        tokens = 60 if calls % 2 else -1_000  # a constructed Usage skips the adapter's check
        usage = Usage.model_construct(input_tokens=tokens, output_tokens=0, cost=0.0)
        return ModelReply.model_construct(
            output=call("read_order", order_id="A1"), usage=usage, exchange=None
        )

    wf = shop.workflow(budget=Budget(max_steps=20, max_tool_calls=20, max_tokens=100, max_repeats=50))
    result = run(Runtime(journal).start(wf, FunctionModel(propose)))

    assert (result.status, result.reason_code) == ("escalated", "budget_exhausted")
    assert calls == 3  # 60 + 0 (clamped, not -1,000) + 60 spends the 100 tokens
