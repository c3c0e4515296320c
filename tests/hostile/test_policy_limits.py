"""Policies within limits: conditions the engine can evaluate without crashing, arguments
bounded by the tool's schema, a budget per decision, and policy tests and checks that say
what really happened."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import pytest
from pydantic import Field

from tether import PolicyFileError, Tool, tool
from tether.policy import Policy
from tether.tools import ArgumentError

ROOT = Path(__file__).resolve().parents[2]
RETAIL = ROOT / "examples" / "retail"

TOOLS = '''\
from tether import tool


@tool(effect="write")
def refund(order_id: str, amount: float) -> dict:
    """Refund part of an order."""
    return {"ok": True}
'''

WORKFLOW = """\
name: limits
version: 1
start: work
states:
  work:
    kind: agent
    instructions: Work.
    tools: ["limits_tools:refund"]
    exits: {done: end}
  end: {kind: terminal}
"""


def tether(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "COLUMNS": "200"},
    )


def folder(tmp_path: Path, condition: str, decision: str = "deny") -> Path:
    (tmp_path / "limits_tools.py").write_text(TOOLS)
    (tmp_path / "workflow.yaml").write_text(WORKFLOW)
    rule = {"id": "the-rule", "tool": "refund", "when": condition, "decision": decision}
    (tmp_path / "policy.yaml").write_text(json.dumps({"rules": [rule]}))
    refund = {"kind": "tool_call", "tool": "refund", "args": {"order_id": "A1", "amount": 5.0}}
    (tmp_path / "script.json").write_text(json.dumps([refund, {"kind": "exit", "exit": "done"}]))
    return tmp_path


def rule(when: str, decision: str = "deny") -> Policy:
    return Policy.from_dict(
        {"rules": [{"id": "the-rule", "tool": "refund", "when": when, "decision": decision}]}
    )


def decide(policy: Policy, args: dict[str, Any], resolvers: dict[str, Any] | None = None) -> Any:
    return policy.decide(
        kind="tool",
        name="refund",
        effect="write",
        variables={"args": args, "tool": {"name": "refund", "effect": "write"}},
        resolvers=resolvers,
    )


# -- conditions the engine can evaluate -------------------------------------------------------


@pytest.mark.parametrize(
    ("terms", "command"),
    [
        (30_000, ["policy", "check", "policy.yaml"]),
        (20_000, ["run", ".", "--db", "t.db", "--model", "script:script.json"]),
    ],
    ids=["crashed the engine at load", "crashed the engine during a run"],
)
def test_a_condition_too_long_for_the_engine_is_refused_at_load(
    tmp_path: Path, terms: int, command: list[str]
) -> None:
    # Before the limits these crashed the whole process (SIGSEGV in the CEL evaluator).
    wf = folder(tmp_path, " + ".join(["1"] * terms) + " > 0")
    out = tether(*command, cwd=wf)
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "rule 'the-rule': condition is" in out.stderr and "over the limit of 4000" in out.stderr
    assert not (wf / "t.db").exists()


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        (" + ".join(["1"] * 600) + " > 0", "has 600 operators, over the limit of 500"),
        ("(" * 40 + "args.amount" + ")" * 40 + " > 0.0", "nests brackets 40 deep, over the limit of 32"),
    ],
    ids=["operators", "nesting"],
)
def test_a_condition_with_too_many_operators_or_too_deep_is_refused_at_load(
    condition: str, message: str
) -> None:
    with pytest.raises(PolicyFileError, match=message):
        rule(condition)


CHAIN = " + ".join(["1"] * 600) + " > 0"


@pytest.mark.parametrize(
    "condition",
    [
        f'// """\n{CHAIN}\n// """',
        f"r'\\' == '' || {CHAIN} || '' == r'\\'",
    ],
    ids=["between quotes in comments", "between raw strings ending in a backslash"],
)
def test_operators_count_wherever_the_engine_sees_them(condition: str) -> None:
    with pytest.raises(PolicyFileError, match=r"has 6\d\d operators, over the limit of 500"):
        rule(condition)


def test_operators_inside_string_literals_do_not_count() -> None:
    assert rule("args.order_id != '" + "+" * 1_000 + "'").rules[0].id == "the-rule"


# -- arguments bounded by the tool's schema ---------------------------------------------------


