"""The runtime: starts, drives, pauses, resumes and recovers runs.

    drive:  terminal? -> finish | deterministic step -> record + move
            | agent state -> one governed step (tether.step) -> again

A paused run holds no memory or process: `resume` rebuilds it from the journal (the
checkpoint, the current visit's entries), first settling any effect left in doubt by a
crash, then any ticket a person decided. What happens to a proposal is the governed
step's business; the runtime only moves the run from step to step and holds its lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from tether import handoffs
from tether.audit import Auditor
from tether.compensation import Rollback
from tether.errors import EditRefused, InputError, JournalError, RunStateError, TicketError
from tether.hashing import encode_json
from tether.identity import Principal, authorize
from tether.journal import (
    FINISHED,
    Commit,
    Definition,
    Entry,
    Journal,
    LeaseHeld,
    NewEntry,
    RunRecord,
    RunUpdate,
    Ticket,
    integrity,
)
from tether.journal import bodies as b
from tether.journal.common import SELF_DRIVEN
from tether.models.protocol import Model
from tether.observe import NO_OBSERVER, NO_SPAN, ObservedSpan, Observer
from tether.policy import Policy
from tether.proposals import Proposal, ToolCall, json_value_problem
from tether.reasons import ReasonCode
from tether.run import Checkpoint, RunCursor, new_checkpoint
from tether.sensitive import Redactor
from tether.step import GovernedStep, Refusal
from tether.workflow import AgentState, Next, Step, Terminal, Workflow

log = logging.getLogger("tether.runtime")
# A run whose driving raises an unexpected error (a bug, a value that breaks a library) is
# retried after a growing pause, then failed for good: never re-claimed in a tight loop.
MAX_CRASHES = 3
CRASH_BACKOFF_SECONDS = 5.0
# A drive nothing observes: one context for all (each run waiting on its model is inside one).
_NOT_OBSERVED = contextlib.nullcontext(NO_SPAN)


@dataclass(frozen=True)
class RunResult:
    """Where a run stands after `start` or `resume` returns."""

    run_id: str
    status: str
    state: str
    data: dict[str, Any]
    reason_code: str | None = None
    message: str | None = None
    owner: str | None = None
    ticket_id: str | None = None
    # What the ticket a paused run waits on asks for: "approval" or "question".
    ticket_kind: str | None = None

    @classmethod
    def of(cls, record: RunRecord) -> RunResult:
        pending = record.checkpoint.get("pending") or {}
        paused = record.status == "paused" and pending.get("ticket_id") is not None
        asked = (pending.get("proposal") or {}).get("kind") == "question"
        return cls(
            run_id=record.run_id,
            status=record.status,
            state=record.state,
            data=record.data,
            reason_code=record.reason_code,
            message=record.message,
            owner=record.owner,
            ticket_id=pending.get("ticket_id") if record.status == "paused" else None,
            ticket_kind=("question" if asked else "approval") if paused else None,
        )


class Runtime:
    """Drives runs of any workflow against one journal. Many may live in one process.

    While it drives a run it holds the run's lease (as `worker_id`), renews it every third
    of `lease_seconds`, and releases it when the run stops; every commit is fenced by the
    lease, so a process that lost it can no longer write. `stopping = True` drains: each
    run stops between two steps, keeping everything it committed, for another to resume.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        clock: Callable[[], float] = time.time,
        worker_id: str | None = None,
        lease_seconds: float = 30.0,
        record_exchanges: bool = True,
        on_commit: Callable[[list[Entry]], None] | None = None,
        crash_backoff_seconds: float = CRASH_BACKOFF_SECONDS,
        auditor: Auditor | None = None,
        observer: Observer | None = None,
    ) -> None:
        self.journal = journal
        # Signs a checkpoint of each run's head whenever the run stops (tether.audit): given,
        # or the journal's (`open_journal` reads $TETHER_AUDIT_KEY and $TETHER_AUDIT_WITNESS).
        self.auditor: Auditor | None = auditor if auditor is not None else getattr(journal, "auditor", None)
        # Told of each run driven, step, model and tool call as spans (tether.observe; the
        # OpenTelemetry one is tether.otel). None: nothing is observed.
        self.observer: Observer = observer or NO_OBSERVER
        # After an unexpected error a run waits this long (doubling per crash) before a retry.
        self.crash_backoff_seconds = crash_backoff_seconds
        # Model calls (prompts, raw responses, attempts) are kept apart from the entries.
        self.record_exchanges = record_exchanges
        # Called with the entries of every commit of the runs it drives, once they are durable.
        self.on_commit = on_commit
        self.clock = clock
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease_seconds = lease_seconds
        self.stopping = False
        self._driving: dict[str, RunCursor] = {}
        self._heartbeat: asyncio.Task[None] | None = None
        # Workflow and policy hashes whose definitions this runtime has kept (tether.replay).
        self._defined: set[str] = set()
        # Runs left leased after a crash until their backoff ends (never released early).
        self._quarantined: set[str] = set()
        # The cursor of each run being driven, until its lease is given back.
        self._cursors: dict[str, RunCursor] = {}

    # -- lifecycle -------------------------------------------------------------------

    async def start(
        self,
        workflow: Workflow,
        model: Model | None = None,
        *,
        input: dict[str, Any] | None = None,
        workflow_ref: str = "",
        policy_ref: str | None = None,
        model_spec: str | None = None,
        by: Principal | None = None,
    ) -> RunResult:
        """Start a run pinned to this workflow's and policy's hashes; drive it until it stops.

        `workflow_ref` and `policy_ref` (a policy file overriding the workflow's) are what
        `tether resume` and workers load the definition from in another process. `by` is
        the principal starting it (what `forbid_self_approval` compares approvers with).
        """
        record = await self.create(
            workflow,
            model,
            input=input,
            workflow_ref=workflow_ref,
            policy_ref=policy_ref,
            model_spec=model_spec,
            queued=False,
            by=by,
        )
        try:
            with self._observed(record, workflow, "start") as span:
                result = self._ended(span, await self._drive(self._cursor(record, workflow), model))
        finally:
            await self._release(record.run_id)
        await self._checkpoint(result)
        return result

    async def submit(
        self,
        workflow: Workflow,
        *,
        input: dict[str, Any] | None = None,
        workflow_ref: str,
        policy_ref: str | None = None,
        model_spec: str | None = None,
        run_id: str | None = None,
        by: Principal | None = None,
    ) -> RunResult:
        """Enqueue a run for a worker to drive (`tether submit`); nothing runs here.

        `run_id` names the run (an API's idempotent start); a run of that id already
        recorded is refused (JournalError)."""
        record = await self.create(
            workflow,
            None,
            input=input,
            workflow_ref=workflow_ref,
            policy_ref=policy_ref,
            model_spec=model_spec,
            queued=True,
            run_id=run_id,
            by=by,
        )
        return RunResult.of(record)

    async def create(
        self,
        workflow: Workflow,
        model: Model | None,
        *,
        input: dict[str, Any] | None,
        workflow_ref: str,
        policy_ref: str | None,
        model_spec: str | None,
        queued: bool,
        run_id: str | None = None,
        by: Principal | None = None,
    ) -> RunRecord:
        """Record a new run: queued for a worker, or leased to this runtime to drive now.
        `by` is who starts it (recorded in `run_started` and the run's `started_by`)."""
        policy = workflow.policy or Policy.default()
        needs_model = [s.name for s in workflow.states.values() if isinstance(s, AgentState)]
        if model is None and not (queued and model_spec) and needs_model:
            raise RunStateError(
                f"workflow {workflow.name!r} has agent state(s) {', '.join(needs_model)}: "
                "give a model to propose their steps (e.g. --model script:FILE.json)"
            )
        data = _checked_input(input, workflow)
        Redactor.for_workflow(workflow)  # sensitive fields and no key: refused before anything is written
        now = self.clock()
        # Built from checked values, so not validated again; no field marked as set (a run
        # waiting holds this record: pydantic's set of 21 names would cost it 2 KB).
        record = RunRecord.model_construct(
            set(),
            run_id=run_id or "run_" + secrets.token_hex(6),
            workflow_name=workflow.name,
            workflow_version=workflow.version,
            workflow_hash=workflow.hash,
            workflow_ref=workflow_ref or f"<python:{workflow.name}>",
            policy_hash=policy.hash,
            policy_ref=policy_ref,
            model_spec=model_spec or (model.name if model else None),
            state=workflow.start,
            input=data,
            data=dict(data),
            checkpoint=msgspec.to_builtins(new_checkpoint(workflow.start)),
            created_at=now,
            updated_at=now,
            status="queued" if queued else "running",
            lease_owner=None if queued else self.worker_id,
            lease_expires_at=None if queued else now + self.lease_seconds,
            started_by=by.principal_id if by is not None else None,
        )
        started = b.RunStarted(
            workflow=b.WorkflowRef(
                workflow.name, workflow.version, workflow.hash, record.workflow_ref, workflow.skills()
            ),
            policy_hash=policy.hash,
            input=data,
            model=record.model_spec,
            started_by=by,
        )
        await self.keep_definitions(workflow, policy)
        written = await self.journal.create_run(
            record,
            [NewEntry.of(started, state=workflow.start)],
            lease_seconds=None if queued else self.lease_seconds,  # on the store's clock
        )
        # The record as stored, without reading it back or copying it (a run waiting holds it).
        record.last_seq, record.last_hash = written[-1].seq, written[-1].hash
        return record

    async def resume(
        self,
        run_id: str,
        workflow: Workflow,
        model: Model | None = None,
        *,
        claimed: RunRecord | None = None,
    ) -> RunResult:
        """Continue a queued, paused or interrupted run from its last committed step.

        Takes the run's lease first: a run another live process is driving is refused
        (`LeaseHeld`), so resuming can never race the process that is still working on it.
        A lease left by a crashed process of this machine is taken over at once. A worker
        passes the record its claim returned (`claimed`), already leased to it. The lease
        is given back however this returns, paused again included.
        """
        if claimed is not None and claimed.run_id == run_id and claimed.lease_owner == self.worker_id:
            record = claimed
        else:
            record = await self._acquire(run_id)
        try:
            with self._observed(record, workflow, "resume") as span:
                result = self._ended(span, await self._resume(record, workflow, model))
        finally:
            await self._release(run_id)
        await self._checkpoint(result)
        return result

    async def _check(self, record: RunRecord, doing: str, *, whole: bool = False) -> list[Entry]:
        """Before acting on a run: its rows agree with its chain (tether.journal.integrity),
        and with a key, its chain still holds the head it was last signed at (tether.audit).
        Returns the entries checked: from the current visit's opening on, or (`whole`, for
        what acts on every entry) all of them."""
        entries = await integrity.check_run(self.journal, record, doing=doing, whole=whole)
        if self.auditor is not None:
            await self.auditor.check_anchor(self.journal, record.run_id, doing=doing)
        return entries

    async def _checkpoint(self, result: RunResult) -> None:
        """Sign the run's head when it stopped (paused, finished, escalated, handed off)."""
        if self.auditor is not None and result.status not in ("running", "queued"):
            await self.auditor.checkpoint_run(self.journal, result.run_id)

    async def _release(self, run_id: str) -> None:
        """Give the run's lease back, unless its last commit did (or a crash keeps it)."""
        cursor = self._cursors.pop(run_id, None)
        if run_id in self._quarantined:
            self._quarantined.discard(run_id)
        elif cursor is None or not cursor.released:
            await self.journal.release(run_id, self.worker_id)

    async def _acquire(self, run_id: str) -> RunRecord:
        try:
            return await self.journal.acquire(run_id, self.worker_id, lease_seconds=self.lease_seconds)
        except LeaseHeld as held:
            if not _dead_local_process(held.holder):
                raise
            holder = str(held.holder)
        # The holder was a process on this machine that no longer exists (it crashed): its
        # lease cannot be renewed, so waiting for it to expire would only delay recovery.
        await self.journal.release(run_id, holder)
        return await self.journal.acquire(run_id, self.worker_id, lease_seconds=self.lease_seconds)

    async def _resume(self, record: RunRecord, workflow: Workflow, model: Model | None) -> RunResult:
        # The row is a cache of the chain: what it says is checked before anything is acted on
        # (every entry, when the policy reads the run's whole history or provenance).
        checked = await self._check(record, f"resume run {record.run_id}", whole=_reads_all(workflow))
        _check_resumable(record, workflow)
        cursor = self._cursor(record, workflow)
        if record.status == "queued":
            cursor.record.status = "running"
        visit = await cursor.load(checked)
        state = workflow.states[record.state]
        doubt = _intent_without_result(visit)
        if doubt is not None and isinstance(state, AgentState):
            step = GovernedStep(cursor, state, doubt.step_id)
            with step.observed("recover"):
                await step.recover(doubt)
        elif record.status == "paused" and isinstance(state, AgentState):
            pending = cursor.checkpoint.pending
            if pending is None:
                raise RunStateError(f"run {record.run_id} is paused but its checkpoint names no ticket")
            ticket = await self.journal.get_ticket(pending.ticket_id)
            if ticket.status == "pending":
                ticket = await self.journal.expire_ticket(ticket.ticket_id)
                if ticket.status == "pending":  # not expired by the store's clock: still waiting
                    return RunResult.of(cursor.record)
            step = GovernedStep(cursor, state, pending.step_id)
            with step.observed("resume_ticket"):
                await step.resume_ticket(ticket, pending)
        return await self._drive(cursor, model)

    async def pick_up(
        self, run_id: str, workflow: Workflow, *, by: str, model: Model | None = None
    ) -> tuple[RunResult, list[b.FactCheck]]:
        """A person picks up a handed-off run: every value the handoff relied on is read
        again first (tether.handoffs). Unchanged, the run stays handed off, now owned by
        `by`. Changed, the handoff is turned back to the state that made it, with the
        differences (returned second): its model is told what changed, and with `model` the
        run is driven on from there, as `resume` would."""
        record = await self._acquire(run_id)
        try:
            # Reading the relied-on values again reads the run's results: the whole chain.
            await self._check(record, f"pick up run {run_id}", whole=True)
            if record.status != "handed_off":
                raise RunStateError(f"run {run_id} is {record.status}, not handed off: nothing to pick up")
            _check_pinned(record, workflow)
            cursor = self._cursor(record, workflow)
            visit = await cursor.load()
            state = workflow.states[record.state]
            entry = next((e for e in reversed(visit) if e.kind == "handoff"), None)
            handed = entry.body if entry is not None else None
            if entry is None or not isinstance(state, AgentState) or not isinstance(handed, b.HandedOff):
                raise RunStateError(f"run {run_id} is handed off, but no handoff is recorded in its state")
            step = GovernedStep(cursor, state, entry.step_id)
            differences = await handoffs.pick_up(step, handed.handoff, by)
            if differences and model is not None:
                result = await self._drive(cursor, model)
            else:
                result = RunResult.of(cursor.record)
        finally:
            await self._release(run_id)
        await self._checkpoint(result)
        return result, differences

    async def decide(
        self,
        ticket_id: str,
        *,
        approve: bool,
        by: Principal,
        reason: str = "",
        answer: str | None = None,
        edited_args: dict[str, Any] | None = None,
        workflow: Workflow | None = None,
    ) -> Ticket:
        """A person decides a ticket: the one entry point the CLI, the API and the web use.

        `by` must be allowed to (`tether.identity.authorize`: an approver for the ticket's
        approver role and the run's workflow, or an admin). A question is answered (`answer`)
        or declined (`approve=False`); an approval is approved or denied, never answered.
        `edited_args` (edit-and-approve) go through scope, schema and policy again, with
        `workflow` (the run's, as pinned) and this run's facts; refused, nothing changes and
        `EditRefused` says why. The store then records the decision atomically, enforcing
        the rule's `forbid_self_approval` and `approvals: N` (journal/store.py). A run that
        is not driven by this runtime continues at its next `resume` (or a worker's claim).
        """
        ticket = await self.journal.get_ticket(ticket_id)
        record = await self.journal.get_run(ticket.run_id)
        authorize(by, "answer" if ticket.kind == "question" else "decide", ticket=ticket, run=record)
        if ticket.kind == "question" and approve and answer is None:
            raise TicketError(
                f"ticket {ticket_id} is a question ({ticket.question!r}), not an approval: "
                f"answer it (tether answer {ticket_id} TEXT), or decline it (tether deny)"
            )
        if ticket.kind == "approval" and answer is not None:
            raise TicketError(f"ticket {ticket_id} is an approval, not a question: approve or deny it")
        edited = None
        if edited_args is not None:
            if not approve or ticket.kind != "approval":
                raise TicketError(
                    f"only an approval's arguments can be edited, by approving it ({ticket_id})"
                )
            if workflow is None and record.workflow_ref.startswith(SELF_DRIVEN):
                # Its tools (their schemas, the policy's resolvers) exist only in the process
                # that built the workflow in code; that process passes it, no other can.
                raise EditRefused(
                    f"the arguments of {ticket_id} cannot be edited here: run {record.run_id}'s tools "
                    f"live in the process that drives it ({record.workflow_ref}), which alone can "
                    "check them. Approve the call as it is, or deny it with a reason saying what to "
                    "change: the agent is told, and may propose the call again",
                    reason_code=ReasonCode.NOT_DRIVABLE,
                )
            if workflow is None:
                raise RunStateError(f"checking the edited arguments of {ticket_id} needs the run's workflow")
            edited = await self._checked_edit(record, workflow, ticket, edited_args, by)
        return await self.journal.decide_ticket(
            ticket_id, approve=approve, by=by, reason=reason, answer=answer, edited=edited
        )

    async def _checked_edit(
        self, record: RunRecord, workflow: Workflow, ticket: Ticket, edited: dict[str, Any], by: Principal
    ) -> tuple[dict[str, Any], str]:
        """Edited arguments as the run would check a proposal of them: the tool still in scope,
        the arguments valid for its schema, and the policy (with this run's facts) allowing
        them, or asking the same approval as the ticket's (never a wider one). Returns the
        validated arguments and their hash."""
        _check_pinned(record, workflow)
        state = workflow.states.get(record.state)
        cursor = RunCursor(
            record, workflow, workflow.policy or Policy.default(), self.journal, clock=self.clock
        )
        pending = cursor.checkpoint.pending
        if record.status != "paused" or pending is None or pending.ticket_id != ticket.ticket_id:
            raise RunStateError(f"run {record.run_id} is not waiting on ticket {ticket.ticket_id}")
        proposal = msgspec.convert(pending.proposal, Proposal)
        if not isinstance(proposal, ToolCall) or not isinstance(state, AgentState):
            raise TicketError(
                f"ticket {ticket.ticket_id} approves an exit, not a tool call: it cannot be edited"
            )
        await cursor.load()  # history and provenance, if the policy reads them
        step = GovernedStep(cursor, state, pending.step_id)
        try:
            tool = step.scope(proposal.tool)
            # A sensitive argument left as shown (its fingerprint) keeps the value it stands for.
            args = step.arguments(tool, step._unsealed(edited))
            decision = await step.policy(tool, args)
        except Refusal as refusal:
            d = refusal.decision
            raise EditRefused(
                f"edited arguments refused ({d.rule_id}, {d.reason_code}): {d.reason or d.reason_code}; "
                f"ticket {ticket.ticket_id} is still pending",
                reason_code=d.reason_code,
            ) from None
        wider = decision.decision == "defer" or (
            decision.decision == "ask"
            and (
                (decision.approver or state.escalate_to) != ticket.approver
                or (decision.approvals or 1) > ticket.approvals_required
                or (decision.forbid_self_approval and not ticket.forbid_self_approval)
            )
        )
        if wider:
            raise EditRefused(
                f"the edited call needs another decision than this ticket's (rule {decision.rule_id}: "
                f"{decision.decision}{f' by {decision.approver}' if decision.approver else ''}): deny "
                f"ticket {ticket.ticket_id} with a reason instead, for the model to propose it",
                reason_code=str(decision.reason_code),
            )
        if args.hash == ticket.args_hash:
            raise TicketError(
                f"the edited arguments are those of ticket {ticket.ticket_id}: approve it as is"
            )
        red = cursor.redactor  # recorded with fingerprints, like the call it replaces
        return (red.args(tool.name, args.values) if red is not None else args.values), args.hash

    async def resolve(self, run_id: str, *, done: bool, by: str, note: str = "") -> RunResult:
        """A person settles an effect in doubt; the run can then be resumed."""
        record = await self.journal.get_run(run_id)
        await self._check(record, f"settle run {run_id}")
        if record.status != "effect_in_doubt":
            raise RunStateError(f"run {run_id} is {record.status}, not effect_in_doubt")
        started = int(record.checkpoint.get("visit", {}).get("started_seq", 0))
        doubt = (await self.journal.read_entries(run_id, started, kinds=("effect_in_doubt",)))[-1]
        in_doubt = doubt.body
        assert isinstance(in_doubt, b.EffectInDoubt)
        settled = b.EffectSettled(
            tool=in_doubt.tool,
            args=in_doubt.args,
            done=done,
            by=by,
            note=note,
            continuation=in_doubt.continuation,  # an approved call's proposal is in the transcript
        )
        entry = NewEntry.of(settled, step_id=doubt.step_id, state=doubt.state)
        return await self._record(
            record, entry, RunUpdate(status="running", owner=None, reason_code=None, message=None)
        )

    async def migrate(
        self, run_id: str, workflow: Workflow, *, by: str, workflow_ref: str, policy_ref: str | None = None
    ) -> RunResult:
        """Move an unfinished run to another version of its workflow, explicitly and on the record.

        The run keeps its data, facts, history and any pending ticket; its current state must
        exist in the new version, and a pending proposal's tool or exit must still be offered
        there. The move is an entry in the run's journal; the next step runs on the new version.
        """
        record = await self.journal.get_run(run_id)
        await self._check(record, f"migrate run {run_id}")
        if record.status in FINISHED:
            raise RunStateError(f"run {run_id} is {record.status}; only unfinished runs can be migrated")
        if workflow.name != record.workflow_name:
            raise RunStateError(
                f"run {run_id} belongs to workflow {record.workflow_name!r}, not {workflow.name!r}"
            )
        _check_compatible(record, workflow)
        policy = workflow.policy or Policy.default()
        moved = b.Migrated(
            from_=b.Version(
                record.workflow_version, record.workflow_hash, record.policy_hash, record.workflow_ref
            ),
            to=b.Version(workflow.version, workflow.hash, policy.hash, workflow_ref),
            by=by,
        )
        await self.keep_definitions(workflow, policy)
        update = RunUpdate(
            workflow_version=workflow.version,
            workflow_hash=workflow.hash,
            workflow_ref=workflow_ref,
            policy_hash=policy.hash,
            policy_ref=policy_ref,
        )
        return await self._record(record, NewEntry.of(moved, state=record.state), update)

    async def keep_definitions(self, workflow: Workflow, policy: Policy) -> None:
        """Keep the workflow's description and the policy document by hash, before a run is
        pinned to them, so that `tether replay` can re-evaluate its decisions under the very
        text they were made under (once per hash per runtime: describing reads sources)."""
        kept = []
        if workflow.hash not in self._defined:
            described = Definition.of("workflow", workflow.describe())
            # A source file edited since the workflow was loaded describes another workflow.
            if described.hash == workflow.hash:
                kept.append(described)
        if policy.hash not in self._defined:
            kept.append(Definition.of("policy", policy.document.hashed()))
        if kept:
            await self.journal.put_definitions(kept)
        self._defined |= {workflow.hash, policy.hash}

    async def _record(self, record: RunRecord, entry: NewEntry, update: RunUpdate) -> RunResult:
        """A person's act on a run nobody is driving (resolve, migrate): one synced commit."""
        await self.journal.commit(
            Commit(
                run_id=record.run_id,
                expected_seq=record.last_seq,
                expected_hash=record.last_hash,
                entries=[entry],
                update=update,
                durable=True,
            )
        )
        result = RunResult.of(await self.journal.get_run(record.run_id))
        await self._checkpoint(result)
        return result

    # -- driving ---------------------------------------------------------------------

    def _observed(
        self, record: RunRecord, workflow: Workflow, how: str
    ) -> contextlib.AbstractContextManager[ObservedSpan]:
        """One drive of a run (a start, a resume) as the observer's `run` span."""
        if self.observer is NO_OBSERVER:
            return _NOT_OBSERVED
        attributes = {
            "gen_ai.operation.name": "invoke_workflow",
            "tether.run_id": record.run_id,
            "tether.workflow": workflow.name,
            "tether.workflow_version": workflow.version,
            "tether.policy_hash": record.policy_hash,
            "tether.drive": how,
        }
        return self.observer.span("run", f"invoke_workflow {workflow.name}", attributes)

    @staticmethod
    def _ended(span: ObservedSpan, result: RunResult) -> RunResult:
        span.set({"tether.status": result.status, "tether.reason_code": result.reason_code})
        return result

    def _cursor(self, record: RunRecord, workflow: Workflow) -> RunCursor:
        cursor = RunCursor(
            record,
            workflow,
            workflow.policy or Policy.default(),
            self.journal,
            clock=self.clock,
            lease=(self.worker_id, self.lease_seconds),
            on_commit=self.on_commit,
        )
        cursor.observer = self.observer
        self._cursors[record.run_id] = cursor
        return cursor

    async def _drive(self, cursor: RunCursor, model: Model | None) -> RunResult:
        """Drive until the run stops or the runtime drains; the caller releases the lease."""
        self._driving[cursor.run_id] = cursor
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._renew_leases())
        crash: Exception | None = None
        try:
            await self._steps(cursor, model)
        except (JournalError, RunStateError):
            raise  # the store's trouble or the caller's, not the run's: nothing to record
        except Exception as exc:
            crash = exc
        finally:
            del self._driving[cursor.run_id]
        if crash is not None:
            return await self._crashed(cursor.run_id, crash)
        state = cursor.workflow.states.get(cursor.record.state)
        if (
            cursor.record.status == "failed"
            and isinstance(state, AgentState)
            and state.on_failure == "rollback"
        ):
            return await self._roll_back(cursor)
        return RunResult.of(cursor.record)

    async def _roll_back(self, failed: RunCursor) -> RunResult:
        """A state's `on_failure: rollback`: the run failed there, so the compensations of its
        effects run (tether.compensation), under its lease taken again (the failing commit
        gave it back). The run stays failed; its message says what was undone."""
        record = await self.journal.acquire(failed.run_id, self.worker_id, lease_seconds=self.lease_seconds)
        cursor = self._cursor(record, failed.workflow)
        await cursor.load()
        entries = await self.journal.read_entries(record.run_id)
        why = f"on_failure: rollback ({record.reason_code}: {record.message})"
        await Rollback(cursor).run(
            entries, final=RunUpdate(status="failed", message=record.message), reason=why
        )
        return RunResult.of(await self.journal.get_run(record.run_id))

    async def _renew_leases(self) -> None:
        """One task per runtime renews the leases of every run it is driving: one statement.
        A renewal that fails is tried again at the next interval (a lease outlives two): were
        this task to end, every lease would lapse and other workers would redo the runs."""
        while self._driving:
            await asyncio.sleep(self.lease_seconds / 3)
            if not self._driving:  # all let go while it slept: the journal may be closed by now
                break
            with contextlib.suppress(JournalError):
                await self.journal.renew_leases(self.worker_id, lease_seconds=self.lease_seconds)

    async def _steps(self, cursor: RunCursor, model: Model | None) -> None:
        while cursor.record.status == "running" and not self.stopping:
            state = cursor.workflow.states[cursor.record.state]
            if isinstance(state, Terminal):
                status: Literal["completed", "failed"] = "failed" if state.failed else "completed"
                finished = b.RunFinished(status=status, data=cursor.record.data)
                await cursor.commit([NewEntry.of(finished, state=state.name)], status=status)
            elif isinstance(state, Step):
                await self._deterministic(cursor, state)
            else:
                if model is None:
                    raise RunStateError(f"state {state.name!r} needs a model to propose steps")
                step = GovernedStep(cursor, state)
                with step.observed("turn"):
                    await step.turn(model, self.record_exchanges)

    async def _deterministic(self, cursor: RunCursor, state: Step) -> None:
        step_id = cursor.new_step_id()
        try:
            result = state.fn(dict(cursor.record.data))
            nxt = await result if inspect.isawaitable(result) else result
            _check_next(nxt, state)
        except Exception as exc:  # the step's own failure fails the run, recorded
            message = f"{type(exc).__name__}: {exc}"
            await cursor.commit(
                [NewEntry.of(b.StepFailed(error=message), step_id=step_id, state=state.name)],
                status="failed",
                reason_code=ReasonCode.STEP_FAILED,
                message=message,
            )
            return
        facts = {**cursor.record.facts, **nxt.facts} if nxt.facts else None
        carried = None
        if nxt.history or nxt.history_cut:
            carried = b.CarriedHistory(list(nxt.history), list(nxt.history_runs), nxt.history_cut)
        done = b.StepDone(
            next=nxt.to, update=nxt.update, facts=nxt.facts, carried=cursor.carried(facts), history=carried
        )
        cursor.enter(nxt.to, entries_in_commit=1)
        await cursor.commit(
            [NewEntry.of(done, step_id=step_id, state=state.name)],
            data={**cursor.record.data, **nxt.update} if nxt.update else None,
            facts=facts,
            buffer=not state.checkpoint,
        )
        cursor.observe(done, step_id)  # the calls it carried into `history`, if any

    async def _crashed(self, run_id: str, exc: Exception) -> RunResult:
        """Driving the run raised something no stage expected: record it from the last
        commit (what was in memory may be half a step), pause the run behind its lease for
        a growing backoff, and fail it for good after MAX_CRASHES."""
        log.error("run %s: driving it raised", run_id, exc_info=exc)
        record = await self.journal.get_run(run_id)
        checkpoint = msgspec.convert(record.checkpoint, Checkpoint)
        checkpoint.crashes += 1
        error = f"{type(exc).__name__}: {str(exc)[:500]}"
        final = checkpoint.crashes >= MAX_CRASHES
        backoff = self.crash_backoff_seconds * 2 ** (checkpoint.crashes - 1)
        crashed = b.Crashed(error=error, crashes=checkpoint.crashes, retry_in=None if final else backoff)
        message = (
            f"driving this run raised {error} {checkpoint.crashes} times; it is failed"
            if final
            else f"driving this run raised {error} ({checkpoint.crashes} of {MAX_CRASHES}); "
            f"retried after {backoff:g} s"
        )
        update = RunUpdate(checkpoint=msgspec.to_builtins(checkpoint), message=message)
        if final:
            update = msgspec.structs.replace(update, status="failed", reason_code=ReasonCode.RUNTIME_ERROR)
        await self.journal.commit(
            Commit(
                run_id=run_id,
                expected_seq=record.last_seq,
                expected_hash=record.last_hash,
                entries=[NewEntry.of(crashed, state=record.state)],
                update=update,
                # The lease is kept (not renewed) until the backoff ends: no worker claims it before.
                lease_owner=self.worker_id,
                lease_seconds=backoff,
            )
        )
        if not final:
            self._quarantined.add(run_id)
        return RunResult.of(await self.journal.get_run(run_id))

    # -- runs whose proposals come from outside (tether.external) -------------------------------

    async def hold(
        self, run_id: str, workflow: Workflow, *, claimed: RunRecord | None = None
    ) -> tuple[RunCursor, Entry | None]:
        """Lease and load a run to take proposals made outside tether (an agent framework's
        tool calls; tether.external): checked like a resume, its lease renewed with the runs
        this runtime drives until `let_go`. Also returns the visit's intent without a result,
        if a process died while that effect was under way."""
        record = claimed if claimed is not None else await self._acquire(run_id)
        try:
            checked = await self._check(record, f"take a call on run {run_id}", whole=_reads_all(workflow))
            _check_resumable(record, workflow)
            cursor = self._cursor(record, workflow)
            if record.status == "queued":
                cursor.record.status = "running"
            doubt = _intent_without_result(await cursor.load(checked))
        except BaseException:
            await self._release(run_id)
            raise
        self._driving[run_id] = cursor
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._renew_leases())
        return cursor, doubt

    async def finish(self, cursor: RunCursor) -> RunResult:
        """Drive a held run that left its agent state on to where it stops (its deterministic
        steps, its end); it needs no model."""
        return await self._drive(cursor, None)

    async def let_go(self, run_id: str) -> None:
        """Stop holding a run taken with `hold`: its lease is given back (unless a step that
        stopped it already did) and, with an auditor, its head is signed if it stopped."""
        cursor = self._driving.pop(run_id, None)
        await self._release(run_id)
        if cursor is not None:
            await self._checkpoint(RunResult.of(cursor.record))


