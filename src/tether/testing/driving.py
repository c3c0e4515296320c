"""Drive a run to its end with a scripted model and a scripted person, and read what it did.

`run_to_end` starts a run and, each time it pauses on a ticket, lets the scripted person
decide the ticket through the journal (`decide_ticket`, as `tether approve` does) and
resumes the run, until it completes, fails, escalates, is handed off, or the person takes
it over. It returns a `RunOutcome`: the run's status, the states it visited, and one
`StepDecision` per governed step, all read back from the journal.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tether.decision import Decision
from tether.journal import Entry, Journal
from tether.journal import bodies as b
from tether.loader import load_workflow_async, workflow_ref
from tether.models import Model, ScriptedModel
from tether.runtime import RunResult, Runtime
from tether.testing import coverage
from tether.testing.person import ScriptedPerson, describe_ticket
from tether.timeline import outcome_of, transitions
from tether.workflow import Workflow


@dataclass(frozen=True)
class StepDecision:
    """One governed step: what was proposed, the decision on it, and how the step ended.

    `decision`, `rule_id` and `reason_code` are the step's own decision (a person's later
    verdict on its ticket is in `ticket` and `outcome`: `executed` after an approval,
    `approval_denied` after a denial). `outcome` is one of `executed`, `refused`,
    `awaiting_approval`, `awaiting_answer`, `answered`, `unanswered`, `approval_denied`,
    `approval_expired`, `transition`, `handoff`, `handoff_received`, `handoff_returned`,
    `tool_error`, `verification_failed`, `intent`, `effect_in_doubt`, `executed`/`not_executed`
    (an effect in doubt, settled).
    """

    number: int
    step_id: str
    state: str
    proposal: Any
    decision: str
    rule_id: str
    reason_code: str
    outcome: str
    ticket: str | None = None

    @property
    def tool(self) -> str | None:
        return self.proposal.get("tool") if _kind(self.proposal) == "tool_call" else None

    @property
    def exit(self) -> str | None:
        kind = _kind(self.proposal)
        return self.proposal.get("exit") if kind == "exit" else ("finish" if kind == "finish" else None)

    def proposed(self, width: int = 60) -> str:
        """The proposal in one line: `issue_refund(order_id="A-1001", amount=650.0, …)`."""
        p = self.proposal
        kind = _kind(p)
        if kind == "tool_call":
            args = ", ".join(f"{k}={json.dumps(v)}" for k, v in (p.get("args") or {}).items())
            text = f"{p.get('tool')}({args})"
        elif kind in ("exit", "finish"):
            text = f"exit {self.exit}"
        elif kind == "question":
            text = f"question {json.dumps(p.get('question'))}"
        elif kind == "handoff":
            text = f"handoff to {p.get('to')}"
        else:
            text = f"unparseable {json.dumps(p, default=str)}"
        return text if len(text) <= width else text[: width - 1] + "…"

    def decided(self) -> str:
        """`deny by refund-over-hard-limit (policy_denied)`."""
        return f"{self.decision} by {self.rule_id} ({self.reason_code})"

    def describe(self) -> str:
        ticket = f" [{self.ticket}]" if self.ticket else ""
        return f"{self.decided()} → {self.outcome}{ticket}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "step": self.number,
            "step_id": self.step_id,
            "state": self.state,
            "proposal": self.proposal,
            "decision": self.decision,
            "rule": self.rule_id,
            "reason_code": self.reason_code,
            "outcome": self.outcome,
            "ticket": self.ticket,
        }


def _kind(proposal: Any) -> str | None:
    return proposal.get("kind") if isinstance(proposal, dict) else None


@dataclass
class RunOutcome:
    """Where a run ended and what it did, as its journal records it."""

    run_id: str
    workflow: str
    status: str
    state: str
    reason_code: str | None
    message: str | None
    owner: str | None
    ticket_id: str | None
    data: dict[str, Any]
    path: list[str]
    steps: list[StepDecision]
    entries: list[Entry] = field(repr=False)
    # The ticket the scripted person took the run over at, described.
    taken_over: str | None = None

    @property
    def decisions(self) -> list[StepDecision]:
        return self.steps

    def ended(self) -> str:
        """`escalated in state resolve (budget_exhausted: …)`."""
        why = f" ({self.reason_code}: {self.message})" if self.reason_code and self.message else ""
        taken = f"; taken over by the scripted person at {self.taken_over}" if self.taken_over else ""
        return f"{self.status} in state {self.state}{why}{taken}"

    def describe(self) -> str:
        """What the run did, step by step: the text assertion errors end with."""
        lines = [f"run {self.run_id} ({self.workflow}) went {' → '.join(self.path)}; it is {self.ended()}"]
        rows = [[str(s.number), s.step_id, s.state, s.proposed(), s.describe()] for s in self.steps]
        lines += ["  " + line for line in aligned(rows)] or ["  (no governed steps)"]
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "workflow": self.workflow,
            "status": self.status,
            "state": self.state,
            "reason_code": self.reason_code,
            "message": self.message,
            "owner": self.owner,
            "ticket_id": self.ticket_id,
            "taken_over": self.taken_over,
            "path": self.path,
            "steps": [s.as_dict() for s in self.steps],
        }

    @classmethod
    def of(cls, result: RunResult, workflow: Workflow, entries: list[Entry]) -> RunOutcome:
        return cls(
            run_id=result.run_id,
            workflow=f"{workflow.name} {workflow.version}",
            status=result.status,
            state=result.state,
            reason_code=result.reason_code,
            message=result.message,
            owner=result.owner,
            ticket_id=result.ticket_id,
            data=result.data,
            path=states_visited(entries),
            steps=governed_steps(entries),
            entries=entries,
        )


def aligned(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell, nothing cut."""
    if not rows:
        return []
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


