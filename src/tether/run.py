"""The in-memory view of a run being driven: its record, transcript and visit counters.

Everything here is rebuilt from the journal on resume; nothing lives only in memory
across a commit. `RunCursor.commit` is the one way the runtime writes.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Literal

from tether.journal import Commit, Entry, Journal, ModelExchange, NewEntry, RunRecord, RunUpdate, Ticket
from tether.models.protocol import Message
from tether.policy import Decision, Policy
from tether.tools import ToolContext
from tether.workflow import Workflow

EXECUTED = ("executed", "verification_failed")
log = logging.getLogger("tether.run")


def new_visit(state: str, number: int, started_seq: int) -> dict[str, Any]:
    """Counters of one visit to a state; budgets apply per visit."""
    return {
        "state": state,
        "number": number,
        "started_seq": started_seq,
        "steps": 0,
        "tool_calls": 0,
        "tokens": 0,
        "cost": 0.0,
        "active_seconds": 0.0,
        "last_call": None,
        "repeats": 0,
    }


class RunCursor:
    def __init__(
        self,
        record: RunRecord,
        workflow: Workflow,
        policy: Policy,
        journal: Journal,
        *,
        clock: Callable[[], float] = time.time,
        lease: tuple[str, float] | None = None,
        on_commit: Callable[[list[Entry]], None] | None = None,
    ) -> None:
        self.record = record
        # Told of every entry once it is committed (progress, tracing); it cannot change them.
        self.on_commit = on_commit
        self.workflow = workflow
        self.policy = policy
        self.journal = journal
        self.clock = clock
        self.transcript: list[Message] = []
        self.history: list[dict[str, Any]] = []
        # (owner, seconds): every commit is fenced by this lease and renews it.
        self.lease = lease
        self._since = time.monotonic()
        self._buffered: list[NewEntry] = []
        self._dirty: set[str] = set()
        self._exchanges: list[ModelExchange] = []

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def checkpoint(self) -> dict[str, Any]:
        return self.record.checkpoint

    @property
    def visit(self) -> dict[str, Any]:
        visit: dict[str, Any] = self.record.checkpoint["visit"]
        return visit

    def clear_notice(self) -> None:
        """The next commit clears the run's owner, reason and message (it moves on)."""
        self.record.owner = self.record.reason_code = self.record.message = None
        self._dirty |= {"owner", "reason_code", "message"}

    def count(self, key: str, amount: float = 1) -> None:
        """Spend budget: in this visit and in the run's totals (`steps`, `tool_calls`, `tokens`, `cost`)."""
        self.visit[key] += amount
        totals = self.checkpoint.setdefault("totals", {})
        totals[key] = totals.get(key, 0) + amount

    def total(self, key: str) -> float:
        return float(self.checkpoint.get("totals", {}).get(key, 0))

    def new_step_id(self) -> str:
        self.checkpoint["steps"] = self.checkpoint.get("steps", 0) + 1
        return f"s{self.checkpoint['steps']}"

    def next_exchange_seq(self) -> int:
        self.checkpoint["exchanges"] = self.checkpoint.get("exchanges", 0) + 1
        return int(self.checkpoint["exchanges"])

    def record_exchange(self, exchange: ModelExchange) -> None:
        """Keep a model exchange to be written with the next commit (the step it served)."""
        self._exchanges.append(exchange)

    def active_seconds(self) -> float:
        """Time spent working in this visit; time paused between processes is not counted."""
        return float(self.visit["active_seconds"]) + (time.monotonic() - self._since)

    def enter(self, state: str, *, entries_in_commit: int = 0) -> None:
        """Start a new visit; the caller commits it with `entries_in_commit` entries."""
        number = self.visit["number"] + 1 if self.checkpoint.get("visit") else 1
        self.record.state = state
        started = self.record.last_seq + len(self._buffered) + entries_in_commit
        self.checkpoint["visit"] = new_visit(state, number, started)
        self.transcript = []
        self._since = time.monotonic()

    async def commit(
        self,
        entries: list[NewEntry],
        *,
        status: str | None = None,
        data: dict[str, Any] | None = None,
        facts: dict[str, Any] | None = None,
        owner: str | None = None,
        reason_code: str | None = None,
        message: str | None = None,
        tickets: list[Ticket] | None = None,
        consume: tuple[str, str] | None = None,
        durable: bool = False,
        buffer: bool = False,
    ) -> list[Entry]:
        """Write entries with the run's checkpoint in one transaction.

        `buffer=True` (a state declared `checkpoint: false`) keeps the entries in memory
        to be written with the next commit; a crash before then redoes that state.
        """
        changes = {
            "status": status,
            "data": data,
            "facts": facts,
            "owner": owner,
            "reason_code": reason_code,
            "message": message,
        }
        for key, value in changes.items():
            if value is not None:
                setattr(self.record, key, value)
                self._dirty.add(key)
        if buffer:
            self._buffered.extend(entries)
            return []
        if "visit" in self.checkpoint:
            self.visit["active_seconds"] = self.active_seconds()
            self._since = time.monotonic()
        fields = {k: getattr(self.record, k) for k in ("state", "checkpoint", "status", *self._dirty)}
        written = await self.journal.commit(
            # Built from values this class already holds typed: no need to validate them again.
            Commit(
                run_id=self.run_id,
                expected_seq=self.record.last_seq,
                expected_hash=self.record.last_hash,
                entries=[*self._buffered, *entries],
                update=RunUpdate(**fields),
                new_tickets=tickets or [],
                consume=consume,
                exchanges=self._exchanges,
                durable=durable,
                lease_owner=self.lease[0] if self.lease else None,
                lease_seconds=self.lease[1] if self.lease else None,
            )
        )
        self._buffered, self._dirty, self._exchanges = [], set(), []
        if written:
            self.record.last_seq, self.record.last_hash = written[-1].seq, written[-1].hash
            if self.on_commit is not None:
                try:
                    self.on_commit(written)
                except Exception:  # an observer's failure (a closed terminal, say) is not the run's
                    log.exception("on_commit observer failed for run %s", self.run_id)
        return written

    def decide(
        self, *, kind: Literal["tool", "exit"], tool: dict[str, Any], args: dict[str, Any], step_id: str
    ) -> Decision:
        """Ask the policy about a proposal, with this run's variables and resolvers.

        `tool` is what conditions see as `tool`: `name` and `effect` (and `idempotent` for tools).
        """
        name, effect = tool["name"], tool["effect"]
        variables: dict[str, Any] = {
            "args": args,
            "data": self.record.data,
            "facts": self.record.facts,
            "history": lambda: self.history,
            "tool": tool,
            "run": {
                "id": self.run_id,
                "workflow": self.record.workflow_name,
                "version": self.record.workflow_version,
                "state": self.record.state,
            },
        }
        ctx = ToolContext(
            run_id=self.run_id,
            step_id=step_id,
            idempotency_key=f"{self.run_id}:{step_id}",
            data=self.record.data,
            facts=self.record.facts,
        )
        resolvers = {n: functools.partial(fn, ctx) for n, fn in self.workflow.resolvers.items()}
        return self.policy.decide(
            kind=kind,
            name=name,
            effect=effect,
            variables=variables,
            resolvers=resolvers,
        )

    def executed(self, entry_body: dict[str, Any], step_id: str, state: str) -> None:
        """Remember a tool call whose effect happened, for conditions over `history`."""
        self.history.append(_history_item(entry_body, step_id, state))