def _checked_input(input: dict[str, Any] | None, workflow: Workflow) -> dict[str, Any]:
    """A run's input: a JSON object within the workflow's limits, or an InputError."""
    data = dict(input or {})
    problem = json_value_problem(data, workflow.limits.input())
    if problem is None:
        size = len(encode_json(data))
        if size > workflow.limits.max_input_bytes:
            problem = f"{size:,} bytes as JSON exceeds the limit of {workflow.limits.max_input_bytes:,}"
    if problem is not None:
        raise InputError(f"the run's input is refused: {problem.replace('output', 'input')}")
    return data


def _check_next(nxt: Any, state: Step) -> None:
    if not isinstance(nxt, Next):
        raise TypeError(f"step function returned {type(nxt).__name__}, expected tether.Next")
    if nxt.to not in state.next:
        raise ValueError(f"step went to {nxt.to!r}; declared next states: {', '.join(state.next)}")
    for name, value in (("update", nxt.update), ("facts", nxt.facts)):
        problem = json_value_problem(value)
        if problem is not None:
            raise ValueError(f"step's {name} is not recordable: {problem.replace('output', name)}")
    # Carried calls are read from entries (recordable already; a result nested near the depth
    # limit is deeper still inside the list), so only their shape is checked here.
    calls_ok = all(isinstance(c, dict) for c in nxt.history)
    if not calls_ok or len(nxt.history_runs) != len(nxt.history) or nxt.history_cut < 0:
        raise ValueError(
            "step's history: give each carried call as a mapping, the run of each, and a cut of 0 or more"
        )