def test_tool_argument_lists_and_strings_are_bounded_by_default_and_the_author_may_raise_the_bound() -> None:
    def tag(
        labels: list[str],
        notes: dict[str, str],
        title: str,
        aliases: Annotated[list[str] | None, Field(description="other names")] = None,
    ) -> None: ...

    def tag_many(labels: Annotated[list[str], Field(max_length=5_000)]) -> None: ...

    tagger, many = Tool(tag, effect="write"), Tool(tag_many, effect="write")
    ok = {"labels": ["a"] * 100, "notes": {str(i): "x" for i in range(100)}, "title": "t" * 100_000}
    assert tagger.validate(ok).values == {**ok, "aliases": None}
    for too_big in (
        {**ok, "labels": ["a"] * 101},
        {**ok, "notes": {str(i): "x" for i in range(101)}},
        {**ok, "title": "t" * 100_001},
        {**ok, "labels": ["t" * 100_001]},
        {**ok, "aliases": ["a"] * 101},
    ):
        with pytest.raises(ArgumentError, match="at most"):
            tagger.validate(too_big)
    assert many.validate({"labels": ["a"] * 5_000}).values == {"labels": ["a"] * 5_000}
    with pytest.raises(ArgumentError, match="at most 5000 items"):
        many.validate({"labels": ["a"] * 5_001})
    # The declared schema (what the model sees, what the workflow hash covers) shows the
    # author's bounds, not the defaults: workflows written before the defaults keep their hash.
    schema = tagger.json_schema()["properties"]
    assert schema["labels"] == {"items": {"type": "string"}, "title": "Labels", "type": "array"}
    assert many.json_schema()["properties"]["labels"]["maxItems"] == 5_000


def test_the_retail_item_lists_are_bounded_so_the_item_rule_never_sees_thousands_of_ids() -> None:
    sys.path.insert(0, str(RETAIL))
    try:
        import retail_tools as rt
    finally:
        sys.path.remove(str(RETAIL))
    ids = ["1008292230"] * 10_000
    for name in (
        "modify_pending_order_items",
        "return_delivered_order_items",
        "exchange_delivered_order_items",
    ):
        t = getattr(rt, name)
        args = {"order_id": "#W1", "item_ids": ids, "payment_method_id": "gift_card_1"}
        if "new_item_ids" in t.json_schema()["properties"]:
            args["new_item_ids"] = ids
        with pytest.raises(ArgumentError, match=f"at most {rt.MAX_ITEMS_PER_ORDER} items"):
            t.validate(args)


# -- a budget per decision --------------------------------------------------------------------


def test_a_decision_over_its_evaluation_budget_denies_with_policy_error_naming_the_budget() -> None:
    policy = Policy.from_dict(
        {
            "rules": [
                {"id": "big-refunds", "tool": "refund", "when": "args.amount > 100.0", "decision": "deny"}
            ]
        },
        evaluation_budget=1e-9,
    )
    decision = decide(policy, {"order_id": "A1", "amount": 5.0})
    assert (decision.decision, decision.reason_code, decision.rule_id) == (
        "deny",
        "policy_error",
        "policy:evaluation_budget",
    )
    assert "over its budget of 1e-06 ms" in decision.reason and "after rule 'big-refunds'" in decision.reason
    with pytest.raises(ValueError, match="positive"):
        Policy.from_dict({}, evaluation_budget=0)


