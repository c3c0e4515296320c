"""Tool calls from agents tether did not write, each one a governed step of a tether run.

An agent framework (pydantic-ai, the OpenAI Agents SDK, LangGraph: `tether.integrations`)
keeps its own loop and its own conversation; it hands tether one tool call at a time.
`GovernedCalls` keeps one tether run per conversation and takes each call through the
governed step (tether.step): scope, arguments, budget, loop, policy, approval, intent,
execution, verification, record. The run's workflow is built here, one agent state whose
tools are the agent's; `tether show`, `audit`, `replay` and the inbox treat the run like any
other. The framework's id for each call is written in the step's entries (`call_id`, under
the hash chain); replay re-decides each call from its entry.

- A call the policy asks about pauses the run on a ticket bound to the call's arguments
  (outcome `awaiting_approval`); the framework ends its own run its own way (a deferred tool,
  an interruption). A person decides from anywhere (`tether approve`, the inbox). When the
  framework presents the same call again (the same call id, or without one the same tool and
  arguments), the decision is carried out: the approved arguments run, once, or the denial is
  recorded. The call presented with other arguments is refused and nothing runs.
- While its run waits on a ticket, a conversation takes no other call (refused, naming it).
  Such refusals (`approval_mismatch`, `approval_pending`) are recorded as steps of the run,
  decided by the ticket (`approval:TICKET`), while it stays paused on the same ticket: an
  attempt to get around an approval is on the record (`_refuse_waiting`).
- A call id seen before gets what was recorded for it, never a second execution: a framework
  that re-runs a node after a crash does not repeat the effect. A crash while an effect was
  under way is settled as in any run: an idempotent tool runs again with the same idempotency
  key, anything else is `effect_in_doubt` until a person resolves it.
- Workers never claim these runs (their workflow is not loadable elsewhere). A run's id is
  derived from the conversation's key, so a conversation resumed in another process, after a
  restart, continues the same run. The key is the application's: whoever can name a
  conversation can act in it, as whoever can open the journal can (docs/security.md).
- One process holds a conversation's run (its lease) at a time, between calls too: it lets it
  go `idle_release` seconds after the last call (or when the adapter says the framework's
  run is over), and a call of a conversation held elsewhere waits for it (`hold_wait`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.budget import Budget
from tether.decision import Decision
from tether.errors import JournalError, RunNotFound, RunStateError
from tether.hashing import encode_json, value_hash
from tether.identity import Principal
from tether.journal import Entry, Journal
from tether.journal import bodies as b
from tether.journal.common import SELF_DRIVEN
from tether.journal.records import LeaseHeld
from tether.policy import Policy
from tether.reasons import ReasonCode
from tether.run import Pending, RunCursor
from tether.runtime import Runtime
from tether.step import GovernedStep
from tether.tools import ArgumentError, Tool
from tether.workflow import AgentState, Terminal, Workflow

STATE = "agent"
# A conversation is long and may repeat itself (the same read again): the limits are there
# only because a budget must have some. Pass a Budget to bound it.
# A call id longer than this is kept as its hash (it still names the call; it costs nothing).
MAX_CALL_ID = 200
OPEN_BUDGET = Budget(max_steps=10**9, max_tool_calls=10**9, max_seconds=1e9, max_repeats=10**9)
# A conversation's run is let go this long after its last call (another process may then take
# its next one), unless the adapter lets it go sooner (at the end of a framework's run).
IDLE_RELEASE_SECONDS = 2.0


@dataclass(frozen=True)
class CallOutcome:
    """What became of one call: the observation tether recorded, in the fields a framework
    adapter needs. `outcome` is one of executed, refused, tool_error, verification_failed,
    awaiting_approval, effect_in_doubt, stopped (the run no longer takes calls)."""

    outcome: str
    run_id: str
    step_id: str | None = None
    result: Any = None
    reason_code: str | None = None
    reason: str | None = None
    ticket_id: str | None = None
    observation: Mapping[str, Any] = field(default_factory=dict)

    @property
    def executed(self) -> bool:
        return self.outcome == "executed"

    @classmethod
    def observed(cls, run_id: str, seen: Mapping[str, Any]) -> CallOutcome:
        outcome = str(seen.get("outcome"))
        asked = ReasonCode.APPROVAL_REQUIRED if outcome == "awaiting_approval" else None
        return cls(
            outcome=outcome,
            run_id=run_id,
            step_id=seen.get("step_id"),
            result=seen.get("result"),
            reason_code=seen.get("reason_code") or asked,
            reason=seen.get("reason") or seen.get("error"),
            ticket_id=seen.get("ticket_id"),
            observation=seen,
        )

    def describe(self) -> str:
        """One line for a person or a model: what happened and why."""
        where = f"run {self.run_id}" + (f", step {self.step_id}" if self.step_id else "")
        if self.outcome == "awaiting_approval":
            return f"waiting for a person to approve (ticket {self.ticket_id}) [{where}]"
        if self.outcome == "executed":
            return f"executed [{where}]"
        return f"{self.outcome} ({self.reason_code}): {self.reason or 'no reason given'} [{where}]"


class GovernedCalls:
    """One tether run per conversation, taking the conversation's tool calls one by one.

    `name` names the workflow (and so the runs in `tether runs`); `tools` are tether tools
    (`tether.tool`, `Tool`); `policy` decides each call (default: tether's default policy).
    Use as an async context manager, or call `aclose`: the runs held between calls are let go.
    Calls of one conversation are taken one at a time; different conversations run side by side.
    A conversation's run is held (leased) by one process at a time: this object lets it go
    `idle_release` seconds after its last call, and a call of a conversation another process
    holds waits for it (up to `hold_wait` seconds), so processes can share conversations.
    """

    def __init__(
        self,
        journal: Journal,
        tools: Sequence[Tool],
        *,
        name: str,
        policy: Policy | None = None,
        version: str = "1",
        budget: Budget | None = None,
        escalate_to: str = "operator",
        source: str = "agent",
        runtime: Runtime | None = None,
        idle_release: float | None = IDLE_RELEASE_SECONDS,
        hold_wait: float | None = None,
    ) -> None:
        self.journal = journal
        self.source = source  # recorded as the "model" of each call's exchange
        self.workflow = Workflow(
            name,
            version,
            STATE,
            [
                AgentState(
                    name=STATE,
                    instructions=f"Tool calls of an agent running in {source}, governed by tether.",
                    tools=tuple(tools),
                    exits={"end": "ended"},
                    budget=budget or OPEN_BUDGET,
                    escalate_to=escalate_to,
                ),
                Terminal("ended"),
            ],
            policy=policy,
        )
        state = self.workflow.states[STATE]
        assert isinstance(state, AgentState)
        self.state = state
        self.runtime = runtime or Runtime(journal)
        self._held: dict[str, RunCursor] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._call_steps: dict[str, dict[str, str]] = {}  # run id -> call id -> step id
        # Held runs are let go `idle_release` seconds after their last call (None: only by
        # `release`/`aclose`); a run another process holds is waited for up to `hold_wait`
        # seconds (default: one lease and a little more, so a crashed holder's lease lapses).
        self.idle_release = idle_release
        self.hold_wait = self.runtime.lease_seconds + 5.0 if hold_wait is None else hold_wait
        self._idle: dict[str, asyncio.TimerHandle] = {}
        self._releasing: set[asyncio.Task[None]] = set()

    async def __aenter__(self) -> GovernedCalls:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def run_id_for(self, conversation: str) -> str:
        return conversation_run_id(self.workflow.name, conversation)

    def tool(self, name: str) -> Tool | None:
        return self.state.tool(name)

    async def call(
        self,
        conversation: str,
        tool: str,
        args: Mapping[str, Any],
        *,
        call_id: str | None = None,
        by: Principal | None = None,
    ) -> CallOutcome:
        """Take one tool call of `conversation` as a governed step (see the module's doc).
        `call_id` is the framework's id for the call; `by` who starts the conversation's run,
        if this call starts it (what `forbid_self_approval` compares approvers with)."""
        run_id = self.run_id_for(conversation)
        if call_id is not None and len(call_id) > MAX_CALL_ID:  # a framework's, maybe a model's
            call_id = "sha256:" + hashlib.sha256(call_id.encode()).hexdigest()
        async with self._locks.setdefault(run_id, asyncio.Lock()):
            held = await self._hold(run_id, by)
            if isinstance(held, CallOutcome):
                return held
            try:
                return await self._take(held, tool, dict(args), call_id)
            finally:
                if held.released or held.record.status != "running":
                    await self._let_go(run_id)
                else:
                    self._release_when_idle(run_id)

    async def end(self, conversation: str, summary: str = "") -> CallOutcome:
        """End the conversation's run (it completes); it takes no calls after this."""
        run_id = self.run_id_for(conversation)
        async with self._locks.setdefault(run_id, asyncio.Lock()):
            held = await self._hold(run_id, None)
            if isinstance(held, CallOutcome):
                return held
            try:
                proposal: dict[str, Any] = {"kind": "exit", "exit": "end", "summary": summary}
                pending = held.checkpoint.pending
                if pending is not None:
                    return await self._refuse_waiting(
                        held,
                        proposal,
                        ReasonCode.APPROVAL_PENDING,
                        _waiting_reason(pending, "end the conversation"),
                        call_id=None,
                        args_hash=value_hash(encode_json({"exit": "end", "update": {}})),
                    )
                step = GovernedStep(held, self.state)
                with step.observed("external"):
                    await step.take_external(proposal, None)
                if held.record.status == "running" and held.record.state != STATE:
                    await self.runtime.finish(held)
                return CallOutcome(outcome=held.record.status, run_id=run_id, step_id=step.step_id)
            finally:
                await self._let_go(run_id)

    async def release(self, conversation: str) -> None:
        """Let go of the conversation's run, if this object holds it (its lease is given back),
        once no call of it is under way: another process may take its next call at once. A
        framework's run over, its adapter releases the conversation; the next call holds it again."""
        run_id = self.run_id_for(conversation)
        async with self._locks.setdefault(run_id, asyncio.Lock()):
            await self._let_go(run_id)

    async def aclose(self) -> None:
        for timer in self._idle.values():
            timer.cancel()
        self._idle.clear()
        if self._releasing:
            await asyncio.gather(*self._releasing, return_exceptions=True)
        for run_id in list(self._held):
            await self._let_go(run_id)

    def _release_when_idle(self, run_id: str) -> None:
        if self.idle_release is None:
            return
        old = self._idle.pop(run_id, None)
        if old is not None:
            old.cancel()
        loop = asyncio.get_running_loop()
        self._idle[run_id] = loop.call_later(self.idle_release, self._start_idle_release, run_id)

    def _start_idle_release(self, run_id: str) -> None:
        self._idle.pop(run_id, None)
        task = asyncio.get_running_loop().create_task(self._idle_release(run_id))
        self._releasing.add(task)
        task.add_done_callback(self._releasing.discard)

    async def _idle_release(self, run_id: str) -> None:
        async with self._locks.setdefault(run_id, asyncio.Lock()):
            if run_id not in self._idle:  # no call since the timer was set
                with contextlib.suppress(JournalError):  # the lease lapses on its own then
                    await self._let_go(run_id)

    # -- holding a conversation's run ---------------------------------------------------------

    async def _hold(self, run_id: str, by: Principal | None) -> RunCursor | CallOutcome:
        held = self._held.get(run_id)
        if held is not None and not held.released and held.record.status == "running":
            return held
        if held is not None:
            await self._let_go(run_id)
        created = False
        try:
            record = await self.journal.get_run(run_id)
        except RunNotFound:
            try:
                await self.runtime.create(
                    self.workflow,
                    None,
                    input={},
                    workflow_ref=f"{SELF_DRIVEN}{self.source}:{self.workflow.name}>",
                    policy_ref=None,
                    model_spec=self.source,
                    queued=True,  # not leased yet: held below like any later call
                    run_id=run_id,
                    by=by,
                )
                created = True
            except JournalError:  # another process started it in the meantime
                await self.journal.get_run(run_id)
        else:
            if record.status in ("completed", "failed", "cancelled", "escalated", "effect_in_doubt"):
                return _stopped(run_id, record.status, record.reason_code, record.message)
        try:
            cursor, doubt = await self._hold_when_free(run_id)
        except RunStateError as exc:
            return _stopped(run_id, "stopped", None, str(exc))
        self._held[run_id] = cursor
        # A run this call just created has no calls yet: nothing to read back.
        self._call_steps[run_id] = {} if created else await recorded_calls(self.journal, run_id)
        if doubt is not None:  # a process died while this effect was under way: settle it first
            step = GovernedStep(cursor, self.state, doubt.step_id)
            with step.observed("recover"):
                await step.recover(doubt)
        return cursor

    async def _hold_when_free(self, run_id: str) -> tuple[RunCursor, Entry | None]:
        """Hold the run, waiting while another process holds it (it lets it go when idle, or
        its lease lapses if it died), up to `hold_wait` seconds."""
        deadline = time.monotonic() + self.hold_wait
        pause = 0.02
        while True:
            try:
                return await self.runtime.hold(run_id, self.workflow)
            except LeaseHeld as held:
                if time.monotonic() + pause > deadline:
                    raise LeaseHeld(
                        f"run {run_id} (this conversation) is held by another process "
                        f"({held.holder}) and was not let go within {self.hold_wait:g} s; "
                        "try the call again",
                        run_id=run_id,
                        holder=held.holder,
                        expires_at=held.expires_at,
                    ) from None
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    async def _let_go(self, run_id: str) -> None:
        timer = self._idle.pop(run_id, None)
        if timer is not None:
            timer.cancel()
        if self._held.pop(run_id, None) is not None:
            await self.runtime.let_go(run_id)
        self._call_steps.pop(run_id, None)

    # -- one call -------------------------------------------------------------------------------

    async def _take(
        self, cursor: RunCursor, tool: str, args: dict[str, Any], call_id: str | None
    ) -> CallOutcome:
        run_id = cursor.run_id
        known = self._call_steps[run_id].get(call_id) if call_id else None
        pending = cursor.checkpoint.pending
        if known is not None and (pending is None or pending.step_id != known):
            seen = cursor.transcript.observation_of(known)
            if seen is not None:  # recorded before: what it came to, never a second run
                return CallOutcome.observed(run_id, seen)
        if cursor.record.status != "running" and pending is None:
            record = cursor.record
            return _stopped(run_id, record.status, record.reason_code, record.message)
        if pending is not None:
            same = known == pending.step_id or (
                known is None
                and pending.proposal.get("kind") == "tool_call"
                and pending.proposal.get("tool") == tool
                and self._hash(tool, args) == self._hash(tool, pending.proposal.get("args") or {})
            )
            if not same:
                return await self._refuse_waiting(
                    cursor,
                    {"kind": "tool_call", "tool": tool, "args": args},
                    ReasonCode.APPROVAL_PENDING,
                    _waiting_reason(pending, f"take {tool}"),
                    call_id=call_id,
                    args_hash=self._hash(tool, args),
                )
            return await self._decided(cursor, tool, args, call_id)
        step = GovernedStep(cursor, self.state)
        with step.observed("external"):
            await step.take_external({"kind": "tool_call", "tool": tool, "args": args}, call_id)
        if call_id:
            self._call_steps[run_id][call_id] = step.step_id
        seen = cursor.transcript.observation_of(step.step_id)
        assert seen is not None  # every path of a step records what it came to
        return CallOutcome.observed(run_id, seen)

    async def _decided(
        self, cursor: RunCursor, tool: str, args: dict[str, Any], call_id: str | None
    ) -> CallOutcome:
        """The call a paused run waits on, presented again: carry out the person's decision."""
        pending = cursor.checkpoint.pending
        assert pending is not None
        ticket = await self.journal.get_ticket(pending.ticket_id)
        if ticket.status == "pending":
            ticket = await self.journal.expire_ticket(ticket.ticket_id)  # by the store's clock
            if ticket.status == "pending":
                return CallOutcome(
                    outcome="awaiting_approval",
                    run_id=cursor.run_id,
                    step_id=pending.step_id,
                    reason_code=ReasonCode.APPROVAL_REQUIRED,
                    reason=f"waiting for {ticket.approver} to decide ticket {ticket.ticket_id}",
                    ticket_id=ticket.ticket_id,
                )
        presented = self._hash(tool, args)
        if ticket.status == "approved" and presented not in (ticket.args_hash, ticket.original_args_hash):
            return await self._refuse_waiting(
                cursor,
                {"kind": "tool_call", "tool": tool, "args": args},
                ReasonCode.APPROVAL_MISMATCH,
                f"ticket {ticket.ticket_id} approved {ticket.subject} with other arguments than "
                "these; nothing was run (present the call as it was approved)",
                call_id=call_id,
                args_hash=presented,
            )
        step = GovernedStep(cursor, self.state, pending.step_id)
        with step.observed("resume_ticket"):
            await step.resume_ticket(ticket, pending)
        seen = cursor.transcript.observation_of(pending.step_id)
        assert seen is not None
        return CallOutcome.observed(cursor.run_id, seen)

    async def _refuse_waiting(
        self,
        cursor: RunCursor,
        proposal: dict[str, Any],
        code: ReasonCode,
        reason: str,
        *,
        call_id: str | None,
        args_hash: str | None,
    ) -> CallOutcome:
        """A call presented while the run waits on its ticket, refused (`approval_pending`: any
        other call, or ending the conversation; `approval_mismatch`: the waiting call with other
        arguments than the approved ones). Nothing runs. The refusal is on the record, a step of
        its own with the presented proposal and arguments' fingerprint, decided by the ticket
        (`approval:TICKET`); the run stays paused on the same ticket and pending step, and the
        call the ticket is for, presented as it was approved, still carries out the decision."""
        pending = cursor.checkpoint.pending
        assert pending is not None
        run_id, ticket_id = cursor.run_id, pending.ticket_id
        # The presented call id is NOT the step's `call_id`: a call id in a step's entry is
        # answered from the record and never taken again (`recorded_calls`). Under the waiting
        # call's id, the legitimate presentation of that call would be answered "refused"
        # instead of carrying out the decision; under another call's id (approval_pending),
        # that call presented again once the ticket is decided (a LangGraph node re-run after
        # its interrupt) would get this refusal instead of being taken. The id is kept in the
        # recorded reason instead (under the hash chain; `tether show --json`), not in a field
        # of its own: the journal's schema is unchanged, and no reader of it can take the id for
        # the step's call id.
        said = reason + (f" (presented as call id {json.dumps(call_id)})" if call_id else "")
        decision = Decision("deny", f"approval:{ticket_id}", code, said)
        step_id = await self._just_refused(cursor, decision, args_hash) if call_id else None
        if step_id is None:
            step = GovernedStep(cursor, self.state)
            with step.observed("external"):
                await step.refuse(proposal, decision, args_hash)
            step_id = step.step_id
        return CallOutcome(
            outcome="refused",
            run_id=run_id,
            step_id=step_id,
            reason_code=code,
            reason=reason,
            ticket_id=ticket_id,
        )

    async def _just_refused(self, cursor: RunCursor, decision: Decision, args_hash: str | None) -> str | None:
        """The step of the run's last entry if it is this very refusal: the same call (by its
        id) presented again as it was, nothing recorded since (the Agents SDK presents a call
        twice, to `needs_approval` and then to the tool; a LangGraph node re-run before the
        ticket is decided presents its other calls again). One attempt, one entry."""
        if args_hash is None:
            return None
        last = await self.journal.read_entries(cursor.run_id, cursor.record.last_seq - 1)
        if not last or last[-1].kind != "refused" or last[-1].step_id is None:
            return None
        body = last[-1].body
        if (
            isinstance(body, b.Refused)
            and not body.continuation
            and body.args_hash == args_hash
            and body.decision == decision  # the ticket, the reason code, the reason with the call id
        ):
            return last[-1].step_id
        return None

    def _hash(self, tool: str, args: Mapping[str, Any]) -> str | None:
        found = self.state.tool(tool)
        if found is None:
            return None
        try:
            return found.validate(dict(args)).hash
        except ArgumentError:
            return None


def conversation_run_id(name: str, conversation: str) -> str:
    """The id of the run that takes the tool calls of `conversation` for workflow `name`."""
    digest = hashlib.sha256(f"{name}\x00{conversation}".encode()).hexdigest()
    return f"run_{digest[:20]}"


async def recorded_calls(journal: Journal, run_id: str) -> dict[str, str]:
    """Call id -> step id, for every call a conversation's run has taken: from its entries
    (`call_id`), and from its exchanges, where runs recorded by earlier versions of tether
    kept them."""
    found: dict[str, str] = {}
    for x in await journal.read_exchanges(run_id):
        if isinstance(x.request, dict) and x.request.get("call_id") and x.step_id:
            found[str(x.request["call_id"])] = x.step_id
    for entry in await journal.read_entries(run_id):
        if entry.step_id and '"call_id":' in entry.body_json:  # skips decoding the others
            body = entry.body
            if isinstance(body, b.StepRecord) and body.call_id:
                found[body.call_id] = entry.step_id
    return found


def _stopped(run_id: str, status: str, code: str | None, message: str | None) -> CallOutcome:
    return CallOutcome(
        outcome="effect_in_doubt" if status == "effect_in_doubt" else "stopped",
        run_id=run_id,
        reason_code=code or status,
        reason=f"the conversation's run is {status}" + (f": {message}" if message else ""),
    )


def _waiting_reason(pending: Pending, doing: str) -> str:
    what = pending.proposal.get("tool") or pending.proposal.get("exit")
    return (
        f"cannot {doing}: the conversation waits on ticket {pending.ticket_id} ({what}); a "
        "person decides it (tether approve / tether deny), then present that call again"
    )
