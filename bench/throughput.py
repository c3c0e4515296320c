"""Throughput of governed runs: tether against DBOS Transact at the same durability, on SQLite
and PostgreSQL; many concurrent runs in one process against the commit floor (group commit);
worker processes with the CPU they and the PostgreSQL server spend per step; recovery after
every worker is killed; and 10,000 runs waiting on a slow model in one process.

The workload (bench/workload/): one agent state whose scripted proposer looks three items up
(reads), records one (an idempotent write: an intent synced to disk, then the result), and
finishes; a trivial tool, a three-rule policy. Five governed steps per run. DBOS runs the
same shape as a workflow of five `@DBOS.step`s (bench/workload/dbos_workload.py), in a child
process per row (DBOS is one instance per process).

Sections (`--only`), each row on a fresh SQLite file or PostgreSQL schema:

1. pairs: tether and DBOS, row by row at the same durability: SQLite in WAL mode at
   synchronous FULL and NORMAL (DBOS is given WAL connections for this; its own default, the
   rollback journal at FULL, is one more row, which tether cannot match: its journal is
   always WAL) and PostgreSQL with `synchronous_commit` on (FULL) and off (NORMAL; tether
   still syncs each intent, DBOS has no such mixed mode). N runs one after another ("seq")
   and all at once ("gather": asyncio.gather; DBOS async workflows).
2. group: N = 1, 10, 100, 1,000 runs in flight at once in one process on one SQLite journal
   at FULL (more runs are started as runs finish, until the row's total), each row preceded
   by the single-writer FULL commit floor, measured right then. The goal: durable steps/s at
   N = 1,000 ≥ 5× that floor (group commit: many runs' steps in one transaction and fsync).
3. workers: N runs submitted, then driven by K = 1, 2, 4 `tether worker` processes (the CLI,
   its default durability, so DBOS's queue workers run with `synchronous_commit` off), and K
   DBOS processes draining a DBOS queue. steps/s over the span the store shows (first step
   to last); the goal: adding a worker never lowers it.
4. recovery: R runs, K workers with a short lease and a 50 ms model; once about half are
   completed every worker is SIGKILLed and K fresh ones started: the time until every run
   is completed or in doubt, and how many intents were re-run.
5. waiting: W runs started at once in ONE process against a model that takes 200 ms per
   proposal, on SQLite and PostgreSQL: memory per waiting run from the RSS high-water mark
   (VmHWM, reset before the runs) over W, the RSS when the most runs were seen in their model
   call (their first: what a waiting run holds, without the transient peaks of runs between
   two calls or queued behind the store), and in a second child (fewer runs: tracing is slow)
   what tracemalloc shows held once every run is in its model call (or has been there once,
   where the PostgreSQL pool keeps them from all waiting at once), by allocation site; and
   the most runs seen inside the model call at once (the goal needs all W waiting together).

Sections 1–3 are repeated (`--repeat`, 3): each repetition measures every row of its section
in turn, so the repetitions of a row are minutes apart. Tables show steps/s as the median
(lowest–highest) and CPU as medians; ratios are computed within a repetition (between rows
measured back to back) and goals are judged on medians.

CPU columns (PostgreSQL, Linux, server on this machine): worker CPU µs/step is the process
time of the process(es) driving the runs over the timed window (worker processes: sampled
from /proc every 50 ms and interpolated to the span, so start-up is not counted); server
CPU µs/step is utime+stime of the PostgreSQL backends serving the row's sessions (found in
pg_stat_activity by the application_name the row gives its connections, read from /proc
every 50 ms), and "+ bg" the server's background processes (WAL writer, checkpointer...)
over the same window, which any other client of the server would add to. Server and
workers share this machine's cores.

No timing is asserted: this is a report. Rows that fail print the error in their notes.
The report ends with the goals of issue 9 it measures.

Run:  .venv-bench/bin/python bench/throughput.py [--quick] [--only pairs,group,...] [--no-pg] [--profile]
(the bench extra: `pip install -e '.[dev,bench]'`, for dbos and psycopg; PostgreSQL at
$TETHER_BENCH_PG, default postgresql://postgres@127.0.0.1:5432/test.)
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import gc
import inspect
import io
import itertools
import json
import os
import pstats
import signal
import subprocess
import sys
import tempfile
import threading
import time
import tracemalloc
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchkit import (
    GOALS_HEADER,
    ROOT,
    Spread,
    describe_machine,
    goal_line,
    load_average,
    print_result,
    run_child,
    sqlite_commit_seconds,
)

SCRIPT = Path(__file__).resolve()
WORKLOAD = SCRIPT.parent / "workload"
PROPOSALS_FILE = WORKLOAD / "proposals.json"
MODEL_SPEC = f"script:{PROPOSALS_FILE}"
STEPS_PER_RUN = 5  # governed steps (model proposals) per run; DBOS: @DBOS.step calls per workflow
TRACE_FRAMES = 30  # frames kept per allocation: enough to reach tether's own code
MODEL_SECONDS = 0.2  # the slow model of the waiting runs, per proposal
SAMPLE_SECONDS = 0.05  # /proc sampling interval
SETTLED = ("completed", "effect_in_doubt")
PG_DEFAULT = os.environ.get("TETHER_BENCH_PG", "postgresql://postgres@127.0.0.1:5432/test")
STORE_NAME = {"sqlite": "SQLite", "pg": "PostgreSQL"}
SECTIONS = ("pairs", "group", "workers", "recovery", "waiting")
DURABILITY_NAME = {
    ("sqlite", "full"): "WAL, sync FULL",
    ("sqlite", "normal"): "WAL, sync NORMAL",
    ("sqlite", "default"): "rollback journal, sync FULL",
    ("pg", "full"): "synchronous_commit on",
    ("pg", "normal"): "synchronous_commit off",
}
TETHER_NOTE = {
    ("sqlite", "normal"): "tether's intents synced FULL",
    ("pg", "normal"): "tether's intents synced (on)",
}


# -- rows and reporting -------------------------------------------------------------------


@dataclass
class Row:
    system: str
    kind: str  # "sqlite" or "pg"
    durability: str
    how: str
    runs: int
    seconds: float | None
    worker_cpu: float | None = None  # seconds, over the timed window
    server_cpu: float | None = None  # seconds, the row's backends
    background_cpu: float | None = None  # seconds, the server's background processes
    notes: list[str] = field(default_factory=list)

    @property
    def store(self) -> str:
        return STORE_NAME[self.kind]

    @property
    def steps(self) -> int:
        return self.runs * STEPS_PER_RUN

    @property
    def steps_per_second(self) -> float | None:
        return None if not self.seconds else self.steps / self.seconds

    def micros(self, seconds: float | None) -> float | None:
        """CPU seconds over the row as µs per step."""
        return None if seconds is None or not self.seconds else seconds / self.steps * 1e6


@dataclass
class Series:
    """One row measured once in each repetition of its section; a repetition measures every
    row of the section in turn, so the repetitions of a row are minutes apart."""

    rows: list[Row]

    @property
    def first(self) -> Row:
        return self.rows[0]

    def spread(self, figure: Callable[[Row], float | None]) -> Spread | None:
        values = [v for r in self.rows if (v := figure(r)) is not None]
        return Spread.of(values) if values else None

    @property
    def rate(self) -> Spread | None:
        return self.spread(lambda r: r.steps_per_second)

    def notes(self) -> list[str]:
        """The first repetition's notes, and any other repetition's failure."""
        seen = list(self.first.notes)
        for row in self.rows[1:]:
            seen += [n for n in row.notes if n.startswith(("FAILED", "statuses")) and n not in seen]
        return seen


ROW_HEADER = (
    "| system | store | durability | how | runs | steps/s | worker CPU µs/step | "
    "server CPU µs/step (+ bg) | notes |\n|---|---|---|---|---|---|---|---|---|"
)


def show(spread: Spread | None, fmt: str = ",.0f", suffix: str = "") -> str:
    return "-" if spread is None else spread.show(fmt, suffix)


def median(spread: Spread | None) -> str:
    return "-" if spread is None else f"{spread.median:,.0f}"


def line(series: Series) -> str:
    """A row: steps/s as median (low–high) over the repetitions, CPU per step as medians."""
    row = series.first
    server = median(series.spread(lambda r: r.micros(r.server_cpu)))
    background = series.spread(lambda r: r.micros(r.background_cpu))
    if background is not None:
        server += f" (+{median(background)})"
    return (
        f"| {row.system} | {row.store} | {DURABILITY_NAME[row.kind, row.durability]} | {row.how} | "
        f"{row.runs:,} | {show(series.rate)} | {median(series.spread(lambda r: r.micros(r.worker_cpu)))} | "
        f"{server} | {'; '.join(series.notes())} |"
    )


def progress(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


def failed(row: Row, exc: BaseException) -> Row:
    message = f"{type(exc).__name__}: {exc}".replace("\n", " ").replace("|", "/")
    row.seconds = None
    row.notes.append(f"FAILED: {message[:300]}")
    return row


# -- stores -------------------------------------------------------------------------------


def pg_url(base: str, schema: str, application_name: str | None = None) -> str:
    sep = "&" if "?" in base else "?"
    url = f"{base}{sep}options=-csearch_path%3D{schema}"
    return url + (f"&application_name={application_name}" if application_name else "")


@contextlib.contextmanager
def pg_schema(base: str, prefix: str) -> Iterator[str]:
    """A fresh schema's name, dropped afterwards."""
    import psycopg

    name = f"{prefix}_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"CREATE SCHEMA {name}")
    try:
        yield name
    finally:
        drop_schema(base, name)


