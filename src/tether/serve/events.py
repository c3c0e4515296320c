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
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from tether.hashing import encode_json
from tether.journal import FINISHED, Entry, Journal
from tether.timeline import timeline

# Entries sent per read: a long run's history goes out in pages, not one read.
PAGE = 500


@dataclass
class _Watch:
    subscribers: int = 0
    seen: int = 0  # the highest seq known to be committed
    status: str = ""
    changed: asyncio.Event = field(default_factory=asyncio.Event)


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
                entries = await self.journal.read_entries(run_id, after)
                for start in range(0, len(entries), PAGE):
                    page = entries[start : start + PAGE]
                    for entry, row in zip(page, timeline(page), strict=True):
                        yield {"id": str(entry.seq), "event": "entry", "data": _event(entry, row)}
                    after = page[-1].seq
                watch.seen = max(watch.seen, after)
                if not entries:
                    record = await self.journal.get_run(run_id)
                    if record.status in FINISHED and record.last_seq <= after:
                        yield {"event": "end", "data": encode_json({"status": record.status})}
                        return
                    if record.last_seq > after:
                        continue
                    await self._wait(watch)
        finally:
            watch.subscribers -= 1
            if watch.subscribers == 0:
                self._watches.pop(run_id, None)

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
