"""Racing approvers through the API: two client processes, each talking to its own
`tether serve` process over one journal, approve the same ticket at the same moment, for
100 tickets, on SQLite and on PostgreSQL. Every time exactly one decision is recorded;
the other caller gets a 409 problem saying the ticket was already decided.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from servers import REFUND_INPUT, serve
from tether import identity
from tether.journal import open_journal

pytest_plugins = ("stores",)  # the db_target fixture: SQLite and PostgreSQL

TRIALS = 100


@pytest.fixture
def db(db_target: str) -> str:
    """A SQLite file, or a PostgreSQL schema of its own (tests/stores.py)."""
    return db_target


async def _setup(db: str) -> dict[str, str]:
    journal = open_journal(db)
    try:
        tokens = {}
        for name in ("operator", "ann", "bob"):
            role = "operator" if name == "operator" else "approver"
            scope = () if name == "operator" else ("supervisor",)
            tokens[name], _ = await identity.create_token(
                journal, name=name, role=role, approver_for=scope, expires_in=None
            )
        return tokens
    finally:
        await journal.aclose()


def _approve_each(url: str, token: str, tickets: list[str], barrier: Any, results: Any) -> None:
    """One racer: for each ticket, wait for the other racer, then approve it at once."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        for ticket_id in tickets:
            barrier.wait()
            response = client.post(f"/api/v1/tickets/{ticket_id}/approve", json={"reason": "race"})
            code = response.json().get("code") if response.status_code != 200 else None
            results.put((ticket_id, token[-6:], response.status_code, code))


def test_two_approvers_racing_through_two_servers_decide_each_ticket_exactly_once(
    db: str, tmp_path: Path
) -> None:
    tokens = asyncio.run(_setup(db))
    # One server drives the runs (its worker pauses each on its supervisor ticket); the
    # other only serves. Each racer talks to its own server: a race between processes.
    driving, other = serve(db, tmp_path, workers=1), serve(db, tmp_path, workers=0)
    try:
        headers = {"Authorization": f"Bearer {tokens['operator']}"}
        with httpx.Client(base_url=driving.url, headers=headers, timeout=60) as client:
            runs = [
                client.post("/api/v1/runs", json={"workflow": "refund", "input": REFUND_INPUT}).json()[
                    "run_id"
                ]
                for _ in range(TRIALS)
            ]
            tickets = _tickets_of(client, runs)
        context = multiprocessing.get_context("fork")
        barrier, results = context.Barrier(2), context.Queue()
        racers = [
            context.Process(
                target=_approve_each, args=(driving.url, tokens["ann"], tickets, barrier, results)
            ),
            context.Process(target=_approve_each, args=(other.url, tokens["bob"], tickets, barrier, results)),
        ]
        for racer in racers:
            racer.start()
        outcomes: dict[str, list[tuple[int, str | None]]] = {t: [] for t in tickets}
        for _ in range(2 * TRIALS):
            ticket_id, _, status, code = results.get(timeout=120)
            outcomes[ticket_id].append((status, code))
        for racer in racers:
            racer.join(timeout=30)
            assert racer.exitcode == 0
    finally:
        driving.stop()
        other.stop()
    for ticket_id, seen in outcomes.items():
        assert sorted(status for status, _ in seen) == [200, 409], (ticket_id, seen)
        assert [code for status, code in seen if status == 409] == ["ticket_conflict"]
    decided = asyncio.run(_decisions(db, runs))
    assert decided == {run_id: 1 for run_id in runs}


def _tickets_of(client: httpx.Client, runs: list[str]) -> list[str]:
    deadline, tickets = time.monotonic() + 120, {}
    while len(tickets) < len(runs) and time.monotonic() < deadline:
        for run_id in runs:
            if run_id not in tickets:
                run = client.get(f"/api/v1/runs/{run_id}").json()["run"]
                if run["status"] == "paused":
                    tickets[run_id] = run["ticket_id"]
        time.sleep(0.1)
    assert len(tickets) == len(runs), f"only {len(tickets)} of {len(runs)} runs paused on a ticket"
    return [tickets[r] for r in runs]


async def _decisions(db: str, runs: list[str]) -> dict[str, int]:
    journal = open_journal(db)
    try:
        return {r: len(await journal.read_entries(r, kinds=("ticket_decided",))) for r in runs}
    finally:
        await journal.aclose()
