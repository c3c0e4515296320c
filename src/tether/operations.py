"""What a person can do to a run that stopped for them: cancel, retry, take over.

Escalated runs, runs with an effect in doubt and stuck runs (no worker can drive them) wait
for a person; `actionable` lists them with the actions that apply to each. The CLI
(`tether cancel | retry | takeover`), the HTTP API and the web interface all call these
operations, with the `Principal` who acts; each is recorded as a typed entry naming that
principal, and each is refused, with nothing changed, when it does not apply:

- `cancel(run, by, reason, rollback=False)`: the run ends `cancelled`; a pending ticket is
  withdrawn with it. With `rollback`, the compensations of its effects run first, newest
  first, each a governed step (tether.compensation), and what could not be undone is reported.
- `retry(run, by, note)`: the run re-enters its state (the one it escalated or failed in)
  with a fresh visit budget, queued for a worker or `tether resume`.
- `take_over(run, by, exit, data)`: a person chooses an exit of the run's state, with data,
  in place of the model; checked as a model's exit is (offered here, the skill's output
  contract, the policy: an exit policy denies or would ask for is refused).

Each takes the run's lease first, so it never races a process that is driving the run.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import msgspec

from tether.compensation import Rollback, RollbackReport, unfinished_rollback
from tether.decision import Decision
from tether.errors import InputError, RunStateError
from tether.hashing import encode_json
from tether.identity import Principal
from tether.journal import Commit, Journal, NewEntry, RunRecord, RunUpdate
from tether.journal import bodies as b
from tether.journal.common import SELF_DRIVEN
from tether.proposals import json_value_problem
from tether.reasons import ReasonCode
from tether.run import Checkpoint
from tether.runtime import RunResult, Runtime
from tether.workflow import AgentState, Step, Terminal, Workflow

# The workflow a run is pinned to: a coroutine function, or a plain one (a worker
# registry's `workflow_for`).
Loader = Callable[[RunRecord], "Awaitable[Workflow] | Workflow"]
# Statuses in which a run is stopped for a person (or waiting on one) rather than ended.
STUCK = ReasonCode.NOT_DRIVABLE


async def load_pinned(record: RunRecord) -> Workflow:
    """The workflow and policy a run is pinned to, from the reference it was started with."""
    from tether.loader import load_workflow_async  # the loader imports tools: only when needed

    return await load_workflow_async(
        record.workflow_ref, policy=record.policy_ref, pinned=record.workflow_hash
    )


@dataclass(frozen=True)
class Outcome:
    """Where the run stands after an operation; a rollback's report when one ran."""

    run: RunResult
    rollback: RollbackReport | None = None

    def as_dict(self) -> dict[str, Any]:
        values: dict[str, Any] = dict(self.run.__dict__)
        if self.rollback is not None:
            values["rollback"] = self.rollback.as_dict()
        return values


@dataclass(frozen=True)
class Actionable:
    """A run waiting for a person, and what they can do about it."""

    run: RunRecord
    actions: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        r = self.run
        return {
            "run_id": r.run_id,
            "workflow": r.workflow_name,
            "version": r.workflow_version,
            "status": r.status,
            "state": r.state,
            "owner": r.owner,
            "reason_code": r.reason_code,
            "message": r.message,
            "updated_at": r.updated_at,
            "actions": list(self.actions),
        }


def actions_for(record: RunRecord) -> tuple[str, ...]:
    """The operations that apply to a run as it stands (a first answer: retry and take over
    are refused later for a run whose state has nothing to retry or no exits)."""
    status = record.status
    if status == "effect_in_doubt":
        return ("resolve", "cancel")  # a person first says whether the effect happened
    if status in ("escalated", "failed") and record.reason_code != ReasonCode.CANCELLED:
        return ("retry", "take_over", "cancel") if status == "escalated" else ("retry", "take_over")
    if status in ("queued", "running") and record.reason_code == STUCK:
        return ("retry", "take_over", "cancel")
    if status in ("paused", "handed_off"):
        return ("take_over", "cancel")
    if status in ("queued", "running"):
        return ("cancel",)
    return ()