def drop_schema(base: str, name: str) -> None:
    import psycopg

    with psycopg.connect(base, autocommit=True) as admin:
        admin.execute(f"DROP SCHEMA IF EXISTS {name} CASCADE")


@contextlib.contextmanager
def tether_store(kind: str, tmp: Path, pg: str, application_name: str | None = None) -> Iterator[str]:
    """A fresh tether store: a SQLite file path, or a PostgreSQL URL on a fresh schema."""
    if kind == "sqlite":
        path = tmp / f"tether-{uuid.uuid4().hex[:8]}.db"
        try:
            yield str(path)
        finally:
            for suffix in ("", "-wal", "-shm"):
                Path(f"{path}{suffix}").unlink(missing_ok=True)
    else:
        with pg_schema(pg, "bench_tether") as schema:
            yield pg_url(pg, schema, application_name)


def pg_available(base: str) -> str | None:
    """None when the server answers, else why not."""
    try:
        import psycopg

        with psycopg.connect(base, connect_timeout=3) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}".strip()
    return None


def pg_version(base: str) -> str:
    import psycopg

    with psycopg.connect(base) as conn:
        row = conn.execute("SHOW server_version").fetchone()
        sync = conn.execute("SHOW synchronous_commit").fetchone()
    return f"PostgreSQL {row[0] if row else '?'} (server synchronous_commit={sync[0] if sync else '?'})"


