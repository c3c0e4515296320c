"""Workers: processes that claim runnable runs from the journal and drive them.

Any number of workers, on any machines sharing a PostgreSQL journal (or processes sharing a
SQLite file), cooperate through the journal alone: a worker claims a run by taking its lease
(PostgreSQL: `FOR UPDATE SKIP LOCKED`), renews the lease while it works, and releases it
when the run pauses or ends. A worker that dies stops renewing; once its leases expire,
another worker claims those runs and resumes each from its last committed step (an effect
that was under way is settled as the runtime always does: idempotent tools re-run with the
same key, others wait for a person). Idle workers sleep until the journal signals new work
(PostgreSQL LISTEN/NOTIFY) or a poll interval passes.

A worker runs only code an operator gave it: the workflows of its `Registry` (loaded at
startup from its roots), and `function:` models whose module lies under those roots. A run
pinned to anything else is set aside: left as it is for a person, its message saying why,
and not claimed again by this worker.

Every worker also runs the expiry sweeper (tether.sweeper) at most every `sweep_seconds`:
tickets nobody decided expire at their deadline, whether or not anybody looks.

SIGTERM or SIGINT drain a worker: it claims nothing more, lets each run finish the step it
is in, releases the leases and exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tether.errors import ConcurrentWriteError, TetherError
from tether.journal import Commit, Journal, RunRecord, RunUpdate
from tether.models import Model, close_model, resolve_model
from tether.reasons import ReasonCode
from tether.registry import NotRegistered, Registry
from tether.runtime import RunResult, Runtime
from tether.sweeper import sweep_expired

log = logging.getLogger("tether.worker")
# The message of a run a worker set aside starts with this; driving the run clears it.
SET_ASIDE = "not driven by worker"


@dataclass
class WorkerStats:
    claimed: int = 0
    stopped: dict[str, int] = field(default_factory=dict)
    set_aside: int = 0
    errors: int = 0
    expired: int = 0  # tickets the sweeper expired


class Worker:
    """Claims and drives runs of the registry's workflows until stopped, `concurrency` at once."""

    def __init__(
        self,
        journal: Journal,
        registry: Registry,
        *,
        worker_id: str | None = None,
        concurrency: int = 8,
        lease_seconds: float = 15.0,
        limits: Mapping[str, int] | None = None,
        poll_seconds: float = 1.0,
        model_for: Callable[[str], Model] | None = None,
        sweep_seconds: float | None = None,
    ) -> None:
        self.runtime = Runtime(journal, worker_id=worker_id, lease_seconds=lease_seconds)
        self.journal = journal
        self.registry = registry
        self.concurrency = concurrency
        self.limits = dict(limits or {})
        self.poll_seconds = poll_seconds
        # How often the expiry sweeper runs (default: every poll interval).
        self.sweep_seconds = poll_seconds if sweep_seconds is None else sweep_seconds
        self._next_sweep = 0.0
        self.stats = WorkerStats()
        self._model_for = model_for or self._resolve_model
        # One model per spec, shared by the runs that name it (an adapter holds an HTTP
        # client or a loaded model), closed when the worker stops.
        self._models: dict[str, Model] = {}
        self._unloadable: set[str] = set()
        self._stop = asyncio.Event()

    @property
    def worker_id(self) -> str:
        return self.runtime.worker_id

    def stop(self) -> None:
        """Drain: claim nothing more; runs stop after their current step."""
        self._stop.set()
        self.runtime.stopping = True

    async def run(self, *, until_idle: bool = False) -> WorkerStats:
        """Work until stopped (or, with `until_idle`, until nothing is runnable)."""
        active: set[asyncio.Task[None]] = set()
        while not self._stop.is_set():
            await self._sweep()
            claimed = None
            if len(active) < self.concurrency:
                claimed = await self.journal.claim(
                    self.worker_id,
                    lease_seconds=self.runtime.lease_seconds,
                    limits=self.limits or None,
                    skip_runs=self._unloadable,
                )
            if claimed is not None:
                self.stats.claimed += 1
                log.info(
                    "claimed run %s (%s %s, %s in state %s)",
                    claimed.run_id,
                    claimed.workflow_name,
                    claimed.workflow_version,
                    claimed.status,
                    claimed.state,
                )
                task = asyncio.create_task(self._drive(claimed))
                active.add(task)
                task.add_done_callback(active.discard)
                continue
            if until_idle and not active:
                break
            timeout = min(self.poll_seconds, max(0.0, self._next_sweep - time.monotonic()))
            waiting = [asyncio.create_task(self.journal.wait_for_work(timeout))]
            stop_waiter = asyncio.create_task(self._stop.wait())
            await asyncio.wait([*waiting, stop_waiter, *active], return_when=asyncio.FIRST_COMPLETED)
            for t in (*waiting, stop_waiter):
                t.cancel()
        if active:
            await asyncio.gather(*active, return_exceptions=True)
        for model in self._models.values():
            await close_model(model)
        self._models.clear()
        return self.stats

    async def _sweep(self) -> None:
        """Expire the tickets past their deadline, at most every `sweep_seconds`."""
        if time.monotonic() < self._next_sweep:
            return
        self._next_sweep = time.monotonic() + self.sweep_seconds
        try:
            self.stats.expired += await sweep_expired(self.journal)
        except TetherError as exc:  # the store's trouble: tried again at the next interval
            log.warning("expiry sweep failed: %s", exc)

    def _resolve_model(self, spec: str) -> Model:
        """A model of a run's spec; a `function:` model only from a module under the roots."""
        prefix, _, arg = spec.partition(":")
        if prefix != "function":
            return resolve_model(spec, journal=self.journal)
        module = arg.partition(":")[0]
        root = self.registry.module_root(module)
        if root is None:
            raise NotRegistered(
                f"model {spec!r}: module {module!r} is not under this worker's roots "
                f"({', '.join(map(str, self.registry.roots))}); a worker imports no code a run names"
            )
        return resolve_model(spec, root, journal=self.journal)

    def _model(self, spec: str | None) -> Model | None:
        if spec is None:
            return None
        if spec not in self._models:
            self._models[spec] = self._model_for(spec)
        return self._models[spec]

    async def _drive(self, record: RunRecord) -> None:
        try:
            try:
                workflow = self.registry.workflow_for(record)
                model = self._model(record.model_spec)
            except TetherError as exc:
                await self._set_aside(record, str(exc))
                return
            if is_set_aside(record):  # by a worker without this one's roots: no longer true
                record = await note(self.journal, record, None, self.worker_id, self.runtime.lease_seconds)
            result = await self.runtime.resume(record.run_id, workflow, model, claimed=record)
        except ConcurrentWriteError as exc:
            # Another process took the run over (this worker stalled past its lease): the
            # fencing refused our write and nothing was changed; the run is in good hands.
            self.stats.errors += 1
            log.warning("run %s: %s", record.run_id, exc)
            return
        except TetherError as exc:
            # A run its workflow cannot drive here (a policy that changed, a model that cannot
            # be built): left untouched for a person, and not claimed again by this worker.
            self.stats.errors += 1
            log.error("run %s cannot be driven here: %s", record.run_id, exc)
            self._unloadable.add(record.run_id)
            self.stats.set_aside += 1
            await self.journal.release(record.run_id, self.worker_id)
            try:  # so that `tether runs` says why (its lease was given back: noted unleased)
                current = await self.journal.get_run(record.run_id)
                await note(
                    self.journal, current, f"{SET_ASIDE} {self.worker_id}: {exc}", reason_code=_stuck(current)
                )
            except TetherError as lost:  # the run moved on meanwhile: nothing to note
                log.warning("run %s: not noted as set aside: %s", record.run_id, lost)
            return
        except Exception:  # a bug or a lost database: the lease expires and another worker resumes
            self.stats.errors += 1
            log.exception("run %s: driving failed", record.run_id)
            return
        self._count(result)

    async def _set_aside(self, record: RunRecord, why: str) -> None:
        """Leave the run as it is (status, state, everything) with a message saying why, so
        that `tether runs` shows it; this worker does not claim it again."""
        self.stats.set_aside += 1
        self._unloadable.add(record.run_id)
        log.error("run %s set aside, not driven: %s", record.run_id, why)
        try:
            message = f"{SET_ASIDE} {self.worker_id}: {why}"
            await note(
                self.journal,
                record,
                message,
                self.worker_id,
                self.runtime.lease_seconds,
                reason_code=_stuck(record),
            )
        finally:
            await self.journal.release(record.run_id, self.worker_id)

    def _count(self, result: RunResult) -> None:
        self.stats.stopped[result.status] = self.stats.stopped.get(result.status, 0) + 1
        waiting = f" on ticket {result.ticket_id}" if result.ticket_id else ""
        why = f" ({result.reason_code}: {result.message})" if result.reason_code and result.message else ""
        log.info("run %s %s in state %s%s%s", result.run_id, result.status, result.state, waiting, why)


