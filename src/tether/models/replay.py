"""Re-running a model's answers: a run's model calls answered with what a recorded run's
model answered.

`--model rerun:RUN_ID` (formerly `replay:RUN_ID`, still accepted) re-runs a workflow
offline: the n-th model call of the new run gets the n-th recorded exchange's output (or
its failure, with the same reason code). Everything else — parsing, policy, approvals,
tools, verification — runs for real, so a changed policy or tool shows up as a different
journal of decisions: the basis of regression tests for real-model behaviour. **Tools run
for real too: a re-run write writes again** (against a copy of the data, or a test double,
it is a regression test; against production it repeats the effects). `tether replay RUN`
(`tether.replay`) is the replay that never executes anything.

The position in the recording is the number of exchanges the new run has already
recorded, so a replayed run that pauses continues in another process where it was. A run
driven by an in-process model (scripted, a function) records no exchanges — its entries
already hold every proposal — so its calls are read from its entries instead.
"""

from __future__ import annotations

from typing import Any

import msgspec

from tether.errors import ModelSpecError, RunNotFound
from tether.journal import Entry, ModelExchange
from tether.journal import bodies as b
from tether.models.protocol import Exchange, ModelCallError, ModelContext, ModelReply, Usage
from tether.reasons import ReasonCode


class ReplayModel:
    def __init__(self, journal: Any, run_id: str, *, prefix: str = "rerun") -> None:
        self.journal = journal
        self.recorded_run = run_id
        self.name = f"{prefix}:{run_id}"
        self._recording: list[Any] | None = None
        self._served: dict[str, int] = {}

    async def load(self) -> None:
        """Read the recording; a run that is not in the journal, or recorded no model call,
        is a ModelSpecError: callers check it before they create anything."""
        if self._recording is not None:
            return
        try:
            await self.journal.get_run(self.recorded_run)
        except RunNotFound:
            raise ModelSpecError(
                f"{self.name}: no run {self.recorded_run} in this journal, so no recorded "
                "model exchanges to replay"
            ) from None
        recording = await self.journal.read_exchanges(self.recorded_run)
        if not recording:
            recording = calls_from_entries(await self.journal.read_entries(self.recorded_run))
        if not recording:
            raise ModelSpecError(f"{self.name}: run {self.recorded_run} made no model call to re-run")
        self._recording = recording

    async def propose(self, ctx: ModelContext) -> ModelReply:
        if self._recording is None:
            try:
                await self.load()
            except ModelSpecError as exc:
                raise ModelCallError(ReasonCode.MODEL_ERROR, str(exc)) from None
        assert self._recording is not None
        if ctx.run_id not in self._served:
            self._served[ctx.run_id] = len(await self.journal.read_exchanges(ctx.run_id))
        number = self._served[ctx.run_id]
        self._served[ctx.run_id] = number + 1
        if number >= len(self._recording):
            raise ModelCallError(
                ReasonCode.MODEL_ERROR,
                f"replay of run {self.recorded_run} has {len(self._recording)} model call(s); "
                f"call {number + 1} was asked: the replayed run went further than the recording",
            )
        recorded = self._recording[number]
        if recorded.state != ctx.state:
            raise ModelCallError(
                ReasonCode.MODEL_ERROR,
                f"replay diverged at model call {number + 1}: the recording was in state "
                f"{recorded.state!r}, this run is in {ctx.state!r}",
            )
        if recorded.error is not None:
            raise ModelCallError(
                recorded.reason_code or ReasonCode.MODEL_ERROR, f"replayed failure: {recorded.error}"
            )
        return ModelReply(
            output=recorded.output,
            usage=Usage.model_validate(recorded.usage),
            exchange=Exchange(request={"replay_of": self.recorded_run, "seq": recorded.seq}),
        )


def calls_from_entries(entries: list[Entry]) -> list[ModelExchange]:
    """A run's model calls as its entries hold them: each proposal (or unparseable output)
    that began a governed step, and each model failure that escalated the run."""
    calls: list[ModelExchange] = []
    for e in entries:
        record = e.body
        output: Any = None
        error = code = None
        if (
            isinstance(record, b.StepRecord) and not record.continuation and e.kind in b.STEP_KINDS
        ) or isinstance(record, b.HandedOff):
            output = b.proposed(record)
        elif isinstance(record, b.Escalated) and (record.reason_code or "").startswith("model_"):
            error, code = record.message or "model call failed", record.reason_code
        else:
            continue
        usage = getattr(record, "usage", None)
        calls.append(
            ModelExchange(
                run_id=e.run_id,
                seq=len(calls) + 1,
                step_id=e.step_id,
                state=e.state or "",
                model="entries",
                created_at=e.created_at,
                output=output,
                usage=msgspec.to_builtins(usage) if usage is not None else {},
                error=error,
                reason_code=code,
            )
        )
    return calls