async def maybe_await(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


async def stop_heartbeat(runtime: Any) -> None:
    """End the runtime's lease-renewal task, if it has one, before the journal closes: it
    outlives the runs it renews by up to a third of the lease."""
    task = getattr(runtime, "_heartbeat", None)
    if task is not None and not task.done():
        task.cancel()
        with contextlib.suppress(BaseException):
            await task


async def close(journal: Any) -> None:
    aclose = getattr(journal, "aclose", None)
    await maybe_await(aclose() if aclose is not None else journal.close())


def new_tag(prefix: str) -> str:
    """An application_name for one row's PostgreSQL sessions."""
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


# -- CPU from /proc ---------------------------------------------------------------------------


def proc_cpu(pid: int) -> float | None:
    """utime + stime of a process in seconds (Linux /proc/PID/stat), None once it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuSampler:
    """Samples the CPU time of a changing set of processes every SAMPLE_SECONDS in a thread.

    `pids()` names the processes to sample (worker pids, or the server processes found in
    pg_stat_activity). `cpu(t0, t1)` is their CPU seconds between two `time.time()` moments,
    interpolated between samples; a process first seen after the first sample had none before.
    """

    def __init__(self, pids: Callable[[], list[int]]) -> None:
        self._pids = pids
        self.samples: dict[int, list[tuple[float, float]]] = {}
        self._first_round = True
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._born_late: set[int] = set()

    def __enter__(self) -> CpuSampler:
        self._sample()
        self._thread.start()
        return self

    def __exit__(self, *_: Any) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()

    def _loop(self) -> None:
        while not self._stop.wait(SAMPLE_SECONDS):
            with contextlib.suppress(Exception):  # a failed round is a missing sample, no more
                self._sample()

    def _sample(self) -> None:
        for pid in self._pids():
            cpu = proc_cpu(pid)
            if cpu is None:
                continue
            if pid not in self.samples and not self._first_round:
                self._born_late.add(pid)
            self.samples.setdefault(pid, []).append((time.time(), cpu))
        self._first_round = False

    def cpu(self, t0: float, t1: float) -> float:
        return sum(self._at(pid, t1) - self._at(pid, t0) for pid in self.samples)

    def _at(self, pid: int, t: float) -> float:
        points = self.samples[pid]
        if t <= points[0][0]:
            return 0.0 if pid in self._born_late else points[0][1]
        for (ta, ca), (tb, cb) in itertools.pairwise(points):
            if ta <= t <= tb:
                return ca + (cb - ca) * (t - ta) / (tb - ta) if tb > ta else cb
        return points[-1][1]


class ServerCpu:
    """The PostgreSQL server's CPU for one row: its backends serving sessions named `tag`, and
    its background processes. Needs the server on this machine (its /proc)."""

    def __init__(self, base: str, tag: str) -> None:
        import psycopg

        self._conn = psycopg.connect(base, autocommit=True, application_name="bench-cpu-sampler")
        self._lock = threading.Lock()
        self.backends = CpuSampler(lambda: self._find("application_name = %s", tag))
        self.background = CpuSampler(lambda: self._find("backend_type <> 'client backend'"))

    def _find(self, where: str, *args: Any) -> list[int]:
        with self._lock:
            rows = self._conn.execute(f"SELECT pid FROM pg_stat_activity WHERE {where}", args).fetchall()
        return [pid for (pid,) in rows]

    def __enter__(self) -> ServerCpu:
        self.backends.__enter__()
        self.background.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.backends.__exit__()
        self.background.__exit__()
        self._conn.close()

    def cpu(self, t0: float, t1: float) -> tuple[float, float]:
        return self.backends.cpu(t0, t1), self.background.cpu(t0, t1)

    @property
    def visible(self) -> bool:
        """Whether any backend's /proc entry could be read (the server is on this machine)."""
        return bool(self.backends.samples) or bool(self.background.samples)


@contextlib.contextmanager
def server_cpu(pg: str | None, tag: str) -> Iterator[ServerCpu | None]:
    """A ServerCpu on PostgreSQL, None on SQLite or when it cannot run."""
    if not pg:
        yield None
        return
    try:
        sampler = ServerCpu(pg, tag)
    except Exception as exc:
        progress(f"server CPU not measured: {exc}")
        yield None
        return
    with sampler:
        yield sampler


def fill_server_cpu(row: Row, sampler: ServerCpu | None, t0: float, t1: float) -> None:
    if sampler is None:
        return
    if not sampler.visible:
        row.notes.append("server CPU: no server process visible in /proc")
        return
    row.server_cpu, row.background_cpu = sampler.cpu(t0, t1)


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

    def reset(self) -> None:
        self.calls.clear()
        self.seconds.clear()

    def per_run(self, runs: int) -> str:
        return ", ".join(
            f"{name} {count / runs:.1f}x {self.seconds[name] / count * 1e6:,.0f}us"
            for name, count in self.calls.most_common()
            if name != "aclose"
        )


def workload() -> Any:
    from tether import load_workflow

    return load_workflow(WORKLOAD)


@dataclass
class Timed:
    """What one timed section of runs took."""

    seconds: float
    cpu: float
    t0: float  # time.time() at the start and the end, for the server's CPU
    t1: float
    statuses: Counter[str]
    calls: str = ""


async def tether_in_process(store: str, durability: str, runs: int, in_flight: int) -> Timed:
    """`runs` runs started by one Runtime in this process, at most `in_flight` at once."""
    from tether import Runtime, ScriptedModel, open_journal

    workflow = workload()
    model = ScriptedModel.from_file(PROPOSALS_FILE)
    journal = CountingJournal(open_journal(store, durability=durability))
    runtime = Runtime(journal)  # type: ignore[arg-type]
    ref = str(WORKLOAD)
    gate = asyncio.Semaphore(in_flight)

    async def one() -> Any:
        async with gate:
            return await runtime.start(workflow, model, workflow_ref=ref)

    try:
        for _ in range(3):  # warm-up: first-call costs (CEL compile, schemas) out of the timing
            await runtime.start(workflow, model, workflow_ref=ref)
        journal.reset()
        t0, start, cpu = time.time(), time.perf_counter(), time.process_time()
        results = await asyncio.gather(*(one() for _ in range(runs)))
        timed = Timed(
            time.perf_counter() - start,
            time.process_time() - cpu,
            t0,
            time.time(),
            Counter(r.status for r in results),
        )
        timed.calls = journal.per_run(runs)
    finally:
        await stop_heartbeat(runtime)
        await close(journal)
    return timed


def measure_tether(
    kind: str, tmp: Path, pg: str, durability: str, runs: int, in_flight: int, how: str
) -> Row:
    row = Row("tether", kind, durability, how, runs, None)
    tag = new_tag("bench-tether")
    try:
        with (
            tether_store(kind, tmp, pg, tag) as store,
            server_cpu(pg if kind == "pg" else None, tag) as sampler,
        ):
            timed = asyncio.run(tether_in_process(store, durability, runs, in_flight))
            row.seconds, row.worker_cpu = timed.seconds, timed.cpu
            fill_server_cpu(row, sampler, timed.t0, timed.t1)
    except Exception as exc:
        return failed(row, exc)
    if (kind, durability) in TETHER_NOTE:
        row.notes.append(TETHER_NOTE[kind, durability])
    if timed.statuses != Counter(completed=runs):
        row.notes.append(f"statuses {dict(timed.statuses)}")
    row.notes.append(f"journal calls/run: {timed.calls}")
    return row


# -- DBOS, one process ----------------------------------------------------------------------


def dbos_sqlite_url(tmp: Path) -> tuple[str, Path]:
    path = tmp / f"dbos-{uuid.uuid4().hex[:8]}.db"
    return f"sqlite:///{path}", path


def dbos_local(arg: dict[str, Any]) -> dict[str, Any]:
    """Child: N DBOS workflows in this process, one after another or gathered."""
    sys.path.insert(0, str(WORKLOAD))
    from dbos import DBOS
    from dbos_workload import WalConnection, config, run_async, run_sync

    n, mode, url, pg = arg["n"], arg["mode"], arg["url"], arg.get("pg")
    cfg = config(
        url,
        executor="local",
        durability=arg["durability"],
        schema=arg.get("schema"),
        application_name=arg["tag"],
    )
    DBOS(config=cfg)  # type: ignore[arg-type]
    DBOS.launch()
    try:
        for i in range(3):
            run_sync(-1 - i)
        with server_cpu(pg, arg["tag"]) as sampler:
            t0, start, cpu = time.time(), time.perf_counter(), time.process_time()
            if mode == "seq":
                for i in range(n):
                    run_sync(i)
            else:

                async def gathered() -> None:
                    await asyncio.gather(*(run_async(i) for i in range(n)))

                asyncio.run(gathered())
            seconds, cpu, t1 = time.perf_counter() - start, time.process_time() - cpu, time.time()
            server = sampler.cpu(t0, t1) if sampler is not None and sampler.visible else None
        return {"seconds": seconds, "cpu": cpu, "server": server, "pragmas": sorted(WalConnection.seen)}
    finally:
        DBOS.destroy()


def measure_dbos(kind: str, tmp: Path, pg: str, durability: str, runs: int, mode: str, how: str) -> Row:
    row = Row("DBOS", kind, durability, how, runs, None)
    tag = new_tag("bench-dbos")
    arg: dict[str, Any] = {"n": runs, "mode": mode, "durability": durability, "tag": tag}
    try:
        if kind == "sqlite":
            arg["url"], path = dbos_sqlite_url(tmp)
            try:
                result = run_child(SCRIPT, "dbos-local", arg)
            finally:
                for suffix in ("", "-wal", "-shm", "-journal"):
                    Path(f"{path}{suffix}").unlink(missing_ok=True)
        else:
            arg |= {"url": pg, "schema": f"bench_dbos_{uuid.uuid4().hex[:8]}", "pg": pg}
            try:
                result = run_child(SCRIPT, "dbos-local", arg)
            finally:
                drop_schema(pg, arg["schema"])
    except Exception as exc:
        return failed(row, exc)
    row.seconds, row.worker_cpu = result["seconds"], result["cpu"]
    if result.get("server"):
        row.server_cpu, row.background_cpu = result["server"]
    row.notes.append("sync workflow, called in turn" if mode == "seq" else "async workflow + steps, gathered")
    if result["pragmas"]:
        seen = ", ".join(f"journal_mode={m} synchronous={s}" for m, s in result["pragmas"])
        row.notes.append(f"DBOS connections: {seen}")
    return row


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


async def store_span(store: str, ids: list[str]) -> tuple[float, float, int]:
    """The first step any run took after it started and the last entry written (time.time());
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
            recovered += sum(1 for e in entries if e.kind == "step" and recovered_step(e.body))
    finally:
        await close(journal)
    return first, last, recovered


def recovered_step(body: Any) -> bool:
    """Whether a step entry's body says it re-ran an intent after a crash (a dict today, a typed
    record once bodies are typed)."""
    return bool(body.get("recovered") if isinstance(body, dict) else getattr(body, "recovered", False))


_WORKER_HELP: list[str] = []


def worker_options() -> list[str]:
    """`--workflows DIR` when this tether's worker takes it (it loads workflows only from
    trusted roots), else nothing."""
    if not _WORKER_HELP:
        out = subprocess.run(
            [sys.executable, "-m", "tether", "worker", "--help"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**os.environ, "COLUMNS": "200"},
            check=False,
        )
        _WORKER_HELP.append(out.stdout)
    return ["--workflows", str(WORKLOAD)] if "--workflows" in _WORKER_HELP[0] else []


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
    cmd = [sys.executable, "-m", "tether", "worker", "--db", store, "--concurrency", str(concurrency)]
    cmd += worker_options()
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
    row = Row("tether", kind, "normal", f"{k} worker{'s' if k > 1 else ''} x {concurrency}", n, None)
    tag = new_tag("bench-tworker")
    try:
        with tether_store(kind, tmp, pg, tag) as store:
            ids = asyncio.run(submit_runs(store, n))
            log = tmp / f"workers-{kind}-{k}.log"
            procs: list[subprocess.Popen[bytes]] = []
            with (
                server_cpu(pg if kind == "pg" else None, tag) as server,
                CpuSampler(lambda: [p.pid for p in procs if p.poll() is None]) as workers,
            ):
                start = time.perf_counter()
                procs += [spawn_tether_worker(store, concurrency, log) for _ in range(k)]
                wait_all(procs, 600, log)
                wall = time.perf_counter() - start
            statuses = asyncio.run(run_statuses(store, n + 100))
            t0, t1, _ = asyncio.run(store_span(store, ids))
    except Exception as exc:
        return failed(row, exc)
    row.seconds = t1 - t0 if t1 > t0 else None
    row.worker_cpu = workers.cpu(t0, t1)
    fill_server_cpu(row, server, t0, t1)
    row.notes.append(f"span {t1 - t0:.2f}s; wall from spawn {wall:.2f}s ({n / wall:,.0f} runs/s)")
    row.notes.append(TETHER_NOTE.get((kind, "normal"), ""))
    if statuses != Counter(completed=n):
        row.notes.append(f"statuses {dict(statuses)}")
    return row


# -- DBOS, queue workers --------------------------------------------------------------------


def dbos_worker(arg: dict[str, Any]) -> None:
    """Child: a DBOS process that dequeues the bench queue until it is terminated."""
    sys.path.insert(0, str(WORKLOAD))
    from dbos import DBOS
    from dbos_workload import QUEUE, config

    cfg = config(
        arg["url"],
        executor=f"worker-{os.getpid()}",
        durability=arg["durability"],
        schema=arg["schema"],
        application_name=arg["tag"],
    )
    DBOS(config=cfg)  # type: ignore[arg-type]
    DBOS.listen_queues([QUEUE])
    DBOS.launch()
    signal.sigwait({signal.SIGTERM, signal.SIGINT})
    DBOS.destroy()


def dbos_queue(arg: dict[str, Any]) -> dict[str, Any]:
    """Child: enqueue N workflows on a DBOS queue, then start K worker processes; time them."""
    sys.path.insert(0, str(WORKLOAD))
    import sqlalchemy as sa
    from dbos import DBOS
    from dbos_workload import QUEUE, config, run_sync

    url, schema, n, k = arg["url"], arg["schema"], arg["n"], arg["k"]
    cfg = config(
        url, executor="enqueuer", durability=arg["durability"], schema=schema, application_name="bench"
    )
    DBOS(config=cfg)  # type: ignore[arg-type]
    DBOS.listen_queues([])  # this process only enqueues
    DBOS.launch()
    procs: list[subprocess.Popen[bytes]] = []
    try:
        queue = DBOS.register_queue(
            QUEUE, worker_concurrency=arg["concurrency"], polling_interval_sec=arg["poll"]
        )
        for i in range(n):
            queue.enqueue(run_sync, i)
        engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://", 1))
        done_sql = sa.text(
            f"SELECT count(*), min(started_at_epoch_ms), max(updated_at) FROM {schema}.workflow_status "
            "WHERE queue_name = :q AND status = 'SUCCESS'"
        )
        worker = {k: arg[k] for k in ("url", "schema", "durability", "tag")}
        with (
            server_cpu(url, arg["tag"]) as server,
            CpuSampler(lambda: [p.pid for p in procs if p.poll() is None]) as workers,
        ):
            start = time.perf_counter()
            procs += [
                subprocess.Popen(
                    [sys.executable, str(SCRIPT), "--child", "dbos-worker", json.dumps(worker)], cwd=ROOT
                )
                for _ in range(k)
            ]
            with engine.connect() as conn:
                while True:
                    done, first, last = conn.execute(done_sql, {"q": QUEUE}).one()
                    conn.commit()
                    if done >= n or time.perf_counter() - start > 600:
                        break
                    time.sleep(0.05)
            wall = time.perf_counter() - start
        engine.dispose()
        t0, t1 = (first / 1000, last / 1000) if done else (0.0, 0.0)
        return {
            "done": done,
            "wall": wall,
            "t0": t0,
            "t1": t1,
            "worker_cpu": workers.cpu(t0, t1) if done else None,
            "server": server.cpu(t0, t1) if done and server is not None and server.visible else None,
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


def measure_dbos_queue(pg: str, n: int, k: int, concurrency: int, poll: float) -> Row:
    row = Row("DBOS", "pg", "normal", f"{k} worker{'s' if k > 1 else ''} x {concurrency}", n, None)
    schema = f"bench_dbosq_{uuid.uuid4().hex[:8]}"
    arg = {
        "url": pg,
        "schema": schema,
        "n": n,
        "k": k,
        "concurrency": concurrency,
        "poll": poll,
        "durability": "normal",
        "tag": new_tag("bench-dworker"),
    }
    try:
        result = run_child(SCRIPT, "dbos-queue", arg)
    except Exception as exc:
        return failed(row, exc)
    finally:
        drop_schema(pg, schema)
    span = result["t1"] - result["t0"]
    row.seconds = span if span > 0 else None
    row.worker_cpu = result["worker_cpu"]
    if result.get("server"):
        row.server_cpu, row.background_cpu = result["server"]
    row.notes.append(
        f"queue, poll {poll:g}s; span {span:.2f}s; wall from spawn {result['wall']:.2f}s "
        f"({n / result['wall']:,.0f} runs/s)"
    )
    if result["done"] < n:
        row.notes.append(f"only {result['done']} of {n} completed")
    return row


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


def measure_recovery(kind: str, tmp: Path, pg: str, plan: Plan) -> Recovery:
    n, k, lease, model_seconds = (
        plan.recovery_runs,
        plan.recovery_workers,
        plan.lease,
        plan.recovery_model_ms / 1000,
    )
    result = Recovery(STORE_NAME[kind], n, k, plan.recovery_concurrency, lease, model_seconds)
    procs: list[subprocess.Popen[bytes]] = []

    def spawn() -> list[subprocess.Popen[bytes]]:
        return [
            spawn_tether_worker(
                store,
                plan.recovery_concurrency,
                log,
                lease=lease,
                until_idle=False,
                model_seconds=model_seconds,
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
            *_, result.recovered = asyncio.run(store_span(store, ids))
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
    under_way: set[str] = set()  # runs that have asked the model at least once

    async def propose(ctx: ModelContext) -> dict[str, Any]:
        nonlocal waiting, most_waiting
        under_way.add(ctx.run_id)
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
        journal.reset()
        most_waiting = 0
        under_way.clear()
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
        sampled_waiting = 0

        async def watch() -> None:
            nonlocal rss_waiting, sampled_waiting
            while True:
                await asyncio.sleep(0.05)
                # The RSS when the most runs were seen in their model call: what waiting runs
                # hold, apart from the peaks of runs between two model calls (the high-water mark).
                if waiting > sampled_waiting:
                    sampled_waiting, rss_waiting = waiting, proc_status("VmRSS") or 0
                if trace and "waiting" not in snapshots and max(waiting, len(under_way)) >= 0.95 * n:
                    # Every run is in its model call (or, where they never all are at once, as
                    # the PostgreSQL pool throttles them, every run is under way): what a run in
                    # flight holds. Tracing stops here: it slows everything after it manyfold.
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
            out["rss_growth_peak"] = (proc_status("VmHWM") or 0) - rss_before
            out["rss_growth_waiting"] = rss_waiting - rss_before
            out["sampled_waiting"] = sampled_waiting
        if trace:
            tracemalloc.stop()
            if "waiting" in snapshots:
                out["snapshot_waiting"] = snapshots["waiting_count"]
                out["top"] = top_allocations(snapshots["before"], snapshots["waiting"], n, top)
        print_result(out)  # before any clean-up that could hang
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


@dataclass
class Waiting:
    store: str
    traced: bool
    result: dict[str, Any] | None
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.store}{', tracemalloc on' if self.traced else ''}"


def waiting_results(plan: Plan, tmp: Path) -> list[Waiting]:
    """Each store twice: all the runs (RSS), then fewer with tracemalloc on."""
    todo = [("sqlite", plan.waiting, False), ("sqlite", plan.trace_runs, True)]
    if plan.pg:
        todo += [("pg", plan.pg_waiting, False), ("pg", plan.pg_trace_runs, True)]
    out = []
    for kind, n, trace in todo:
        if n <= 0:
            continue
        item = Waiting(STORE_NAME[kind], trace, None)
        try:
            with tether_store(kind, tmp, plan.pg or "") as store:
                item.result = run_child(
                    SCRIPT, "waiting", {"store": store, "n": n, "trace": trace, "top": plan.top}
                )
        except Exception as exc:
            item.error = f"FAILED: {type(exc).__name__}: {exc}"[:600]
        out.append(item)
        progress(f"waiting runs, {item.label}: {item.error or 'done'}")
    return out


# -- profile ------------------------------------------------------------------------------


def profile_runs(tmp: Path, n: int, top: int) -> str:
    """cProfile of N runs, one after another, in this process on SQLite: where a run's time goes."""
    with tether_store("sqlite", tmp, "") as store:
        profiler = cProfile.Profile()
        profiler.enable()
        asyncio.run(tether_in_process(store, "normal", n, 1))
        profiler.disable()
    text = []
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(top)
        text.append(f"\n== cProfile, {n} tether runs in turn on SQLite (+3 warm-up), top {top} by {key} ==")
        text.append(out.getvalue().split("\n", 4)[-1].rstrip())
    return "\n".join(text)


