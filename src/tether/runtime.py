"""The runtime: starts, drives, pauses, resumes and recovers runs.

    drive:  terminal? -> finish | deterministic step -> record + move
            | agent state -> budget check -> model proposes -> governed step -> apply

A paused run holds no memory or process: `resume` rebuilds everything from the journal,
first settling any effect left in doubt by a crash, then any ticket a person decided.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import os
import secrets
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic_core import to_jsonable_python

from tether.errors import JournalError, RunStateError
from tether.journal import (
    FINISHED,
    Commit,
    Entry,
    Journal,
    LeaseHeld,
    ModelExchange,
    NewEntry,
    RunRecord,
    RunUpdate,
)
from tether.models.protocol import (
    BudgetLeft,
    ExitSpec,
    Model,
    ModelCallError,
    ModelContext,
    ModelReply,
    ToolSpec,
)
from tether.policy import Decision, Policy
from tether.reasons import ReasonCode
from tether.recovery import continue_pending, intent_without_result, recover
from tether.run import RunCursor, history_from, new_visit, transcript_from
from tether.step import GovernedStep, StepOutcome
from tether.workflow import AgentState, Next, Step, Terminal, Workflow


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

    @classmethod
    def of(cls, record: RunRecord) -> RunResult:
        pending = record.checkpoint.get("pending") or {}
        return cls(
            run_id=record.run_id,
            status=record.status,
            state=record.state,
            data=record.data,
            reason_code=record.reason_code,
            message=record.message,
            owner=record.owner,
            ticket_id=pending.get("ticket_id") if record.status == "paused" else None,
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
    ) -> None:
        self.journal = journal
        # Model calls (prompts, raw responses, attempts) are kept apart from the entries.
        self.record_exchanges = record_exchanges
        # Called with the entries of every commit of the runs it drives, once they are durable.
        self.on_commit = on_commit
        self.clock = clock
        self.worker_id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"
        self.lease_seconds = lease_seconds
        self.stopping = False
        self._specs: dict[tuple[str, str], tuple[list[ToolSpec], list[ExitSpec]]] = {}
        self._driving: dict[str, RunCursor] = {}
        self._heartbeat: asyncio.Task[None] | None = None

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
    ) -> RunResult:
        """Start a run pinned to this workflow's and policy's hashes; drive it until it stops.

        `workflow_ref` and `policy_ref` (a policy file overriding the workflow's) are what
        `tether resume` and workers load the definition from in another process.
        """
        record = await self.create(
            workflow,
            model,
            input=input,
            workflow_ref=workflow_ref,
            policy_ref=policy_ref,
            model_spec=model_spec,
            queued=False,
        )
        cursor = RunCursor(
            record,
            workflow,
            workflow.policy or Policy.default(),
            self.journal,
            clock=self.clock,
            lease=(self.worker_id, self.lease_seconds),
            on_commit=self.on_commit,
        )
        return await self._drive(cursor, model)

    async def submit(
        self,
        workflow: Workflow,
        *,
        input: dict[str, Any] | None = None,
        workflow_ref: str,
        policy_ref: str | None = None,
        model_spec: str | None = None,
    ) -> RunResult:
        """Enqueue a run for a worker to drive (`tether submit`); nothing runs here."""
        record = await self.create(
            workflow,
            None,
            input=input,
            workflow_ref=workflow_ref,
            policy_ref=policy_ref,
            model_spec=model_spec,
            queued=True,
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
    ) -> RunRecord:
        """Record a new run: queued for a worker, or leased to this runtime to drive now."""
        policy = workflow.policy or Policy.default()
        needs_model = [s.name for s in workflow.states.values() if isinstance(s, AgentState)]
        if model is None and not (queued and model_spec) and needs_model:
            raise RunStateError(
                f"workflow {workflow.name!r} has agent state(s) {', '.join(needs_model)}: "
                "give a model to propose their steps (e.g. --model script:FILE.json)"
            )
        now = self.clock()
        data = dict(input or {})
        record = RunRecord(
            run_id="run_" + secrets.token_hex(6),
            workflow_name=workflow.name,
            workflow_version=workflow.version,
            workflow_hash=workflow.hash,
            workflow_ref=workflow_ref or f"<python:{workflow.name}>",
            policy_hash=policy.hash,
            policy_ref=policy_ref,
            model_spec=model_spec or (model.name if model else None),
            state=workflow.start,
            input=data,
            data=data,
            checkpoint={"steps": 0, "visit": new_visit(workflow.start, 1, 1)},
            created_at=now,
            updated_at=now,
            status="queued" if queued else "running",
            lease_owner=None if queued else self.worker_id,
            lease_expires_at=None if queued else now + self.lease_seconds,
        )
        written = await self.journal.create_run(
            record,
            [
                NewEntry.of(
                    kind="run_started",
                    state=workflow.start,
                    body={
                        "workflow": {
                            "name": workflow.name,
                            "version": workflow.version,
                            "hash": workflow.hash,
                            "ref": record.workflow_ref,
                        },
                        "policy_hash": policy.hash,
                        "input": data,
                        "model": record.model_spec,
                    },
                )
            ],
        )
        # The record as stored, without reading it back: one query and one copy fewer per run.
        return record.model_copy(update={"last_seq": written[-1].seq, "last_hash": written[-1].hash})

    async def resume(self, run_id: str, workflow: Workflow, model: Model | None = None) -> RunResult:
        """Continue a queued, paused or interrupted run from its last committed step.

        Takes the run's lease first: a run another live process is driving is refused
        (`LeaseHeld`), so resuming can never race the process that is still working on it.
        A lease left by a crashed process of this machine is taken over at once.
        """
        record = await self._acquire(run_id)
        try:
            return await self._resume(record, workflow, model)
        except BaseException:
            await self.journal.release(run_id, self.worker_id)
            raise

    async def _acquire(self, run_id: str) -> RunRecord:
        try:
            return await self.journal.acquire(
                run_id, self.worker_id, lease_seconds=self.lease_seconds, now=self.clock()
            )
        except LeaseHeld as held:
            if not _dead_local_process(held.holder):
                raise
            holder = str(held.holder)
        # The holder was a process on this machine that no longer exists (it crashed): its
        # lease cannot be renewed, so waiting for it to expire would only delay recovery.
        await self.journal.release(run_id, holder)
        return await self.journal.acquire(
            run_id, self.worker_id, lease_seconds=self.lease_seconds, now=self.clock()
        )

    async def _resume(self, record: RunRecord, workflow: Workflow, model: Model | None) -> RunResult:
        run_id = record.run_id
        if record.status in FINISHED:
            raise RunStateError(f"run {run_id} is {record.status}; there is nothing to resume")
        if record.status == "effect_in_doubt":
            raise RunStateError(
                f"run {run_id} has an effect in doubt ({record.message}); a person must say "
                f"whether it happened: tether resolve {run_id} --done | --not-done"
            )
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
        cursor = RunCursor(
            record,
            workflow,
            policy,
            self.journal,
            clock=self.clock,
            lease=(self.worker_id, self.lease_seconds),
            on_commit=self.on_commit,
        )
        if record.status == "queued":
            cursor.record.status = "running"
        everything = await self.journal.read_entries(run_id)
        cursor.history = history_from(everything)
        entries = [e for e in everything if e.seq > cursor.visit["started_seq"]]
        cursor.transcript = transcript_from(entries)
        doubt = intent_without_result(entries)
        if doubt is not None:
            outcome = await recover(cursor, doubt)
            await self._apply(cursor, outcome)
        elif record.status == "paused":
            outcome = await continue_pending(cursor)
            if outcome is None:
                return RunResult.of(cursor.record)
            await self._apply(cursor, outcome)
        return await self._drive(cursor, model)

    async def resolve(self, run_id: str, *, done: bool, by: str, note: str = "") -> RunResult:
        """A person settles an effect in doubt; the run can then be resumed."""
        record = await self.journal.get_run(run_id)
        if record.status != "effect_in_doubt":
            raise RunStateError(f"run {run_id} is {record.status}, not effect_in_doubt")
        doubt = next(
            e for e in reversed(await self.journal.read_entries(run_id)) if e.kind == "effect_in_doubt"
        )
        outcome = "executed" if done else "not_executed"
        observation = {"step_id": doubt.step_id, "outcome": outcome, "resolved_by": by, "note": note}
        body = {
            **doubt.body,
            "outcome": outcome,
            "resolved_by": by,
            "note": note,
            "reason_code": ReasonCode.EFFECT_IN_DOUBT,
            "result": None,
            "source": {"kind": "person", "by": by},
            "observation": observation,
        }
        entry = NewEntry.of(kind="step", step_id=doubt.step_id, state=doubt.state, body=body)
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
        if record.status in FINISHED:
            raise RunStateError(f"run {run_id} is {record.status}; only unfinished runs can be migrated")
        if workflow.name != record.workflow_name:
            raise RunStateError(
                f"run {run_id} belongs to workflow {record.workflow_name!r}, not {workflow.name!r}"
            )
        _check_compatible(record, workflow)
        policy = workflow.policy or Policy.default()
        moved = {
            "from": {
                "version": record.workflow_version,
                "hash": record.workflow_hash,
                "policy_hash": record.policy_hash,
                "ref": record.workflow_ref,
            },
            "to": {
                "version": workflow.version,
                "hash": workflow.hash,
                "policy_hash": policy.hash,
                "ref": workflow_ref,
            },
            "by": by,
        }
        update = RunUpdate(
            workflow_version=workflow.version,
            workflow_hash=workflow.hash,
            workflow_ref=workflow_ref,
            policy_hash=policy.hash,
            policy_ref=policy_ref,
        )
        return await self._record(record, NewEntry.of("migrated", moved, state=record.state), update)

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
        return RunResult.of(await self.journal.get_run(record.run_id))

    # -- driving ---------------------------------------------------------------------

    async def _drive(self, cursor: RunCursor, model: Model | None) -> RunResult:
        """Drive until the run stops or the runtime drains; the lease is held throughout."""
        self._driving[cursor.run_id] = cursor
        if self._heartbeat is None or self._heartbeat.done():
            self._heartbeat = asyncio.create_task(self._renew_leases())
        try:
            await self._steps(cursor, model)
        finally:
            del self._driving[cursor.run_id]
            await self.journal.release(cursor.run_id, self.worker_id)
        return RunResult.of(cursor.record)

    async def _renew_leases(self) -> None:
        """One task per runtime renews the leases of every run it is driving: one statement.
        A renewal that fails is tried again at the next interval (a lease outlives two): were
        this task to end, every lease would lapse and other workers would redo the runs."""
        while self._driving:
            await asyncio.sleep(self.lease_seconds / 3)
            with contextlib.suppress(JournalError):
                await self.journal.renew_leases(self.worker_id, lease_seconds=self.lease_seconds)

    async def _steps(self, cursor: RunCursor, model: Model | None) -> None:
        while cursor.record.status == "running" and not self.stopping:
            state = cursor.workflow.states[cursor.record.state]
            if isinstance(state, Terminal):
                status = "failed" if state.failed else "completed"
                await cursor.commit(
                    [
                        NewEntry.of(
                            kind="run_finished",
                            state=state.name,
                            body={"status": status, "data": cursor.record.data},
                        )
                    ],
                    status=status,
                )
            elif isinstance(state, Step):
                await self._deterministic(cursor, state)
            else:
                if model is None:
                    raise RunStateError(f"state {state.name!r} needs a model to propose steps")
                await self._apply(cursor, await self._agent_turn(cursor, state, model))

    async def _deterministic(self, cursor: RunCursor, state: Step) -> None:
        step_id = cursor.new_step_id()
        decision = Decision(
            decision="allow",
            rule_id=f"workflow:{state.name}",
            policy_hash=cursor.policy.hash,
            reason_code=ReasonCode.POLICY_ALLOWED,
            reason="deterministic step of the workflow",
        )
        try:
            result = state.fn(dict(cursor.record.data))
            nxt = await result if inspect.isawaitable(result) else result
            if not isinstance(nxt, Next):
                raise TypeError(f"step function returned {type(nxt).__name__}, expected tether.Next")
            if nxt.to not in state.next:
                raise ValueError(f"step went to {nxt.to!r}; declared next states: {', '.join(state.next)}")
        except Exception as exc:  # the step's own failure fails the run, recorded
            message = f"{type(exc).__name__}: {exc}"
            await cursor.commit(
                [
                    NewEntry.of(
                        kind="step",
                        step_id=step_id,
                        state=state.name,
                        body={
                            "decision": decision.model_dump(mode="json"),
                            "outcome": "step_failed",
                            "reason_code": ReasonCode.STEP_FAILED,
                            "error": message,
                        },
                    )
                ],
                status="failed",
                reason_code=ReasonCode.STEP_FAILED,
                message=message,
            )
            return
        body = {
            "decision": decision.model_dump(mode="json"),
            "outcome": "transition",
            "reason_code": None,
            "update": nxt.update,
            "facts": nxt.facts,
            "next": nxt.to,
        }
        cursor.enter(nxt.to, entries_in_commit=1)
        await cursor.commit(
            [NewEntry.of(kind="step", step_id=step_id, state=state.name, body=body)],
            data={**cursor.record.data, **nxt.update},
            facts={**cursor.record.facts, **nxt.facts} if nxt.facts else None,
            buffer=not state.checkpoint,
        )

    async def _agent_turn(self, cursor: RunCursor, state: AgentState, model: Model) -> StepOutcome:
        exhausted = _exhausted(cursor, state)
        if exhausted:
            kind = "escalate" if state.on_budget_exhausted == "escalate" else "fail"
            return StepOutcome(
                kind, reason_code=ReasonCode.BUDGET_EXHAUSTED, message=exhausted, owner=state.escalate_to
            )
        visit, budget = cursor.visit, state.budget
        tools, exits = self._spec(cursor.workflow, state)
        context = ModelContext.model_construct(
            run_id=cursor.run_id,
            state=state.name,
            instructions=state.instructions,
            transcript=list(cursor.transcript),
            tools=tools,
            exits=exits,
            data=cursor.record.data,
            budget_left=BudgetLeft(
                steps=budget.max_steps - visit["steps"],
                tool_calls=budget.max_tool_calls - visit["tool_calls"],
                seconds=budget.max_seconds - cursor.active_seconds(),
                tokens=budget.max_tokens - visit["tokens"] if budget.max_tokens else None,
                cost=budget.max_cost - visit["cost"] if budget.max_cost else None,
            ),
        )
        cursor.count("steps")
        step_id = cursor.new_step_id()
        started = time.monotonic()
        try:
            reply = await model.propose(context)
        except Exception as exc:  # a failing model is recorded and escalated, never a crash
            code = exc.reason_code if isinstance(exc, ModelCallError) else ReasonCode.MODEL_ERROR
            message = str(exc) if isinstance(exc, ModelCallError) else f"{type(exc).__name__}: {exc}"
            if self.record_exchanges:
                cursor.record_exchange(
                    self._exchange(cursor, model, state, step_id, started, error=(exc, code, message))
                )
            return StepOutcome("escalate", reason_code=code, message=message, owner=state.escalate_to)
        if self.record_exchanges:
            cursor.record_exchange(self._exchange(cursor, model, state, step_id, started, reply=reply))
        cursor.count("tokens", reply.usage.tokens)
        cursor.count("cost", reply.usage.cost)
        return await GovernedStep(cursor, state, reply.usage, step_id).run(reply.output)

    def _exchange(
        self,
        cursor: RunCursor,
        model: Model,
        state: AgentState,
        step_id: str,
        started: float,
        *,
        reply: ModelReply | None = None,
        error: tuple[BaseException, str, str] | None = None,
    ) -> ModelExchange:
        """The record of one model call, written with the step it served."""
        exchange = reply.exchange if reply is not None else None
        values: dict[str, Any] = {}
        if exchange is not None:
            values = exchange.model_dump(mode="json")
        if error is not None:
            exc, code, message = error
            values |= {"error": message, "reason_code": code}
            if isinstance(exc, ModelCallError):
                values |= {
                    "request": to_jsonable_python(exc.request, fallback=str),
                    "attempts": [a.model_dump() for a in exc.attempts],
                }
        # Built from typed values (a reply already validated): no need to validate again.
        return ModelExchange.model_construct(
            run_id=cursor.run_id,
            seq=cursor.next_exchange_seq(),
            step_id=step_id,
            state=state.name,
            model=model.name,
            created_at=self.clock(),
            seconds=round(time.monotonic() - started, 4),
            output=to_jsonable_python(reply.output, fallback=str) if reply is not None else None,
            usage=reply.usage.model_dump() if reply is not None else {},
            **{"error": None, "reason_code": None, "request": None, "response": None, "attempts": []}
            | values,
        )

    async def _apply(self, cursor: RunCursor, outcome: StepOutcome) -> None:
        """Carry out the next-step decision a governed step returned."""
        state_name = cursor.record.state
        if outcome.kind == "transition":
            assert outcome.to is not None
            step_id = outcome.update["observation"]["step_id"]
            entry = NewEntry.of(kind="step", step_id=step_id, state=state_name, body=outcome.update)
            cursor.enter(outcome.to, entries_in_commit=1)
            await cursor.commit([entry], status="running", data=cursor.record.data, consume=outcome.consume)
        elif outcome.kind == "handoff":
            handed = outcome.update["handoff"]
            await cursor.commit(
                [
                    NewEntry.of(
                        kind="handoff",
                        step_id=outcome.update["step_id"],
                        state=state_name,
                        body=outcome.update,
                    )
                ],
                status="handed_off",
                owner=handed["owner"],
                reason_code=outcome.reason_code,
                message=f"handed off to {handed['owner']}: {outcome.message}",
            )
        elif outcome.kind in ("escalate", "fail"):
            status = "escalated" if outcome.kind == "escalate" else "failed"
            await cursor.commit(
                [
                    NewEntry.of(
                        kind=status,
                        state=state_name,
                        body={
                            "reason_code": outcome.reason_code,
                            "message": outcome.message,
                            "owner": outcome.owner if status == "escalated" else None,
                            "data": cursor.record.data,
                            "facts": cursor.record.facts,
                        },
                    )
                ],
                status=status,
                owner=outcome.owner if status == "escalated" else None,
                reason_code=outcome.reason_code,
                message=outcome.message,
            )

    def _spec(self, workflow: Workflow, state: AgentState) -> tuple[list[ToolSpec], list[ExitSpec]]:
        key = (workflow.hash, state.name)
        if key not in self._specs:
            self._specs[key] = (
                [
                    ToolSpec(
                        name=t.name, description=t.description, effect=t.effect, parameters=t.json_schema()
                    )
                    for t in state.tools
                ],
                [ExitSpec(name=n, target=t) for n, t in state.exits.items()],
            )
        return self._specs[key]


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


def _exhausted(cursor: RunCursor, state: AgentState) -> str | None:
    run_budget = cursor.workflow.budget
    for key, limit in (
        ("steps", run_budget.max_steps),
        ("tokens", run_budget.max_tokens),
        ("cost", run_budget.max_cost),
    ):
        if limit is not None and cursor.total(key) >= limit:
            return f"the run's {key.rstrip('s')} budget of {limit:g} is spent"
    visit, budget = cursor.visit, state.budget
    if visit["steps"] >= budget.max_steps:
        return f"step budget of {budget.max_steps} for state {state.name!r} is spent"
    if cursor.active_seconds() >= budget.max_seconds:
        return f"time budget of {budget.max_seconds:g}s for state {state.name!r} is spent"
    if budget.max_tokens is not None and visit["tokens"] >= budget.max_tokens:
        return f"token budget of {budget.max_tokens} for state {state.name!r} is spent"
    if budget.max_cost is not None and visit["cost"] >= budget.max_cost:
        return f"cost budget of {budget.max_cost:g} for state {state.name!r} is spent"
    return None