def stuck_reason(record: RunRecord, now: float) -> tuple[str, str] | None:
    """Why a run that should be moving is not (queued or running, no live lease): a reason
    code and a message, never empty; None for a run that is moving or stopped. `now` is for
    display only (whether a lease looks live), never for a decision."""
    if record.status not in ("queued", "running"):
        return None
    if record.reason_code == STUCK:
        return STUCK, record.message or "a worker could not drive it"
    if record.lease_owner is not None and (record.lease_expires_at or 0.0) > now:
        return None
    hint = f"tether resume {record.run_id}"
    if record.workflow_ref.startswith(SELF_DRIVEN):
        return STUCK, (
            f"its workflow ({record.workflow_ref}) was built in code by the process that started it, "
            f"so no worker can load it: drive it from that process, or tether cancel {record.run_id}"
        )
    if record.status == "queued":
        return ReasonCode.WAITING_FOR_WORKER, (
            "no worker has claimed it: is one running with this workflow "
            f"(tether worker --workflows DIR)? or {hint}"
        )
    return ReasonCode.WAITING_FOR_WORKER, f"no process holds its lease: a worker claims it again, or {hint}"


async def actionable(journal: Journal, *, owner: str | None = None, limit: int = 100) -> list[Actionable]:
    """Runs waiting for a person to act (escalated, effect in doubt, stuck), newest first."""
    return [Actionable(r, actions_for(r)) for r in await journal.list_actionable(owner=owner, limit=limit)]


