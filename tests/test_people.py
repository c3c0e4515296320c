"""People in the loop: who decides a ticket (role, approver role, workflow), separation of
duties (`forbid_self_approval`, `approvals: N`) and edit-and-approve, through the one kernel
entry point `Runtime.decide`; what the journal records of each."""

from __future__ import annotations

from typing import Any

import pytest

from conftest import Shop, call, run
from tether import Runtime, ScriptedModel
from tether.errors import EditRefused, Forbidden, TicketConflict, TicketError
from tether.identity import Principal
from tether.journal import Journal, bodies, verify_chain


def person(name: str, role: str = "approver", *for_: str, workflows: tuple[str, ...] = ()) -> Principal:
    return Principal(
        principal_id=f"person:{name}",
        name=name,
        kind="person",
        role=role,  # type: ignore[arg-type]
        approver_for=for_ or (("supervisor",) if role == "approver" else ()),
        workflows=workflows,
    )


SAM, KIM, OLGA = person("sam"), person("kim"), person("olga", "operator")


def ask_rule(**extra: Any) -> dict[str, Any]:
    return {
        "rules": [
            {"id": "no-huge", "tool": "refund", "when": "args.amount > 100.0", "decision": "deny"},
            {
                "id": "refund-ask",
                "tool": "refund",
                "when": "args.amount > 50.0",
                "decision": "ask",
                "approver": "supervisor",
                **extra,
            },
            {"id": "refund-ok", "tool": "refund", "decision": "allow"},
        ]
    }


def paused_refund(
    journal: Journal, shop: Shop, amount: float = 70.0, by: Principal | None = OLGA, **rule: Any
) -> tuple[Runtime, Any, ScriptedModel, Any]:
    wf = shop.workflow(policy=ask_rule(**rule))
    script = ScriptedModel([call("refund", order_id="A1", amount=amount), {"kind": "finish"}])
    runtime = Runtime(journal)
    paused = run(runtime.start(wf, script, by=by))
    assert paused.status == "paused" and paused.ticket_kind == "approval"
    return runtime, wf, script, paused


def entries_of(journal: Journal, run_id: str, kind: str) -> list[Any]:
    return [e.body for e in run(journal.read_entries(run_id)) if e.kind == kind]


def test_the_starter_and_every_decider_are_recorded_as_principals(journal: Journal, shop: Shop) -> None:
    runtime, wf, script, paused = paused_refund(journal, shop)
    assert run(journal.get_run(paused.run_id)).started_by == "person:olga"
    assert entries_of(journal, paused.run_id, "run_started")[0].started_by == OLGA
    ticket = run(runtime.decide(paused.ticket_id, approve=True, by=SAM, reason="checked"))
    assert (ticket.status, ticket.decided_by) == ("approved", "person:sam")
    decided = entries_of(journal, paused.run_id, "ticket_decided")
    assert [d.by for d in decided] == [SAM] and decided[0].approvers == []
    assert run(runtime.resume(paused.run_id, wf, script)).status == "completed"
    assert shop.refunds == [("A1", 70.0)]


@pytest.mark.parametrize(
    ("who", "message"),
    [
        (OLGA, "may not decide tickets: that needs role approver"),
        (person("vic", "viewer"), "may not decide tickets"),
        (
            person("fin", "approver", "finance"),
            "it is for approver 'supervisor', and this principal approves for finance",
        ),
        (
            person("pat", workflows=("payroll",)),
            "may not decide in workflow 'shop': it is limited to payroll",
        ),
    ],
)
def test_a_principal_without_the_role_or_scope_cannot_decide(
    journal: Journal, shop: Shop, who: Principal, message: str
) -> None:
    runtime, _, _, paused = paused_refund(journal, shop)
    with pytest.raises(Forbidden, match=message):
        run(runtime.decide(paused.ticket_id, approve=True, by=who))
    assert run(journal.get_ticket(paused.ticket_id)).status == "pending"
    assert entries_of(journal, paused.run_id, "ticket_decided") == []