# -- orchestration --------------------------------------------------------------------------


@dataclass
class Plan:
    runs: int
    dbos_runs: int
    group: list[int]
    group_runs: int
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
    pg_trace_runs: int
    floor_commits: int
    dbos_poll: float
    pg: str | None
    dbos: bool
    top: int
    repeat: int


Pair = tuple[Series, Series | None]  # a tether row and the DBOS row at its durability


def pair_rows(plan: Plan, tmp: Path) -> list[Pair]:
    """Each tether row in one process, then DBOS's at the same store, durability and mode."""
    pg = plan.pg or ""
    measured: dict[tuple[str, str, str], tuple[list[Row], list[Row]]] = {}
    for _ in range(plan.repeat):
        for kind in ["sqlite"] + (["pg"] if plan.pg else []):
            for durability in ("full", "normal"):
                for mode in ("seq", "gather"):
                    how = "1 process, one run at a time" if mode == "seq" else "1 process, all at once"
                    ours, theirs = measured.setdefault((kind, durability, mode), ([], []))
                    in_flight = 1 if mode == "seq" else plan.runs
                    ours.append(measure_tether(kind, tmp, pg, durability, plan.runs, in_flight, how))
                    progress(line(Series([ours[-1]])))
                    if plan.dbos:
                        theirs.append(measure_dbos(kind, tmp, pg, durability, plan.dbos_runs, mode, how))
                        progress(line(Series([theirs[-1]])))
        if plan.dbos:
            _, shipped = measured.setdefault(("sqlite", "default", "seq"), ([], []))
            shipped.append(
                measure_dbos(
                    "sqlite", tmp, pg, "default", plan.dbos_runs, "seq", "1 process, one run at a time"
                )
            )
            shipped[-1].notes.append(
                "DBOS as shipped; tether's journal is always WAL: no tether row matches it"
            )
            progress(line(Series([shipped[-1]])))
    pairs: list[Pair] = []
    for (_, durability, _), (ours, theirs) in measured.items():
        if durability == "default":  # DBOS as shipped, beside tether's FULL row
            ours = measured["sqlite", "full", "seq"][0]
        pairs.append((Series(ours), Series(theirs) if theirs else None))
    return pairs


