"""The policy language's additions: facts from answers, a call's subject, `now`, list helpers and
named definitions — each as a policy author and a person answering a ticket would meet it."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from conftest import Shop, call, run, step_rows
from tether import PolicyFileError, Runtime, ScriptedModel
from tether.analysis.check import check
from tether.analysis.diff import redecide
from tether.journal import Journal, bodies
from tether.policy import Policy, PolicyDocument

REFUND = call("refund", order_id="A1", amount=20.0)


def decide(policy: Policy, tool: str = "refund", **variables: Any) -> Any:
    resolvers = variables.pop("resolvers", None)
    variables.setdefault("args", {"order_id": "A1", "amount": 20.0})
    return policy.decide(kind="tool", name=tool, effect="write", variables=variables, resolvers=resolvers)


def facts(journal: Journal, run_id: str) -> dict[str, Any]:
    return dict(run(journal.get_run(run_id)).facts)


def refused(content: dict[str, Any]) -> str:
    with pytest.raises(PolicyFileError) as caught:
        Policy.from_dict(content, "p.yaml")
    return str(caught.value)


# -- (a) facts from answers ------------------------------------------------------------------------

ASK_REASON = {"kind": "question", "question": "Why the refund?", "fact": "refund_reason"}
NEEDS_REASON = {
    "rules": [
        {"id": "needs-a-reason", "tool": "refund", "when": "!has(facts.refund_reason)", "decision": "deny"},
        {
            "id": "reason-from-a-person",
            "tool": "refund",
            "when": "has(facts.refund_reason) && (!provenance(facts.refund_reason).trusted"
            ' || facts.refund_reason != "damaged")',
            "decision": "deny",
        },
        {"id": "refund-ok", "tool": "refund", "decision": "allow"},
    ]
}


def test_an_answer_becomes_a_fact_with_its_source(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow(NEEDS_REASON, facts_from_answers={"refund_reason": "why the customer wants a refund"})
    script = ScriptedModel([REFUND, ASK_REASON, REFUND, {"kind": "exit", "exit": "done"}])
    paused = run(Runtime(journal).start(wf, script))
    ticket = run(journal.get_ticket(paused.ticket_id))
    assert ticket.kind == "question" and ticket.args == {
        "question": "Why the refund?",
        "fact": "refund_reason",
    }

    run(journal.decide_ticket(ticket.ticket_id, approve=True, by="customer", answer="damaged"))
    done = run(Runtime(journal).resume(paused.run_id, wf, script))

    assert done.status == "completed" and facts(journal, done.run_id)["refund_reason"] == "damaged"
    rows = step_rows(journal, paused.run_id)
    assert rows[0]["decision"]["rule_id"] == "needs-a-reason"  # before the answer: no fact
    [answered] = [r["record"] for r in rows if isinstance(r["record"], bodies.Answered)]
    assert (answered.fact, answered.answer, answered.by) == ("refund_reason", "damaged", "local:customer")
    refund = next(r for r in rows[2:] if r["decision"] and r["decision"]["rule_id"] == "refund-ok")
    [traced] = refund["decision"]["provenance"].values()
    assert traced["trusted"] and traced["sources"][0]["kind"] == "answer"
    assert traced["sources"][0]["by"] == "local:customer"
    assert shop.refunds == [("A1", 20.0)]


def test_a_fact_the_state_does_not_take_from_answers_is_refused(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow(NEEDS_REASON, facts_from_answers={"refund_reason": "why"})
    ask_user = {"kind": "question", "question": "Who are you?", "fact": "user_id"}
    result = run(Runtime(journal).start(wf, ScriptedModel([ask_user, {"kind": "exit", "exit": "done"}])))
    [row] = [r for r in step_rows(journal, result.run_id) if r["decision"]][:1]
    assert row["decision"]["reason_code"] == "out_of_scope"
    assert "fact 'user_id' cannot be set from an answer" in row["decision"]["reason"]
    assert "refund_reason" in row["decision"]["reason"]
    assert run(journal.list_tickets()) == [] and facts(journal, result.run_id) == {}


def test_a_declined_question_sets_no_fact(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow(NEEDS_REASON, facts_from_answers={"refund_reason": "why"})
    script = ScriptedModel([ASK_REASON, {"kind": "exit", "exit": "done"}])
    paused = run(Runtime(journal).start(wf, script))
    run(journal.decide_ticket(paused.ticket_id, approve=False, by="customer", reason="no comment"))
    done = run(Runtime(journal).resume(paused.run_id, wf, script))
    assert done.status == "completed" and "refund_reason" not in facts(journal, done.run_id)


def test_a_state_offers_its_facts_to_the_model() -> None:
    from tether.models.chat import functions, proposal_from_call
    from tether.models.protocol import BudgetLeft, ModelContext

    budget = BudgetLeft(steps=1, tool_calls=1, seconds=1.0, tokens=None, cost=None)
    ctx = ModelContext(run_id="r", state="s", instructions="", budget_left=budget)
    [ask] = [f for f in functions(ctx) if "question" in f.parameters["properties"]]
    assert "fact" not in ask.parameters["properties"]
    ctx = ctx.model_copy(update={"facts_from_answers": {"cancel_reason": "why they cancel"}})
    [ask] = [f for f in functions(ctx) if "question" in f.parameters["properties"]]
    assert ask.parameters["properties"]["fact"]["enum"] == ["cancel_reason"]
    asked = proposal_from_call(ask.name, {"question": "Why?", "fact": "cancel_reason"})
    assert asked == {"kind": "question", "question": "Why?", "fact": "cancel_reason"}


# -- (b) subject -----------------------------------------------------------------------------------

ORDERS = {"A1": {"customer": "ann", "total": 80.0}, "B2": {"customer": "bob", "total": 500.0}}
LOOKUP = {"order": lambda order_id: ORDERS.get(order_id)}


def test_a_tool_subject_and_a_rule_subject() -> None:
    policy = Policy.from_dict(
        {
            "subjects": {"refund": "order(args.order_id)"},
            "rules": [
                {
                    "id": "not-over-total",
                    "tool": "refund",
                    "when": "args.amount > subject.total",
                    "decision": "deny",
                },
                {
                    "id": "last-read-order",
                    "tool": "refund",
                    "subject": 'order(last(history.filter(h, h.tool == "read_order")).args.order_id)',
                    "when": "subject.customer != facts.customer",
                    "decision": "deny",
                },
            ],
        }
    )
    history = [{"tool": "read_order", "args": {"order_id": "B2"}}]
    over = decide(policy, args={"order_id": "A1", "amount": 90.0}, facts={"customer": "bob"}, history=history,
                  resolvers=LOOKUP)  # fmt: skip
    assert over.rule_id == "not-over-total" and over.resolved['order("A1")'] == ORDERS["A1"]
    other = decide(policy, facts={"customer": "ann"}, history=history, resolvers=LOOKUP)
    assert other.rule_id == "last-read-order" and 'order("B2")' in other.resolved
    fine = decide(policy, facts={"customer": "bob"}, history=history, resolvers=LOOKUP)
    assert fine.rule_id == "default:write"


def test_a_subject_that_cannot_be_computed_denies_naming_it() -> None:
    policy = Policy.from_dict(
        {
            "subjects": {"refund": "order(args.order_id).customer"},
            "rules": [{"id": "ann-only", "tool": "refund", "when": 'subject != "ann"', "decision": "deny"}],
        }
    )
    missing = decide(policy, args={"order_id": "Z9", "amount": 1.0}, resolvers=LOOKUP)
    assert missing.reason_code == "policy_error" and missing.rule_id == "ann-only"
    assert "subject of 'refund' could not be evaluated" in missing.reason


def test_a_rule_reading_a_subject_nobody_declared_is_refused() -> None:
    rule = {"id": "r", "tool": "refund", "when": "subject == null", "decision": "deny"}
    assert "no subject is declared for refund" in refused({"rules": [rule]})
    bad = {"subjects": {"refund": "subject"}, "rules": [rule]}
    assert "a subject cannot read `subject`" in refused(bad)


# -- (c) now ---------------------------------------------------------------------------------------

RECENT = {
    "rules": [
        {
            "id": "only-before-the-deadline",
            "tool": "refund",
            "when": "now > timestamp(data.deadline) || now.getFullYear() < 2000",
            "decision": "deny",
        },
        {"id": "refund-ok", "tool": "refund", "decision": "allow"},
    ]
}


def test_now_is_the_store_clock_recorded_with_the_decision(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow(RECENT)
    before = time.time()
    result = run(
        Runtime(journal).start(
            wf,
            ScriptedModel([REFUND, {"kind": "exit", "exit": "done"}]),
            input={"deadline": "2999-01-01T00:00:00Z"},
        )
    )
    after = time.time()
    [refund] = [r for r in step_rows(journal, result.run_id) if r["decision"]["rule_id"] == "refund-ok"]
    recorded = datetime.fromisoformat(refund["decision"]["resolved"]["now"]).timestamp()
    assert before - 1 <= recorded <= after + 1
    # A replay decides on the recorded time, never the clock's: the same decision, years later.
    entries = run(journal.read_entries(result.run_id))
    assert {r.status for r in redecide(result.run_id, entries, wf)} == {"same"}
    # A policy that did not read `now` recorded none: a new one reading it cannot replay it.
    plain = run(
        Runtime(journal).start(shop.workflow(), ScriptedModel([REFUND, {"kind": "exit", "exit": "done"}]))
    )
    plain_entries = run(journal.read_entries(plain.run_id))
    assert all(
        "now" not in (r["decision"] or {}).get("resolved", {}) for r in step_rows(journal, plain.run_id)
    )
    [first, *_] = redecide(plain.run_id, plain_entries, shop.workflow(RECENT))
    assert first.status == "not decidable" and "now" in (first.note or "")


def test_now_decides_deadlines_and_without_a_time_fails_closed() -> None:
    policy = Policy.from_dict(RECENT)
    data = {"deadline": "2024-05-16T00:00:00Z"}
    assert decide(policy, data=data, now=datetime(2024, 5, 15, tzinfo=UTC)).rule_id == "refund-ok"
    late = decide(policy, data=data, now=datetime(2024, 5, 17, tzinfo=UTC).timestamp())
    assert late.rule_id == "only-before-the-deadline" and late.resolved["now"] == "2024-05-17T00:00:00Z"
    unknown = decide(policy, data=data)
    assert unknown.reason_code == "policy_error" and "`now` is not available" in unknown.reason
    assert Policy.from_dict(RECENT).uses("now") and not Policy.default().uses("now")


# -- (d) list helpers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expression", "holds"),
    [
        ("pairs([1, 2, 4]) == [[1, 2], [2, 4]]", True),
        ("pairs([1]) == [] && pairs([]) == []", True),
        ("pairs(args.legs).all(p, p[0].to == p[1].from)", True),
        ('indexed(["a", "b"]) == [[0, "a"], [1, "b"]]', True),
        ("indexed(args.legs).all(p, p[0] == 0 || p[1].from == args.legs[p[0] - 1].to)", True),
        ('first(args.legs).from == "JFK" && last(args.legs).to == "SEA"', True),
        ("first([]) == null && last([]) == null", True),
        ("max([3, 9, 2]) == 9 && min([3.5, 1.5]) == 1.5", True),
        ('args.legs[1].from == "LAX"', True),
        ('pairs(args.legs).exists(p, p[1].from == "SEA")', False),
    ],
)
def test_list_helpers(expression: str, holds: bool) -> None:
    policy = Policy.from_dict({"rules": [{"id": "r", "tool": "fly", "when": expression, "decision": "deny"}]})
    legs = [{"from": "JFK", "to": "LAX"}, {"from": "LAX", "to": "SEA"}]
    decision = decide(policy, "fly", args={"legs": legs})
    assert decision.reason_code != "policy_error", decision.reason
    assert (decision.rule_id == "r") is holds


@pytest.mark.parametrize(
    ("expression", "error"),
    [("pairs(args.name) == []", "pairs() takes a list, not str"), ("max([]) == 0", "max() of an empty list")],
)
def test_list_helpers_fail_closed(expression: str, error: str) -> None:
    policy = Policy.from_dict(
        {"rules": [{"id": "r", "tool": "fly", "when": expression, "decision": "allow"}]}
    )
    decision = decide(policy, "fly", args={"name": "x"})
    assert decision.decision == "deny" and decision.reason_code == "policy_error" and error in decision.reason


def test_helpers_count_against_the_evaluation_budget() -> None:
    rules = [
        {"id": f"r{i}", "tool": "fly", "when": "pairs(args.legs).all(p, p[0] <= p[1])", "decision": "allow"}
        for i in range(50)
    ]
    policy = Policy(PolicyDocument.model_validate({"rules": rules}), evaluation_budget=0.000_01)
    decision = decide(policy, "fly", args={"legs": list(range(20_000))})
    assert decision.rule_id == "policy:evaluation_budget" and decision.decision == "deny"


# -- (e) definitions -------------------------------------------------------------------------------

DEFINED = {
    "definitions": {
        "placed": "order(args.order_id)",
        "total": "placed.total",
        "big": "args.amount > 100.0",
    },
    "rules": [
        {"id": "no-such-order", "tool": "refund", "when": "placed == null", "decision": "deny"},
        {
            "id": "over-total",
            "tool": "refund",
            "when": "placed != null && args.amount > total",
            "decision": "deny",
        },
        {"id": "big-asks", "tool": "refund", "when": "big", "decision": "ask"},
    ],
}


def test_definitions_are_read_by_name_and_guarded_like_the_expression() -> None:
    policy = Policy.from_dict(DEFINED)
    assert decide(policy, args={"order_id": "Z9", "amount": 1.0}, resolvers=LOOKUP).rule_id == "no-such-order"
    assert decide(policy, args={"order_id": "A1", "amount": 90.0}, resolvers=LOOKUP).rule_id == "over-total"
    assert decide(policy, args={"order_id": "B2", "amount": 200.0}, resolvers=LOOKUP).rule_id == "big-asks"


def test_a_definition_is_evaluated_once_per_decision() -> None:
    policy = Policy.from_dict(DEFINED)
    placed = policy.definitions["placed"]
    runs: list[int] = []

    class Counting:
        source = placed.program.source

        def execute(self, context: Any) -> Any:
            runs.append(1)
            return real.execute(context)

    real, placed.program = placed.program, Counting()  # type: ignore[assignment]
    decide(policy, args={"order_id": "A1", "amount": 90.0}, resolvers=LOOKUP)
    assert len(runs) == 1  # read by two rules (and through `total`), computed once
    decide(policy, args={"order_id": "B2", "amount": 90.0}, resolvers=LOOKUP)
    assert len(runs) == 2  # and again for the next decision


def test_a_definition_that_fails_names_itself_even_where_cel_would_absorb_it() -> None:
    policy = Policy.from_dict(
        {
            "definitions": {"owner": "order(args.order_id).customer"},
            "rules": [{"id": "r", "tool": "refund", "when": 'owner == "ann" || true', "decision": "allow"}],
        }
    )
    decision = decide(policy, args={"order_id": "Z9", "amount": 1.0}, resolvers=LOOKUP)
    assert decision.reason_code == "policy_error"
    assert "rule 'r': definition 'owner' could not be evaluated" in decision.reason


@pytest.mark.parametrize(
    ("definitions", "message"),
    [
        ({"a": "b", "b": "c", "c": "a"}, "definitions refer to themselves: a -> b -> c -> a"),
        ({"a": "a"}, "definitions refer to themselves: a -> a"),
        ({"a": "nope + 1"}, "definition 'a': unknown name(s) nope"),
        ({"args": "1"}, "definition 'args' is a variable every condition has"),
        ({"now": "1"}, "definition 'now' is a variable every condition has"),
        ({"in": "1"}, "definition 'in' is a reserved word of CEL"),
        ({"pairs": "1"}, "definition 'pairs' is a function's name"),
        ({"2x": "1"}, "definition '2x' is not a name"),
        ({"a": "(("}, "definition 'a' does not parse"),
        ({"a": "+".join(["args.x"] * 300)}, "operators, over the limit of 500"),
    ],
)
def test_definitions_are_checked_when_the_policy_loads(definitions: dict[str, str], message: str) -> None:
    assert message in refused({"definitions": definitions, "rules": []})


def test_a_condition_is_bounded_with_the_definitions_it_reads() -> None:
    half = " + ".join(["args.x"] * 130)  # 259 operators each: within the limit alone
    content = {
        "definitions": {"a": half, "b": f"a + {half}"},
        "rules": [{"id": "r", "tool": "t", "when": "b > 0", "decision": "deny"}],
    }
    assert "condition with the definitions it reads (a, b) has" in refused(content)


def test_a_policy_without_the_new_sections_hashes_as_before() -> None:
    content = {"rules": [{"id": "r", "tool": "t", "decision": "deny"}]}
    hashed = Policy.from_dict(content).document.hashed()
    assert set(hashed) == {"version", "defaults", "rules"} and "subject" not in hashed["rules"][0]
    assert Policy.from_dict({**content, "definitions": {"x": "1"}}).hash != Policy.from_dict(content).hash


def test_policy_check_reports_an_unknown_name_in_a_definition(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from tether.cli import app

    policy = tmp_path / "policy.yaml"
    policy.write_text("definitions: {big: 'args.amount > limit_of_the_day'}\nrules: []\n")
    result = CliRunner().invoke(app, ["policy", "check", str(policy)])
    assert result.exit_code == 2, result.output
    assert "definition 'big': unknown name(s) limit_of_the_day" in result.output


def test_tether_check_reads_rules_through_their_definitions(shop: Shop) -> None:
    gated = {
        "definitions": {"big": "args.amount > 50.0", "typo": "args.amout > 0.0"},
        "rules": [
            {"id": "big-asks", "tool": "refund", "when": "big", "decision": "ask"},
            {"id": "small-ok", "tool": "refund", "when": "!big", "decision": "allow"},
            {"id": "misspelt", "tool": "refund", "when": "typo", "decision": "deny"},
        ],
    }
    report = check(shop.workflow(gated))
    unknown = [f for f in report.findings if f.code == "unknown-name"]
    assert [f.at for f in unknown] == ["misspelt"] and "args.amout" in unknown[0].message
    assert not [
        f for f in report.findings if f.code == "opaque-condition" and f.at in ("big-asks", "small-ok")
    ]


def test_a_handoff_names_a_person_s_answer_as_the_source_of_a_fact(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow(NEEDS_REASON, facts_from_answers={"refund_reason": "why"})
    script = ScriptedModel([ASK_REASON, {"kind": "handoff", "to": "billing", "note": "refund over limit"}])
    paused = run(Runtime(journal).start(wf, script))
    run(journal.decide_ticket(paused.ticket_id, approve=True, by="customer", answer="damaged"))
    run(Runtime(journal).resume(paused.run_id, wf, script))
    entries = run(journal.read_entries(paused.run_id))
    [handed] = [e.body for e in entries if isinstance(e.body, bodies.HandedOff)]
    [fact] = [f for f in handed.handoff.relied_on if f.name == "facts.refund_reason"]
    assert (fact.reader, fact.value) == ("answer", "damaged")


def test_a_definition_or_subject_calling_no_resolver_of_the_workflow_is_refused(shop: Shop) -> None:
    for policy, where in (
        ({"definitions": {"o": "lookup(args.order_id)"}}, "definition 'o'"),
        ({"subjects": {"refund": "lookup(args.order_id)"}}, "subject of 'refund'"),
        ({"subjects": {"wire": "args.to"}}, "subjects names unknown tool 'wire'"),
    ):
        with pytest.raises(PolicyFileError) as caught:
            shop.workflow({**policy, "rules": []}).validate()
        assert where in str(caught.value)
        if "unknown tool" not in where:
            assert "calls unknown function(s) lookup" in str(caught.value)


def test_runs_sharing_an_evaluation_get_each_their_own_decision() -> None:
    """Conditions reading only `args` and `tool` share one engine context between the runs of
    a thread; decisions of different tools and arguments, interleaved, come out as each would
    alone."""
    policy = Policy.from_dict(
        {
            "rules": [
                {
                    "id": "big-refund",
                    "tool": "*",
                    "when": "tool.name == 'refund' && args.amount > 100",
                    "decision": "deny",
                },
                {"id": "writes-asked", "tool": "*", "when": "tool.effect == 'write'", "decision": "ask"},
                {"id": "rest", "tool": "*", "decision": "allow"},
            ]
        }
    )
    resolvers: dict[str, Any] = {}
    shared = policy.evaluation(resolvers)
    assert policy.evaluation(resolvers) is shared  # one context, not one per run
    refund = {"name": "refund", "effect": "write"}
    lookup = {"name": "lookup", "effect": "read"}
    calls = [(refund, {"amount": 500}), (lookup, {"amount": 500}), (refund, {"amount": 5}), (lookup, {})]
    for tool, args in calls * 2:
        variables = {"tool": tool, "args": args}
        alone = policy.decide(kind="tool", name=tool["name"], effect=tool["effect"], variables=variables)
        with_shared = policy.decide(
            kind="tool", name=tool["name"], effect=tool["effect"], variables=variables, evaluation=shared
        )
        assert (with_shared.decision, with_shared.rule_id) == (alone.decision, alone.rule_id)
    assert [
        policy.decide(
            kind="tool",
            name=t["name"],
            effect=t["effect"],
            variables={"tool": t, "args": a},
            evaluation=shared,
        ).rule_id
        for t, a in calls
    ] == ["big-refund", "rest", "writes-asked", "rest"]