def test_self_approval_is_refused_when_the_rule_forbids_it(journal: Journal, shop: Shop) -> None:
    # The same person started the run (with an operator token) and holds an approver token.
    runtime, wf, script, paused = paused_refund(
        journal, shop, by=person("sam", "operator"), forbid_self_approval=True
    )
    with pytest.raises(Forbidden, match=r"started run .* forbids approving one's own run"):
        run(runtime.decide(paused.ticket_id, approve=True, by=SAM))
    assert run(journal.get_ticket(paused.ticket_id)).status == "pending"
    run(runtime.decide(paused.ticket_id, approve=True, by=KIM))
    assert run(runtime.resume(paused.run_id, wf, script)).status == "completed"
    assert shop.refunds == [("A1", 70.0)]


def test_without_the_rule_the_starter_may_approve(journal: Journal, shop: Shop) -> None:
    runtime, _, _, paused = paused_refund(journal, shop, by=person("sam", "operator"))
    assert run(runtime.decide(paused.ticket_id, approve=True, by=SAM)).status == "approved"


def test_two_approvals_need_two_distinct_principals_bound_to_the_same_arguments(
    journal: Journal, shop: Shop
) -> None:
    runtime, wf, script, paused = paused_refund(journal, shop, approvals=2)
    first = run(runtime.decide(paused.ticket_id, approve=True, by=SAM))
    assert (first.status, first.approvals, first.approvals_required) == ("pending", 1, 2)
    # Still waiting: nothing runs on one approval.
    assert run(runtime.resume(paused.run_id, wf, script)).status == "paused" and shop.refunds == []
    with pytest.raises(TicketConflict, match=r"already approved ticket .* needs 2 distinct approvers"):
        run(runtime.decide(paused.ticket_id, approve=True, by=SAM))
    second = run(runtime.decide(paused.ticket_id, approve=True, by=KIM))
    assert (second.status, second.approvals, second.decided_by) == ("approved", 2, "person:kim")
    given = entries_of(journal, paused.run_id, "approval_given")
    assert [(g.by.principal_id, g.count, g.required) for g in given] == [
        ("person:sam", 1, 2),
        ("person:kim", 2, 2),
    ]
    assert {g.args_hash for g in given} == {first.args_hash}
    decided = entries_of(journal, paused.run_id, "ticket_decided")
    assert len(decided) == 1 and decided[0].approvers == ["person:sam", "person:kim"]
    assert run(runtime.resume(paused.run_id, wf, script)).status == "completed"
    assert shop.refunds == [("A1", 70.0)]
    assert verify_chain(run(journal.read_entries(paused.run_id))) == []


def test_any_denial_decides_a_ticket_needing_several_approvals(journal: Journal, shop: Shop) -> None:
    runtime, wf, script, paused = paused_refund(journal, shop, approvals=2)
    run(runtime.decide(paused.ticket_id, approve=True, by=SAM))
    denied = run(runtime.decide(paused.ticket_id, approve=False, by=KIM, reason="no receipt"))
    assert denied.status == "denied"
    with pytest.raises(TicketConflict, match="already denied"):
        run(runtime.decide(paused.ticket_id, approve=True, by=person("lee")))
    run(runtime.resume(paused.run_id, wf, script))
    assert shop.refunds == []