@dataclass
class GroupRow:
    in_flight: int
    floors: list[float]  # commits/s, each measured just before a repetition of the row
    series: Series

    def ratio(self) -> Spread | None:
        values = [
            r.steps_per_second / f
            for r, f in zip(self.series.rows, self.floors, strict=True)
            if r.steps_per_second
        ]
        return Spread.of(values) if values else None


def group_rows(plan: Plan, tmp: Path) -> list[GroupRow]:
    rows = {n: GroupRow(n, [], Series([])) for n in plan.group}
    for _ in range(plan.repeat):
        for n, group in rows.items():
            group.floors.append(1 / sqlite_commit_seconds(tmp / "floor.db", "FULL", plan.floor_commits))
            runs = max(n, plan.group_runs)
            group.series.rows.append(measure_tether("sqlite", tmp, "", "full", runs, n, f"{n:,} in flight"))
            progress(f"floor FULL {group.floors[-1]:,.0f} commits/s; {line(Series(group.series.rows[-1:]))}")
    return list(rows.values())


def worker_rows(plan: Plan, tmp: Path) -> list[Series]:
    todo: list[tuple[str, int]] = []
    for kind in ["sqlite"] + (["pg"] if plan.pg else []):
        # SQLite: one file, one writer at a time; more than two processes only contend
        todo += [(kind, count) for count in plan.workers if kind == "pg" or count <= 2]
    if plan.pg and plan.dbos:
        todo += [("dbos", count) for count in plan.workers]
    measured: dict[tuple[str, int], list[Row]] = {key: [] for key in todo}
    for _ in range(plan.repeat):
        for kind, count in todo:
            if kind == "dbos":
                row = measure_dbos_queue(
                    plan.pg or "", plan.dbos_runs, count, plan.concurrency, plan.dbos_poll
                )
            else:
                row = measure_tether_workers(kind, tmp, plan.pg or "", plan.runs, count, plan.concurrency)
            measured[kind, count].append(row)
            progress(line(Series([row])))
    return [Series(rows) for rows in measured.values()]