def _reads_all(workflow: Workflow) -> bool:
    """Whether driving the run reads every entry it has (the policy reads `history` or
    traces provenance): then the check before acting reads and checks every one too."""
    policy = workflow.policy or Policy.default()
    return policy.uses("history") or policy.uses_provenance


def _check_resumable(record: RunRecord, workflow: Workflow) -> None:
    run_id = record.run_id
    if record.status == "handed_off":
        raise RunStateError(
            f"run {run_id} is handed off to {record.owner}; its owner picks it up, which reads the "
            f"values it relied on again first: tether pickup {run_id}"
        )
    if record.status in FINISHED:
        raise RunStateError(f"run {run_id} is {record.status}; there is nothing to resume")
    if record.status == "effect_in_doubt":
        raise RunStateError(
            f"run {run_id} has an effect in doubt ({record.message}); a person must say "
            f"whether it happened: tether resolve {run_id} --done | --not-done"
        )
    _check_pinned(record, workflow)


def _check_pinned(record: RunRecord, workflow: Workflow) -> None:
    """The definition and policy given are those the run is pinned to."""
    run_id = record.run_id
    if workflow.hash != record.workflow_hash:
        raise RunStateError(
            f"run {run_id} is pinned to {record.workflow_name} {record.workflow_version} "
            f"({record.workflow_hash[:19]}…), but the definition given hashes to "
            f"{workflow.hash[:19]}… (version {workflow.version}); load the version the run "
            "started on"
        )
    policy = workflow.policy or Policy.default()
    if policy.hash != record.policy_hash:
        raise RunStateError(
            f"run {run_id} is pinned to policy {record.policy_hash[:19]}…, but the policy given "
            f"({policy.source}) hashes to {policy.hash[:19]}…; resume with the policy the run "
            "started with"
        )