def messages_for(body: dict[str, Any]) -> list[Message]:
    """What one step entry adds to the transcript: the proposal (unless it continues a
    paused step, whose proposal is already there) and what the runtime observed."""
    messages = []
    if not body.get("continuation"):
        proposal = body.get("proposal")
        messages.append(
            Message(role="proposal", content=proposal if proposal is not None else body.get("raw"))
        )
    role = "person" if body.get("outcome") == "answered" else "observation"
    content = body["observation"]
    if body.get("outcome") in ("executed", "verification_failed"):
        content = {**content, "result": body.get("result")}
        if body.get("verification") is not None:
            content["verification"] = body["verification"]
    messages.append(Message(role=role, content=content))
    return messages


def _history_item(body: dict[str, Any], step_id: str | None, state: str | None) -> dict[str, Any]:
    return {
        "tool": body["tool"]["name"],
        "args": body["args"],
        "step_id": step_id,
        "state": state,
        "outcome": body["outcome"],
    }


def history_from(entries: list[Entry]) -> list[dict[str, Any]]:
    """Rebuild the run's executed tool calls from its journal."""
    return [
        _history_item(e.body, e.step_id, e.state)
        for e in entries
        if e.kind == "step" and e.body.get("outcome") in EXECUTED
    ]


def transcript_from(entries: list[Entry]) -> list[Message]:
    """Rebuild a visit's transcript from its journal entries."""
    return [m for e in entries if e.kind == "step" and "observation" in e.body for m in messages_for(e.body)]