class Operations:
    """People's operations on runs of one journal (see the module's docstring).

    `load` gives the workflow a run is pinned to (default: from its recorded reference; a
    server passes its registry's). Operations hold a run's lease as `worker_id` while they act.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        load: Loader | None = None,
        worker_id: str | None = None,
        lease_seconds: float = 30.0,
    ) -> None:
        self.journal = journal
        self.load = load or load_pinned
        self.runtime = Runtime(journal, worker_id=worker_id, lease_seconds=lease_seconds)

    # -- cancel --------------------------------------------------------------------------

    async def cancel(
        self, run_id: str, by: Principal, reason: str = "", *, rollback: bool = False
    ) -> Outcome:
        """End the run `cancelled` (withdrawing a pending ticket); with `rollback`, undo its
        effects first. On a cancelled run whose rollback was cut off, continue the rollback."""
        record = await self.journal.get_run(run_id)
        continuing = False
        if record.status in ("completed", "failed", "cancelled"):
            entries = await self.journal.read_entries(run_id) if rollback else []
            continuing = rollback and unfinished_rollback(entries) is not None
            if not continuing:
                raise RunStateError(f"run {run_id} is {record.status}; there is nothing to cancel")
        if record.status == "effect_in_doubt" and rollback:
            raise RunStateError(
                f"run {run_id} has an effect in doubt ({record.message}); say whether it happened first "
                f"(tether resolve {run_id} --done | --not-done), then cancel with --rollback"
            )
        workflow = await self._load(record) if rollback else None
        record = await self.runtime._acquire(run_id)
        try:
            pending = record.checkpoint.get("pending") or {}
            ticket_id = pending.get("ticket_id") if record.status == "paused" else None
            cancelled = b.Cancelled(
                by=by, reason=reason, from_status=record.status, rollback=rollback, ticket_id=ticket_id
            )
            checkpoint = {k: v for k, v in record.checkpoint.items() if k != "pending"}
            message = f"cancelled by {by.describe()}" + (f": {reason}" if reason else "")
            final = RunUpdate(
                status="cancelled", owner=None, reason_code=ReasonCode.CANCELLED, message=message
            )
            if workflow is None:
                await self.journal.commit(
                    Commit(
                        run_id=run_id,
                        expected_seq=record.last_seq,
                        expected_hash=record.last_hash,
                        entries=[NewEntry.of(cancelled, state=record.state)],
                        update=msgspec.structs.replace(final, checkpoint=checkpoint),
                        lease_owner=self.runtime.worker_id,
                        lease_seconds=self.runtime.lease_seconds,
                        release=True,
                        withdraw=ticket_id,
                        durable=True,
                    )
                )
                return Outcome(RunResult.of(await self.journal.get_run(run_id)))
            if continuing:
                final = RunUpdate(status=record.status, message=record.message)  # as it was left
                first: list[b.Body] = []
            else:
                first = [cancelled]
            cursor = self.runtime._cursor(record, workflow)
            cursor.checkpoint.pending = None
            entries = await self.journal.read_entries(run_id)
            await cursor.load()
            report = await Rollback(cursor).run(
                entries, final=final, first=first, by=by, reason=reason, withdraw=ticket_id
            )
            return Outcome(RunResult.of(await self.journal.get_run(run_id)), report)
        finally:
            await self.runtime._release(run_id)

    # -- retry ---------------------------------------------------------------------------

    async def retry(self, run_id: str, by: Principal, note: str = "") -> Outcome:
        """Send the run back into its state with a fresh visit budget (a new visit), queued."""
        record = await self.journal.get_run(run_id)
        self._refuse_unless(record, "retry", ("escalated", "failed"))
        workflow = await self._load(record)
        state = workflow.states.get(record.state)
        if state is None or isinstance(state, Terminal):
            raise RunStateError(
                f"run {run_id} ended in {'terminal ' if state else ''}state {record.state!r}; "
                "there is no state to retry"
            )
        record = await self.runtime._acquire(run_id)
        try:
            self._refuse_unless(record, "retry", ("escalated", "failed"))  # as it is now, leased
            checkpoint = msgspec.convert(record.checkpoint, Checkpoint)
            checkpoint.pending = None
            checkpoint.crashes = 0
            # A new visit, starting after the `retried` entry: its transcript starts empty.
            checkpoint.visit = type(checkpoint.visit)(
                record.state, checkpoint.visit.number + 1, record.last_seq + 1
            )
            retried = b.Retried(
                by=by,
                note=note,
                from_status=record.status,
                state=record.state,
                reason_code=record.reason_code,
            )
            update = RunUpdate(
                status="queued",
                owner=None,
                reason_code=None,
                message=None,
                checkpoint=msgspec.to_builtins(checkpoint),
            )
            await self._commit(record, [NewEntry.of(retried, state=record.state)], update)
        finally:
            await self.runtime._release(run_id)
        return Outcome(RunResult.of(await self.journal.get_run(run_id)))

    # -- take over -----------------------------------------------------------------------

    async def take_over(
        self, run_id: str, by: Principal, exit: str, data: dict[str, Any] | None = None
    ) -> Outcome:
        """Choose exit `exit` of the run's state with `data` (merged into the run's data), as
        a model's exit is taken: it must be offered there, meet the skill's contract, and be
        allowed by policy. The run is then queued in the exit's state (driven at once when
        that state is terminal)."""
        allowed = ("escalated", "failed", "paused", "handed_off")
        record = await self.journal.get_run(run_id)
        self._refuse_unless(record, "take over", allowed)
        update = dict(data or {})
        problem = json_value_problem(update)
        workflow = await self._load(record)
        if problem is None and len(encode_json(update)) > workflow.limits.max_output_bytes:
            problem = f"more than {workflow.limits.max_output_bytes:,} bytes as JSON"
        if problem is not None:
            raise InputError(f"the take-over's data is refused: {problem.replace('output', 'data')}")
        state = workflow.states.get(record.state)
        target = _target(run_id, state, exit, record.state)
        record = await self.runtime._acquire(run_id)
        try:
            self._refuse_unless(record, "take over", allowed)
            cursor = self.runtime._cursor(record, workflow)
            await cursor.load()
            step_id = cursor.new_step_id()
            decision = await self._exit_decision(cursor, state, exit, update, step_id, by)
            pending = record.checkpoint.get("pending") or {}
            ticket_id = pending.get("ticket_id") if record.status == "paused" else None
            taken = b.TakenOver(
                by=by,
                exit=exit,
                next=target,
                data=update,
                decision=decision.stored(),
                from_status=record.status,
                ticket_id=ticket_id,
            )
            entry = NewEntry(b.KIND_OF[b.TakenOver], encode_json(taken), step_id, record.state)
            cursor.checkpoint.pending = None
            cursor.checkpoint.crashes = 0
            cursor.enter(target, entries_in_commit=1)  # the record's state is now the target
            changes = RunUpdate(
                status="queued",
                state=target,
                data={**record.data, **update},
                owner=None,
                reason_code=None,
                message=None,
                checkpoint=msgspec.to_builtins(cursor.checkpoint),
            )
            await self._commit(record, [entry], changes, withdraw=ticket_id)
        finally:
            await self.runtime._release(run_id)
        if isinstance(workflow.states[target], Terminal):  # nothing left to decide: finish it now
            return Outcome(await self.runtime.resume(run_id, workflow, None))
        return Outcome(RunResult.of(await self.journal.get_run(run_id)))

    async def _exit_decision(
        self, cursor: Any, state: Any, exit: str, update: dict[str, Any], step_id: str, by: Principal
    ) -> Decision:
        if not isinstance(state, AgentState):  # a deterministic step's next state: the workflow allows it
            return Decision(
                "allow",
                f"workflow:{state.name}",
                ReasonCode.POLICY_ALLOWED,
                f"{by.name} chose the next state",
            )
        problem = state.skill.output_problem(exit, update) if state.skill is not None else None
        if problem:
            raise RunStateError(f"exit {exit!r} refused: the skill's output contract: {problem}")
        args = {"exit": exit, "update": update}
        decision: Decision = await cursor.decide(
            kind="exit", tool={"name": exit, "effect": "exit"}, args=args, step_id=step_id
        )
        if decision.decision != "allow":
            asked = f"; it asks {decision.approver}" if decision.decision == "ask" else ""
            raise RunStateError(
                f"exit {exit!r} refused by policy: {decision.rule_id} says {decision.decision}"
                f" ({decision.reason or decision.reason_code}){asked}; a take-over is governed as a "
                "model's exit is"
            )
        return decision

    # -- helpers -------------------------------------------------------------------------

    async def _load(self, record: RunRecord) -> Workflow:
        loaded = self.load(record)
        return await loaded if inspect.isawaitable(loaded) else loaded

    @staticmethod
    def _refuse_unless(record: RunRecord, action: str, statuses: tuple[str, ...]) -> None:
        status, run_id = record.status, record.run_id
        if status == "effect_in_doubt":
            raise RunStateError(
                f"run {run_id} has an effect in doubt ({record.message}); say whether it happened "
                f"first: tether resolve {run_id} --done | --not-done"
            )
        stuck = status in ("queued", "running") and record.reason_code == STUCK
        if (status in statuses and record.reason_code != ReasonCode.CANCELLED) or stuck:
            return
        what = (
            "escalated, failed or stuck"
            if action == "retry"
            else "escalated, failed, paused, handed off or stuck"
        )
        raise RunStateError(f"run {run_id} is {status}; only a run that is {what} can be {_past(action)}")

    async def _commit(
        self, record: RunRecord, entries: list[NewEntry], update: RunUpdate, withdraw: str | None = None
    ) -> None:
        await self.journal.commit(
            Commit(
                run_id=record.run_id,
                expected_seq=record.last_seq,
                expected_hash=record.last_hash,
                entries=entries,
                update=update,
                lease_owner=self.runtime.worker_id,
                lease_seconds=self.runtime.lease_seconds,
                release=True,
                withdraw=withdraw,
                durable=True,
            )
        )


def _past(action: str) -> str:
    return {"retry": "retried", "take over": "taken over"}.get(action, action)


def _target(run_id: str, state: Any, exit: str, name: str) -> str:
    """The state exit `exit` of the run's state leads to, or why there is none."""
    if isinstance(state, AgentState):
        exits = state.exits
    elif isinstance(state, Step):
        exits = {n: n for n in state.next}
    else:
        raise RunStateError(
            f"run {run_id} is in {'terminal ' if state else ''}state {name!r}: it has no exits"
        )
    if exit not in exits:
        raise RunStateError(
            f"state {name!r} has no exit {exit!r} (its exits: {', '.join(sorted(exits)) or 'none'})"
        )
    return exits[exit]


__all__ = [
    "Actionable",
    "Operations",
    "Outcome",
    "actionable",
    "actions_for",
    "load_pinned",
    "stuck_reason",
]