def _intent_without_result(entries: Sequence[Entry]) -> Entry | None:
    """The last intent of the visit, if no entry after it records that step's outcome."""
    for i in range(len(entries) - 1, -1, -1):
        e = entries[i]
        if e.kind == "intent":
            settled = any(x.step_id == e.step_id and x.kind != "intent" for x in entries[i + 1 :])
            return None if settled else e
    return None


def _dead_local_process(holder: str | None) -> bool:
    """Whether a lease holder named host:pid:… is a process of this host that has exited."""
    host, _, rest = (holder or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


def _check_compatible(record: RunRecord, workflow: Workflow) -> None:
    state = workflow.states.get(record.state)
    if state is None:
        raise RunStateError(
            f"run {record.run_id} is in state {record.state!r}, which version "
            f"{workflow.version} does not have"
        )
    pending = record.checkpoint.get("pending")
    if pending and isinstance(state, AgentState):
        proposal = pending["proposal"]
        offered = (
            state.tool(proposal.get("tool", "")) is not None
            if proposal.get("kind") == "tool_call"
            else proposal.get("exit", "finish") in state.exits
        )
        if not offered:
            raise RunStateError(
                f"run {record.run_id} waits on a ticket for {proposal}, which state "
                f"{record.state!r} of version {workflow.version} no longer offers"
            )
