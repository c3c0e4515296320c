"""A run's journal as a timeline of rows a person (or a program) can read."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec

from tether.decision import Decision
from tether.journal import Entry
from tether.journal import bodies as b
from tether.reasons import ReasonCode
from tether.run import messages_for

# What each record's outcome is called on the timeline (the words `show` has always used).
_OUTCOMES: dict[type[Any], str] = {
    b.Refused: "refused",
    b.AwaitingAnswer: "awaiting_answer",
    b.AwaitingApproval: "awaiting_approval",
    b.Intent: "intent recorded, effect starting",
    b.VerificationFailed: "verification_failed",
    b.Executed: "executed",
    b.ToolFailed: "tool_error",
    b.Transition: "transition",
    b.HandedOff: "handoff",
    b.HandoffReceived: "handoff_received",
    b.HandoffReturned: "handoff_returned",
    b.Unanswered: "unanswered",
    b.Answered: "answered",
    b.EffectInDoubt: "effect_in_doubt",
    b.StepDone: "transition",
    b.StepFailed: "step_failed",
    b.RunStarted: "started",
    b.Failed: "failed",
    b.Escalated: "escalated",
    b.Migrated: "migrated",
    b.Crashed: "crashed",
    b.UpstreamRestarted: "upstream_restarted",
    b.ApprovalGiven: "approval_given",
    b.Cancelled: "cancelled",
    b.Retried: "retried",
    b.TakenOver: "taken_over",
    b.TicketExpiredRecord: "ticket_expired",
    b.RollbackStarted: "rollback_started",
    b.CompensationIntent: "compensation intent recorded, starting",
    b.Compensated: "compensated",
    b.CompensationFailed: "compensation_failed",
    b.CompensationRefused: "compensation_refused",
    b.CompensationInDoubt: "compensation_in_doubt",
    b.RolledBack: "rolled_back",
}


def timeline(entries: list[Entry]) -> list[dict[str, Any]]:
    """One row per journal entry: proposal → decision and rule → outcome → result.

    A decision's policy hash is the run's pinned policy at that point (from `run_started`
    and `migrated`), which the journal does not repeat in every step.
    """
    rows = []
    policy_hash: str | None = None
    for e in entries:
        record = e.body
        if isinstance(record, b.RunStarted):
            policy_hash = record.policy_hash
        elif isinstance(record, b.Migrated):
            policy_hash = record.to.policy_hash
        decision = getattr(record, "decision", None)
        if isinstance(record, b.StepDone | b.StepFailed):
            decision = deterministic(e.state or "")
        rows.append(
            {
                "seq": e.seq,
                "kind": "step" if _is_step(record) else e.kind,
                "step_id": e.step_id,
                "state": e.state,
                "proposal": b.proposed(record),
                "decision": decision.decision if decision else None,
                "rule_id": decision.rule_id if decision else None,
                "policy_hash": (decision.policy_hash or policy_hash) if decision else None,
                "reason_code": _reason_code(record) or (decision.reason_code if decision else None),
                "reason": decision.reason if decision else None,
                # Where the values the decision traced came from (tether.provenance).
                "provenance": decision.provenance if decision and decision.provenance else None,
                "outcome": _outcome(record),
                "args_hash": getattr(record, "args_hash", None),
                # The arguments the call ran with, when not the proposal's (edited by an
                # approver, or normalized by the tool's schema).
                "executed_args": record.args
                if isinstance(record, b.ToolStep) and record.proposed_args is not None
                else None,
                "ticket_id": getattr(record, "ticket_id", None),
                "result": getattr(record, "result", None),
                "source": _source(record),
                "verification": getattr(record, "verification", None),
                "error": getattr(record, "error", None),
                "detail": _detail(record),
                # What the model was told of the step (nothing for a step no model proposed).
                "observation": _told(record, e.step_id),
            }
        )
    return rows


def deterministic(state: str) -> Decision:
    """What allowed a deterministic step: the workflow itself (never stored: always this)."""
    return Decision(
        "allow", f"workflow:{state}", ReasonCode.POLICY_ALLOWED, "deterministic step of the workflow"
    )


def _told(record: Any, step_id: str | None) -> Any:
    messages = messages_for(record, step_id)
    return messages[-1].content if messages else None


def _is_step(record: Any) -> bool:
    return isinstance(record, b.StepRecord | b.StepDone | b.StepFailed) and not isinstance(
        record, b.Intent | b.EffectInDoubt | b.HandedOff | b.HandoffReceived | b.HandoffReturned
    )


def transitions(entries: list[Entry]) -> tuple[str | None, list[tuple[str, str, str | None]]]:
    """Where a run started, and each move it made: (from state, to state, exit or None for a
    deterministic step or a routed handoff), in order."""
    start: str | None = None
    moves: list[tuple[str, str, str | None]] = []
    for e in entries:
        record = e.body
        if isinstance(record, b.RunStarted):
            start = e.state
        elif isinstance(record, b.StepDone | b.Transition) and e.state:
            moves.append((e.state, record.next, record.exit if isinstance(record, b.Transition) else None))
        elif isinstance(record, b.TakenOver) and e.state:  # a person chose the exit
            moves.append((e.state, record.next, record.exit))
        elif isinstance(record, b.HandoffReceived) and record.to_state and e.state:
            moves.append((e.state, record.to_state, None))  # a handoff routed to another agent state
    return start, moves


def outcome_of(record: Any) -> str:
    """What a record's outcome is called on the timeline."""
    return _outcome(record)


