"""Latency of the web interface's pages with 10,000 runs in the journal.

The journal (SQLite, or PostgreSQL with --pg) is filled with real runs of the refund example
(examples/refund), driven in this process by the runtime with scripted proposals: 99 in 100
refund 20 and complete; 1 in 100 is the README's walkthrough and pauses on a supervisor's
approval (a pending ticket in the inbox). Then a real `tether serve` (uvicorn, no workers)
serves the pages, and each page is requested in turn over HTTP by a signed-in admin
(sequentially, after a warm-up): the table shows the median and 95th percentile of the
time to the last byte, and the size of the page.

No timing is asserted: this is a report. The goal of issue 13 it measures: a page in
< 100 ms with 10,000 runs in the journal.

Run:  .venv/bin/python bench/web.py [--runs 10000] [--requests 50] [--pg URL]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchkit import ROOT, describe_machine, goal_line

REFUND = ROOT / "examples" / "refund"
SMALL = [
    {"kind": "tool_call", "tool": "lookup_order", "args": {"order_id": "A-1002"}},
    {
        "kind": "tool_call",
        "tool": "issue_refund",
        "args": {"order_id": "A-1002", "amount": 20.0, "reason": "late"},
    },
    {"kind": "exit", "exit": "refunded"},
]


async def fill(db: str, runs: int, tmp: Path) -> tuple[str, list[str], float]:
    """`runs` refund runs (none if the journal has runs already: `--journal`); return an
    admin token, a paused, a completed and the newest run's ids, and how long filling took."""
    from tether.identity import create_token
    from tether.journal import open_journal
    from tether.loader import load_workflow_async, workflow_ref
    from tether.models import resolve_model
    from tether.runtime import Runtime

    small = tmp / "small.json"
    small.write_text(json.dumps({"proposals": SMALL}))
    workflow = await load_workflow_async(str(REFUND))
    journal = open_journal(db)
    started = time.perf_counter()
    try:
        token, _ = await create_token(journal, name="bench", role="admin", expires_in=3600)
        # A short lease: the runtime's lease-renewal task wakes a third of it after the last
        # run, and must find the journal still open (see the sleep below).
        runtime = Runtime(journal, lease_seconds=1.5)
        models = {
            spec: resolve_model(spec, journal=journal)
            for spec in (f"script:{small}", f"script:{REFUND / 'proposals.json'}")
        }
        ids: list[str] = []
        existing = await journal.page_runs(status="paused", limit=1)
        if existing:
            done = await journal.page_runs(status="completed", limit=1)
            return token, [existing[0].run_id, done[0].run_id, done[0].run_id], 0.0

        async def one(i: int) -> str:
            spec = f"script:{REFUND / 'proposals.json'}" if i % 100 == 0 else f"script:{small}"
            result = await runtime.start(
                workflow,
                models[spec],
                input={"order_id": "A-1001" if i % 100 == 0 else "A-1002", "reason": "bench"},
                workflow_ref=workflow_ref(str(REFUND)),
                model_spec=spec,
            )
            return result.run_id

        for start in range(0, runs, 200):
            ids += await asyncio.gather(*(one(i) for i in range(start, min(start + 200, runs))))
        await asyncio.sleep(1.0)
    finally:
        await journal.aclose()
    return token, [ids[0], ids[1], ids[-1]], time.perf_counter() - started


def serve(db: str, tmp: Path) -> tuple[subprocess.Popen[bytes], str]:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "REFUND_LEDGER": str(tmp / "ledger.sqlite")}
    with (tmp / "serve.log").open("wb") as log:
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "tether", "serve", "--db", db, "--workflows", str(REFUND)),
                *("--port", str(port), "--workers", "0"),
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            httpx.get(url + "/login", timeout=1)
            return process, url
        except httpx.TransportError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError((tmp / "serve.log").read_text())


def measure(client: httpx.Client, path: str, requests: int) -> tuple[float, float, int]:
    for _ in range(5):  # warm-up
        client.get(path).raise_for_status()
    times = []
    size = 0
    for _ in range(requests):
        t0 = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - t0) * 1000)
        response.raise_for_status()
        size = len(response.content)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1], size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=50)
    parser.add_argument("--pg", help="a PostgreSQL URL (a fresh database or schema) instead of SQLite")
    parser.add_argument("--journal", help="a SQLite file to fill once and measure again (kept)")
    options = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        os.environ["REFUND_LEDGER"] = str(tmp / "ledger.sqlite")
        db = options.pg or options.journal or str(tmp / "tether.db")
        print(describe_machine(tmp, ["starlette", "uvicorn", "jinja2"]))
        token, (paused, completed, newest), seconds = asyncio.run(fill(db, options.runs, tmp))
        print(
            f"journal: {'PostgreSQL' if options.pg else 'SQLite'}, {options.runs:,} refund runs "
            f"({options.runs // 100:,} paused on an approval), "
            + (f"made in {seconds:.0f} s\n" if seconds else "filled by an earlier run (--journal)\n")
        )
        process, url = serve(db, tmp)
        try:
            with httpx.Client(base_url=url) as client:
                csrf = re.search(r'name="csrf" value="([^"]+)"', client.get("/login").text)
                assert csrf is not None
                client.post("/login", data={"csrf": csrf.group(1), "token": token})
                second_page = re.search(r'href="(/runs\?after=[^"]+)"', client.get("/runs").text)
                assert second_page is not None
                pages = [
                    ("inbox (10 pending tickets, with their evidence)", "/inbox"),
                    ("run list, newest 50", "/runs"),
                    ("run list, second page", second_page.group(1).replace("&amp;", "&")),
                    ("run list, status completed", "/runs?status=completed"),
                    ("run list, status paused", "/runs?status=paused"),
                    ("timeline + graph of a completed run", f"/runs/{completed}"),
                    ("timeline + graph of a paused run", f"/runs/{paused}"),
                    ("active policy of a run", f"/runs/{newest}/policy"),
                    ("graph (SVG) of a run", f"/runs/{newest}/graph.svg"),
                ]
                rows = [(name, *measure(client, path, options.requests)) for name, path in pages]
        finally:
            process.terminate()
            process.wait(timeout=15)
    width = max(len(r[0]) for r in rows)
    print(f"{'page':<{width}}  {'median ms':>9}  {'p95 ms':>7}  {'bytes':>8}")
    for name, median, p95, size in rows:
        print(f"{name:<{width}}  {median:>9.1f}  {p95:>7.1f}  {size:>8,}")
    worst = max(r[2] for r in rows)
    print()
    print(
        goal_line(
            f"a page in < 100 ms with {options.runs:,} runs (p95, slowest page)",
            f"{worst:.1f} ms",
            worst < 100,
        )
    )


if __name__ == "__main__":
    main()