def test_edit_and_approve_runs_exactly_the_edited_arguments_once(journal: Journal, shop: Shop) -> None:
    runtime, wf, script, paused = paused_refund(journal, shop, amount=80.0)
    proposed = run(journal.get_ticket(paused.ticket_id))
    edited = run(
        runtime.decide(
            paused.ticket_id,
            approve=True,
            by=SAM,
            reason="half",
            edited_args={"order_id": "A1", "amount": 40},
            workflow=wf,
        )
    )
    assert edited.status == "approved" and edited.args == {"order_id": "A1", "amount": 40.0}
    assert edited.original_args_hash == proposed.args_hash != edited.args_hash
    decided = entries_of(journal, paused.run_id, "ticket_decided")[0]
    assert (decided.by, decided.edited_args, decided.original_args_hash, decided.args_hash) == (
        SAM,
        {"order_id": "A1", "amount": 40.0},
        proposed.args_hash,
        edited.args_hash,
    )
    done = run(runtime.resume(paused.run_id, wf, script))
    assert done.status == "completed"
    assert shop.refunds == [("A1", 40.0)]
    executed = entries_of(journal, paused.run_id, "executed")[-1]
    assert executed.args == {"order_id": "A1", "amount": 40.0} and executed.args_hash == edited.args_hash
    assert executed.proposed_args == {"order_id": "A1", "amount": 80.0}
    assert run(journal.get_ticket(paused.ticket_id)).status == "consumed"


@pytest.mark.parametrize(
    ("args", "message", "code"),
    [
        ({"order_id": "A1", "amount": 500}, "no-huge", "policy_denied"),
        ({"order_id": "A1", "amount": "lots"}, "runtime:arguments", "invalid_arguments"),
        ({"order_id": "A1"}, "runtime:arguments", "invalid_arguments"),
    ],
)
def test_edited_arguments_that_policy_or_schema_refuses_leave_the_ticket_pending(
    journal: Journal, shop: Shop, args: dict[str, Any], message: str, code: str
) -> None:
    runtime, wf, script, paused = paused_refund(journal, shop)
    with pytest.raises(EditRefused, match=message) as refused:
        run(runtime.decide(paused.ticket_id, approve=True, by=SAM, edited_args=args, workflow=wf))
    assert refused.value.reason_code == code
    ticket = run(journal.get_ticket(paused.ticket_id))
    assert ticket.status == "pending" and ticket.args == {"order_id": "A1", "amount": 70.0}
    assert entries_of(journal, paused.run_id, "ticket_decided") == []
    run(runtime.decide(paused.ticket_id, approve=True, by=SAM))  # still decidable as it is
    run(runtime.resume(paused.run_id, wf, script))
    assert shop.refunds == [("A1", 70.0)]


def test_an_edit_needing_a_wider_approval_or_voiding_approvals_is_refused(
    journal: Journal, shop: Shop
) -> None:
    runtime, wf, _, paused = paused_refund(journal, shop, approvals=2)
    run(runtime.decide(paused.ticket_id, approve=True, by=SAM))
    with pytest.raises(TicketConflict, match="an edit would void them"):
        run(
            runtime.decide(
                paused.ticket_id,
                approve=True,
                by=KIM,
                edited_args={"order_id": "A1", "amount": 40},
                workflow=wf,
            )
        )
    # A workflow whose rule for the edited amount asks a different approver.
    other = Shop()
    wf2 = other.workflow(
        policy={
            "rules": [
                {
                    "id": "big",
                    "tool": "refund",
                    "when": "args.amount > 60.0",
                    "decision": "ask",
                    "approver": "finance",
                },
                {
                    "id": "mid",
                    "tool": "refund",
                    "when": "args.amount > 50.0",
                    "decision": "ask",
                    "approver": "supervisor",
                },
                {"id": "ok", "tool": "refund", "decision": "allow"},
            ]
        }
    )
    rt2 = Runtime(journal)
    p2 = run(rt2.start(wf2, ScriptedModel([call("refund", order_id="A1", amount=55.0)]), by=OLGA))
    with pytest.raises(
        EditRefused, match=r"another decision than this ticket's \(rule big: ask by finance\)"
    ):
        run(
            rt2.decide(
                p2.ticket_id, approve=True, by=SAM, edited_args={"order_id": "A1", "amount": 65}, workflow=wf2
            )
        )
    # Without the workflow, a run built in code cannot have its edit checked: refused, clearly.
    with pytest.raises(EditRefused, match="cannot be edited here"):
        run(rt2.decide(p2.ticket_id, approve=True, by=SAM, edited_args={"order_id": "A1", "amount": 52}))