def _stuck(record: RunRecord) -> str | None:
    """The reason code a run set aside is noted with: `not_drivable` while it waits for a
    worker (queued or running); a paused or stopped run keeps its own."""
    return ReasonCode.NOT_DRIVABLE if record.status in ("queued", "running") else None


def is_set_aside(record: RunRecord) -> bool:
    """Whether the run's message is a worker's note that it could not drive the run."""
    return record.message is not None and record.message.startswith(SET_ASIDE)


async def note(
    journal: Journal,
    record: RunRecord,
    message: str | None,
    lease_owner: str | None = None,
    lease_seconds: float | None = None,
    *,
    reason_code: str | None = None,
) -> RunRecord:
    """Set or clear the run's message (and, for a run no worker can drive, its reason code
    `not_drivable`, cleared with the message), nothing else, under `lease_owner`'s lease
    (None: only while nobody holds one)."""
    stuck = record.reason_code == ReasonCode.NOT_DRIVABLE
    code = reason_code if reason_code is not None else (None if stuck else record.reason_code)
    if record.message == message and record.reason_code == code:
        return record
    await journal.commit(
        Commit(
            run_id=record.run_id,
            expected_seq=record.last_seq,
            expected_hash=record.last_hash,
            update=RunUpdate(message=message, reason_code=code),
            lease_owner=lease_owner,
            lease_seconds=lease_seconds,
        )
    )
    return record.model_copy(update={"message": message, "reason_code": code})


def install_signal_handlers(worker: Worker) -> None:
    """SIGTERM and SIGINT drain the worker gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
