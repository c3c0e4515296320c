"""Rollback: the compensations of a run's effects, run newest first, each a governed step.

A `write` or `external` tool may declare how its effect is undone (`compensate:` in the
workflow, `Tool.compensate_with` in Python: tether.tools.Compensation). A rollback —
`tether cancel RUN --rollback`, or a state's `on_failure: rollback` when the run fails
there — takes the run's executed effects in reverse order and, for each, derives the
compensating call's arguments from the original call and its result, then governs it like
any write: the arguments' schema, the policy (a compensation runs only when policy allows
it: one that is denied or would need an approval is refused and reported, never run), an
intent synced before it runs, its verifier, and a record. Effects with no compensation (or
whose arguments cannot be derived) are listed, never silently skipped:

    rollback_started (plan) -> per effect: compensation_intent -> compensated
                               | compensation_failed | compensation_refused
                            -> rolled_back (what was undone, what was not)

Crash-safety: the plan is recorded before anything runs and each compensation's intent is
synced before it runs. A rollback cut off by a crash is continued by running it again
(`tether cancel RUN --rollback`): finished compensations are not repeated; one whose intent
has no result is re-run with the same idempotency key if its tool is idempotent, else
recorded in doubt (`compensation_in_doubt`) for a person, never run twice.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from tether.errors import RunStateError
from tether.identity import Principal
from tether.journal import Commit, Entry, NewEntry, RunUpdate
from tether.journal import bodies as b
from tether.run import RunCursor
from tether.tools import ArgumentError, Tool, ToolContext

_DONE_KINDS = (
    "compensated",
    "compensation_failed",
    "compensation_refused",
    "compensation_in_doubt",
)


@dataclass
class RollbackReport:
    """What a rollback did, by the step id of each original effect."""

    compensated: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    in_doubt: list[str] = field(default_factory=list)
    uncompensated: list[b.Uncompensated] = field(default_factory=list)
    # What each step id's outcome was, in the order they were undone (for people).
    details: list[dict[str, Any]] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Every effect was undone."""
        return not (self.failed or self.refused or self.in_doubt or self.uncompensated)

    def summary(self) -> str:
        parts = [f"{len(self.compensated)} compensated"]
        for name, items in (
            ("failed", self.failed),
            ("refused", self.refused),
            ("in doubt", self.in_doubt),
            ("without compensation", self.uncompensated),
        ):
            if items:
                parts.append(f"{len(items)} {name}")
        return "rollback: " + ", ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return {
            "compensated": self.compensated,
            "failed": self.failed,
            "refused": self.refused,
            "in_doubt": self.in_doubt,
            "uncompensated": msgspec.to_builtins(self.uncompensated),
            "details": self.details,
            "complete": self.complete,
        }


@dataclass
class _Effect:
    step_id: str
    tool: str
    args: dict[str, Any]
    result: Any


def unfinished_rollback(entries: Sequence[Entry]) -> int | None:
    """The index of a `rollback_started` entry with no `rolled_back` after it, if any."""
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].kind == "rolled_back":
            return None
        if entries[i].kind == "rollback_started":
            return i
    return None


def plan(cursor: RunCursor, entries: Sequence[Entry]) -> tuple[list[str], list[b.Uncompensated]]:
    """The effects a rollback will compensate, newest first, and those it cannot."""
    tools = cursor.workflow.tools()
    done = {
        e.body.compensates
        for e in entries
        if e.kind in _DONE_KINDS and isinstance(e.body, b.CompensationStep)
    }
    effects, missing = [], []
    for effect in reversed(_effects(entries)):
        if effect.step_id in done:  # undone by an earlier rollback
            continue
        tool = tools.get(effect.tool)
        if tool is not None and tool.effect == "read":  # nothing to undo
            continue
        why = _why_not(tool, effect)
        if why is None:
            effects.append(effect.step_id)
        else:
            missing.append(b.Uncompensated(step_id=effect.step_id, tool=effect.tool, reason=why))
    return effects, missing


def _why_not(tool: Tool | None, effect: _Effect) -> str | None:
    if tool is None:
        return f"tool {effect.tool!r} is not in the workflow the run is pinned to"
    if tool.compensation is None:
        return f"tool {effect.tool!r} declares no compensation"
    if effect.result is _SETTLED:
        uses_result = any(s.partition(".")[0] == "result" for s in tool.compensation.args.values())
        if uses_result:
            return "a person said the effect happened, but its result was never recorded"
        return None
    try:
        tool.compensation.derive(effect.args, effect.result)
    except LookupError as exc:
        return str(exc)
    return None