def test_a_question_is_answered_not_approved(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow()
    script = ScriptedModel([{"kind": "question", "question": "Which order?"}, {"kind": "finish"}])
    runtime = Runtime(journal)
    paused = run(runtime.start(wf, script, by=OLGA))
    assert (paused.status, paused.ticket_kind) == ("paused", "question")
    with pytest.raises(TicketError, match=r"is a question .* answer it"):
        run(runtime.decide(paused.ticket_id, approve=True, by=SAM))
    answered = run(runtime.decide(paused.ticket_id, approve=True, by=SAM, answer="A1"))
    assert (answered.status, answered.answer, answered.decided_by) == ("answered", "A1", "person:sam")
    refund_pause = paused_refund(journal, Shop())
    with pytest.raises(TicketError, match="is an approval, not a question"):
        run(refund_pause[0].decide(refund_pause[3].ticket_id, approve=True, by=SAM, answer="yes"))


def test_a_decision_recorded_with_a_free_text_name_reads_as_a_local_principal() -> None:
    old = '{"by":"supervisor","status":"approved","ticket_id":"tkt_1"}'
    record = bodies.decode("ticket_decided", old)
    assert isinstance(record, bodies.TicketDecided)
    assert record.by == Principal(
        principal_id="local:supervisor", name="supervisor", kind="local", role="admin"
    )


def test_policy_files_validate_the_separation_of_duties_options() -> None:
    from tether.errors import PolicyFileError
    from tether.policy import Policy

    for bad, message in [
        ({"id": "r", "tool": "refund", "decision": "allow", "approvals": 2}, "apply only to 'ask' rules"),
        (
            {"id": "r", "tool": "refund", "decision": "deny", "forbid_self_approval": True},
            "apply only to 'ask' rules",
        ),
        ({"id": "r", "tool": "refund", "decision": "ask", "approvals": 0}, "approvals"),
        ({"id": "r", "tool": "refund", "decision": "ask", "approvals": "two"}, "approvals"),
        (
            {"id": "r", "tool": "refund", "decision": "ask", "forbid_self_approval": "yes please"},
            "forbid_self_approval",
        ),
    ]:
        with pytest.raises(PolicyFileError, match=message):
            Policy.from_dict({"rules": [bad]}, "test")
    plain = Policy.from_dict({"rules": [{"id": "r", "tool": "refund", "decision": "ask"}]}, "test")
    same = Policy.from_dict(
        {"rules": [{"id": "r", "tool": "refund", "decision": "ask", "approvals": None}]}, "test"
    )
    strict = Policy.from_dict(
        {"rules": [{"id": "r", "tool": "refund", "decision": "ask", "approvals": 2}]}, "test"
    )
    # A policy that does not use the options keeps its hash (runs pinned to it still resume).
    assert plain.hash == same.hash != strict.hash


def test_an_edit_by_the_first_of_two_approvers_is_what_the_second_approves(
    journal: Journal, shop: Shop
) -> None:
    runtime, wf, script, paused = paused_refund(journal, shop, approvals=2)
    edit = {"order_id": "A1", "amount": 60}
    first = run(runtime.decide(paused.ticket_id, approve=True, by=SAM, edited_args=edit, workflow=wf))
    assert (first.status, first.args["amount"], first.approvals) == ("pending", 60.0, 1)
    given = entries_of(journal, paused.run_id, "approval_given")
    assert (
        given[0].edited_args == {"order_id": "A1", "amount": 60.0} and given[0].args_hash == first.args_hash
    )
    second = run(runtime.decide(paused.ticket_id, approve=True, by=KIM))
    assert second.status == "approved" and second.args_hash == first.args_hash
    decided = entries_of(journal, paused.run_id, "ticket_decided")[0]
    assert decided.edited_args == {"order_id": "A1", "amount": 60.0}
    assert decided.original_args_hash == first.original_args_hash and decided.approvers == [
        "person:sam",
        "person:kim",
    ]
    run(runtime.resume(paused.run_id, wf, script))
    assert shop.refunds == [("A1", 60.0)]
