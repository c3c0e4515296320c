"""Governance coverage: states, exits, rules, both branches of each rule, and decision kinds,
computed from the journals of real runs (a small shop workflow, a SQLite journal per test)."""

from __future__ import annotations

from typing import Any

import pytest

from tether import AgentState, Evidence, Policy, Step, Terminal, ToolContext, Workflow, tool
from tether.journal import Journal
from tether.testing import Collector, ScriptedPerson, run_to_end
from tether.testing.coverage import KindCoverage, _percent
from tether.workflow import Next


def order_read(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    return Evidence(facts={"order_total": 80.0})


def refund_seen(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    return Evidence(facts={"refunded": args["amount"]})


@tool(effect="read", verify=order_read)
def read_order(order_id: str) -> dict[str, Any]:
    """Read an order."""
    return {"order_id": order_id, "total": 80.0}


@tool(effect="write", idempotent=True, verify=refund_seen)
def refund(order_id: str, amount: float) -> dict[str, Any]:
    """Refund part of an order."""
    return {"refunded": amount}


def triage(data: dict[str, Any]) -> Next:
    return Next("shop" if data.get("order_id") else "closed")


RULES = [
    {"id": "big-refund-denied", "tool": "refund", "when": "args.amount > 100.0", "decision": "deny"},
    {
        "id": "refund-asks",
        "tool": "refund",
        "when": "args.amount > 50.0",
        "decision": "ask",
        "approver": "boss",
    },
    {"id": "refund-ok", "tool": "refund", "decision": "allow"},
    {"id": "done-after-refund", "exit": "done", "when": "!has(facts.refunded)", "decision": "deny"},
]


def shop(rules: list[dict[str, Any]] | None = None) -> Workflow:
    return Workflow(
        "shop",
        "1",
        "triage",
        [
            Step("triage", triage, ("shop", "closed")),
            AgentState("shop", "Help.", (read_order, refund), {"done": "closed", "give_up": "closed"}),
            Terminal("closed"),
        ],
        policy=Policy.from_dict({"rules": RULES if rules is None else rules}),
    )


def call(tool_name: str, **args: Any) -> dict[str, Any]:
    return {"kind": "tool_call", "tool": tool_name, "args": args}


def covered(
    journal: Journal, *scripts: list[dict[str, Any]], rules: list[dict[str, Any]] | None = None
) -> Any:
    """The coverage report of one run per script of the shop workflow."""
    workflow, collector = shop(rules), Collector()
    collector.know(workflow)
    boss = ScriptedPerson([{"approve": True}])
    for script in scripts:
        run = run_to_end(workflow, script, journal=journal, input={"order_id": "A1"}, person=boss)
        collector.observe(run.entries)
    report = collector.report()
    assert len(report.workflows) == 1
    return report.workflows[0]


def missed(workflow: Any) -> dict[str, list[str]]:
    return {k.kind: [i.id for i in k.missed] for k in workflow.kinds}


def test_one_run_covers_the_states_exits_branches_and_decisions_it_took(journal: Journal) -> None:
    report = covered(
        journal,
        [
            call("read_order", order_id="A1"),
            call("refund", order_id="A1", amount=20.0),
            {"kind": "exit", "exit": "done"},
        ],
    )
    assert missed(report) == {
        "states": [],
        "exits": ["exit:triage.closed", "exit:shop.give_up"],
        "rules": ["rule:big-refund-denied", "rule:refund-asks", "rule:done-after-refund"],
        "branches": [
            "branch:big-refund-denied=true",
            "branch:refund-asks=true",
            "branch:done-after-refund=true",
        ],
        "decisions": ["decision:ask", "decision:deny"],
    }
    assert (report.total.items, report.total.covered) == (21, 11)
    assert report.runs == 1


def test_a_rule_counts_when_it_decides_and_each_branch_when_its_condition_came_out_that_way(
    journal: Journal,
) -> None:
    # 150: all three refund rules hold; the deny decides. 60: big-refund-denied is false, the ask
    # decides (approved); no refund was ever 50 or less. Leaving through `done` is allowed only
    # because the approved refund was verified.
    report = covered(
        journal,
        [call("refund", order_id="A1", amount=150.0), {"kind": "exit", "exit": "give_up"}],
        [call("refund", order_id="A1", amount=60.0), {"kind": "exit", "exit": "done"}],
    )
    assert missed(report)["rules"] == ["rule:refund-ok", "rule:done-after-refund"]
    assert missed(report)["branches"] == ["branch:refund-asks=false", "branch:done-after-refund=true"]
    assert missed(report)["decisions"] == []


def test_a_rule_without_a_condition_has_no_false_branch_to_miss(journal: Journal) -> None:
    report = covered(journal, [call("refund", order_id="A1", amount=20.0), {"kind": "exit", "exit": "done"}])
    assert report.no_false_branch == ["refund-ok"]
    assert "branch:refund-ok=false" not in [i for k in missed(report).values() for i in k]
    assert "  no false branch (no condition): refund-ok" in report.table()


def test_refusals_before_policy_and_questions_count_for_no_rule_or_decision(journal: Journal) -> None:
    script = [
        call("delete_everything"),
        call("refund", order_id="A1", amount="lots"),
        {"kind": "question", "question": "which order?"},
        {"kind": "exit", "exit": "give_up"},
    ]
    workflow, collector = shop(), Collector()
    collector.know(workflow)
    person = ScriptedPerson([{"question": True, "answer": "A1"}])
    run = run_to_end(workflow, script, journal=journal, input={"order_id": "A1"}, person=person)
    assert [s.rule_id for s in run.steps] == [
        "runtime:scope",
        "runtime:arguments",
        "runtime:question",
        "default:exit",
    ]
    collector.observe(run.entries)
    report = collector.report().workflows[0]
    by_kind = {k.kind: k for k in report.kinds}
    assert by_kind["rules"].covered == 0
    assert by_kind["branches"].covered == 0
    assert [i.id for i in by_kind["decisions"].missed] == ["decision:ask", "decision:deny"]


def test_a_condition_that_cannot_be_evaluated_covers_the_rules_before_it_and_nothing_after(
    journal: Journal,
) -> None:
    rules = [
        {"id": "small", "tool": "refund", "when": "args.amount < 10.0", "decision": "allow"},
        {"id": "broken", "tool": "refund", "when": "facts.missing > 1.0", "decision": "deny"},
        {"id": "after", "tool": "refund", "when": "args.amount > 1.0", "decision": "ask"},
    ]
    report = covered(
        journal,
        [call("refund", order_id="A1", amount=20.0), {"kind": "exit", "exit": "give_up"}],
        rules=rules,
    )
    assert missed(report)["branches"] == [
        "branch:small=true",
        "branch:broken=true",
        "branch:broken=false",
        "branch:after=true",
        "branch:after=false",
    ]
    assert missed(report)["rules"] == ["rule:small", "rule:broken", "rule:after"]


def test_runs_of_a_definition_the_collector_never_saw_are_reported_apart(journal: Journal) -> None:
    run = run_to_end(shop(), [{"kind": "exit", "exit": "give_up"}], journal=journal, input={"order_id": "A1"})
    collector = Collector()
    collector.observe(run.entries, workflow_ref="<python:shop>")
    report = collector.report()
    assert report.workflows == []
    assert report.unattributed == {"shop": 1}
    assert report.lines()[-1].startswith("1 run(s) of workflow shop not counted")


def test_two_policies_for_one_workflow_version_get_a_table_each(journal: Journal) -> None:
    collector = Collector()
    for rules in (RULES, RULES[:2]):
        workflow = shop(rules)
        collector.know(workflow)
        run = run_to_end(
            workflow, [{"kind": "exit", "exit": "give_up"}], journal=journal, input={"order_id": "A1"}
        )
        collector.observe(run.entries)
    titles = [w.title for w in collector.report().workflows]
    assert len(titles) == 2 and all(t.startswith("shop 1 (policy sha256:") for t in titles)
    assert titles[0] != titles[1]


@pytest.mark.parametrize(
    ("covered_items", "items", "shown"),
    [(0, 10, "0%"), (1, 1000, "1%"), (996, 1000, "99%"), (1000, 1000, "100%"), (1, 3, "33%"), (0, 0, "-")],
)
def test_percentages_never_round_up_to_full_nor_down_to_nothing(
    covered_items: int, items: int, shown: str
) -> None:
    assert _percent(KindCoverage("rules", items, covered_items, [])) == shown