def ratio(ours: Series, theirs: Series | None) -> Spread | None:
    """tether steps/s ÷ DBOS steps/s, within each repetition (the two were measured together)."""
    if theirs is None:
        return None
    values = [
        a.steps_per_second / b.steps_per_second
        for a, b in zip(ours.rows, theirs.rows, strict=False)
        if a.steps_per_second and b.steps_per_second
    ]
    return Spread.of(values) if values else None


def report_pairs(pairs: list[Pair]) -> None:
    print(f"\n== tether and DBOS at the same durability: {STEPS_PER_RUN} steps per run ==")
    print("steps/s: median (lowest–highest) over the repetitions; CPU: medians")
    print(ROW_HEADER)
    shown: set[int] = set()
    for ours, theirs in pairs:
        if id(ours) not in shown:
            print(line(ours))
            shown.add(id(ours))
        if theirs is not None:
            print(line(theirs))
    print("\n| store | durability | how | tether steps/s ÷ DBOS steps/s |\n|---|---|---|---|")
    for ours, theirs in pairs:
        if theirs is not None:
            name = DURABILITY_NAME[theirs.first.kind, theirs.first.durability]
            print(
                f"| {ours.first.store} | {name} | {theirs.first.how} | "
                f"{show(ratio(ours, theirs), '.2f', '×')} |"
            )


def report_group(rows: list[GroupRow]) -> None:
    print("\n== many runs in one process on one SQLite journal at FULL (group commit) ==")
    print("floor: one writer, one ~100-byte INSERT + COMMIT per transaction, FULL, measured just before")
    print("each repetition of a row; steps/s ÷ floor computed within each repetition")
    print(
        "| runs in flight | runs | steps/s | floor commits/s | steps/s ÷ floor | CPU µs/step | "
        "journal calls/run |"
    )
    print("|---|---|---|---|---|---|---|")
    for g in rows:
        first = g.series.first
        calls = next(
            (n.removeprefix("journal calls/run: ") for n in first.notes if n.startswith("journal")), ""
        )
        failure = next((n for n in g.series.notes() if n.startswith(("FAILED", "statuses"))), "")
        cpu = median(g.series.spread(lambda r: r.micros(r.worker_cpu)))
        print(
            f"| {g.in_flight:,} | {first.runs:,} | {show(g.series.rate)} | {show(Spread.of(g.floors))} | "
            f"{show(g.ratio(), '.2f', '×')} | {cpu} | {failure or calls} |"
        )


def report_workers(rows: list[Series]) -> None:
    print("\n== worker processes: N runs submitted, then K processes drain them ==")
    print("steps/s: median (lowest–highest) over the repetitions, each over the span the store shows")
    print(ROW_HEADER)
    for series in rows:
        print(line(series))


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
        f"{max(0.0, rec.from_kill - rec.lease):.2f}s beyond the lease"
    )
    print(
        f"final statuses {rec.statuses}; intents re-run after the crash (idempotent write): {rec.recovered}"
    )


