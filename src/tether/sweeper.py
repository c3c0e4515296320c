"""The expiry sweeper: tickets nobody decided in time are expired at their deadline.

A ticket's deadline is kept on the store's clock; the sweeper asks the store which pending
tickets are past it (`due_tickets`) and expires each in one transaction with its run's
record (`sweep_ticket`), applying the rule's `on_expiry:`

- `deny` (the default): the run records `ticket_expired` and becomes claimable; a worker
  resumes it and the model is told the call was refused (`approval_expired`).
- `{escalate: ROLE}`: the run is escalated to ROLE at once (`escalated`, reason
  `approval_expired`), an item a person acts on (tether.operations), with no worker needed.

Every worker runs it in its loop (tether.worker) and `tether serve` may run it on its own
(`sweep_expired`). A ticket of a run a live process holds is left to that process: it
settles the ticket the same way when it resumes the run (tether.step).
"""

from __future__ import annotations

from typing import Any

import msgspec

from tether.journal import Journal, NewEntry, RunRecord, RunUpdate, Ticket
from tether.journal import bodies as b
from tether.reasons import ReasonCode

BATCH = 100


async def sweep_expired(store: Journal, *, limit: int = BATCH) -> int:
    """Expire every pending ticket past its deadline (up to `limit`); how many were expired."""
    expired = 0
    for ticket_id in await store.due_tickets(limit):
        if await store.sweep_ticket(ticket_id, consequence) is not None:
            expired += 1
    return expired


def escalation_role(pending: dict[str, Any] | None, ticket_id: str) -> str | None:
    """The role the paused step's rule escalates to when ticket `ticket_id` expires, if any."""
    if not pending or pending.get("ticket_id") != ticket_id:
        return None
    role = (pending.get("decision") or {}).get("escalate_on_expiry")
    return role if isinstance(role, str) and role else None


def expired_message(ticket: Ticket, role: str) -> str:
    return (
        f"ticket {ticket.ticket_id} ({ticket.subject}, for {ticket.approver}) expired undecided; "
        f"the rule escalates to {role}"
    )


def consequence(ticket: Ticket, run: RunRecord, now: float) -> tuple[list[NewEntry], RunUpdate | None]:
    """What expiring `ticket` writes to its run: the expiry, and an escalation if the rule says so."""
    pending = run.checkpoint.get("pending")
    waiting = (
        run.status == "paused" and isinstance(pending, dict) and pending.get("ticket_id") == ticket.ticket_id
    )
    if not waiting:  # the run no longer waits on it: the ticket alone expires
        return [], None
    role = escalation_role(pending, ticket.ticket_id)
    expired = b.TicketExpiredRecord(
        ticket_id=ticket.ticket_id,
        on_expiry="escalate" if role else "deny",
        escalated_to=role,
        expired_at=ticket.expires_at,
    )
    entries = [NewEntry.of(expired, step_id=ticket.step_id, state=run.state)]
    if role is None:
        return entries, None
    message = expired_message(ticket, role)
    escalated = b.Escalated(
        reason_code=ReasonCode.APPROVAL_EXPIRED, message=message, owner=role, data=run.data, facts=run.facts
    )
    entries.append(NewEntry.of(escalated, state=run.state))
    checkpoint = dict(run.checkpoint) | {"pending": None}
    checkpoint = {k: v for k, v in checkpoint.items() if v is not None}
    update = RunUpdate(
        status="escalated",
        owner=role,
        reason_code=ReasonCode.APPROVAL_EXPIRED,
        message=message,
        checkpoint=msgspec.to_builtins(checkpoint),
    )
    return entries, update
