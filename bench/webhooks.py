"""Measure webhook notifications: what the outbox adds to the commit that opens a ticket,
what an idle dispatcher costs per poll, and how fast a dispatcher delivers.

    PYTHONPATH=src python bench/webhooks.py [--store sqlite|postgres|both] [--runs 300] [--deliveries 1000]

1. Opening a ticket: `runs` lone commits, each appending a step entry and opening one
   ticket (what a step that asks commits), with 0, 1 and 3 webhooks subscribed (three
   journals taking turns); the figure is the median µs per commit (default durability).
2. An idle poll: `deliveries_due()` on an outbox of delivered rows, median µs.
3. Delivery: `deliveries` outbox rows POSTed to a receiver in another process (uvicorn, an
   ASGI app answering 204), signed, by one dispatcher claiming 50 at a time over
   `--connections` (default 8); deliveries/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tether.hashing import encode_json
from tether.journal import Commit, Journal, NewEntry, RunRecord, Ticket, open_journal
from tether.webhooks import DispatchSettings, deliver_due, generate_secret, http_client, outbox_of

PG = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
RECEIVER = """
import uvicorn

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})

uvicorn.run(app, host="127.0.0.1", port=int(__import__("sys").argv[1]), log_level="warning")
"""


@contextmanager
def journal_target(kind: str) -> Iterator[str]:
    if kind == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield str(Path(tmp) / "bench.db")
        return
    import psycopg

    schema = "tether_bench_wh_" + secrets.token_hex(4)
    with psycopg.connect(PG, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"DROP SCHEMA {schema} CASCADE")


async def open_tickets(j: Journal, count: int, prefix: str) -> list[float]:
    """Lone commits that each open a ticket; seconds per commit."""
    times = []
    for n in range(count):
        run_id = f"{prefix}{n}"
        now = time.time()
        await j.create_run(
            RunRecord(
                run_id=run_id,
                workflow_name="bench",
                workflow_version="1",
                workflow_hash="sha256:wf",
                workflow_ref="bench",
                policy_hash="sha256:p",
                status="running",
                state="ask",
                input={},
                checkpoint={},
                created_at=now,
                updated_at=now,
            ),
            [NewEntry("run_started", encode_json({}), None, None)],
        )
        run = await j.get_run(run_id)
        commit = Commit(
            run_id=run_id,
            expected_seq=run.last_seq,
            expected_hash=run.last_hash,
            entries=[NewEntry("step", encode_json({"ask": n, "result": "x" * 200}), "s1", "ask")],
            new_tickets=[
                Ticket(
                    ticket_id=f"tkt_{run_id}",
                    run_id=run_id,
                    step_id="s1",
                    kind="approval",
                    subject="issue_refund",
                    args={"amount": 180.0},
                    args_hash="sha256:a",
                    approver="supervisor",
                    created_at=now,
                    expires_at=now + 3600,
                )
            ],
        )
        start = time.perf_counter()
        await j.commit(commit)
        times.append(time.perf_counter() - start)
    return times


async def add_hooks(j: Journal, count: int, url: str) -> None:
    for _ in range(count):
        await outbox_of(j).add_webhook(
            url,
            events=["ticket.opened"],
            format="standard",
            secret_env="BENCH_SECRET",
            base_url="https://t.example",
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def measure(kind: str, runs: int, deliveries: int, url: str, connections: int) -> dict[str, Any]:
    row: dict[str, Any] = {"store": kind}
    # The three journals take turns, ten commits at a time: a machine whose load drifts
    # (shared cores) moves all three alike.
    with journal_target(kind) as t0, journal_target(kind) as t1, journal_target(kind) as t3:
        journals = {0: open_journal(t0), 1: open_journal(t1), 3: open_journal(t3)}
        times: dict[int, list[float]] = {hooks: [] for hooks in journals}
        try:
            for hooks, j in journals.items():
                await add_hooks(j, hooks, url)
            for chunk in range(0, runs, 10):
                for hooks, j in journals.items():
                    times[hooks] += await open_tickets(j, min(10, runs - chunk), f"r{chunk}_")
        finally:
            for j in journals.values():
                await j.aclose()
        for hooks, measured in times.items():
            row[f"open_{hooks}"] = statistics.median(measured) * 1e6
    with journal_target(kind) as target:
        j = open_journal(target)
        try:
            await add_hooks(j, 1, url)
            await open_tickets(j, deliveries, "d")
            start = time.perf_counter()
            settings = DispatchSettings(batch=50, timeout=10.0, connections=connections)
            delivered = 0
            async with http_client(settings) as http:
                while True:
                    report = await deliver_due(outbox_of(j), client=http, settings=settings)
                    delivered += report.delivered
                    if not report.claimed:
                        break
            row["delivered"] = delivered
            row["per_second"] = delivered / (time.perf_counter() - start)
            polls = []
            for _ in range(200):
                t = time.perf_counter()
                await outbox_of(j).deliveries_due()
                polls.append(time.perf_counter() - t)
            row["idle_poll"] = statistics.median(polls) * 1e6
        finally:
            await j.aclose()
    return row


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--runs", type=int, default=300)
    parser.add_argument("--deliveries", type=int, default=1000)
    parser.add_argument("--connections", type=int, default=DispatchSettings.connections)
    args = parser.parse_args()
    os.environ["BENCH_SECRET"] = generate_secret()
    port = free_port()
    receiver = subprocess.Popen([sys.executable, "-c", RECEIVER, str(port)])
    try:
        deadline = time.time() + 20
        while time.time() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/hook"
        kinds = ["sqlite", "postgres"] if args.store == "both" else [args.store]
        rows = [
            asyncio.run(measure(kind, args.runs, args.deliveries, url, args.connections)) for kind in kinds
        ]
    finally:
        receiver.terminate()
        receiver.wait(10)
    print(
        f"ticket-opening commit, median µs ({args.runs} lone commits); delivery of {args.deliveries} rows "
        f"over {args.connections} connection(s)"
    )
    print("| store | 0 webhooks | 1 webhook | 3 webhooks | idle poll µs | deliveries/s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['store']} | {r['open_0']:.0f} | {r['open_1']:.0f} | {r['open_3']:.0f} | "
            f"{r['idle_poll']:.0f} | {r['per_second']:.0f} ({r['delivered']} delivered) |"
        )


if __name__ == "__main__":
    main()
