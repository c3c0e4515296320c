"""Time is the journal's, not the caller's: expiry and leases are decided on the store's clock.

Each test runs against SQLite and PostgreSQL (the contract suite's stores). A caller's clock
is whatever it passes as `now=`: set back, to approve after expiry; set ahead, to take or
stretch a lease. The store must ignore it.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from test_journal_contract import (  # the stores, one fresh journal per test
    Store,
    pause_on,
    postgres_url,
    start,
    step,
    store,
    ticket,
)
from tether.errors import TicketError
from tether.journal import Journal, LeaseHeld, RunUpdate, TicketExpired

__all__ = ["postgres_url", "store"]  # fixtures, used by name

HOUR = 3600.0


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_a_late_approval_is_refused_even_with_the_callers_clock_set_back(store: Store) -> None:
    journal = store.open()

    async def scenario() -> None:
        await pause_on(journal, await start(journal, "r1"), ticket("t1", "r1", expires_in=-1.1))
        with pytest.raises(TicketExpired, match="ticket t1 expired"):
            await journal.decide_ticket("t1", approve=True, by="mallory", now=time.time() - HOUR)
        assert (await journal.get_ticket("t1")).status == "pending"
        assert [e.kind for e in await journal.read_entries("r1")][-1] != "ticket_decided"

    run(scenario())


def test_an_approved_ticket_cannot_be_used_after_it_expires(store: Store) -> None:
    journal = store.open()

    async def scenario() -> None:
        await pause_on(journal, await start(journal, "r1"), ticket("t1", "r1", expires_in=0.5))
        await journal.decide_ticket("t1", approve=True, by="sam", now=time.time())  # in time
        await asyncio.sleep(0.6)
        paused = await journal.get_run("r1")
        with pytest.raises(TicketExpired, match=r"ticket t1 expired .* before it was used") as refused:
            await step(journal, paused, consume=("t1", "sha256:args"), update=RunUpdate(status="running"))
        assert isinstance(refused.value, TicketError) and refused.value.ticket_id == "t1"
        assert await journal.get_run("r1") == paused  # nothing of that commit was applied
        assert (await journal.get_ticket("t1")).status == "approved"
        assert (await journal.expire_ticket("t1", now=time.time() - HOUR)).status == "expired"

    run(scenario())


def test_a_clock_set_ahead_neither_takes_nor_stretches_a_live_lease(store: Store) -> None:
    journal: Journal = store.open()

    async def scenario() -> None:
        await start(journal, "r1")
        await journal.acquire("r1", "w1", lease_seconds=30, now=time.time() - HOUR)
        held = await journal.get_run("r1")
        assert held.lease_expires_at is not None and held.lease_expires_at > time.time() + 20
        ahead = time.time() + HOUR
        assert await journal.claim("thief", lease_seconds=30, now=ahead) is None
        with pytest.raises(LeaseHeld, match="leased to w1"):
            await journal.acquire("r1", "thief", lease_seconds=30, now=ahead)
        assert await journal.heartbeat("r1", "w1", lease_seconds=30, now=ahead) is True
        renewed = await journal.get_run("r1")
        assert renewed.lease_owner == "w1"
        assert renewed.lease_expires_at is not None and renewed.lease_expires_at < time.time() + 60

    run(scenario())