def states_visited(entries: list[Entry]) -> list[str]:
    """The states a run entered, in order: its start state, then each one it moved to."""
    start, moves = transitions(entries)
    return ([start] if start else []) + [to for _, to, _ in moves]


def governed_steps(entries: list[Entry]) -> list[StepDecision]:
    """One row per governed step, in order: its first decision (a continuation after a
    ticket repeats or replaces it, as `tether policy explain` reads it too) and its outcome."""
    first: dict[str, tuple[Entry, Any]] = {}
    last: dict[str, Any] = {}
    tickets: dict[str, str] = {}
    for e in entries:
        record = e.body
        if isinstance(record, b.TicketDecided):
            tickets[record.ticket_id] = f"{record.status} by {record.by.principal_id}"
        if e.step_id is None or not isinstance(record, b.StepRecord):
            continue
        last[e.step_id] = record
        if (
            e.step_id not in first
            and isinstance(getattr(record, "decision", None), Decision)
            and not record.continuation
        ):
            first[e.step_id] = (e, record)
    steps = []
    for number, (step_id, (entry, record)) in enumerate(first.items(), start=1):
        decision: Decision = record.decision
        ticket_id = getattr(record, "ticket_id", None)
        steps.append(
            StepDecision(
                number=number,
                step_id=step_id,
                state=entry.state or "",
                proposal=b.proposed(record),
                decision=decision.decision,
                rule_id=decision.rule_id,
                reason_code=str(decision.reason_code),
                outcome=_outcome(last[step_id]),
                ticket=tickets.get(ticket_id) if ticket_id else None,
            )
        )
    return steps


def _outcome(record: Any) -> str:
    """The timeline's name for an outcome; a refusal after a ticket is named by its reason."""
    if isinstance(record, b.Refused) and record.continuation:
        return str(record.decision.reason_code)
    return "intent" if isinstance(record, b.Intent) else outcome_of(record)


ModelLike = Model | Sequence[Any] | Mapping[str, Sequence[Any]]


async def run_to_end_async(
    workflow: Workflow | str | Path,
    model: ModelLike | None = None,
    *,
    journal: Journal,
    input: dict[str, Any] | None = None,
    person: ScriptedPerson | None = None,
) -> RunOutcome:
    """Start a run and drive it to its end, the scripted person deciding every ticket.

    `workflow` is a `Workflow` or what `tether run` accepts (a folder, a YAML file,
    `module:attr`); `model` a model, or a script (a list of proposals, or a mapping of
    agent state to list) for a `ScriptedModel`. With no `person`, the run stays paused at
    its first ticket. Raises `PersonHasNoRule` when no rule of the person decides a ticket.
    """
    ref = ""
    if not isinstance(workflow, Workflow):
        ref = workflow_ref(workflow)
        workflow = await load_workflow_async(workflow)
    proposer = model if model is None or isinstance(model, Model) else ScriptedModel(model)
    runtime = Runtime(journal)
    result = await runtime.start(workflow, proposer, input=input, workflow_ref=ref)
    taken_over = None
    while person is not None and result.status == "paused" and result.ticket_id:
        ticket = await journal.get_ticket(result.ticket_id)
        verdict = person.decide(ticket)
        if verdict.action == "take_over":
            taken_over = f"ticket {ticket.ticket_id} ({describe_ticket(ticket)})"
            break
        await journal.decide_ticket(
            ticket.ticket_id,
            approve=verdict.action != "deny",
            by=person.name,
            reason=verdict.text if verdict.action != "answer" else "",
            answer=verdict.text if verdict.action == "answer" else None,
        )
        result = await runtime.resume(result.run_id, workflow, proposer)
    entries = await journal.read_entries(result.run_id)
    coverage.observe(workflow, entries)
    outcome = RunOutcome.of(result, workflow, entries)
    outcome.taken_over = taken_over
    return outcome


def run_to_end(
    workflow: Workflow | str | Path,
    model: ModelLike | None = None,
    *,
    journal: Journal,
    input: dict[str, Any] | None = None,
    person: ScriptedPerson | None = None,
) -> RunOutcome:
    """`run_to_end_async` for tests that are not coroutines (it runs its own event loop)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_to_end_async(workflow, model, journal=journal, input=input, person=person))
    raise RuntimeError("run_to_end was called inside a running event loop: await run_to_end_async(...)")