def _outcome(record: Any) -> str:
    if isinstance(record, b.EffectSettled):
        return "executed" if record.done else "not_executed"
    if isinstance(record, b.TicketDecided | b.RunFinished):
        return record.status
    if isinstance(record, b.UnknownBody):
        return record.kind
    return _OUTCOMES.get(type(record), type(record).__name__)


def _reason_code(record: Any) -> str | None:
    match record:
        case b.Refused(decision=d) | b.AwaitingApproval(decision=d) | b.HandedOff(decision=d):
            return d.reason_code
        case b.VerificationFailed():
            return "verification_failed"
        case b.ToolFailed():
            return "tool_error"
        case b.EffectInDoubt() | b.EffectSettled():
            return "effect_in_doubt"
        case b.Unanswered(reason_code=code):
            return code
        case b.StepFailed():
            return "step_failed"
        case b.Escalated(reason_code=code):
            return code
    return None


def _source(record: Any) -> Any:
    """Where what the step brought into the run came from: a tool (with the trust of its
    results, tether.provenance) or a person (always trusted)."""
    if isinstance(record, b.Executed | b.ToolFailed):
        return {"kind": "tool", "tool": record.tool, "trust": "untrusted" if record.untrusted else "trusted"}
    if isinstance(record, b.EffectSettled | b.Answered):
        return {"kind": "person", "by": record.by}
    return None


def _edit(record: b.TicketDecided | b.ApprovalGiven) -> str:
    if record.edited_args is None:
        return ""
    return f" (arguments edited: {record.original_args_hash} → {record.args_hash})"


def _detail(record: Any) -> Any:
    match record:
        case b.TicketDecided(ticket_id=t, by=by, answer=answer, reason=reason):
            said = answer or reason
            return f"{t} by {by.principal_id}" + _edit(record) + (f": {said}" if said else "")
        case b.ApprovalGiven(ticket_id=t, by=by, count=count, required=required, reason=reason):
            return (
                f"{t} approval {count} of {required} by {by.principal_id}"
                + _edit(record)
                + (f": {reason}" if reason else "")
            )
        case b.Escalated(message=message) | b.EffectInDoubt(message=message):
            return message
        case b.HandedOff(handoff=handed):
            return msgspec.to_builtins(handed)
        case b.HandoffReturned(by=by, differences=differences):
            changed = "; ".join(f"{d.name}: {d.error or f'{d.then!r} → {d.now!r}'}" for d in differences)
            return f"turned back by {by}: {changed}"
        case b.HandoffReceived(by=by, checked=checked):
            return f"received by {by}: {len(checked)} value(s) read again, unchanged"
        case b.RunStarted(workflow=workflow):
            return msgspec.to_builtins(workflow)
        case b.Crashed(error=error):
            return error
        case b.ToolFailed(error=error) | b.StepFailed(error=error):
            return error
        case b.StepDone(next=to) | b.Transition(next=to):
            return {"next": to, **_carried(record)}
        case b.Refused(decision=d):
            return d.reason
    return _operation_detail(record)


def _carried(record: Any) -> dict[str, Any]:
    """The calls a deterministic step carried into the run's `history` (a gateway session's)."""
    history = record.history if isinstance(record, b.StepDone) else None
    if history is None:
        return {}
    carried: dict[str, Any] = {"calls": len(history.calls), "from_runs": sorted(set(history.runs))}
    return {"history_carried": carried | ({"cut": history.cut} if history.cut else {})}


def _operation_detail(record: Any) -> Any:
    """What a person's operation on the run, a rollback, an expiry or an upstream's restart
    says (tether.operations, tether.mcp.gateway)."""
    match record:
        case b.UpstreamRestarted(upstream=name, restart=count, at=at):
            when = datetime.fromtimestamp(at, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
            return (
                f"upstream {name} went away and was started again (restart {count}, {when}); "
                "the next call went out on the new connection: what it held in memory may be lost"
            )
        case b.Cancelled(by=by, reason=reason, rollback=rollback):
            return (
                f"by {by.describe()}"
                + (f": {reason}" if reason else "")
                + (" (with rollback)" if rollback else "")
            )
        case b.Retried(by=by, note=note, state=state):
            return f"by {by.describe()}: state {state} again, fresh budget" + (f" ({note})" if note else "")
        case b.TakenOver(by=by, exit=exit, next=to):
            return f"by {by.describe()}: exit {exit} → {to}"
        case b.TicketExpiredRecord(ticket_id=t, escalated_to=role):
            return f"{t} expired undecided: " + (f"escalated to {role}" if role else "denied")
        case b.RollbackStarted(effects=effects, uncompensated=missing):
            return {"undo (newest first)": effects, "cannot undo": [m.step_id for m in missing]}
        case b.CompensationRefused(reason=reason) | b.CompensationInDoubt(message=reason):
            return reason
        case b.CompensationFailed(error=error):
            return error
        case b.CompensationStep(compensates=step, of_tool=tool):
            return f"undoes {step} ({tool})"
        case b.RolledBack():
            return {k: v for k, v in msgspec.to_builtins(record).items() if v}
    return None
