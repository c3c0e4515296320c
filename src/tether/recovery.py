"""Resuming a run: settle an effect left in doubt by a crash, then the ticket a person decided.

Both read only the journal: a paused or crashed run holds no memory or process.
"""

from __future__ import annotations

from tether.hashing import fingerprint
from tether.journal import Entry, NewEntry, Ticket
from tether.models.protocol import Usage
from tether.policy import Decision
from tether.proposals import Exit, Finish, ToolCall, parse_proposal
from tether.reasons import ReasonCode
from tether.run import RunCursor
from tether.step import CONTINUE, GovernedStep, StepOutcome
from tether.workflow import AgentState


async def recover(cursor: RunCursor, intent: Entry) -> StepOutcome:
    """An intent with no result: the process died while the effect was under way."""
    state = cursor.workflow.states[intent.state or ""]
    assert isinstance(state, AgentState)
    tool = state.tool(intent.body["tool"]["name"])
    body = intent.body
    if tool is not None and tool.idempotent:
        cursor.record.status = "running"
        cursor.clear_notice()
        step = GovernedStep(
            cursor, state, Usage.model_validate(body.get("usage", {})), step_id=intent.step_id
        )
        return await step.finish_execution(tool, body["args"], {**body, "recovered": True})
    message = (
        f"step {intent.step_id}: {body['tool']['name']} (not idempotent) was started "
        "but its result was never recorded; it will not be re-run without a person: check, then "
        f"tether resolve {cursor.run_id} --done | --not-done"
    )
    await cursor.commit(
        [
            NewEntry.of(
                kind="effect_in_doubt",
                step_id=intent.step_id,
                state=intent.state,
                body={**body, "message": message},
            )
        ],
        status="effect_in_doubt",
        owner=state.escalate_to,
        reason_code=ReasonCode.EFFECT_IN_DOUBT,
        message=message,
    )
    return StepOutcome("continue")


async def continue_pending(cursor: RunCursor) -> StepOutcome | None:
    """Act on the ticket a paused run waits for; None while it is still undecided."""
    pending = cursor.checkpoint["pending"]
    ticket = await cursor.journal.get_ticket(pending["ticket_id"])
    if ticket.status == "pending":
        if ticket.expires_at > cursor.clock():
            return None
        ticket = await cursor.journal.expire_ticket(ticket.ticket_id, cursor.clock())
    state = cursor.workflow.states[cursor.record.state]
    assert isinstance(state, AgentState)
    del cursor.checkpoint["pending"]
    cursor.record.status = "running"
    cursor.clear_notice()
    step = GovernedStep(cursor, state, Usage(), step_id=pending["step_id"])
    proposal = parse_proposal(pending["proposal"])
    if ticket.kind == "question":
        return await _answer(step, ticket)
    if ticket.status != "approved":
        code = ReasonCode.APPROVAL_EXPIRED if ticket.status == "expired" else ReasonCode.APPROVAL_DENIED
        reason = ticket.reason or f"ticket {ticket.ticket_id} {ticket.status}"
        denial = Decision(
            decision="deny",
            rule_id=f"approval:{ticket.ticket_id}",
            policy_hash=cursor.policy.hash,
            reason_code=code,
            reason=f"{reason} (by {ticket.decided_by or 'nobody'})",
        )
        return await step.refuse(proposal, denial, args_hash=ticket.args_hash, continuation=True)
    decision = Decision.model_validate(pending["decision"])
    if isinstance(proposal, ToolCall):
        tool = state.tool(proposal.tool)
        assert tool is not None
        args = tool.validate(proposal.args)
        return await step.execute(
            tool,
            proposal,
            args,
            fingerprint({"tool": tool.name, "args": args}),
            decision,
            ticket_id=ticket.ticket_id,
        )
    assert isinstance(proposal, Exit | Finish)
    name = proposal.exit if isinstance(proposal, Exit) else "finish"
    return await step.take_exit(
        proposal, decision, name, state.exits[name], ticket.args_hash, ticket_id=ticket.ticket_id
    )


async def _answer(step: GovernedStep, ticket: Ticket) -> StepOutcome:
    answered = ticket.status == "answered"
    observation = {
        "step_id": step.step_id,
        "outcome": "answered" if answered else "unanswered",
        "answer": ticket.answer,
        "by": ticket.decided_by,
        "reason": ticket.reason,
    }
    body = {
        "proposal": None,
        "outcome": "answered" if answered else "unanswered",
        "reason_code": None if answered else ReasonCode.APPROVAL_DENIED,
        "ticket_id": ticket.ticket_id,
        "continuation": True,
        "observation": observation,
        "source": {"kind": "person", "by": ticket.decided_by},
    }
    await step.cursor.commit([NewEntry.of("step", body, step_id=step.step_id, state=step.state.name)])
    step._observe(body)
    return CONTINUE


def intent_without_result(entries: list[Entry]) -> Entry | None:
    """The last intent of the visit, if no step entry after it records its result."""
    for e in reversed(entries):
        if e.kind == "intent":
            settled = any(x.kind == "step" and x.step_id == e.step_id and x.seq > e.seq for x in entries)
            return None if settled else e
    return None
