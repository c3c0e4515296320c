"""A run's events, live, as server-sent events: one event per journal entry, its id the seq.

A client that reconnects sends `Last-Event-ID` (the last seq it saw) and gets every entry
after it, then the new ones as they are committed, so nothing is missed or repeated. The
stream ends with an `end` event once the run has finished and every entry was sent.

Waking up: one `EventHub` per server watches the runs that have subscribers. Commits made
in this process (its in-process workers, the API's own decisions) wake the subscribers at
once; commits by other processes (workers elsewhere, another server) are seen by one poll
of every watched run's last seq, in one query, every `poll_seconds` — whatever the
number of subscribers.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tether.hashing import encode_json
from tether.journal import FINISHED, Entry, Journal
from tether.timeline import timeline

# The newest events of a watched run kept in memory, shared by its subscribers.
CACHED = 1000
# How long a read of a run's last entry number and status serves its other subscribers.
FRESH_SECONDS = 0.05


@dataclass
class _Watch:
    subscribers: int = 0
    seen: int = 0  # the highest seq known to be committed
    status: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # Subscribers of one run share its reads: the events of consecutive entries from seq
    # `first`, newest last, and the last (seq, status) read with when it was read.
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    recent: list[dict[str, str]] = field(default_factory=list)
    first: int = 0
    state: tuple[int, str] = (0, "")
    state_at: float = float("-inf")


class EventHub:
    """Who is waiting for which run, and the one poller that wakes them."""

    def __init__(self, journal: Journal, *, poll_seconds: float = 0.25) -> None:
        self.journal = journal
        self.poll_seconds = poll_seconds
        self._watches: dict[str, _Watch] = {}
        self._poller: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()

    def committed(self, entries: list[Entry]) -> None:
        """A runtime's `on_commit`: these entries are durable; wake their run's subscribers."""
        for e in entries:
            self.poke(e.run_id, e.seq)

    def poke(self, run_id: str, seq: int | None = None, status: str | None = None) -> None:
        """Something was committed to `run_id` (up to `seq` when known)."""
        watch = self._watches.get(run_id)
        if watch is None:
            return
        if seq is not None:
            watch.seen = max(watch.seen, seq)
        if status is not None:
            watch.status = status
        watch.changed.set()

    def close(self) -> None:
        """The server stops: every stream ends."""
        self.closed.set()
        for watch in self._watches.values():
            watch.changed.set()
        if self._poller is not None:
            self._poller.cancel()

    async def stream(self, run_id: str, after: int) -> AsyncIterator[dict[str, str]]:
        """The run's entries after seq `after` as SSE events, then live ones, then `end`."""
        watch = self._watches.setdefault(run_id, _Watch())
        watch.subscribers += 1
        self._ensure_poller()
        try:
            while not self.closed.is_set():
                watch.changed.clear()
                events = await self._events_after(run_id, watch, after)
                for event in events:
                    yield event
                if events:
                    after = int(events[-1]["id"])
                    continue
                last_seq, status = await self._state(run_id, watch)
                if status in FINISHED and last_seq <= after:
                    yield {"event": "end", "data": encode_json({"status": status})}
                    return
                if last_seq > after:
                    watch.seen = max(watch.seen, last_seq)
                    continue
                await self._wait(watch)
        finally:
            watch.subscribers -= 1
            if watch.subscribers == 0:
                self._watches.pop(run_id, None)

    async def _events_after(self, run_id: str, watch: _Watch, after: int) -> list[dict[str, str]]:
        """The events of the run's entries after `after`: from the run's shared cache when it
        holds them, else read once for every subscriber waiting on the same entries."""
        async with watch.lock:
            if watch.recent and watch.first <= after + 1:
                newest = watch.first + len(watch.recent) - 1
                if watch.seen > newest or after >= newest:
                    self._remember(watch, await self._read(run_id, newest), newest + 1)
                return watch.recent[after + 1 - watch.first :]
            events = await self._read(run_id, after)
            if events:
                watch.recent, watch.first = [], after + 1
                self._remember(watch, events, after + 1)
            return events

    @staticmethod
    def _remember(watch: _Watch, events: list[dict[str, str]], first: int) -> None:
        if not events:
            return
        if not watch.recent:
            watch.first = first
        watch.recent += events
        watch.seen = max(watch.seen, int(events[-1]["id"]))
        if len(watch.recent) > CACHED:
            dropped = len(watch.recent) - CACHED
            watch.recent, watch.first = watch.recent[dropped:], watch.first + dropped

    async def _read(self, run_id: str, after: int) -> list[dict[str, str]]:
        entries = await self.journal.read_entries(run_id, after)
        rows = timeline(entries)
        return [
            {"id": str(e.seq), "event": "entry", "data": _event(e, row)}
            for e, row in zip(entries, rows, strict=True)
        ]

    async def _state(self, run_id: str, watch: _Watch) -> tuple[int, str]:
        """The run's last entry number and status, read at most once per FRESH_SECONDS."""
        async with watch.lock:
            if time.monotonic() - watch.state_at > FRESH_SECONDS:
                watch.state = (await self.journal.last_seqs([run_id]))[run_id]
                watch.state_at = time.monotonic()
            return watch.state

    async def _wait(self, watch: _Watch) -> None:
        with contextlib.suppress(TimeoutError):
            # A ceiling on the wait: a poke lost to a race costs one interval, never a hang.
            await asyncio.wait_for(watch.changed.wait(), timeout=max(1.0, self.poll_seconds * 8))

    def _ensure_poller(self) -> None:
        if self._poller is None or self._poller.done():
            self._poller = asyncio.create_task(self._poll())

    async def _poll(self) -> None:
        """Every interval, while anyone watches: each watched run's last seq, in one query."""
        while self._watches and not self.closed.is_set():
            await asyncio.sleep(self.poll_seconds)
            try:
                now = await self.journal.last_seqs(list(self._watches))
            except Exception:  # the journal is briefly unreachable: the next poll tries again
                continue
            for run_id, (seq, status) in now.items():
                watch = self._watches.get(run_id)
                if watch is not None and (seq > watch.seen or status != watch.status):
                    self.poke(run_id, seq, status)


def _event(entry: Entry, row: dict[str, object]) -> str:
    """An entry as the event's data: its timeline row, with the entry's kind and time."""
    return encode_json({**row, "entry_kind": entry.kind, "created_at": entry.created_at, "hash": entry.hash})
