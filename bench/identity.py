"""Measure what identities cost: hashing a token (SHA-256, as stored, against a slow KDF),
authenticating a token against the journal, and deciding tickets through `Runtime.decide`.

    PYTHONPATH=src python bench/identity.py [--store sqlite|postgres|both] [--n 300]

`scrypt` (standard library, n=2**14, r=8, p=1: the interactive-login parameters) stands in
for a password hash a token does not need (docs/decisions.md). `authenticate` is one indexed
read of the token's hash and the store's clock; `decide` authorizes, locks the run and the
ticket, and records the decision (one transaction, synced as the store's durability says).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import secrets
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tether import Runtime
from tether.identity import Principal, authenticate, create_token
from tether.journal import Commit, Journal, NewEntry, RunRecord, RunUpdate, Ticket, open_journal
from tether.journal import bodies as b

PG = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
APPROVER = Principal(
    principal_id="person:bench", name="bench", kind="person", role="approver", approver_for=("supervisor",)
)


def per_call(fn: Callable[[], object], n: int) -> float:
    """Median seconds of one call over `n` calls."""
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


async def paused(journal: Journal, n: int) -> list[str]:
    ids = []
    for i in range(n):
        now = time.time()
        run_id, ticket_id = f"run_b{i}_{secrets.token_hex(3)}", f"tkt_b{i}_{secrets.token_hex(3)}"
        record = RunRecord(
            run_id=run_id,
            workflow_name="shop",
            workflow_version="1",
            workflow_hash="h",
            workflow_ref="bench",
            policy_hash="p",
            state="shop",
            created_at=now,
            updated_at=now,
        )
        started = b.RunStarted(workflow=b.WorkflowRef("shop", "1", "h"), policy_hash="p")
        written = await journal.create_run(record, [NewEntry.of(started, state="shop")])
        ticket = Ticket(
            ticket_id=ticket_id,
            run_id=run_id,
            step_id="s1",
            kind="approval",
            subject="refund",
            args={"amount": 70},
            args_hash="sha256:a",
            approver="supervisor",
            created_at=now,
            expires_at=now + 3600,
        )
        await journal.commit(
            Commit(
                run_id=run_id,
                expected_seq=written[-1].seq,
                expected_hash=written[-1].hash,
                update=RunUpdate(status="paused", checkpoint={"pending": {"ticket_id": ticket_id}}),
                new_tickets=[ticket],
            )
        )
        ids.append(ticket_id)
    return ids


async def measure(target: str, n: int) -> tuple[float, float]:
    async with open_journal(target) as journal:
        token, _ = await create_token(journal, name="bench", role="viewer", expires_in=3600)
        await authenticate(journal, token)
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await authenticate(journal, token)
            times.append(time.perf_counter() - t)
        tickets = await paused(journal, n)
        runtime = Runtime(journal)
        t = time.perf_counter()
        for ticket_id in tickets:
            await runtime.decide(ticket_id, approve=True, by=APPROVER)
        return statistics.median(times), n / (time.perf_counter() - t)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", choices=["sqlite", "postgres", "both"], default="both")
    parser.add_argument("--n", type=int, default=300)
    args = parser.parse_args()
    token = ("tth_" + secrets.token_urlsafe(32)).encode()
    sha = per_call(lambda: hashlib.sha256(token).hexdigest(), 10_000)
    scrypt = per_call(lambda: hashlib.scrypt(token, salt=b"0" * 16, n=2**14, r=8, p=1), 20)
    rows = [
        ("SHA-256 of a token (as stored)", f"{sha * 1e6:.2f} µs"),
        ("scrypt n=2^14 r=8 p=1", f"{scrypt * 1e3:.1f} ms"),
    ]
    targets = []
    if args.store in ("sqlite", "both"):
        targets.append(("sqlite", str(Path(tempfile.mkdtemp()) / "identity.db")))
    if args.store in ("postgres", "both"):
        schema = "bench_identity_" + secrets.token_hex(4)
        import psycopg

        with psycopg.connect(PG, autocommit=True) as conn:
            conn.execute(f"CREATE SCHEMA {schema}")
        targets.append(("postgres", f"{PG}{'&' if '?' in PG else '?'}options=-csearch_path%3D{schema}"))
    try:
        for name, target in targets:
            auth, decisions = asyncio.run(measure(target, args.n))
            rows.append((f"authenticate, {name} (median)", f"{auth * 1e6:.0f} µs"))
            rows.append((f"Runtime.decide, {name}, one after another", f"{decisions:.0f} decisions/s"))
    finally:
        if args.store in ("postgres", "both"):
            with psycopg.connect(PG, autocommit=True) as conn:
                conn.execute(f"DROP SCHEMA {schema} CASCADE")
    width = max(len(r[0]) for r in rows)
    print(f"{'what':<{width}}  figure\n{'-' * width}  ------")
    for what, figure in rows:
        print(f"{what:<{width}}  {figure}")


if __name__ == "__main__":
    main()
