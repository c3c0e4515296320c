"""Deciders racing for the same tickets from separate processes (tests/test_people_race.py).

Importable by a spawned process: each opens its own journal and decides every ticket in
turn, meeting the other process at a barrier before each, so that both try every ticket at
once."""

from __future__ import annotations

import asyncio
from typing import Any

from tether import Runtime
from tether.errors import TicketConflict
from tether.identity import Principal
from tether.journal import open_journal


def decide_all(target: str, ticket_ids: list[str], name: str, barrier: Any, results: Any) -> None:
    by = Principal(
        principal_id=f"person:{name}", name=name, kind="person", role="approver", approver_for=("supervisor",)
    )

    async def main() -> list[str]:
        outcomes: list[str] = []
        async with open_journal(target) as journal:
            runtime = Runtime(journal)
            await journal.list_tickets()  # connected before the first trial
            for ticket_id in ticket_ids:
                barrier.wait(timeout=60)
                try:
                    await runtime.decide(ticket_id, approve=True, by=by, reason=name)
                    outcomes.append("won")
                except TicketConflict:
                    outcomes.append("conflict")
                except Exception as exc:  # reported, and the test fails on it
                    outcomes.append(f"error: {type(exc).__name__}: {exc}")
        return outcomes

    results.put((name, asyncio.run(main())))