def report_waiting(items: list[Waiting]) -> None:
    print(
        "\n== waiting runs: all started at once in one process, "
        f"model {MODEL_SECONDS * 1000:.0f} ms/proposal =="
    )
    for item in items:
        r = item.result
        if r is None:
            print(f"{item.label}: {item.error}")
            continue
        n = r["runs"]
        steps = n * STEPS_PER_RUN
        print(
            f"{item.label}: {n:,} runs, {steps:,} steps in {r['seconds']:.1f}s (a lone run needs "
            f"{STEPS_PER_RUN * MODEL_SECONDS:.1f}s of model time) = {steps / r['seconds']:,.0f} steps/s; "
            f"CPU {r['cpu_seconds'] / steps * 1e6:,.0f} µs/step; "
            f"at most {r['most_waiting']:,} of {n:,} waiting "
            f"on the model at once; statuses {r['statuses']}"
        )
        if r.get("hung_on_exit"):
            print("    the child printed its result but did not exit: killed")
        if "rss_growth_peak" in r:
            reset = "" if r.get("hwm_reset") else " (VmHWM could not be reset: includes set-up)"
            inflated = " (inflated by tracemalloc)" if item.traced else ""
            print(
                f"    RSS growth{inflated}: peak (VmHWM){reset} "
                f"{r['rss_growth_peak'] / n / 1024:,.1f} KB/run; "
                f"when the most were seen in their model call ({r['sampled_waiting']:,}) "
                f"{r['rss_growth_waiting'] / n / 1024:,.1f} KB/run"
            )
        if "traced_growth_waiting" in r:
            print(
                f"    tracemalloc, {r['snapshot_waiting']:,} of {n:,} runs in their model call "
                "(all under way): "
                f"{r['traced_growth_waiting'] / n / 1024:,.1f} KB/run held "
                f"(peak so far {r['traced_peak_growth'] / n / 1024:,.1f} KB/run)"
            )
        for row in r.get("top", []):
            print(f"      {row}")
        print(f"    journal calls/run: {r['journal']}")


GOAL_GROUP = "group commit: durable steps/s at FULL, 1,000 runs in flight ≥ 5× the FULL floor"
GOAL_WORKERS = "PostgreSQL: adding a worker never lowers throughput (medians)"
GOAL_DBOS = "PostgreSQL: ≥ 2× DBOS at the same synchronous_commit, every row (medians)"


def report_goals(
    pairs: list[Pair], group: list[GroupRow], workers: list[Series], waiting: list[Waiting]
) -> None:
    print("\n== goals of issue 9 measured here ==")
    print(GOALS_HEADER)
    big = max(group, key=lambda g: g.in_flight) if group else None
    r = big.ratio() if big is not None else None
    if big is not None and r is not None:
        rate, times = show(big.series.rate), show(r, ".2f", "×")
        figure = f"{rate} steps/s at {big.in_flight:,} in flight = {times} the floor"
        print(goal_line(GOAL_GROUP, figure, r.median >= 5))
    else:
        print(goal_line(GOAL_GROUP, "-", None))
    for item in (w for w in waiting if not w.traced):
        result = item.result
        runs = f"{result['runs']:,}" if result else "?"
        goal = f"{item.store}: {runs} waiting runs < 10 KB each, all waiting at once"
        if result is None or "rss_growth_peak" not in result:
            print(goal_line(goal, item.error or "-", None))
            continue
        kb = result["rss_growth_peak"] / result["runs"] / 1024
        most = result["most_waiting"]
        figure = f"{kb:,.1f} KB/run (RSS peak); at most {most:,} of {result['runs']:,} waiting at once"
        print(goal_line(goal, figure, kb < 10 and most >= result["runs"]))
    pg = [s for s, _ in pairs if s.first.kind == "pg"] + [s for s in workers if s.first.kind == "pg"]
    cpu = [
        (s, s.spread(lambda r: r.micros(r.worker_cpu)), s.spread(lambda r: r.micros(r.server_cpu)))
        for s in pg
        if s.first.system == "tether"
    ]
    figure = "; ".join(
        f"{s.first.how}, {DURABILITY_NAME['pg', s.first.durability]}: worker {median(w)}, server {median(v)}"
        for s, w, v in cpu
        if w is not None and v is not None
    )
    print(
        goal_line(
            "PostgreSQL: worker and server CPU µs per step reported", figure or "-", bool(figure) or None
        )
    )
    tether_pg = [s for s in workers if s.first.system == "tether" and s.first.kind == "pg" and s.rate]
    if len(tether_pg) > 1:
        medians = [s.rate.median for s in tether_pg if s.rate]
        figure = " → ".join(f"{s.first.how.split(' x ')[0]} {show(s.rate)}" for s in tether_pg) + " steps/s"
        print(goal_line(GOAL_WORKERS, figure, all(b >= a for a, b in itertools.pairwise(medians))))
    else:
        print(goal_line(GOAL_WORKERS, "-", None))
    dbos_workers = {s.first.how: s for s in workers if s.first.system == "DBOS"}
    matched = [(a, b) for a, b in pairs if a.first.kind == "pg" and b is not None]
    matched += [(s, dbos_workers.get(s.first.how)) for s in tether_pg]
    ratios = [(a, ratio(a, b)) for a, b in matched]
    ratios = [(a, r) for a, r in ratios if r is not None]
    if ratios:
        shown = "; ".join(
            f"{a.first.how}, {DURABILITY_NAME['pg', a.first.durability]} {show(r, '.2f', '×')}"
            for a, r in ratios
        )
        print(goal_line(GOAL_DBOS, shown, all(r.median >= 2 for _, r in ratios)))
    else:
        print(goal_line(GOAL_DBOS, "-", None))


