"""Measure `tether serve`: page latency with a big journal, approvals per second through the
API, and server-sent events to many subscribers.

    PYTHONPATH=src python bench/serve.py [--store sqlite|postgres|both] [--runs 10000]
        [--tickets 200] [--subscribers 100] [--requests 50]

The journal holds `--runs` runs of the refund example: `--tickets` paused on a supervisor
approval (driven in this process with the example's scripted model), one completed, the
rest queued. A real `tether serve` (uvicorn, one process, no in-process worker) serves it;
clients are httpx in this process, over loopback.

1. Latency (median and p95 of `--requests` sequential requests): the inbox
   (`GET /api/v1/tickets`, every pending ticket), the first page of runs (50, newest first),
   the first page of paused runs, and a completed run's timeline (`GET /api/v1/runs/{id}`).
2. SSE history: `--subscribers` clients at once each stream the completed run's events from
   the start until `end`; events delivered per second, all subscribers together.
3. SSE live: `--subscribers` clients follow one paused run; its ticket is approved through the
   API; milliseconds until every subscriber has received the decision's event.
4. Approvals: the pending tickets approved through the API by 8 concurrent clients; per second.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from benchkit import describe_machine

from tether import identity
from tether.identity import Principal
from tether.journal import open_journal
from tether.loader import load_workflow_async
from tether.models import ScriptedModel
from tether.runtime import Runtime

ROOT = Path(__file__).resolve().parent.parent
REFUND = ROOT / "examples" / "refund"
PROPOSALS = REFUND / "proposals.json"
INPUT = {"order_id": "A-1001", "reason": "kettle arrived broken"}
PG = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
APPROVERS = 8


@contextmanager
def journal_target(kind: str, tmp: Path) -> Iterator[str]:
    if kind == "sqlite":
        yield str(tmp / "bench.db")
        return
    import psycopg

    schema = "tether_bench_serve_" + secrets.token_hex(4)
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def fill(db: str, runs: int, tickets: int) -> dict[str, Any]:
    """The journal: tokens, `tickets` paused runs, one completed run, the rest queued."""
    journal = open_journal(db)
    try:
        admin, _ = await identity.create_token(journal, name="bench", role="admin", expires_in=None)
        workflow = await load_workflow_async(REFUND)
        runtime, model = Runtime(journal), ScriptedModel.from_file(PROPOSALS)
        started = time.perf_counter()
        queued = runs - tickets - 1
        for start in range(0, queued, 100):
            await asyncio.gather(
                *(
                    runtime.submit(workflow, input=INPUT, workflow_ref=str(REFUND), model_spec="script:x")
                    for _ in range(min(100, queued - start))
                )
            )
        paused = [
            await runtime.start(workflow, model, input=INPUT, workflow_ref=str(REFUND))
            for _ in range(tickets + 1)
        ]
        done = paused.pop()
        assert done.ticket_id is not None
        await runtime.decide(done.ticket_id, approve=True, by=Principal.local())
        completed = await runtime.resume(done.run_id, workflow, model)
        assert completed.status == "completed", completed
        return {
            "token": admin,
            "completed": completed.run_id,
            "paused": [(r.run_id, r.ticket_id) for r in paused],
            "fill_seconds": time.perf_counter() - started,
        }
    finally:
        await journal.aclose()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def server(db: str, tmp: Path) -> Iterator[str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "REFUND_LEDGER": str(tmp / "ledger.sqlite")}
    argv = [sys.executable, "-m", "tether", "serve", "--db", db, "--port", str(port)]
    argv += ["--workflows", str(REFUND), "--workers", "0"]
    log = (tmp / "serve.log").open("w")
    process = subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp)
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(300):
            try:
                if httpx.get(url + "/openapi.json", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.1)
        else:
            raise RuntimeError((tmp / "serve.log").read_text())
        yield url
    finally:
        process.terminate()
        process.wait(timeout=15)
        log.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def latency(client: httpx.AsyncClient, path: str, requests: int) -> tuple[float, float]:
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        response = await client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, response.text
    return statistics.median(times), percentile(times, 0.95)


async def events(client: httpx.AsyncClient, path: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
    async with client.stream("GET", path) as response:
        fields: dict[str, str] = {}
        async for line in response.aiter_lines():
            if not line:
                if "data" in fields:
                    yield fields.get("event", "message"), json.loads(fields["data"])
                fields = {}
            elif not line.startswith(":"):
                name, _, value = line.partition(":")
                fields[name] = value.removeprefix(" ")


async def sse_history(client: httpx.AsyncClient, run_id: str, subscribers: int) -> tuple[int, float]:
    async def follow() -> int:
        count = 0
        async for kind, _ in events(client, f"/api/v1/runs/{run_id}/events"):
            if kind == "end":
                return count
            count += 1
        return count

    started = time.perf_counter()
    counts = await asyncio.gather(*(follow() for _ in range(subscribers)))
    return sum(counts), time.perf_counter() - started


async def sse_live(client: httpx.AsyncClient, run_id: str, ticket_id: str, subscribers: int) -> float:
    ready, got = asyncio.Semaphore(0), asyncio.Semaphore(0)
    decided_at: list[float] = []

    async def follow() -> float:
        async for _, data in events(client, f"/api/v1/runs/{run_id}/events"):
            if data.get("outcome") == "awaiting_approval":
                ready.release()
            if data.get("kind") == "ticket_decided":
                got.release()
                return time.perf_counter()
        raise RuntimeError("stream ended before the decision")

    tasks = [asyncio.create_task(follow()) for _ in range(subscribers)]
    for _ in range(subscribers):
        await ready.acquire()
    await asyncio.sleep(0.5)  # every subscriber is now waiting for new entries
    decided_at.append(time.perf_counter())
    response = await client.post(f"/api/v1/tickets/{ticket_id}/approve", json={})
    assert response.status_code == 200, response.text
    received = await asyncio.gather(*tasks)
    return (max(received) - decided_at[0]) * 1000


async def approvals(url: str, token: str, tickets: list[str]) -> tuple[int, float]:
    queue: asyncio.Queue[str] = asyncio.Queue()
    for t in tickets:
        queue.put_nowait(t)
    limits = httpx.Limits(max_connections=APPROVERS)
    headers = {"Authorization": f"Bearer {token}"}

    async def approver(client: httpx.AsyncClient) -> int:
        done = 0
        while not queue.empty():
            ticket_id = queue.get_nowait()
            response = await client.post(f"/api/v1/tickets/{ticket_id}/approve", json={"reason": "bench"})
            assert response.status_code == 200, response.text
            done += 1
        return done

    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=60) as client:
        started = time.perf_counter()
        done = await asyncio.gather(*(approver(client) for _ in range(APPROVERS)))
        return sum(done), time.perf_counter() - started


async def measure(url: str, filled: dict[str, Any], args: argparse.Namespace) -> list[tuple[str, str]]:
    headers = {"Authorization": f"Bearer {filled['token']}"}
    limits = httpx.Limits(max_connections=args.subscribers + 10)
    rows: list[tuple[str, str]] = []
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=120, limits=limits) as client:
        for label, path in (
            (f"inbox: GET /api/v1/tickets ({args.tickets} pending)", "/api/v1/tickets"),
            ("runs, first page: GET /api/v1/runs?limit=50", "/api/v1/runs?limit=50"),
            ("paused runs: GET /api/v1/runs?status=paused&limit=50", "/api/v1/runs?status=paused&limit=50"),
            ("timeline: GET /api/v1/runs/{id} (completed run)", f"/api/v1/runs/{filled['completed']}"),
        ):
            median, p95 = await latency(client, path, args.requests)
            rows.append((label, f"{median:.1f} ms median, {p95:.1f} ms p95"))
        count, seconds = await sse_history(client, filled["completed"], args.subscribers)
        rows.append(
            (
                f"SSE history: {args.subscribers} subscribers x {count // args.subscribers} entries",
                f"{count / seconds:,.0f} events/s ({seconds * 1000:.0f} ms for all)",
            )
        )
        (run_id, ticket_id), rest = filled["paused"][0], filled["paused"][1:]
        ms = await sse_live(client, run_id, ticket_id, args.subscribers)
        rows.append(
            (f"SSE live: a decision reaches {args.subscribers} subscribers", f"{ms:.0f} ms (the last one)")
        )
    done, seconds = await approvals(url, filled["token"], [t for _, t in rest])
    rows.append(
        (f"approvals through the API ({APPROVERS} clients, {done} tickets)", f"{done / seconds:,.0f} /s")
    )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--tickets", type=int, default=200)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--requests", type=int, default=50)
    args = parser.parse_args()
    stores = ["sqlite", "postgres"] if args.store == "both" else [args.store]
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        os.environ["REFUND_LEDGER"] = str(tmp / "ledger.sqlite")
        print(describe_machine(tmp, ["starlette", "uvicorn", "sse-starlette", "httpx", "psycopg"]))
        for kind in stores:
            with journal_target(kind, tmp) as db:
                filled = asyncio.run(fill(db, args.runs, args.tickets))
                with server(db, tmp) as url:
                    rows = asyncio.run(measure(url, filled, args))
            print(f"\n{kind}: {args.runs:,} runs (filled in {filled['fill_seconds']:.0f} s)\n")
            width = max(len(label) for label, _ in rows)
            print(f"| {'measure'.ljust(width)} | result |")
            print(f"|{'-' * (width + 2)}|--------|")
            for label, value in rows:
                print(f"| {label.ljust(width)} | {value} |")


if __name__ == "__main__":
    main()
