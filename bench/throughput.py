"""Throughput of governed runs: tether on SQLite and PostgreSQL, in one process and with workers,
against DBOS Transact on the same workload; recovery after every worker is killed; and many
runs waiting on slow models in one process (steps/s and memory per waiting run).

The workload (bench/workload/): one agent state whose scripted proposer looks three items up
(reads), records one (an idempotent write: an intent synced to disk, then the result), and
finishes; a trivial tool, a three-rule policy. Five governed steps per run. DBOS runs the same
shape: a workflow of five `@DBOS.step`s (bench/workload/dbos_workload.py), on its own
defaults for durability (see the notes column).

What it measures, each on a fresh SQLite file or a fresh PostgreSQL schema:

1. tether, one process: `Runtime(open_journal(store)).start(workflow, model)` N times, one
   after another ("seq") and all at once with asyncio.gather ("gather"); then N runs
   submitted to the journal and driven by K = 1, 2, 4 worker processes
   (`python -m tether worker --db STORE --workflows bench/workload --concurrency C
   --until-idle`). For the worker rows steps/s is over the span the store shows (first
   step after a run started to the last run's finish); the wall time from spawning the
   workers, process start included, is in the notes.
2. DBOS Transact, in a child process per row (DBOS is one instance per process): the same N
   workflows called one after another (sync workflow) and gathered (async workflow), on
   SQLite and PostgreSQL; and on PostgreSQL enqueued on a DBOS queue drained by K worker
   processes (span: first dequeue to last completion, from DBOS's workflow_status).
3. Recovery: R runs submitted, K workers with a short lease (`--lease`) and a model taking
   50 ms per proposal (bench/workload/slow_model.py, so that runs are in flight); once about
   half are completed every worker is SIGKILLed and K fresh workers started at once; the
   time until every run is completed or in doubt (the killed workers' leases must expire
   first), with how many runs were queued and leased at the kill.
4. Waiting runs: W runs started at once in ONE process against a model that takes 200 ms per
   proposal (`FunctionModel`, `await asyncio.sleep(0.2)`): steps/s, and the memory per
   waiting run from the RSS high-water mark (VmHWM, reset before the runs) and, in a second
   child with tracemalloc on (30 frames, fewer runs: it is slow), what is held and where it
   was allocated while every run is in its first model call, charged to the tether line that
   led to it. Compared with the single-run commit floor of the disk (one small INSERT +
   COMMIT per transaction, one writer) and the issue's goal of < 10 KB per waiting run.
   Each runs in a child process of its own, so the RSS is the runs' and not earlier rows'.

No timing is asserted: this is a report. Rows that fail print the error in their notes.

Run:  .venv/bin/python bench/throughput.py [--quick] [--waiting 10000] [--profile]
(`pip install -e '.[dev,bench]'` first, for dbos and psycopg; PostgreSQL at $TETHER_BENCH_PG,
default postgresql://postgres@127.0.0.1:5432/test; `--no-pg` skips it.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import inspect
import io
import json
import os
import platform
import pstats
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
WORKLOAD = BENCH / "workload"
PROPOSALS_FILE = WORKLOAD / "proposals.json"
MODEL_SPEC = f"script:{PROPOSALS_FILE}"
STEPS_PER_RUN = 5  # governed steps (model proposals) per run; DBOS: @DBOS.step calls per workflow
TRACE_FRAMES = 30  # frames kept per allocation: enough to reach tether's own code
MODEL_SECONDS = 0.2  # the slow model of the waiting-runs measurement, per proposal
SETTLED = ("completed", "effect_in_doubt")
PG_DEFAULT = os.environ.get("TETHER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
RESULT = "RESULT "
DURABILITY_NOTE = {
    ("sqlite", "normal"): "WAL, synchronous NORMAL, intents FULL (default)",
    ("sqlite", "full"): "durability=full: every commit synced",
    ("pg", "normal"): "synchronous_commit off, intents on (default)",
    ("pg", "full"): "durability=full: synchronous_commit on",
}  # a child process prints its result as one JSON line after this prefix


# -- rows and reporting -------------------------------------------------------------------


@dataclass
class Row:
    system: str
    store: str
    workers: str
    runs: int
    seconds: float | None
    notes: list[str] = field(default_factory=list)

    @property
    def steps_per_second(self) -> float | None:
        return None if not self.seconds else self.runs * STEPS_PER_RUN / self.seconds

    @property
    def runs_per_second(self) -> float | None:
        return None if not self.seconds else self.runs / self.seconds


HEADER = f"{'system':<7} {'store':<10} {'workers':<18} {'runs':>6} {'steps/s':>8} {'runs/s':>7}  notes"


def _num(x: float | None, width: int) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width},.0f}"


def line(row: Row) -> str:
    return (
        f"{row.system:<7} {row.store:<10} {row.workers:<18} {row.runs:>6} "
        f"{_num(row.steps_per_second, 8)} {_num(row.runs_per_second, 7)}  {'; '.join(row.notes)}"
    )


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def failed(system: str, store: str, workers: str, runs: int, exc: BaseException) -> Row:
    message = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return Row(system, store, workers, runs, None, [f"FAILED: {message[:300]}"])


# -- stores -------------------------------------------------------------------------------


def pg_url(base: str, schema: str) -> str:
    sep = "&" if "?" in base else "?"
    return f"{base}{sep}options=-csearch_path%3D{schema}"


@contextlib.contextmanager
def pg_schema(base: str, prefix: str) -> Iterator[tuple[str, str]]:
    """A fresh schema (name, URL with it as search_path), dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield name, pg_url(base, name)
    finally:
        with psycopg.connect(base, autocommit=True) as admin:
            admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@contextlib.contextmanager