# -- main -----------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument(
        "--quick", action="store_true", help="a smaller run of every section (a minute or two)"
    )
    parser.add_argument("--runs", type=int, help="runs per tether row (default 500; quick 100)")
    parser.add_argument(
        "--repeat", type=int, help="repetitions of the pairs, group and worker rows (default 3; quick 1)"
    )
    parser.add_argument("--dbos-runs", type=int, help="runs per DBOS row (default: --runs; quick 50)")
    parser.add_argument(
        "--group", default="1,10,100,1000", help="runs in flight, group rows (default 1,10,100,1000)"
    )
    parser.add_argument(
        "--group-runs", type=int, help="runs per group row, at least the in-flight count (1000; quick 200)"
    )
    parser.add_argument("--workers", help="worker process counts (default 1,2,4; quick 1,2)")
    parser.add_argument("--concurrency", type=int, default=8, help="runs driven at once per worker")
    parser.add_argument(
        "--recovery-runs", type=int, help="runs in the recovery test (default 1000; quick 200)"
    )
    parser.add_argument("--recovery-workers", type=int, default=2)
    parser.add_argument("--recovery-concurrency", type=int, default=500, help="runs at once per worker")
    parser.add_argument("--recovery-model-ms", type=float, default=50.0, help="ms per proposal in recovery")
    parser.add_argument("--lease", type=float, default=2.0, help="worker lease in the recovery test (s)")
    parser.add_argument("--waiting", type=int, help="concurrent waiting runs (default 10000; quick 500)")
    parser.add_argument(
        "--pg-waiting", type=int, help="waiting runs on PostgreSQL (default --waiting; 0 skips)"
    )
    parser.add_argument(
        "--trace-runs", type=int, help="SQLite runs traced by tracemalloc (2000; quick 200; 0 skips)"
    )
    parser.add_argument(
        "--pg-trace-runs",
        type=int,
        help="PostgreSQL runs traced (500; quick 200; 0 skips): tracing slows every commit, and with "
        "thousands of runs waiting for the pool, its 30 s wait for a connection expires",
    )
    parser.add_argument(
        "--floor-commits", type=int, help="commits per floor measurement (default 2000; quick 500)"
    )
    parser.add_argument("--dbos-poll", type=float, default=0.05, help="DBOS queue polling interval (s)")
    parser.add_argument("--pg", default=PG_DEFAULT, help="PostgreSQL base URL ($TETHER_BENCH_PG)")
    parser.add_argument("--no-pg", action="store_true", help="skip every PostgreSQL measurement")
    parser.add_argument("--no-dbos", action="store_true", help="skip the DBOS rows")
    parser.add_argument("--only", help="comma-separated sections: pairs,group,workers,recovery,waiting")
    parser.add_argument("--top", type=int, default=12, help="allocation sites / functions shown")
    parser.add_argument("--profile", action="store_true", help="also cProfile tether runs in turn on SQLite")
    parser.add_argument("--child", nargs=2, metavar=("KIND", "JSON"), help=argparse.SUPPRESS)
    return parser.parse_args()


def make_plan(args: argparse.Namespace, pg_problem: str | None) -> Plan:
    quick = args.quick
    runs = args.runs or (100 if quick else 500)
    waiting = args.waiting or (500 if quick else 10_000)
    return Plan(
        runs=runs,
        dbos_runs=args.dbos_runs or (50 if quick else runs),
        group=[int(x) for x in args.group.split(",") if x.strip()],
        group_runs=args.group_runs or (200 if quick else 1000),
        workers=[int(x) for x in (args.workers or ("1,2" if quick else "1,2,4")).split(",") if x.strip()],
        concurrency=args.concurrency,
        recovery_runs=args.recovery_runs or (200 if quick else 1000),
        recovery_workers=args.recovery_workers,
        recovery_concurrency=args.recovery_concurrency,
        lease=args.lease,
        recovery_model_ms=args.recovery_model_ms,
        waiting=waiting,
        pg_waiting=waiting if args.pg_waiting is None else args.pg_waiting,
        trace_runs=min(waiting, 200 if quick else 2000) if args.trace_runs is None else args.trace_runs,
        pg_trace_runs=min(waiting, 200 if quick else 500)
        if args.pg_trace_runs is None
        else args.pg_trace_runs,
        floor_commits=args.floor_commits or (500 if quick else 2000),
        dbos_poll=args.dbos_poll,
        pg=None if (args.no_pg or pg_problem) else args.pg,
        dbos=not args.no_dbos,
        top=args.top,
        repeat=args.repeat or (1 if quick else 3),
    )


def child_main(kind: str, arg: dict[str, Any]) -> None:
    if kind == "dbos-worker":
        dbos_worker(arg)
    elif kind == "dbos-local":
        print_result(dbos_local(arg))
    elif kind == "dbos-queue":
        print_result(dbos_queue(arg))
    elif kind == "waiting":
        asyncio.run(waiting_runs(arg["store"], arg["n"], arg["trace"], arg["top"]))  # prints its result
    else:
        raise SystemExit(f"unknown child {kind!r}")


def main() -> None:
    args = parse_args()
    if args.child:
        child_main(args.child[0], json.loads(args.child[1]))
        return
    started = time.perf_counter()
    pg_problem = None if args.no_pg else pg_available(args.pg)
    plan = make_plan(args, pg_problem)
    sections = set((args.only or ",".join(SECTIONS)).split(","))
    if sections - set(SECTIONS):
        unknown = ", ".join(sorted(sections - set(SECTIONS)))
        print(
            f"--only: unknown section(s) {unknown}; the sections are {', '.join(SECTIONS)}", file=sys.stderr
        )
        raise SystemExit(2)
    with tempfile.TemporaryDirectory(prefix="tether-throughput-") as name:
        tmp = Path(name)
        print(describe_machine(tmp, ("dbos", "psycopg", "sqlalchemy")))
        if plan.pg:
            print(f"{pg_version(plan.pg)} at {plan.pg.split('@')[-1]}")
        elif pg_problem:
            print(f"PostgreSQL skipped: {pg_problem}")
        print(
            f"runs per row {plan.runs} (DBOS {plan.dbos_runs}); group {plan.group} in flight, "
            f"{plan.group_runs}+ runs; workers {plan.workers} x {plan.concurrency}; "
            f"waiting {plan.waiting} runs; "
            f"{STEPS_PER_RUN} steps per run; worker options {worker_options() or 'none'}",
            flush=True,
        )
        startup = {k: worker_startup(k, tmp, plan.pg or "") for k in ["sqlite"] + (["pg"] if plan.pg else [])}
        print(
            "tether worker start+exit on an empty store: "
            + ", ".join(f"{k} {'n/a' if v is None else f'{v:.2f}s'}" for k, v in startup.items()),
            flush=True,
        )
        pairs = pair_rows(plan, tmp) if "pairs" in sections else []
        group = group_rows(plan, tmp) if "group" in sections else []
        workers = worker_rows(plan, tmp) if "workers" in sections else []
        recovery = None
        if "recovery" in sections:
            recovery = measure_recovery("pg" if plan.pg else "sqlite", tmp, plan.pg or "", plan)
            progress(f"recovery done: {recovery.error or f'{recovery.from_kill:.2f}s'}")
        waiting = waiting_results(plan, tmp) if "waiting" in sections else []
        profile = profile_runs(tmp, min(plan.runs, 500), args.top * 2) if args.profile else ""
    if pairs:
        report_pairs(pairs)
    if group:
        report_group(group)
    if workers:
        report_workers(workers)
    if recovery is not None:
        report_recovery(recovery)
    if waiting:
        report_waiting(waiting)
    report_goals(pairs, group, workers, waiting)
    if profile:
        print(profile)
    print(f"\nload average at the end: {load_average()}; total {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
