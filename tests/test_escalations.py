"""People acting on runs that stopped for them: cancel (with rollback), retry, take over;
the expiry sweeper and `on_expiry`; stuck runs that say why (tether.operations,
tether.compensation, tether.sweeper). Real SQLite, and PostgreSQL for cancel and the sweeper."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether import AgentState, Budget, Policy, Runtime, ScriptedModel, Terminal, ToolContext, Workflow, tool
from tether.errors import InputError, RunStateError, TicketError
from tether.identity import Principal
from tether.journal import Journal, open_journal
from tether.operations import Operations, actionable
from tether.sweeper import sweep_expired

pytest_plugins = ("stores",)  # the db_target fixture: SQLite and PostgreSQL

ALICE = Principal(principal_id="tok:alice", name="alice", kind="person", role="operator")


class ProcessDied(BaseException):
    """Stands for the process dying mid-call: no `except Exception` handler catches it."""


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def any_journal(db_target: str) -> Iterator[Journal]:
    """A fresh journal on SQLite, and on PostgreSQL in a schema of its own (tests/stores.py)."""
    j = open_journal(db_target)
    yield j
    j.close()


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = open_journal(str(tmp_path / "journal.db"))
    yield j
    j.close()


class Payments:
    """A card processor: charges, their refunds (the compensation), and shipments (none)."""

    def __init__(self, *, idempotent_refund: bool = True) -> None:
        self.charges: dict[str, float] = {}
        self.refunded: list[str] = []  # charge ids, in the order they were refunded
        self.refund_keys: list[str] = []
        self.shipped: list[str] = []
        self.crash_next_refund = False

        @tool(effect="write", idempotent=True)
        def charge(card: str, amount: float, ctx: ToolContext) -> dict[str, Any]:
            """Charge a card."""
            charge_id = f"ch_{len(self.charges) + 1}"
            self.charges[charge_id] = amount
            return {"charge_id": charge_id, "amount": amount}

        @tool(effect="write", idempotent=idempotent_refund)
        def refund_charge(charge_id: str, ctx: ToolContext) -> dict[str, Any]:
            """Refund a charge in full."""
            self.refund_keys.append(ctx.idempotency_key)
            if self.crash_next_refund:
                self.crash_next_refund = False
                raise ProcessDied("the process died while refunding")
            if charge_id not in self.refunded:
                self.refunded.append(charge_id)
            return {"refunded": charge_id}

        @tool(effect="write")
        def ship(order_id: str) -> dict[str, Any]:
            """Ship an order (nothing undoes a shipment)."""
            self.shipped.append(order_id)
            return {"shipped": order_id}

        charge.compensate_with(refund_charge, {"charge_id": "result.charge_id"})
        self.charge, self.refund_charge, self.ship = charge, refund_charge, ship

    def workflow(self, rules: list[dict[str, Any]] | None = None, **agent: Any) -> Workflow:
        pay = AgentState(
            "pay",
            "Charge and ship.",
            (self.charge, self.ship),
            {"done": "done", "give_up": "failed"},
            budget=Budget(max_steps=10, max_tool_calls=6),
            escalate_to="ops",
            **agent,
        )
        allow = [
            {"id": "charge-ok", "tool": "charge", "decision": "allow"},
            {"id": "ship-ok", "tool": "ship", "decision": "allow"},
            {"id": "refund-ok", "tool": "refund_charge", "decision": "allow"},
        ]
        policy = Policy.from_dict({"rules": (rules or []) + allow}, "payments-policy")
        return Workflow(
            "payments", "1", "pay", [pay, Terminal("done"), Terminal("failed", failed=True)], policy=policy
        )


def charge(card: str, amount: float) -> dict[str, Any]:
    return {"kind": "tool_call", "tool": "charge", "args": {"card": card, "amount": amount}}


SHIP = {"kind": "tool_call", "tool": "ship", "args": {"order_id": "O-1"}}


def loader(workflow: Workflow) -> Any:
    async def load(record: Any) -> Workflow:
        return workflow

    return load


def escalated_run(journal: Journal, payments: Payments, script: list[Any], **kw: Any) -> tuple[Workflow, str]:
    """A run that did what `script` says, then escalated (the script ran out: a model error)."""
    wf = payments.workflow(**kw)
    result = run(Runtime(journal).start(wf, ScriptedModel(script)))
    assert result.status == "escalated", result
    return wf, result.run_id


def kinds(journal: Journal, run_id: str) -> list[str]:
    return [e.kind for e in run(journal.read_entries(run_id))]


def bodies_of(journal: Journal, run_id: str, kind: str) -> list[Any]:
    return [e.body for e in run(journal.read_entries(run_id)) if e.kind == kind]


# -- cancel ---------------------------------------------------------------------------------


def test_cancel_records_who_and_why_and_a_finished_run_cannot_be_cancelled(any_journal: Journal) -> None:
    journal, payments = any_journal, Payments()
    wf, run_id = escalated_run(journal, payments, [charge("4242", 10.0)])
    ops = Operations(journal, load=loader(wf))
    outcome = run(ops.cancel(run_id, ALICE, "customer withdrew"))
    assert (outcome.run.status, outcome.run.reason_code) == ("cancelled", "cancelled")
    assert "cancelled by alice (tok:alice, operator): customer withdrew" in outcome.run.message
    (cancelled,) = bodies_of(journal, run_id, "cancelled")
    assert cancelled.by == ALICE and cancelled.from_status == "escalated" and not cancelled.rollback
    assert payments.refunded == []  # no rollback asked: the charge stands
    before = run(journal.get_run(run_id)).last_seq
    with pytest.raises(RunStateError, match="is cancelled; there is nothing to cancel"):
        run(ops.cancel(run_id, ALICE, "again"))
    assert run(journal.get_run(run_id)).last_seq == before


def test_cancel_of_a_paused_run_withdraws_its_ticket(any_journal: Journal) -> None:
    journal, payments = any_journal, Payments()
    ask = [
        {"id": "big", "tool": "charge", "when": "args.amount > 100.0", "decision": "ask", "approver": "boss"}
    ]
    wf = payments.workflow(ask)
    result = run(Runtime(journal).start(wf, ScriptedModel([charge("4242", 500.0)])))
    assert result.status == "paused"
    run(Operations(journal, load=loader(wf)).cancel(result.run_id, ALICE, "too big"))
    ticket = run(journal.get_ticket(result.ticket_id))
    assert ticket.status == "withdrawn"
    with pytest.raises(TicketError, match="already withdrawn"):
        run(journal.decide_ticket(result.ticket_id, approve=True, by="boss"))
    assert payments.charges == {}


def test_rollback_undoes_effects_newest_first_and_reports_what_it_cannot(any_journal: Journal) -> None:
    journal, payments = any_journal, Payments()
    wf, run_id = escalated_run(journal, payments, [charge("4242", 10.0), SHIP, charge("4242", 25.0)])
    outcome = run(Operations(journal, load=loader(wf)).cancel(run_id, ALICE, "fraud", rollback=True))
    assert payments.refunded == ["ch_2", "ch_1"]  # the newest effect is undone first
    report = outcome.rollback
    assert report is not None and not report.complete
    assert report.compensated == ["s3", "s1"]
    assert [(m.step_id, m.tool) for m in report.uncompensated] == [("s2", "ship")]
    assert "declares no compensation" in report.uncompensated[0].reason
    assert outcome.run.status == "cancelled"
    assert "rollback: 2 compensated, 1 without compensation" in outcome.run.message
    assert kinds(journal, run_id)[-7:] == [
        "cancelled",
        "rollback_started",
        "compensation_intent",
        "compensated",
        "compensation_intent",
        "compensated",
        "rolled_back",
    ]
    started = bodies_of(journal, run_id, "rollback_started")[0]
    assert started.effects == ["s3", "s1"] and started.by == ALICE
    done = bodies_of(journal, run_id, "compensated")
    assert [(d.compensates, d.args, d.decision.rule_id) for d in done] == [
        ("s3", {"charge_id": "ch_2"}, "refund-ok"),
        ("s1", {"charge_id": "ch_1"}, "refund-ok"),
    ]
    # Each compensation ran with an idempotency key of its own step.
    steps = [e.step_id for e in run(journal.read_entries(run_id)) if e.kind == "compensated"]
    assert payments.refund_keys == [f"{run_id}:{s}" for s in steps] and len(set(steps)) == 2
    assert run(journal.get_run(run_id)).lease_owner is None


def test_a_compensation_policy_does_not_allow_is_refused_and_reported_not_run(journal: Journal) -> None:
    payments = Payments()
    deny = [
        {
            "id": "no-big-refunds",
            "tool": "refund_charge",
            "when": "args.charge_id == 'ch_1'",
            "decision": "deny",
        }
    ]
    wf, run_id = escalated_run(journal, payments, [charge("4242", 10.0), charge("4242", 20.0)], rules=deny)
    outcome = run(Operations(journal, load=loader(wf)).cancel(run_id, ALICE, rollback=True))
    assert payments.refunded == ["ch_2"]
    assert outcome.rollback is not None and outcome.rollback.refused == ["s1"]
    (refused,) = bodies_of(journal, run_id, "compensation_refused")
    assert refused.decision.rule_id == "no-big-refunds" and "policy says deny" in refused.reason


def test_a_rollback_cut_off_by_a_crash_continues_without_repeating_anything(journal: Journal) -> None:
    payments = Payments()
    wf, run_id = escalated_run(journal, payments, [charge("4242", 10.0), charge("4242", 20.0)])
    ops = Operations(journal, load=loader(wf))
    payments.refunded.clear()
    # ch_2 is refunded; the process dies inside the refund of ch_1, after its intent was synced.
    original = payments.refund_charge.fn

    died: list[str] = []

    def dying(charge_id: str, ctx: ToolContext) -> Any:
        if charge_id == "ch_1" and not died:
            died.append(charge_id)
            payments.crash_next_refund = True
        return original(charge_id, ctx)

    payments.refund_charge.fn = dying
    with pytest.raises(ProcessDied):
        run(ops.cancel(run_id, ALICE, "crash test", rollback=True))
    assert kinds(journal, run_id)[-1] == "compensation_intent"
    assert run(journal.get_run(run_id)).status == "cancelled"
    assert payments.refunded == ["ch_2"]
    # Cancelling again continues the rollback: ch_2 is not refunded twice, and ch_1's refund
    # (idempotent) is re-run with the same idempotency key as the attempt that died.
    outcome = run(ops.cancel(run_id, ALICE, "crash test", rollback=True))
    assert payments.refunded == ["ch_2", "ch_1"]
    assert payments.refund_keys[-1] == payments.refund_keys[-2]
    assert outcome.rollback is not None and outcome.rollback.complete
    assert outcome.rollback.compensated == ["s2", "s1"]
    recovered = bodies_of(journal, run_id, "compensated")[-1]
    assert recovered.recovered and recovered.compensates == "s1"
    assert kinds(journal, run_id).count("rolled_back") == 1
    with pytest.raises(RunStateError, match="nothing to cancel"):
        run(ops.cancel(run_id, ALICE, rollback=True))


def test_a_cut_off_compensation_that_is_not_idempotent_is_left_in_doubt(journal: Journal) -> None:
    payments = Payments(idempotent_refund=False)
    payments.charge.compensate_with(payments.refund_charge, {"charge_id": "result.charge_id"})
    wf, run_id = escalated_run(journal, payments, [charge("4242", 10.0)])
    ops = Operations(journal, load=loader(wf))
    payments.crash_next_refund = True
    with pytest.raises(ProcessDied):
        run(ops.cancel(run_id, ALICE, rollback=True))
    calls = len(payments.refund_keys)
    outcome = run(ops.cancel(run_id, ALICE, rollback=True))
    assert len(payments.refund_keys) == calls  # never run a second time without a person
    assert outcome.rollback is not None and outcome.rollback.in_doubt == ["s1"]
    assert "compensation_in_doubt" in kinds(journal, run_id)


def test_a_compensation_must_fit_the_tool_it_undoes() -> None:
    payments = Payments()
    with pytest.raises(ValueError, match=r"required parameter\(s\) charge_id not given"):
        payments.charge.compensate_with(payments.refund_charge, {})
    with pytest.raises(ValueError, match="names no argument of 'charge'"):
        payments.charge.compensate_with(payments.refund_charge, {"charge_id": "args.nope"})
    with pytest.raises(ValueError, match="no parameter"):
        payments.charge.compensate_with(
            payments.refund_charge, {"charge_id": "result.x", "extra": "args.card"}
        )
    with pytest.raises(ValueError, match="not arguments of 'charge'"):
        payments.charge.compensate_with(payments.refund_charge)  # by name: charge has no charge_id


def test_on_failure_rollback_undoes_the_effects_of_a_run_that_fails(journal: Journal) -> None:
    payments = Payments()
    wf = payments.workflow(on_budget_exhausted="fail", on_failure="rollback")
    wf.states["pay"].budget.max_tool_calls = 1  # type: ignore[union-attr]
    result = run(Runtime(journal).start(wf, ScriptedModel([charge("4242", 10.0), charge("4242", 30.0)])))
    assert result.status == "failed"
    assert payments.refunded == ["ch_1"]
    assert "rollback: 1 compensated" in (result.message or "")
    started = bodies_of(journal, result.run_id, "rollback_started")[0]
    assert started.by is None  # the workflow's on_failure, not a person


# -- retry ----------------------------------------------------------------------------------


def test_retry_reenters_the_state_with_a_fresh_budget_and_is_recorded(journal: Journal) -> None:
    payments = Payments()
    wf, run_id = escalated_run(journal, payments, [charge("4242", 10.0)])
    ops = Operations(journal, load=loader(wf))
    outcome = run(ops.retry(run_id, ALICE, "model fixed"))
    assert outcome.run.status == "queued" and outcome.run.reason_code is None
    (retried,) = bodies_of(journal, run_id, "retried")
    assert (retried.by, retried.note, retried.from_status, retried.reason_code) == (
        ALICE,
        "model fixed",
        "escalated",
        "model_error",
    )
    record = run(journal.get_run(run_id))
    assert record.checkpoint["visit"]["number"] == 2 and record.checkpoint["visit"].get("steps", 0) == 0
    # The new visit's model starts from an empty transcript and takes it to the end.
    final = run(Runtime(journal).resume(run_id, wf, ScriptedModel([{"kind": "exit", "exit": "done"}])))
    assert final.status == "completed"
    with pytest.raises(RunStateError, match="is completed; only a run that is escalated, failed or stuck"):
        run(ops.retry(run_id, ALICE))


def test_retry_of_a_run_that_ended_in_a_terminal_state_is_refused(journal: Journal) -> None:
    payments = Payments()
    wf = payments.workflow()
    result = run(Runtime(journal).start(wf, ScriptedModel([{"kind": "exit", "exit": "give_up"}])))
    assert result.status == "failed"
    with pytest.raises(RunStateError, match="terminal state 'failed'"):
        run(Operations(journal, load=loader(wf)).retry(result.run_id, ALICE))


# -- take over ------------------------------------------------------------------------------


def test_take_over_chooses_an_exit_with_data_and_the_run_finishes(journal: Journal) -> None:
    payments = Payments()
    wf, run_id = escalated_run(journal, payments, [charge("4242", 10.0)])
    outcome = run(
        Operations(journal, load=loader(wf)).take_over(run_id, ALICE, "done", {"note": "checked by hand"})
    )
    assert outcome.run.status == "completed" and outcome.run.state == "done"
    assert outcome.run.data["note"] == "checked by hand"
    (taken,) = bodies_of(journal, run_id, "taken_over")
    assert (taken.by, taken.exit, taken.next, taken.from_status) == (ALICE, "done", "done", "escalated")
    assert taken.decision.rule_id == "default:exit"
    from tether.timeline import transitions  # a take-over is drawn on the run's path

    assert transitions(run(journal.read_entries(run_id)))[1] == [("pay", "done", "done")]


def test_take_over_is_refused_clearly_and_changes_nothing(journal: Journal) -> None:
    payments = Payments()
    no_done = [
        {
            "id": "not-done-yet",
            "exit": "done",
            "when": "!has(args.update.approved)",
            "decision": "deny",
            "reason": "nobody approved",
        }
    ]
    wf, run_id = escalated_run(journal, payments, [charge("4242", 10.0)], rules=no_done)
    ops = Operations(journal, load=loader(wf))
    before = run(journal.get_run(run_id))
    with pytest.raises(RunStateError, match=r"no exit 'finish' \(its exits: done, give_up\)"):
        run(ops.take_over(run_id, ALICE, "finish"))
    with pytest.raises(
        RunStateError, match="refused by policy: not-done-yet says deny \\(nobody approved\\)"
    ):
        run(ops.take_over(run_id, ALICE, "done"))
    with pytest.raises(InputError, match="data is refused"):
        run(ops.take_over(run_id, ALICE, "done", {"x": float("nan")}))
    after = run(journal.get_run(run_id))
    assert (after.last_seq, after.status, after.lease_owner) == (before.last_seq, "escalated", None)
    assert run(ops.take_over(run_id, ALICE, "done", {"approved": True})).run.status == "completed"


def test_take_over_of_a_paused_run_withdraws_its_ticket(journal: Journal) -> None:
    payments = Payments()
    ask = [
        {"id": "big", "tool": "charge", "when": "args.amount > 100.0", "decision": "ask", "approver": "boss"}
    ]
    wf = payments.workflow(ask)
    result = run(Runtime(journal).start(wf, ScriptedModel([charge("4242", 500.0)])))
    outcome = run(
        Operations(journal, load=lambda record: wf).take_over(result.run_id, ALICE, "give_up")
    )  # a plain loader
    assert outcome.run.status == "failed" and outcome.run.state == "failed"
    assert run(journal.get_ticket(result.ticket_id)).status == "withdrawn"


def test_an_effect_in_doubt_is_settled_before_anything_else(journal: Journal) -> None:
    payments = Payments()
    wf = payments.workflow()
    result = run(Runtime(journal).start(wf, ScriptedModel([charge("4242", 10.0)])))
    run_id = result.run_id

    # Make the run look cut off in the middle of a non-idempotent effect.
    async def doubt() -> None:
        record = await journal.get_run(run_id)
        from tether.journal import Commit, RunUpdate

        await journal.commit(
            Commit(
                run_id=run_id,
                expected_seq=record.last_seq,
                expected_hash=record.last_hash,
                update=RunUpdate(status="effect_in_doubt", message="ship in doubt"),
            )
        )

    run(doubt())
    ops = Operations(journal, load=loader(wf))
    for act in (
        ops.retry(run_id, ALICE),
        ops.take_over(run_id, ALICE, "done"),
        ops.cancel(run_id, ALICE, rollback=True),
    ):
        with pytest.raises(RunStateError, match=r"effect in doubt .*tether resolve"):
            run(act)
    items = run(actionable(journal))
    assert [(i.run.run_id, i.actions) for i in items] == [(run_id, ("resolve", "cancel"))]


# -- expiry ---------------------------------------------------------------------------------


def _paused_on_expiring_ticket(journal: Journal, payments: Payments, **rule: Any) -> tuple[Workflow, Any]:
    ask = [
        {
            "id": "big",
            "tool": "charge",
            "when": "args.amount > 100.0",
            "decision": "ask",
            "approver": "boss",
            "expires_in": 0.5,
            **rule,
        }
    ]
    wf = payments.workflow(ask)
    script = ScriptedModel([charge("4242", 500.0), {"kind": "exit", "exit": "give_up"}])
    # A reference a worker could load the workflow from (a run of a `<python:…>` one is never claimed).
    result = run(Runtime(journal).start(wf, script, workflow_ref="payments/workflow.yaml"))
    assert result.status == "paused"
    return wf, result


def test_the_sweeper_expires_a_ticket_at_its_deadline_and_the_run_goes_on_denied(
    any_journal: Journal,
) -> None:
    journal, payments = any_journal, Payments()
    wf, result = _paused_on_expiring_ticket(journal, payments)
    assert run(sweep_expired(journal)) == 0  # not yet due by the store's clock
    time.sleep(0.7)
    assert run(sweep_expired(journal)) == 1
    assert run(sweep_expired(journal)) == 0  # once
    assert run(journal.get_ticket(result.ticket_id)).status == "expired"
    (expired,) = bodies_of(journal, result.run_id, "ticket_expired")
    assert (expired.ticket_id, expired.on_expiry) == (result.ticket_id, "deny")
    # The run is claimable at once; resumed, the model is told the call was refused.
    claimed = run(journal.claim("w1", lease_seconds=5))
    assert claimed is not None and claimed.run_id == result.run_id
    run(journal.release(result.run_id, "w1"))
    final = run(
        Runtime(journal).resume(
            result.run_id, wf, ScriptedModel([charge("4242", 500.0), {"kind": "exit", "exit": "give_up"}])
        )
    )
    assert final.status == "failed"
    refused = bodies_of(journal, result.run_id, "refused")[-1]
    assert refused.decision.reason_code == "approval_expired"
    assert payments.charges == {}


def test_on_expiry_escalate_makes_the_run_an_escalation_for_that_role(any_journal: Journal) -> None:
    journal, payments = any_journal, Payments()
    wf, result = _paused_on_expiring_ticket(journal, payments, on_expiry={"escalate": "finance"})
    time.sleep(0.7)
    assert run(sweep_expired(journal)) == 1
    record = run(journal.get_run(result.run_id))
    assert (record.status, record.owner, record.reason_code) == ("escalated", "finance", "approval_expired")
    assert "expired undecided; the rule escalates to finance" in (record.message or "")
    assert record.checkpoint.get("pending") is None
    items = run(actionable(journal, owner="finance"))
    assert [(i.run.run_id, i.actions) for i in items] == [(result.run_id, ("retry", "take_over", "cancel"))]
    assert run(actionable(journal, owner="someone-else")) == []
    assert (
        run(Operations(journal, load=loader(wf)).cancel(result.run_id, ALICE, "late")).run.status
        == "cancelled"
    )


def test_on_expiry_escalate_also_applies_when_a_worker_resumes_first(journal: Journal) -> None:
    payments = Payments()
    wf, result = _paused_on_expiring_ticket(journal, payments, on_expiry={"escalate": "finance"})
    time.sleep(0.7)
    final = run(Runtime(journal).resume(result.run_id, wf, ScriptedModel([])))
    assert (final.status, final.owner, final.reason_code) == ("escalated", "finance", "approval_expired")
    assert "ticket_expired" in kinds(journal, result.run_id)


def test_on_expiry_belongs_to_ask_rules_and_leaves_other_policies_hashes_alone() -> None:
    rules = {"rules": [{"id": "r", "tool": "t", "decision": "ask"}]}
    with_deny = {"rules": [{"id": "r", "tool": "t", "decision": "ask", "on_expiry": "deny"}]}
    assert Policy.from_dict(rules, "a").hash != Policy.from_dict(with_deny, "b").hash
    from tether.errors import PolicyFileError

    with pytest.raises(PolicyFileError, match="on_expiry"):
        Policy.from_dict({"rules": [{"id": "r", "tool": "t", "decision": "allow", "on_expiry": "deny"}]}, "c")


# -- workers: the sweeper in their loop, and runs they cannot drive ----------------------------


def test_every_worker_loop_sweeps_expired_tickets(journal: Journal) -> None:
    from tether.registry import Registry
    from tether.worker import Worker

    payments = Payments()
    _, result = _paused_on_expiring_ticket(journal, payments, on_expiry={"escalate": "finance"})
    time.sleep(0.7)
    worker = Worker(journal, Registry(()), poll_seconds=0.05)
    stats = run(worker.run(until_idle=True))
    assert stats.expired == 1
    assert run(journal.get_run(result.run_id)).status == "escalated"


def test_a_run_no_worker_can_drive_says_why_and_can_be_retried_or_cancelled(journal: Journal) -> None:
    from tether.registry import Registry
    from tether.worker import Worker

    wf = Payments().workflow()
    queued = run(
        Runtime(journal).submit(wf, workflow_ref="elsewhere/workflow.yaml", model_spec="script:x.json")
    )
    stats = run(Worker(journal, Registry(()), poll_seconds=0.05).run(until_idle=True))
    assert stats.set_aside == 1
    record = run(journal.get_run(queued.run_id))
    assert (record.status, record.reason_code) == ("queued", "not_drivable")
    assert "is not among the 0 workflow version(s) under this worker's roots" in (record.message or "")
    items = run(actionable(journal))
    assert [(i.run.run_id, i.actions) for i in items] == [(queued.run_id, ("retry", "take_over", "cancel"))]
    ops = Operations(journal, load=loader(wf))
    retried = run(ops.retry(queued.run_id, ALICE, "workflow deployed"))
    assert (retried.run.status, retried.run.reason_code, retried.run.message) == ("queued", None, None)
    assert run(ops.cancel(queued.run_id, ALICE, "not needed")).run.status == "cancelled"


def test_stuck_reason_is_never_empty_for_a_run_nobody_drives(journal: Journal) -> None:
    from tether.operations import stuck_reason

    wf = Payments().workflow()
    mine = run(Runtime(journal).submit(wf, workflow_ref="<python:payments>", model_spec="script:x.json"))
    theirs = run(
        Runtime(journal).submit(wf, workflow_ref="payments/workflow.yaml", model_spec="script:x.json")
    )
    now = time.time()
    code, message = stuck_reason(run(journal.get_run(mine.run_id)), now) or ("", "")
    assert code == "not_drivable" and "built in code by the process that started it" in message
    code, message = stuck_reason(run(journal.get_run(theirs.run_id)), now) or ("", "")
    assert code == "waiting_for_worker" and f"tether resume {theirs.run_id}" in message


# -- the command line ---------------------------------------------------------------------------

REPO = Path(__file__).resolve().parents[1]


def tether(tmp_path: Path, *args: str, **extra_env: str) -> Any:
    """`python -m tether ARGS --db tmp/t.db` in a process of its own (the tether under test)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_DB", "FORCE_COLOR")}
    env |= {"REFUND_LEDGER": str(tmp_path / "ledger.sqlite"), "COLUMNS": "500", "NO_COLOR": "1"} | extra_env
    return subprocess.run(
        [sys.executable, "-m", "tether", *args, "--db", str(tmp_path / "t.db")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _escalated_refund(tmp_path: Path) -> str:
    import json

    script = tmp_path / "script.json"
    script.write_text(
        json.dumps(
            [
                {"kind": "tool_call", "tool": "lookup_order", "args": {"order_id": "A-1002"}},
                {
                    "kind": "tool_call",
                    "tool": "issue_refund",
                    "args": {"order_id": "A-1002", "amount": 20.0, "reason": "late"},
                },
            ]
        )
    )
    started = tether(
        tmp_path,
        "run",
        str(REPO / "examples" / "refund"),
        "--input",
        '{"order_id": "A-1002"}',
        "--model",
        f"script:{script}",
        "--json",
    )
    assert started.returncode == 1, started.stderr
    value = json.loads(started.stdout)
    assert value["status"] == "escalated"
    return str(value["run_id"])


def test_cli_cancel_with_rollback_voids_the_refund_of_the_refund_example(tmp_path: Path) -> None:
    import json
    import sqlite3

    run_id = _escalated_refund(tmp_path)
    listed = tether(tmp_path, "escalations")
    assert f"tether cancel {run_id} --reason TEXT [--rollback] --db {tmp_path / 't.db'}" in listed.stdout
    cancelled = tether(tmp_path, "cancel", run_id, "--rollback", "--reason", "customer called back")
    assert cancelled.returncode == 0, cancelled.stderr
    assert "rollback: 1 compensated" in cancelled.stdout
    assert f"tether show {run_id} --db {tmp_path / 't.db'}" in cancelled.stdout
    with sqlite3.connect(tmp_path / "ledger.sqlite") as ledger:
        assert ledger.execute("SELECT order_id, amount FROM voids").fetchall() == [("A-1002", 20.0)]
    again = tether(tmp_path, "cancel", run_id, "--json")
    assert again.returncode == 2
    assert json.loads(again.stdout)["error"]["code"] == "run_state"
    shown = json.loads(tether(tmp_path, "show", run_id, "--json").stdout)
    assert [e["kind"] for e in shown["entries"]][-5:] == [
        "cancelled",
        "rollback_started",
        "compensation_intent",
        "compensated",
        "rolled_back",
    ]
    assert shown["entries"][-5]["body"]["by"]["kind"] == "local"  # the CLI acts as the local admin


def test_cli_takeover_and_retry(tmp_path: Path) -> None:
    import json

    run_id = _escalated_refund(tmp_path)
    refused = tether(tmp_path, "takeover", run_id, "--exit", "nope", "--json")
    assert refused.returncode == 2
    assert "state 'resolve' has no exit 'nope' (its exits: declined, refunded)" in refused.stdout
    bad = tether(tmp_path, "takeover", run_id, "--exit", "declined", "--data", "[1]")
    assert bad.returncode == 2 and "--data must be a JSON object" in bad.stderr
    retried = tether(tmp_path, "retry", run_id, "--note", "try again")
    assert retried.returncode == 0, retried.stderr
    assert "now queued in state resolve" in retried.stdout
    assert f"tether resume {run_id} --db {tmp_path / 't.db'}" in retried.stdout
    runs = json.loads(tether(tmp_path, "runs", "--json").stdout)
    assert runs[0]["stuck"]["reason_code"] == "waiting_for_worker"
    listed = tether(tmp_path, "runs")
    assert "waiting_for_worker" in listed.stdout
    # Queued, not stuck: a worker drives it next; a take-over is for runs that stopped.
    early = tether(tmp_path, "takeover", run_id, "--exit", "refunded")
    assert early.returncode == 2 and "only a run that is escalated, failed, paused" in early.stderr
    cancelled = tether(tmp_path, "cancel", run_id, "--json")
    assert json.loads(cancelled.stdout)["status"] == "cancelled"


def test_cli_takeover_finishes_the_run_through_the_exit_chosen(tmp_path: Path) -> None:
    import json

    run_id = _escalated_refund(tmp_path)
    taken = tether(
        tmp_path, "takeover", run_id, "--exit", "refunded", "--data", '{"note": "called the customer"}'
    )
    assert taken.returncode == 0, taken.stderr
    assert "taken over through exit 'refunded': now completed in state done" in taken.stdout
    shown = tether(tmp_path, "show", run_id)
    assert "taken_over: by " in shown.stdout and "exit refunded → done" in shown.stdout
    again = tether(tmp_path, "retry", run_id, "--json")
    assert again.returncode == 2 and json.loads(again.stdout)["error"]["code"] == "run_state"


def test_a_rollback_whose_process_is_killed_mid_compensation_finishes_when_run_again(tmp_path: Path) -> None:
    import json
    import sqlite3

    fixture = REPO / "tests" / "fixtures" / "rollback"
    ledger = {"PAYMENTS_LEDGER": str(tmp_path / "payments.sqlite")}
    script = f"script:{fixture / 'proposals.json'}"
    started = json.loads(tether(tmp_path, "run", str(fixture), "--model", script, "--json", **ledger).stdout)
    run_id = started["run_id"]
    assert started["status"] == "escalated"
    killed = tether(tmp_path, "cancel", run_id, "--rollback", DIE_IN_REFUND=str(tmp_path / "died"), **ledger)
    assert killed.returncode == 137  # the process died inside the first refund, after its intent
    with sqlite3.connect(tmp_path / "t.db") as journal:
        last = journal.execute(
            "SELECT kind FROM entries WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,)
        )
        assert last.fetchone()[0] == "compensation_intent"
    again = tether(tmp_path, "cancel", run_id, "--rollback", **ledger)  # its lease: a dead process's
    assert again.returncode == 0, again.stderr
    assert "rollback: 2 compensated" in again.stdout
    with sqlite3.connect(tmp_path / "payments.sqlite") as db:
        refunded = [charge_id for (charge_id,) in db.execute("SELECT charge_id FROM refunds ORDER BY rowid")]
        charges = [key for (key,) in db.execute("SELECT key FROM charges ORDER BY rowid")]
    assert refunded == charges[::-1]  # each charge refunded once, the newest first
    shown = json.loads(tether(tmp_path, "show", run_id, "--json").stdout)
    done = [e["body"] for e in shown["entries"] if e["kind"] == "compensated"]
    assert [d.get("recovered", False) for d in done] == [True, False]  # the cut-off one, re-run with its key
