"""Workers: processes that claim runnable runs from the journal and drive them.

Any number of workers, on any machines sharing a PostgreSQL journal (or processes sharing a
SQLite file), cooperate through the journal alone: a worker claims a run by taking its lease
(PostgreSQL: `FOR UPDATE SKIP LOCKED`), renews the lease while it works, and releases it
when the run pauses or ends. A worker that dies stops renewing; once its leases expire,
another worker claims those runs and resumes each from its last committed step (an effect
that was under way is settled as the runtime always does: idempotent tools re-run with the
same key, others wait for a person). Idle workers sleep until the journal signals new work
(PostgreSQL LISTEN/NOTIFY) or a poll interval passes.

SIGTERM or SIGINT drain a worker: it claims nothing more, lets each run finish the step it
is in, releases the leases and exits.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from tether.errors import ConcurrentWriteError, TetherError
from tether.journal import Journal, RunRecord
from tether.loader import load_workflow
from tether.models import Model, close_model, resolve_model
from tether.runtime import RunResult, Runtime
from tether.workflow import Workflow

log = logging.getLogger("tether.worker")


@dataclass
class WorkerStats:
    claimed: int = 0
    stopped: dict[str, int] = field(default_factory=dict)
    errors: int = 0


class Worker:
    """Claims and drives runs until stopped. `concurrency` runs are driven at once."""

    def __init__(
        self,
        journal: Journal,
        *,
        worker_id: str | None = None,
        concurrency: int = 8,
        lease_seconds: float = 15.0,
        limits: Mapping[str, int] | None = None,
        poll_seconds: float = 1.0,
        load: Callable[[str, str | None, str], Workflow] = lambda ref, policy, pinned: load_workflow(
            ref, policy=policy, pinned=pinned
        ),
        model_for: Callable[[str], Model] | None = None,
    ) -> None:
        self.runtime = Runtime(journal, worker_id=worker_id, lease_seconds=lease_seconds)
        self.journal = journal
        self.concurrency = concurrency
        self.limits = dict(limits or {})
        self.poll_seconds = poll_seconds
        self.stats = WorkerStats()
        self._load = load
        self._model_for = model_for or (lambda spec: resolve_model(spec, journal=journal))
        # One model per spec, shared by the runs that name it (an adapter holds an HTTP
        # client or a loaded model), closed when the worker stops.
        self._models: dict[str, Model] = {}
        self._workflows: dict[tuple[str, str | None, str], Workflow] = {}
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
            claimed = None
            if len(active) < self.concurrency:
                claimed = await self.journal.claim(
                    self.worker_id,
                    lease_seconds=self.runtime.lease_seconds,
                    now=self.runtime.clock(),
                    limits=self.limits or None,
                    skip_runs=self._unloadable,
                )
            if claimed is not None:
                self.stats.claimed += 1
                task = asyncio.create_task(self._drive(claimed))
                active.add(task)
                task.add_done_callback(active.discard)
                continue
            if until_idle and not active:
                break
            waiting = [asyncio.create_task(self.journal.wait_for_work(self.poll_seconds))]
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

    def _model(self, spec: str | None) -> Model | None:
        if spec is None:
            return None
        if spec not in self._models:
            self._models[spec] = self._model_for(spec)
        return self._models[spec]

    async def _drive(self, record: RunRecord) -> None:
        try:
            workflow = self._workflow(record)
            model = self._model(record.model_spec)
            result = await self.runtime.resume(record.run_id, workflow, model)
        except ConcurrentWriteError as exc:
            # Another process took the run over (this worker stalled past its lease): the
            # fencing refused our write and nothing was changed; the run is in good hands.
            self.stats.errors += 1
            log.warning("run %s: %s", record.run_id, exc)
            return
        except TetherError as exc:
            # A run this worker cannot drive (its definition changed or is gone, a model it
            # cannot build): leave it untouched for a person, and do not claim it again.
            self.stats.errors += 1
            self._unloadable.add(record.run_id)
            await self.journal.release(record.run_id, self.worker_id)
            log.error("run %s cannot be driven here: %s", record.run_id, exc)
            return
        except Exception:  # a bug or a lost database: the lease expires and another worker resumes
            self.stats.errors += 1
            log.exception("run %s: driving failed", record.run_id)
            return
        self._count(result)

    def _count(self, result: RunResult) -> None:
        self.stats.stopped[result.status] = self.stats.stopped.get(result.status, 0) + 1

    def _workflow(self, record: RunRecord) -> Workflow:
        key = (record.workflow_ref, record.policy_ref, record.workflow_hash)
        if key not in self._workflows:
            self._workflows[key] = self._load(record.workflow_ref, record.policy_ref, record.workflow_hash)
        return self._workflows[key]


def install_signal_handlers(worker: Worker) -> None:
    """SIGTERM and SIGINT drain the worker gracefully."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, worker.stop)