def test_a_garbage_collection_during_a_decision_does_not_count_against_the_budget() -> None:
    """A full collection in a process holding much data takes longer than the budget; it runs
    in whichever thread allocates when it is due, a decision's included. Here every allocation
    collects, and each collection takes 30 ms of CPU (a callback of the collector burning it):
    the conditions themselves take microseconds, and the decision must be theirs."""
    policy = Policy.from_dict(
        {
            "rules": [
                {"id": "big-refunds", "tool": "refund", "when": "args.amount > 100.0", "decision": "deny"},
                {"id": "refunds", "tool": "refund", "decision": "allow"},
            ]
        },
    )

    def slow_collection(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            until = time.thread_time() + 0.03
            while time.thread_time() < until:
                pass

    thresholds = gc.get_threshold()
    gc.callbacks.append(slow_collection)
    gc.set_threshold(1, 1, 1)
    try:
        started = time.thread_time()
        decision = decide(policy, {"order_id": "A1", "amount": 5.0})
        spent = time.thread_time() - started
    finally:
        gc.set_threshold(*thresholds)
        gc.callbacks.remove(slow_collection)
    assert spent > policy.evaluation_budget  # the collections did run, over the budget in all
    assert (decision.decision, decision.rule_id) == ("allow", "refunds"), decision.reason


def test_time_spent_in_resolvers_does_not_count_against_the_budget() -> None:
    def slow_order(order_id: str) -> dict[str, Any]:
        busy_until = time.thread_time() + 0.2  # a costly lookup: four times the default budget
        while time.thread_time() < busy_until:
            pass
        return {"status": "paid"}

    policy = rule("order(args.order_id).status != 'paid'")
    decision = decide(policy, {"order_id": "A1", "amount": 5.0}, {"order": slow_order})
    assert (decision.decision, decision.rule_id) == ("deny", "default:write")
    assert decision.resolved == {'order("A1")': {"status": "paid"}}


# -- policy tests and checks that say what happened -------------------------------------------

CASES = """\
policy: policy.yaml
workflow: workflow.yaml
cases:
  - name: a refund with arguments the tool refuses
    tool: refund
    args: {order_id: A1, amount: "a lot"}
    expect: {decision: deny}
  - name: the same, expecting the refusal
    tool: refund
    args: {order_id: A1, amount: "a lot"}
    expect: {decision: deny, reason_code: invalid_arguments}
  - name: a deny that came from a condition that failed
    tool: refund
    args: {order_id: A1, amount: 5.0}
    expect: {decision: deny, rule: the-rule}
  - name: the same, expecting the failure
    tool: refund
    args: {order_id: A1, amount: 5.0}
    expect: {decision: deny, rule: the-rule, reason_code: policy_error}
"""


def test_policy_test_cases_report_invalid_arguments_and_tell_a_policy_error_from_a_deny(
    tmp_path: Path,
) -> None:
    wf = folder(tmp_path, "args.no_such_field > 1.0")
    (wf / "cases.yaml").write_text(CASES)
    out = tether("policy", "test", "cases.yaml", "--json", cwd=wf)
    assert out.returncode == 1, out.stdout + out.stderr
    report = {c["name"]: c for c in json.loads(out.stdout)["cases"]}
    refused = report["a refund with arguments the tool refuses"]
    assert not refused["passed"]
    assert "got deny by runtime:arguments (invalid_arguments)" in refused["detail"]
    assert "amount: Input should be a valid number" in refused["detail"]
    assert report["the same, expecting the refusal"]["passed"]
    failed = report["a deny that came from a condition that failed"]
    assert not failed["passed"]
    assert (
        "expected deny by the-rule (policy_denied), got deny by the-rule (policy_error)" in failed["detail"]
    )
    assert report["the same, expecting the failure"]["passed"]


def test_policy_check_flags_arithmetic_mixing_int_and_double_over_typed_arguments(tmp_path: Path) -> None:
    wf = folder(tmp_path, "args.amount * 2 > 100.0")
    out = tether("policy", "check", "policy.yaml", "--json", cwd=wf)
    assert out.returncode == 1, out.stdout + out.stderr
    [finding] = json.loads(out.stdout)["findings"]
    assert finding["rule_id"] == "the-rule"
    assert "`args.amount * 2` mixes double and int" in finding["problem"]
    assert "fails closed (deny, policy_error)" in finding["problem"]

    # What the check says is what happens: the condition cannot be evaluated.
    decision = decide(rule("args.amount * 2 > 100.0"), {"order_id": "A1", "amount": 80.0})
    assert (decision.decision, decision.reason_code) == ("deny", "policy_error")

    # Comparisons do mix int and double in CEL, and a double literal is fine.
    for fine in ("args.amount > 100", "args.amount * 2.0 > 100.0"):
        folder(tmp_path, fine)
        out = tether("policy", "check", "policy.yaml", "--json", cwd=wf)
        assert out.returncode == 0 and json.loads(out.stdout)["findings"] == [], (fine, out.stdout)


def test_undeclared_tools_denied_by_default_say_how_to_declare_an_effect() -> None:
    @tool
    def purge(order_id: str) -> None: ...

    policy = Policy.from_dict({})
    info = {"name": "purge", "effect": purge.effect, "effect_declared": purge.effect_declared}
    decision = policy.decide(kind="tool", name="purge", effect=purge.effect, variables={"tool": info})
    assert (decision.decision, decision.rule_id) == ("deny", "default:external")
    assert "tool 'purge' declares no effect, so it counts as external" in decision.reason
    assert '@tool(effect="read")' in decision.reason