def tether_store(kind: str, tmp: Path, pg: str) -> Iterator[str]:
    """A fresh tether store: a SQLite file path, or a PostgreSQL URL on a fresh schema."""
    if kind == "sqlite":
        path = tmp / f"tether-{uuid.uuid4().hex[:8]}.db"
        try:
            yield str(path)
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        with pg_schema(pg, "bench_tether") as (_, url):
            yield url


def pg_available(base: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(base, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def stop_heartbeat(runtime: Any) -> None:
    """End the runtime's lease-renewal task before the journal closes.

    `Runtime._renew_leases` outlives the runs it renews by up to lease/3 seconds, and a round
    still under way after `aclose()` reopens a PostgreSQL journal's pool (see the report).
    """
    task = getattr(runtime, "_heartbeat", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def close(journal: Any) -> None:
    aclose = getattr(journal, "aclose", None)
    await maybe_await(aclose() if aclose is not None else journal.close())


# -- commit floors --------------------------------------------------------------------------


def sqlite_floor(tmp: Path, synchronous: str, n: int) -> float:
    """Commits/s: one ~100-byte INSERT + COMMIT per transaction, WAL mode, one writer."""
    path = tmp / f"floor-{synchronous}.db"
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        body = "x" * 100
        start = time.perf_counter()
        for _ in range(n):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (body) VALUES (?)", (body,))
            db.execute("COMMIT")
        return n / (time.perf_counter() - start)
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


def pg_floor(base: str, n: int) -> float:
    """Commits/s: one ~100-byte INSERT per transaction (autocommit), one connection."""
    import psycopg

    with pg_schema(base, "bench_floor") as (_, url), psycopg.connect(url, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id BIGSERIAL PRIMARY KEY, body TEXT NOT NULL)")
        body = "x" * 100
        start = time.perf_counter()
        for _ in range(n):
            conn.execute("INSERT INTO t (body) VALUES (%s)", (body,))
        return n / (time.perf_counter() - start)


# -- tether, one process ----------------------------------------------------------------


class CountingJournal:
    """Wraps a journal: counts the calls the runtime makes to each method, and their time."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.calls: Counter[str] = Counter()
        self.seconds: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if not inspect.iscoroutinefunction(attr):
            return attr

        async def counted(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                self.calls[name] += 1
                self.seconds[name] += time.perf_counter() - start

        return counted

    def per_run(self, runs: int) -> str:
        parts = [
            f"{name} {count / runs:.1f}x {self.seconds[name] / count * 1e6:,.0f}us"
            for name, count in self.calls.most_common()
            if name != "aclose"
        ]
        return ", ".join(parts)


def workload() -> Any:
    from tether import load_workflow

    return load_workflow(WORKLOAD)


async def tether_local(
    store: str, n: int, mode: str, durability: str = "normal"
) -> tuple[float, Counter[str], CountingJournal]:
    """N runs started by one Runtime in this process, one after another or gathered."""
    from tether import Runtime, ScriptedModel, open_journal

    workflow = workload()
    model = ScriptedModel.from_file(PROPOSALS_FILE)
    journal = CountingJournal(open_journal(store, durability=durability))
    runtime = Runtime(journal)  # type: ignore[arg-type]
    ref = str(WORKLOAD)
    try:
        for _ in range(3):  # warm-up: first-call costs (CEL compile, schemas) out of the timing
            await runtime.start(workflow, model, workflow_ref=ref)
        journal.calls.clear()
        journal.seconds.clear()
        start = time.perf_counter()
        if mode == "seq":
            results = [await runtime.start(workflow, model, workflow_ref=ref) for _ in range(n)]
        else:
            results = await asyncio.gather(
                *(runtime.start(workflow, model, workflow_ref=ref) for _ in range(n))
            )
        seconds = time.perf_counter() - start
    finally:
        await stop_heartbeat(runtime)
        await close(journal)
    return seconds, Counter(r.status for r in results), journal


def measure_tether_local(kind: str, tmp: Path, pg: str, n: int, mode: str, durability: str = "normal") -> Row:
    store_name = "SQLite" if kind == "sqlite" else "PostgreSQL"
    workers = f"1 process, {mode}"
    try:
        with tether_store(kind, tmp, pg) as store:
            seconds, statuses, journal = asyncio.run(tether_local(store, n, mode, durability))
    except Exception as exc:
        return failed("tether", store_name, workers, n, exc)
    notes = [DURABILITY_NOTE[kind, durability]]
    if statuses != Counter(completed=n):
        notes.append(f"statuses {dict(statuses)}")
    notes.append(f"journal calls/run: {journal.per_run(n)}")
    return Row("tether", store_name, workers, n, seconds, notes)


# -- tether, worker processes ---------------------------------------------------------------


async def submit_runs(store: str, n: int, model_spec: str = MODEL_SPEC) -> list[str]:
    from tether import Runtime, open_journal

    workflow = workload()
    journal = open_journal(store)
    try:
        runtime = Runtime(journal)
        ids = []
        for _ in range(n):
            result = await runtime.submit(workflow, workflow_ref=str(WORKLOAD), model_spec=model_spec)
            ids.append(result.run_id)
        return ids
    finally:
        await close(journal)


async def run_statuses(store: str, limit: int) -> Counter[str]:
    from tether import open_journal

    journal = open_journal(store)
    try:
        return Counter(r.status for r in await journal.list_runs(limit=limit))
    finally:
        await close(journal)


async def store_span(store: str, ids: list[str]) -> tuple[float, int]:
    """Seconds from the first step any run took after it started to the last entry written;
    and how many intents were re-run after a crash (`recovered` in a step's body)."""
    from tether import open_journal

    journal = open_journal(store)
    first, last, recovered = float("inf"), 0.0, 0
    try:
        for run_id in ids:
            entries = await journal.read_entries(run_id)
            worked = [e for e in entries if e.kind != "run_started"]
            if worked:
                first = min(first, worked[0].created_at)
                last = max(last, worked[-1].created_at)
            recovered += sum(1 for e in entries if e.kind == "step" and e.body.get("recovered"))
    finally:
        await close(journal)
    return (last - first if last else 0.0), recovered


def spawn_tether_worker(
    store: str,
    concurrency: int,
    log: Path,
    *,
    lease: float | None = None,
    until_idle: bool = True,
    model_seconds: float | None = None,
) -> subprocess.Popen[bytes]:
    """`tether worker`; with `model_seconds`, run from the workload folder, where the
    `function:slow_model:propose` model of the runs resolves, taking that long per proposal."""
    cmd = [sys.executable, "-m", "tether", "worker", "--db", store, "--workflows", str(WORKLOAD)]
    cmd += ["--concurrency", str(concurrency)]
    if lease is not None:
        cmd += ["--lease", f"{lease:g}"]
    if until_idle:
        cmd.append("--until-idle")
    env = {**os.environ, "BENCH_MODEL_SECONDS": str(model_seconds or 0)}
    with open(log, "ab") as err:
        return subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=err, cwd=WORKLOAD if model_seconds else ROOT, env=env
        )


def wait_all(procs: list[subprocess.Popen[bytes]], timeout: float, log: Path) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            code = p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise TimeoutError(f"workers still running after {timeout:.0f}s; log {log}") from None
        if code != 0:
            tail = log.read_text(errors="replace")[-600:] if log.exists() else ""
            raise RuntimeError(f"worker exited {code}: {tail}")


def worker_startup(kind: str, tmp: Path, pg: str) -> float | None:
    """Seconds for `tether worker --until-idle` to start and exit on an empty store."""
    try:
        with tether_store(kind, tmp, pg) as store:
            asyncio.run(submit_runs(store, 0))  # creates the schema
            log = tmp / "startup.log"
            start = time.perf_counter()
            wait_all([spawn_tether_worker(store, 1, log)], 120, log)
            return time.perf_counter() - start
    except Exception as exc:
        progress(f"worker start-up not measured: {exc}")
        return None


def measure_tether_workers(kind: str, tmp: Path, pg: str, n: int, k: int, concurrency: int) -> Row:
    store_name = "SQLite" if kind == "sqlite" else "PostgreSQL"
    workers = f"{k} worker{'s' if k > 1 else ''} x {concurrency}"
    try:
        with tether_store(kind, tmp, pg) as store:
            ids = asyncio.run(submit_runs(store, n))
            log = tmp / f"workers-{kind}-{k}.log"
            start = time.perf_counter()
            procs = [spawn_tether_worker(store, concurrency, log) for _ in range(k)]
            wait_all(procs, 600, log)
            wall = time.perf_counter() - start
            statuses = asyncio.run(run_statuses(store, n + 100))
            span, _ = asyncio.run(store_span(store, ids))
    except Exception as exc:
        return failed("tether", store_name, workers, n, exc)
    notes = [f"span {span:.2f}s; wall from spawn {wall:.2f}s ({n / wall:,.0f} runs/s)"]
    if statuses != Counter(completed=n):
        notes.append(f"statuses {dict(statuses)}")
    return Row("tether", store_name, workers, n, span or None, notes)


# -- recovery -------------------------------------------------------------------------------


@dataclass
class Recovery:
    store: str
    runs: int
    workers: int
    concurrency: int
    lease: float
    model_seconds: float
    at_kill: dict[str, int] = field(default_factory=dict)
    leased_at_kill: int = 0
    first_phase: float = 0.0
    from_kill: float = 0.0
    statuses: dict[str, int] = field(default_factory=dict)
    recovered: int = 0
    error: str | None = None


async def leased_runs(store: str, limit: int) -> tuple[Counter[str], int]:
    from tether import open_journal

    journal = open_journal(store)
    try:
        records = await journal.list_runs(limit=limit)
    finally:
        await close(journal)
    now = time.time()
    held = sum(1 for r in records if r.lease_owner and (r.lease_expires_at or 0) > now)
    return Counter(r.status for r in records), held


def poll_until(store: str, n: int, done: Callable[[Counter[str]], bool], limit: float) -> Counter[str]:
    """Poll the runs' statuses until `done` says so or `limit` seconds pass."""
    start = time.perf_counter()
    while True:
        statuses = asyncio.run(run_statuses(store, n + 100))
        if done(statuses) or time.perf_counter() - start > limit:
            return statuses
        time.sleep(0.02)


def signal_all(procs: list[subprocess.Popen[bytes]], sig: int) -> None:
    for p in procs:
        p.send_signal(sig)
    for p in procs:
        p.wait(timeout=60)


def measure_recovery(
    kind: str, tmp: Path, pg: str, n: int, k: int, concurrency: int, lease: float, model_seconds: float
) -> Recovery:
    name = "SQLite" if kind == "sqlite" else "PostgreSQL"
    result = Recovery(name, n, k, concurrency, lease, model_seconds)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn() -> list[subprocess.Popen[bytes]]:
        return [
            spawn_tether_worker(
                store, concurrency, log, lease=lease, until_idle=False, model_seconds=model_seconds
            )
            for _ in range(k)
        ]

    try:
        with tether_store(kind, tmp, pg) as store:
            spec = "function:slow_model:propose" if model_seconds else MODEL_SPEC
            ids = asyncio.run(submit_runs(store, n, spec))
            log = tmp / f"recovery-{kind}.log"
            start = time.perf_counter()
            procs = spawn()
            poll_until(store, n, lambda st: st["completed"] >= n // 2, 300)
            signal_all(procs, signal.SIGKILL)
            killed = time.perf_counter()
            result.first_phase = killed - start
            at_kill, result.leased_at_kill = asyncio.run(leased_runs(store, n + 100))
            result.at_kill = dict(at_kill)
            procs = spawn()
            statuses = poll_until(store, n, lambda st: sum(st[s] for s in SETTLED) >= n, 600)
            result.from_kill = time.perf_counter() - killed
            result.statuses = dict(statuses)
            signal_all(procs, signal.SIGTERM)
            _, result.recovered = asyncio.run(store_span(store, ids))
    except Exception as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        for p in procs:
            if p.poll() is None:
                p.kill()
    return result


# -- waiting runs ---------------------------------------------------------------------------


def proc_status(key: str) -> int | None:
    """A field of /proc/self/status in bytes (VmRSS, VmHWM), Linux only."""
    try:
        with open("/proc/self/status") as f:
            for row in f:
                if row.startswith(key + ":"):
                    return int(row.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


async def waiting_runs(store: str, n: int, trace: bool, top: int) -> dict[str, Any]:
    """N runs at once in this process, each proposal taking the model MODEL_SECONDS."""
    from tether import FunctionModel, ModelContext, Runtime, open_journal

    script = json.loads(PROPOSALS_FILE.read_text())["proposals"]
    waiting = 0
    most_waiting = 0

    async def propose(ctx: ModelContext) -> dict[str, Any]:
        nonlocal waiting, most_waiting
        waiting += 1
        most_waiting = max(most_waiting, waiting)
        try:
            await asyncio.sleep(MODEL_SECONDS)
        finally:
            waiting -= 1
        return dict(script[ctx.proposals_made])

    workflow = workload()
    model = FunctionModel(propose, name="slow-script")
    journal = CountingJournal(open_journal(store))
    runtime = Runtime(journal)  # type: ignore[arg-type]
    ref = str(WORKLOAD)
    out: dict[str, Any] = {"runs": n}
    try:
        await asyncio.gather(*(runtime.start(workflow, model, workflow_ref=ref) for _ in range(3)))
        journal.calls.clear()
        journal.seconds.clear()
        gc.collect()
        rss_before = proc_status("VmRSS")
        out["hwm_reset"] = reset_peak_rss()
        snapshots: dict[str, Any] = {}
        if trace:
            tracemalloc.start(TRACE_FRAMES)
            snapshots["before"] = tracemalloc.take_snapshot()
            traced_before = tracemalloc.get_traced_memory()[0]
            tracemalloc.reset_peak()
        rss_waiting = 0

        async def watch() -> None:
            nonlocal rss_waiting
            while True:
                await asyncio.sleep(0.05)
                rss_waiting = max(rss_waiting, proc_status("VmRSS") or 0)
                if trace and "waiting" not in snapshots and waiting >= 0.95 * n:
                    # Every run is in its model call: what a waiting run holds. Tracing stops
                    # here, because it slows everything after it several times over.
                    snapshots["waiting"] = tracemalloc.take_snapshot()
                    snapshots["waiting_count"] = waiting
                    current, peak = tracemalloc.get_traced_memory()
                    out["traced_growth_waiting"] = current - traced_before
                    out["traced_peak_growth"] = peak - traced_before
                    tracemalloc.stop()

        watcher = asyncio.create_task(watch())
        start = time.perf_counter()
        cpu = time.process_time()
        results = await asyncio.gather(*(runtime.start(workflow, model, workflow_ref=ref) for _ in range(n)))
        out["seconds"] = time.perf_counter() - start
        out["cpu_seconds"] = time.process_time() - cpu
        watcher.cancel()
        out["statuses"] = dict(Counter(r.status for r in results))
        out["most_waiting"] = most_waiting
        out["journal"] = journal.per_run(n)
        if rss_before is not None:
            out["rss_before"] = rss_before
            out["rss_growth_peak"] = (proc_status("VmHWM") or 0) - rss_before
            out["rss_growth_waiting"] = rss_waiting - rss_before
        if trace:
            tracemalloc.stop()
            if "waiting" in snapshots:
                out["snapshot_waiting"] = snapshots["waiting_count"]
                out["top"] = top_allocations(snapshots["before"], snapshots["waiting"], n, top)
        print(RESULT + json.dumps(out), flush=True)  # before any clean-up that could hang
    finally:
        await stop_heartbeat(runtime)
        await close(journal)
    return out


def _where(frame: Any) -> str:
    name = frame.filename
    for marker in ("/site-packages/", "/src/", "/lib/python3."):
        if marker in name:
            name = name.split(marker, 1)[1]
            break
    return f"{name}:{frame.lineno}"


def top_allocations(before: Any, after: Any, n: int, top: int) -> list[str]:
    """The allocation sites that grew most between two snapshots, in bytes per run.

    Each site is the innermost frame, attributed to the innermost frame in tether's own code
    that led to it (pydantic or json allocations are charged to the tether line calling them).
    """
    sites: Counter[str] = Counter()
    blocks: Counter[str] = Counter()
    for stat in after.compare_to(before, "traceback"):
        frames = list(stat.traceback)  # oldest first
        inner = _where(frames[-1])
        ours = next((f for f in reversed(frames) if "/tether/" in f.filename), None)
        key = inner if ours is None or ours is frames[-1] else f"{_where(ours)} -> {inner}"
        sites[key] += stat.size_diff
        blocks[key] += stat.count_diff
    rows = [f"all sites: {sum(sites.values()) / n:,.0f} B/run"]
    for key, size in sites.most_common(top):
        rows.append(f"{size / n:>8,.0f} B/run {blocks[key] / n:>6.1f} blocks/run  {key}")
    return rows


# -- DBOS -----------------------------------------------------------------------------------


def dbos_config(url: str, schema: str | None, executor: str) -> dict[str, Any]:
    config: dict[str, Any] = {
        "name": "bench-throughput",
        "system_database_url": url,
        "log_level": "WARNING",
        "application_version": "bench-throughput-1",
        "executor_id": executor,
    }
    if schema:
        config["dbos_system_schema"] = schema
    return config


def dbos_local(url: str, schema: str | None, n: int, mode: str) -> dict[str, Any]:
    """Child: N DBOS workflows in this process, called one after another or gathered."""
    sys.path.insert(0, str(WORKLOAD))
    from dbos import DBOS
    from dbos_workload import run_async, run_sync

    DBOS(config=dbos_config(url, schema, "local"))  # type: ignore[arg-type]
    DBOS.launch()
    try:
        for i in range(3):
            run_sync(-1 - i)
        start = time.perf_counter()
        if mode == "seq":
            for i in range(n):
                run_sync(i)
        else:

            async def gathered() -> None:
                await asyncio.gather(*(run_async(i) for i in range(n)))

            asyncio.run(gathered())
        return {"seconds": time.perf_counter() - start}
    finally:
        DBOS.destroy()


def dbos_worker(url: str, schema: str) -> None:
    """Child: a DBOS process that dequeues the bench queue until it is terminated."""
    sys.path.insert(0, str(WORKLOAD))
    from dbos import DBOS
    from dbos_workload import QUEUE

    DBOS(config=dbos_config(url, schema, f"worker-{os.getpid()}"))  # type: ignore[arg-type]
    DBOS.listen_queues([QUEUE])
    DBOS.launch()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    DBOS.destroy()


def dbos_queue(url: str, schema: str, n: int, k: int, concurrency: int, poll: float) -> dict[str, Any]:
    """Child: enqueue N workflows on a DBOS queue, then start K worker processes; time them."""
    sys.path.insert(0, str(WORKLOAD))
    import sqlalchemy as sa
    from dbos import DBOS
    from dbos_workload import QUEUE, run_sync

    DBOS(config=dbos_config(url, schema, "enqueuer"))  # type: ignore[arg-type]
    DBOS.listen_queues([])  # this process only enqueues
    DBOS.launch()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        queue = DBOS.register_queue(QUEUE, worker_concurrency=concurrency, polling_interval_sec=poll)
        start = time.perf_counter()
        for i in range(n):
            queue.enqueue(run_sync, i)
        enqueue_rate = n / (time.perf_counter() - start)
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        done_sql = sa.text(
            f"SELECT count(*), min(started_at_epoch_ms), max(updated_at) FROM {schema}.workflow_status "
            "WHERE queue_name = :q AND status = 'SUCCESS'"
        )
        child = [sys.executable, str(Path(__file__).resolve()), "--child", "dbos-worker"]
        arg = json.dumps({"url": url, "schema": schema})
        start = time.perf_counter()
        procs = [subprocess.Popen([*child, arg], cwd=ROOT) for _ in range(k)]
        with engine.connect() as conn:
            while True:
                done, first, last = conn.execute(done_sql, {"q": QUEUE}).one()
                conn.commit()
                if done >= n or time.perf_counter() - start > 600:
                    break
                time.sleep(0.05)
        wall = time.perf_counter() - start
        engine.dispose()
        return {
            "done": done,
            "wall": wall,
            "span": (last - first) / 1000 if done else None,
            "enqueue_rate": enqueue_rate,
        }
    finally:
        for p in procs:
            p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                p.kill()
        DBOS.destroy()


def run_child(kind: str, arg: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run this script as a child process for one measurement; return its JSON result.

    A child that printed its result but then did not exit within the timeout is killed and
    its result kept, with `hung_on_exit` set.
    """
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, json.dumps(arg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    hung = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        hung = True
    for row in reversed(stdout.splitlines()):
        if row.startswith(RESULT):
            result: dict[str, Any] = json.loads(row.removeprefix(RESULT))
            if hung:
                result["hung_on_exit"] = True
            return result
    state = f"timed out after {timeout:.0f}s" if hung else f"exited {proc.returncode}"
    raise RuntimeError(f"child {kind} {state}: {(stderr or stdout)[-800:]}")


def child_main(kind: str, arg: dict[str, Any]) -> None:
    if kind == "dbos-worker":
        dbos_worker(arg["url"], arg["schema"])
        return
    if kind == "dbos-local":
        result = dbos_local(arg["url"], arg.get("schema"), arg["n"], arg["mode"])
    elif kind == "dbos-queue":
        result = dbos_queue(arg["url"], arg["schema"], arg["n"], arg["k"], arg["concurrency"], arg["poll"])
    elif kind == "waiting":
        asyncio.run(waiting_runs(arg["store"], arg["n"], arg["trace"], arg["top"]))
        return  # printed its result itself
    else:
        raise SystemExit(f"unknown child {kind!r}")
    print(RESULT + json.dumps(result), flush=True)


def dbos_sqlite_url(tmp: Path) -> tuple[str, Path]:
    path = tmp / f"dbos-{uuid.uuid4().hex[:8]}.db"
    return f"sqlite:///{path}", path


def measure_dbos_local(kind: str, tmp: Path, pg: str, n: int, mode: str) -> Row:
    store_name = "SQLite" if kind == "sqlite" else "PostgreSQL"
    workers = f"1 process, {mode}"
    notes = [
        "sync workflow, called in turn" if mode == "seq" else "async workflow + async steps, gathered",
        "DBOS defaults: rollback journal, synchronous FULL"
        if kind == "sqlite"
        else "DBOS defaults: synchronous_commit on",
    ]
    try:
        if kind == "sqlite":
            url, path = dbos_sqlite_url(tmp)
            try:
                result = run_child("dbos-local", {"url": url, "n": n, "mode": mode})
            finally:
                for suffix in ("", "-wal", "-shm"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        else:
            name = f"bench_dbos_{uuid.uuid4().hex[:8]}"
            try:
                result = run_child("dbos-local", {"url": pg, "schema": name, "n": n, "mode": mode})
            finally:
                drop_schema(pg, name)
    except Exception as exc:
        return failed("DBOS", store_name, workers, n, exc)
    return Row("DBOS", store_name, workers, n, result["seconds"], notes)


def drop_schema(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


def measure_dbos_queue(pg: str, n: int, k: int, concurrency: int, poll: float) -> Row:
    workers = f"{k} worker{'s' if k > 1 else ''} x {concurrency}"
    name = f"bench_dbosq_{uuid.uuid4().hex[:8]}"
    try:
        arg = {"url": pg, "schema": name, "n": n, "k": k, "concurrency": concurrency, "poll": poll}
        result = run_child("dbos-queue", arg)
    except Exception as exc:
        return failed("DBOS", "PostgreSQL", workers, n, exc)
    finally:
        drop_schema(pg, name)
    notes = [
        f"queue, poll {poll:g}s; span {result['span'] or 0:.2f}s; wall from spawn {result['wall']:.2f}s "
        f"({n / result['wall']:,.0f} runs/s); enqueue {result['enqueue_rate']:,.0f}/s (not timed)"
    ]
    if result["done"] < n:
        notes.append(f"only {result['done']} of {n} completed")
    return Row("DBOS", "PostgreSQL", workers, n, result["span"], notes)


# -- profile ------------------------------------------------------------------------------


def profile_sequential(tmp: Path, n: int, top: int) -> None:
    """cProfile of N sequential tether runs on SQLite: where a run's time goes."""
    with tether_store("sqlite", tmp, "") as store:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(tether_local(store, n, "seq"))
        profiler.disable()
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        stats = pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key)
        stats.print_stats(top)
        print(f"\n== cProfile, {n} sequential tether runs on SQLite (+3 warm-up), top {top} by {key} ==")
        print(out.getvalue().split("\n", 4)[-1].rstrip())


# -- orchestration --------------------------------------------------------------------------


@dataclass
class Plan:
    runs: int
    dbos_runs: int
    workers: list[int]
    concurrency: int
    recovery_runs: int
    recovery_workers: int
    recovery_concurrency: int
    lease: float
    recovery_model_ms: float
    waiting: int
    pg_waiting: int
    trace_runs: int
    floor_commits: int
    dbos_poll: float
    pg: str | None
    dbos: bool
    top: int


def throughput_rows(plan: Plan, tmp: Path) -> list[Row]:
    """Every throughput row, printed to stderr as it finishes."""
    pg = plan.pg or ""
    kinds = ["sqlite"] + (["pg"] if plan.pg else [])
    todo: list[Callable[[], Row]] = []
    for kind in kinds:
        for mode, durability in (("seq", "normal"), ("gather", "normal"), ("seq", "full")):
            todo.append(
                lambda k=kind, m=mode, d=durability: measure_tether_local(k, tmp, pg, plan.runs, m, d)
            )
        for count in plan.workers:
            if kind == "sqlite" and count > 2:
                continue  # one file, one writer at a time: more processes only contend
            todo.append(
                lambda k=kind, c=count: measure_tether_workers(k, tmp, pg, plan.runs, c, plan.concurrency)
            )
    if plan.dbos:
        for kind in kinds:
            for mode in ("seq", "gather"):
                todo.append(lambda k=kind, m=mode: measure_dbos_local(k, tmp, pg, plan.dbos_runs, m))
        for count in plan.workers if plan.pg else []:
            todo.append(
                lambda c=count: measure_dbos_queue(pg, plan.dbos_runs, c, plan.concurrency, plan.dbos_poll)
            )
    rows = []
    for measure in todo:
        rows.append(measure())
        progress(line(rows[-1]))
    return rows


def waiting_results(plan: Plan, tmp: Path) -> list[tuple[str, dict[str, Any] | str]]:
    """SQLite, SQLite with tracemalloc (fewer runs: tracing 30 frames is slow), PostgreSQL."""
    todo = [("sqlite", plan.waiting, False), ("sqlite", plan.trace_runs, True)]
    if plan.pg:
        todo.append(("pg", plan.pg_waiting, False))
    out: list[tuple[str, dict[str, Any] | str]] = []
    for kind, n, trace in todo:
        if n <= 0:
            continue
        label = f"{'SQLite' if kind == 'sqlite' else 'PostgreSQL'}{', tracemalloc on' if trace else ''}"
        try:
            with tether_store(kind, tmp, plan.pg or "") as store:
                arg = {"store": store, "n": n, "trace": trace, "top": plan.top}
                result: dict[str, Any] | str = run_child("waiting", arg)
        except Exception as exc:
            result = f"FAILED: {type(exc).__name__}: {exc}"[:600]
        out.append((label, result))
        progress(f"waiting runs, {label}: {result if isinstance(result, str) else 'done'}")
    return out


def report_waiting(results: list[tuple[str, dict[str, Any] | str]], floors: dict[str, float]) -> None:
    print(
        f"\n== waiting runs: all started at once in one process, "
        f"model {MODEL_SECONDS * 1000:.0f} ms/proposal =="
    )
    print("goal (issue): < 10 KB per waiting run; durable steps/s >= the single-run commit floor")
    for label, r in results:
        if isinstance(r, str):
            print(f"{label}: {r}")
            continue
        n = r["runs"]
        steps = n * STEPS_PER_RUN
        rate = steps / r["seconds"]
        ideal = STEPS_PER_RUN * MODEL_SECONDS
        print(
            f"{label}: {n:,} runs, {steps:,} steps in {r['seconds']:.1f}s (a lone run needs {ideal:.1f}s of "
            f"model time) = {rate:,.0f} steps/s, {n / r['seconds']:,.0f} runs/s; CPU {r['cpu_seconds']:.1f}s "
            f"({r['cpu_seconds'] / steps * 1e6:,.0f} us/step); at most {r['most_waiting']:,} waiting on the "
            f"model at once; statuses {r['statuses']}"
        )
        traced = "traced_growth_waiting" in r
        keys = ["pg"] if label.startswith("PostgreSQL") else ["sqlite-full", "sqlite-normal"]
        for key in [] if traced else [k for k in keys if k in floors]:
            print(
                f"    vs single-run commit floor {key} ({floors[key]:,.0f} commits/s): "
                f"{rate / floors[key]:.2f}x  -> {'met' if rate >= floors[key] else 'NOT met'}"
            )
        if r.get("hung_on_exit"):
            print("    the child printed its result but did not exit: killed (see the report on leases)")
        if "rss_growth_peak" in r and traced:
            print(f"    RSS growth {r['rss_growth_peak'] / n / 1024:,.1f} KB/run (inflated by tracemalloc)")
        elif "rss_growth_peak" in r:
            kb_peak = r["rss_growth_peak"] / n / 1024
            kb_wait = r["rss_growth_waiting"] / n / 1024
            reset = "" if r.get("hwm_reset") else " (VmHWM could not be reset: includes set-up)"
            print(
                f"    RSS growth: peak (VmHWM){reset} {r['rss_growth_peak'] / 2**20:,.1f} MiB "
                f"= {kb_peak:,.1f} KB/run; "
                f"while waiting {r['rss_growth_waiting'] / 2**20:,.1f} MiB = {kb_wait:,.1f} KB/run  "
                f"-> goal < 10 KB/run {'met' if kb_peak < 10 else 'NOT met'}"
            )
        if "traced_growth_waiting" in r:
            print(
                f"    tracemalloc, all {r['snapshot_waiting']:,} runs in their first model call: "
                f"{r['traced_growth_waiting'] / 2**20:,.1f} MiB = "
                f"{r['traced_growth_waiting'] / n / 1024:,.1f} KB/run held "
                f"(peak so far {r['traced_peak_growth'] / n / 1024:,.1f} KB/run)"
            )
        if "top" in r:
            print(
                f"    top allocations while {r['snapshot_waiting']:,} runs waited "
                "(growth over the idle process):"
            )
            for row in r["top"]:
                print(f"      {row}")
        print(f"    journal calls/run: {r['journal']}")


def report_recovery(rec: Recovery) -> None:
    print(
        f"\n== recovery ({rec.store}): {rec.runs:,} runs, {rec.workers} workers x {rec.concurrency}, "
        f"lease {rec.lease:g}s; all workers SIGKILLed at about half, {rec.workers} fresh ones started =="
    )
    model = f"model {rec.model_seconds * 1000:.0f} ms/proposal" if rec.model_seconds else "scripted model"
    print(f"({model}, so that runs are in flight when the workers die)")
    if rec.error:
        print(f"FAILED: {rec.error}")
        return
    print(
        f"killed after {rec.first_phase:.2f}s; at the kill: {rec.at_kill}, {rec.leased_at_kill} still leased"
    )
    left = rec.runs - rec.at_kill.get("completed", 0)
    print(
        f"recovered: every run completed or in doubt {rec.from_kill:.2f}s after the kill "
        f"({left:,} runs left at the kill, "
        f"{left * STEPS_PER_RUN / rec.from_kill:,.0f} steps/s incl. the wait); "
        f"lease {rec.lease:g}s, so {max(0.0, rec.from_kill - rec.lease):.2f}s beyond the lease"
    )
    print(
        f"final statuses {rec.statuses}; intents re-run after the crash (idempotent write): {rec.recovered}"
    )


def describe_machine() -> str:
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"], capture_output=True, text=True, cwd=ROOT, check=False
        ).stdout.strip()
    except OSError:
        rev = "?"
    versions = []
    for package in ("dbos", "psycopg", "sqlalchemy"):
        try:
            from importlib.metadata import version

            versions.append(f"{package} {version(package)}")
        except Exception:
            versions.append(f"{package} not installed")
    return (
        f"tether {rev or '?'}; Python {platform.python_version()}; SQLite {sqlite3.sqlite_version}; "
        f"{', '.join(versions)}; {os.cpu_count()} cpus; load average {load()}"
    )


def load() -> str:
    return "n/a" if not hasattr(os, "getloadavg") else ", ".join(f"{x:.2f}" for x in os.getloadavg())


def pg_version(base: str) -> str:
    import psycopg

    with psycopg.connect(base) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        sync = conn.execute("SHOW synchronous_commit").fetchone()
    return f"PostgreSQL {row[0] if row else '?'} (synchronous_commit={sync[0] if sync else '?'})"


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke run (< 1 minute)")
    parser.add_argument("--runs", type=int, help="runs per throughput row (default 1000; quick 100)")
    parser.add_argument("--dbos-runs", type=int, help="runs per DBOS row (default: --runs; quick 50)")
    parser.add_argument("--workers", help="worker process counts (default 1,2,4; quick 1,2)")
    parser.add_argument("--concurrency", type=int, default=8, help="runs driven at once per worker")
    parser.add_argument(
        "--recovery-runs", type=int, help="runs in the recovery test (default 1000; quick 200)"
    )
    parser.add_argument("--recovery-workers", type=int, default=2)
    parser.add_argument("--recovery-concurrency", type=int, default=500, help="runs at once per worker")
    parser.add_argument(
        "--recovery-model-ms",
        type=float,
        default=50.0,
        help="ms per proposal of the recovery test's model (0: the instant scripted model)",
    )
    parser.add_argument("--lease", type=float, default=2.0, help="worker lease in the recovery test (s)")
    parser.add_argument("--waiting", type=int, help="concurrent waiting runs (default 10000; quick 500)")
    parser.add_argument("--floor-commits", type=int, default=2000, help="commits per floor measurement")
    parser.add_argument("--dbos-poll", type=float, default=0.05, help="DBOS queue polling interval (s)")
    parser.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL base URL ($TETHER_BENCH_PG)")
    parser.add_argument("--no-pg", action="store_true", help="skip every PostgreSQL measurement")
    parser.add_argument("--no-dbos", action="store_true", help="skip the DBOS rows")
    parser.add_argument(
        "--pg-waiting", type=int, help="waiting runs on PostgreSQL (default --waiting; 0 skips)"
    )
    parser.add_argument(
        "--trace-runs",
        type=int,
        help="runs in the tracemalloc child (SQLite; default min(--waiting, 2000), quick 200; 0 skips)",
    )
    parser.add_argument("--only", help="comma-separated sections: throughput,recovery,waiting (default all)")
    parser.add_argument("--profile", action="store_true", help="cProfile sequential tether runs on SQLite")
    parser.add_argument("--top", type=int, default=15, help="rows of allocation sites / profiles shown")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    return parser.parse_args()


def make_plan(args: argparse.Namespace, pg_problem: str | None) -> Plan:
    quick = args.quick
    runs = args.runs or (100 if quick else 1000)
    workers = [int(x) for x in (args.workers or ("1,2" if quick else "1,2,4")).split(",") if x.strip()]
    waiting = args.waiting or (500 if quick else 10_000)
    return Plan(
        runs=runs,
        dbos_runs=args.dbos_runs or (50 if quick else runs),
        workers=workers,
        concurrency=args.concurrency,
        recovery_runs=args.recovery_runs or (200 if quick else 1000),
        recovery_workers=args.recovery_workers,
        recovery_concurrency=args.recovery_concurrency,
        lease=args.lease,
        recovery_model_ms=args.recovery_model_ms,
        waiting=waiting,
        pg_waiting=waiting if args.pg_waiting is None else args.pg_waiting,
        trace_runs=min(waiting, 200 if quick else 2000) if args.trace_runs is None else args.trace_runs,
        floor_commits=500 if quick else args.floor_commits,
        dbos_poll=args.dbos_poll,
        pg=None if (args.no_pg or pg_problem) else args.pg,
        dbos=not args.no_dbos,
        top=args.top,
    )


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return
    started = time.perf_counter()
    pg_problem = None if args.no_pg else pg_available(args.pg)
    plan = make_plan(args, pg_problem)
    sections = set((args.only or "throughput,recovery,waiting").split(","))
    print(describe_machine())
    if plan.pg:
        print(f"{pg_version(plan.pg)} at {plan.pg.split('@')[-1]}")
    elif pg_problem:
        print(f"PostgreSQL skipped: {pg_problem}")
    print(
        f"runs/row {plan.runs} (DBOS {plan.dbos_runs}); workers {plan.workers} x {plan.concurrency}; "
        f"recovery {plan.recovery_runs} runs; waiting {plan.waiting} runs; {STEPS_PER_RUN} steps per run"
    )
    with tempfile.TemporaryDirectory(prefix="tether-throughput-") as name:
        tmp = Path(name)
        floors = {
            "sqlite-full": sqlite_floor(tmp, "FULL", plan.floor_commits),
            "sqlite-normal": sqlite_floor(tmp, "NORMAL", plan.floor_commits),
        }
        if plan.pg:
            floors["pg"] = pg_floor(plan.pg, plan.floor_commits)
        print(
            "commit floors (one writer, one ~100-byte INSERT + COMMIT per transaction): "
            + ", ".join(f"{k} {v:,.0f}/s" for k, v in floors.items())
        )
        startup = {k: worker_startup(k, tmp, plan.pg or "") for k in ["sqlite"] + (["pg"] if plan.pg else [])}
        print(
            "tether worker start+exit on an empty store: "
            + ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}s'}" for k, v in startup.items())
        )
        progress(f"progress (rows as they finish):\n{HEADER}")
        rows = throughput_rows(plan, tmp) if "throughput" in sections else []
        recovery = None
        if "recovery" in sections:
            kind = "pg" if plan.pg else "sqlite"
            recovery = measure_recovery(
                kind,
                tmp,
                plan.pg or "",
                plan.recovery_runs,
                plan.recovery_workers,
                plan.recovery_concurrency,
                plan.lease,
                plan.recovery_model_ms / 1000,
            )
            progress(f"recovery done: {recovery.error or f'{recovery.from_kill:.2f}s'}")
        waiting = waiting_results(plan, tmp) if "waiting" in sections else []
        if args.profile:
            profile_sequential(tmp, min(plan.runs, 500), args.top * 2)
    if rows:
        print(f"\n== throughput: {STEPS_PER_RUN} steps per run (3 reads, 1 idempotent write, finish) ==")
        print(HEADER)
        for row in rows:
            print(line(row))
    if recovery is not None:
        report_recovery(recovery)
    if waiting:
        report_waiting(waiting, floors)
    print(f"\nload average at the end: {load()}; total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