_SETTLED: Any = object()  # the result of an effect a person said happened (none recorded)


def _effects(entries: Sequence[Entry]) -> list[_Effect]:
    """The run's effects (write and external calls that executed), oldest first."""
    found = []
    for e in entries:
        if e.kind in b.EXECUTED_KINDS or e.kind == "effect_settled":
            record = e.body
            if isinstance(record, b.Executed):
                found.append(_Effect(e.step_id or "", record.tool, record.args, record.result))
            elif isinstance(record, b.EffectSettled) and record.done:
                found.append(_Effect(e.step_id or "", record.tool, record.args, _SETTLED))
    return found


class Rollback:
    """One rollback of a run, driven under the lease its caller holds (`cursor.lease`)."""

    def __init__(self, cursor: RunCursor) -> None:
        if cursor.lease is None:
            raise RunStateError("a rollback runs under the run's lease")
        self.cursor = cursor
        self.report = RollbackReport()

    async def commit(
        self, records: list[tuple[b.Body, str | None]], update: RunUpdate | None = None, **commit: Any
    ) -> None:
        """Write records (with the step id each belongs to) and the checkpoint, fenced by the lease."""
        cursor = self.cursor
        assert cursor.lease is not None
        cursor.record.checkpoint = msgspec.to_builtins(cursor.checkpoint)
        fields = update.given() if update is not None else {}
        update = RunUpdate(**({"checkpoint": cursor.record.checkpoint} | fields))
        written = await cursor.journal.commit(
            Commit(
                run_id=cursor.run_id,
                expected_seq=cursor.record.last_seq,
                expected_hash=cursor.record.last_hash,
                entries=[NewEntry.of(r, step_id=s, state=cursor.record.state) for r, s in records],
                update=update,
                lease_owner=cursor.lease[0],
                lease_seconds=cursor.lease[1],
                **commit,
            )
        )
        if written:
            cursor.record.last_seq, cursor.record.last_hash = written[-1].seq, written[-1].hash
        for key, value in fields.items():
            if key != "checkpoint":
                setattr(cursor.record, key, value)

    async def run(
        self,
        entries: list[Entry],
        *,
        final: RunUpdate,
        first: list[b.Body] | None = None,
        by: Principal | None = None,
        reason: str = "",
        **first_commit: Any,
    ) -> RollbackReport:
        """Plan (or continue) the rollback, run every compensation, record the outcome with
        `final` (the run's status after it) and give the lease back. `first` are records to
        write with the plan (a cancellation), with `first_commit` options (a ticket withdrawn)."""
        cursor = self.cursor
        started = unfinished_rollback(entries)
        if started is None:
            effects, missing = plan(cursor, entries)
            begun = b.RollbackStarted(by=by, reason=reason, effects=effects, uncompensated=missing)
            records: list[tuple[b.Body, str | None]] = [(r, None) for r in first or []]
            await self.commit([*records, (begun, None)], final, durable=True, **first_commit)
            since: list[Entry] = []
        else:
            record = entries[started].body
            assert isinstance(record, b.RollbackStarted)
            begun, since = record, entries[started + 1 :]
            if first:
                await self.commit([(r, None) for r in first], final, **first_commit)
        self.report.uncompensated = list(begun.uncompensated)
        by_step = {e.step_id: e for e in _effects(entries)}
        for step_id in begun.effects:
            await self.compensate(by_step[step_id], since)
        outcome = b.RolledBack(
            compensated=self.report.compensated,
            failed=self.report.failed,
            refused=self.report.refused,
            in_doubt=self.report.in_doubt,
            uncompensated=self.report.uncompensated,
        )
        message = self.report.summary()
        if final.message:
            message = f"{final.message}; {message}"
        done = msgspec.structs.replace(final, message=message)
        await self.commit([(outcome, None)], done, release=True, durable=True)
        return self.report

    async def compensate(self, effect: _Effect, since: Sequence[Entry]) -> None:
        """Undo one effect, or finish what a crash cut off; recorded either way."""
        cursor = self.cursor
        tool = cursor.workflow.tools()[effect.tool]
        comp = tool.compensation
        assert comp is not None
        mine = [
            e
            for e in since
            if isinstance(e.body, b.CompensationStep) and e.body.compensates == effect.step_id
        ]
        finished = next((e for e in mine if e.kind in _DONE_KINDS), None)
        if finished is not None:  # done before a crash: counted, not repeated
            self._count(finished.kind, effect.step_id, finished.body)
            return
        intent = next((e for e in mine if e.kind == "compensation_intent"), None)
        fields: dict[str, Any] = {
            "compensates": effect.step_id,
            "of_tool": effect.tool,
            "tool": comp.tool.name,
        }
        args = comp.derive(effect.args, None if effect.result is _SETTLED else effect.result)
        fields["args"] = args
        if intent is not None:
            step_id = intent.step_id or cursor.new_step_id()
            recorded = intent.body
            assert isinstance(recorded, b.CompensationIntent)
            fields |= {"args": recorded.args, "args_hash": recorded.args_hash, "decision": recorded.decision}
            if not comp.tool.idempotent:
                message = (
                    f"compensation {comp.tool.name} of step {effect.step_id} was started but its result "
                    "was never recorded, and it is not idempotent: check whether it happened"
                )
                return await self._record(b.CompensationInDoubt(**fields, message=message), step_id)
            return await self._call(comp.tool, fields, step_id, recovered=True)
        step_id = cursor.new_step_id()
        try:
            validated = comp.tool.validate(args)
        except ArgumentError as exc:
            return await self._record(b.CompensationRefused(**fields, reason=str(exc)), step_id)
        fields |= {"args": validated.values, "args_hash": validated.hash}
        decision = await cursor.decide(
            kind="tool", tool=comp.tool.info, args=validated.values, step_id=step_id
        )
        fields["decision"] = decision.stored()
        if decision.decision != "allow":
            why = f"policy says {decision.decision} ({decision.rule_id}: {decision.reason})"
            if decision.decision in ("ask", "defer"):
                why += (
                    "; a rollback does not wait for a person: run the compensation by hand if it must happen"
                )
            return await self._record(b.CompensationRefused(**fields, reason=why), step_id)
        await self.commit([(b.CompensationIntent(**fields), step_id)], durable=True)
        await self._call(comp.tool, fields, step_id)

    async def _call(
        self, tool: Tool, fields: dict[str, Any], step_id: str, *, recovered: bool = False
    ) -> None:
        cursor = self.cursor
        ctx = ToolContext(
            run_id=cursor.run_id,
            step_id=step_id,
            idempotency_key=f"{cursor.run_id}:{step_id}",
            data=cursor.record.data,
            facts=cursor.record.facts,
        )
        try:
            result = await tool.call(fields["args"], ctx)
        except Exception as exc:  # recorded and reported: the rollback goes on with the others
            return await self._record(
                b.CompensationFailed(**fields, error=f"{type(exc).__name__}: {exc}"), step_id
            )
        verification: dict[str, Any] | None = None
        verified = True
        try:
            evidence = await tool.verify(fields["args"], result, ctx)
        except Exception as exc:
            evidence, verification, verified = (
                None,
                {"ok": False, "error": f"{type(exc).__name__}: {exc}"},
                False,
            )
        if evidence is not None:
            verification, verified = evidence.model_dump(), evidence.ok
        done = b.Compensated(
            **fields, result=result, verification=verification, verified=verified, recovered=recovered
        )
        await self._record(done, step_id)

    async def _record(self, record: b.CompensationStep, step_id: str) -> None:
        await self.commit([(record, step_id)])
        self._count(b.KIND_OF[type(record)], record.compensates, record)

    def _count(self, kind: str, step_id: str, record: Any) -> None:
        report = self.report
        if kind == "compensated" and getattr(record, "verified", True):
            report.compensated.append(step_id)
        elif kind == "compensation_refused":
            report.refused.append(step_id)
        elif kind == "compensation_in_doubt":
            report.in_doubt.append(step_id)
        else:
            report.failed.append(step_id)
        detail = {"step_id": step_id, "outcome": kind, "tool": getattr(record, "tool", None)}
        for name in ("reason", "error", "message", "verified"):
            value = getattr(record, name, None)
            if value not in (None, ""):
                detail[name] = value
        report.details.append(detail)
