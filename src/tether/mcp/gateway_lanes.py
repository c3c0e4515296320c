"""One caller's calls through the MCP gateway: its session, its runs, and calls waiting for a person.

    caller (a principal) ─ Lane ─┬─ Segment: the current run; its CallQueue is the run's model
                                 ├─ Segment: paused on a ticket, its one call waiting for a person
                                 └─ ...

A caller's `tools/call`s go to its lane, never to another principal's. The lane hands each
call to its current *segment*: one governed run of the gateway workflow whose model is a
`CallQueue` (the calls as tool_call proposals, one step at a time, in arrival order). When
a call's decision is `ask`, the runtime pauses that run on a ticket; the lane then detaches
the segment: the segment waits for the person's decision (then executes the call or records
the denial, answers it, and ends), while the caller's later calls (and any queued behind the
waiting one) go to a fresh segment. So no call waits behind another that waits for a person.

Facts a session established stay visible to its later calls: the lane keeps the session's
facts (those the verification of each executed step established, read from the step's
observation), and a fresh segment starts at the workflow's `carry` state, a deterministic
step that records the carried facts (and the runs they came from, in the run's input) before
the first call. When a detached segment's call establishes facts after a fresh segment
started, the lane retires the fresh one (it ends after the calls already queued in it), so
the next call starts a segment that carries them.

So do the session's calls, when its policy reads `history`: the lane keeps the calls executed
in its runs (each as `history` holds it, told by the runtime as its entry is committed), and
the `carry` step records them in its entry (`step_done`'s `history`: the calls, the run each
was executed in, and how many earlier ones were left out), ahead of the run's own calls: the
fresh run's `history` is the session's, on its own record, for replay and the audit. The
carry is bounded: the session's last `CARRY_CALLS` calls, within `CARRY_BYTES` of their
entries. Past the bound the older calls are left out and the carry says how many (`cut`);
a call governed by a rule that reads `history` is then refused (`history_incomplete`,
tether.policy) for the rest of the session, since the calls left out could change its
decision. When a call of another segment (one detached on a ticket, then approved) executes
while a fresh segment is current, the fresh one is retired and the calls queued in it move
to the next, which carries it.

Waiting for a person does not poll on PostgreSQL: `Decisions` LISTENs to the journal's
notifications (a decided ticket NOTIFYs in the transaction that decides it), and a decision
made through this process (the gateway's approval route) wakes the waiting call at once. On
SQLite, which has no notifications, a decision made by another process (`tether approve`) is
seen by a bounded poll of the journal, at most 0.2 s later (the store's `wait_for_work`).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from tether.errors import TicketError
from tether.external import OPEN_BUDGET
from tether.identity import Principal
from tether.journal import Entry, Journal, Ticket
from tether.journal import bodies as b
from tether.journal.common import SELF_DRIVEN
from tether.models.protocol import Exchange, ModelContext, ModelReply
from tether.run import history_item
from tether.runtime import Runtime
from tether.workflow import Next, Workflow

try:
    from mcp.server.context import ServerRequestContext
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the MCP gateway needs the official MCP SDK ({exc}); install it with: pip install 'tether[mcp]'"
    ) from exc

log = logging.getLogger("tether.mcp.gateway")

STATE = "gateway"
CARRY = "carry"
# Marked self-driven: `tether resume` and workers cannot load it; only the gateway drives it.
WORKFLOW_REF = f"{SELF_DRIVEN}mcp-gateway>"
# A fresh visit of the gateway state every so many calls (exit `rotate`), so that the visit's
# transcript, which the runtime keeps in memory, stays bounded however long the session.
ROTATE_EVERY = 200
# A gateway session is long and repeats itself (the same read, again and again): the budget
# of any conversation driven from outside (tether.external).
BUDGET = OPEN_BUDGET
PROGRESS_EVERY = 10.0  # seconds between progress notifications while a call waits for a person
WATCH_SECONDS = 60.0  # the longest a wait for the journal's notifications lasts before it is renewed
# The bound of the session's calls a fresh run carries in its `history` (when the policy reads
# it): the last CARRY_CALLS calls, as long as their entries hold at most CARRY_BYTES of JSON.
CARRY_CALLS = 500
CARRY_BYTES = 2_000_000


@dataclass(frozen=True)
class CarriedCalls:
    """What a fresh segment's `carry` step carries into its run's `history`."""

    calls: list[dict[str, Any]]
    runs: list[str]
    cut: int


NO_CALLS = CarriedCalls([], [], 0)
# The calls the segment being started carries (set by its lane in the segment's task, read by
# its `carry` step, which runs first in that task). Unset: the step is not the gateway's.
CARRYING: contextvars.ContextVar[CarriedCalls | None] = contextvars.ContextVar("carrying", default=None)


def carry_facts(data: dict[str, Any]) -> Next:
    """The `carry` state: the session's facts, carried from its earlier runs, become this run's,
    and its calls (when the policy reads `history`) go ahead of the run's own in `history`."""
    carried = CARRYING.get()
    if carried is None:  # never silently without the session's calls: the run fails instead
        raise RuntimeError("the carry step runs only in a run an MCP gateway's lane started")
    return Next(
        STATE,
        facts=dict(data.get("carried_facts") or {}),
        history=carried.calls,
        history_runs=carried.runs,
        history_cut=carried.cut,
    )


@dataclass(eq=False)
class Call:
    """One tools/call from the client, waiting for the observation of its step."""

    tool: str
    args: dict[str, Any]
    request: dict[str, Any]
    ctx: ServerRequestContext[Any] | None = None
    answer: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    abandoned: bool = False  # the client cancelled it
    run_id: str | None = None  # the run it went to
    _progress: int = 0

    def resolve(self, observation: dict[str, Any]) -> None:
        if not self.answer.done():
            self.answer.set_result(observation)

    async def tell(self, message: str) -> None:
        """A progress notification (if the client asked for them): it may show the message,
        and a client that resets its request timeout on progress keeps waiting."""
        if self.ctx is None:
            return
        self._progress += 1
        with contextlib.suppress(Exception):  # the client may be gone; the call goes on
            await self.ctx.session.report_progress(self._progress, None, message)


class CallQueue:
    """A segment's model: the caller's calls as proposals, one at a time, in arrival order."""

    name = "mcp-client"

    def __init__(
        self, rotate_every: int = ROTATE_EVERY, observed: Callable[[dict[str, Any]], None] | None = None
    ) -> None:
        self.rotate_every = rotate_every
        self.observed = observed
        self.started: Callable[[str], None] | None = None  # told the run's id when it starts
        self.current: Call | None = None
        self.run_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.stopped: dict[str, Any] | None = None
        self.retired = False
        self._calls: asyncio.Queue[Call | None] = asyncio.Queue()
        self._closing = False

    def submit(self, call: Call) -> None:
        if self.stopped is not None:
            call.resolve(self.stopped)
        else:
            self._calls.put_nowait(call)

    def retire(self, *, drain: bool) -> list[Call]:
        """Take no more calls: the run ends once those queued are answered, or, with `drain`
        (the run is paused), the queued calls are returned for another segment to take."""
        self.retired = True
        taken: list[Call] = []
        while drain and not self._calls.empty():
            call = self._calls.get_nowait()
            if call is not None:
                taken.append(call)
        self._calls.put_nowait(None)
        return taken

    def close(self) -> None:
        """The gateway stops: the next proposal ends the run; calls still queued are answered."""
        self._closing = True
        self._calls.put_nowait(None)

    def stop(self, observation: dict[str, Any]) -> None:
        """The run no longer takes calls: answer every waiting one with `observation`."""
        self.stopped = observation
        waiting: list[Call | None] = [self.current] if self.current else []
        while not self._calls.empty():
            waiting.append(self._calls.get_nowait())
        for call in waiting:
            if call is not None:
                call.resolve(observation)
        self.current = None

    async def propose(self, ctx: ModelContext) -> ModelReply:
        if not self.run_id.done():
            self.run_id.set_result(ctx.run_id)
            if self.started is not None:
                self.started(ctx.run_id)
        if self.current is not None:
            # The runtime asks for the next step only once this call's step is recorded.
            observation = ctx.transcript[-1].content if ctx.transcript else {}
            if self.observed is not None and isinstance(observation, dict):
                self.observed(observation)
            self.current.resolve(observation)
            self.current = None
        if ctx.proposals_made >= self.rotate_every:
            return ModelReply(output={"kind": "exit", "exit": "rotate"})
        call = await self._calls.get()
        while call is not None and call.abandoned:  # the client gave up before its turn
            call = await self._calls.get()
        if self._closing:  # calls still queued are answered, not run
            self.current = call
            self.stop({"outcome": "gateway_stopped", "reason": "the gateway stopped"})
            return ModelReply(output={"kind": "exit", "exit": "end", "summary": "the gateway stopped"})
        if call is None:
            summary = "the session goes on in another run"
            return ModelReply(output={"kind": "exit", "exit": "end", "summary": summary})
        self.current = call
        call.run_id = ctx.run_id
        return ModelReply(
            output={"kind": "tool_call", "tool": call.tool, "args": call.args},
            exchange=Exchange(request=call.request),
        )


class Decisions:
    """Wakes the calls waiting for a person's decision: at once for a decision made in this
    process (`poke`), at a NOTIFY on PostgreSQL, at SQLite's poll interval otherwise.

    A waiter notes `generation` before it reads its ticket and then waits until it moves
    (or its timeout), so a decision between the read and the wait is never missed.
    """

    def __init__(self, journal: Journal) -> None:
        self.journal = journal
        self.generation = 0
        self._event = asyncio.Event()
        self._watcher: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Listen before anyone looks at a ticket (no decision notified in between is lost)."""
        await self.journal.prepare_to_wait()
        self._watcher = asyncio.create_task(self._watch(), name="mcp-gateway-decisions")

    def poke(self) -> None:
        self.generation += 1
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, since: int, timeout: float) -> None:
        if self.generation != since:
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._event.wait(), timeout=max(0.0, timeout))

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _watch(self) -> None:
        while True:
            try:
                await self.journal.prepare_to_wait()
                await self.journal.wait_for_work(WATCH_SECONDS)
            except Exception as exc:  # the listener failed: waiters re-read; it is opened again
                log.warning("waiting for the journal's notifications failed: %s", exc)
                await asyncio.sleep(1.0)
            self.poke()


@dataclass(eq=False)
class Segment:
    """One run of a lane and the calls it takes."""

    queue: CallQueue
    workflow: Workflow
    task: asyncio.Task[None] | None = None


@dataclass(frozen=True)
class LaneSettings:
    """What every lane of a gateway shares."""

    runtime: Runtime
    decisions: Decisions
    stopping: asyncio.Event
    approval_timeout: float
    db_hint: str = ""  # e.g. " --db PATH", for the commands the log suggests
    rotate_every: int = ROTATE_EVERY
    describe: Mapping[str, Any] = field(default_factory=dict)  # the gateway, for each run's input
    carry_calls: int = CARRY_CALLS
    carry_bytes: int = CARRY_BYTES
    # The lane of each run being driven (its executed calls are the lane's), by run id.
    runs: dict[str, Lane] = field(default_factory=dict)


class Lane:
    """A caller's session: its facts, its current segment, and the segments paused on a ticket."""

    def __init__(
        self,
        principal: Principal,
        policy_key: str,
        workflows: Callable[[bool], tuple[Workflow, str | None]],
        settings: LaneSettings,
    ) -> None:
        self.principal = principal
        self.policy_key = policy_key
        # The workflow a new segment runs (starting at `carry` or not) and its policy's file.
        self.workflows = workflows
        self.settings = settings
        self.facts: dict[str, Any] = {}
        self.current: Segment | None = None
        self.segments: set[Segment] = set()
        self.run_ids: list[str] = []
        self._closed = False
        # The session's executed calls (only when its policy reads `history`): the latest, at
        # most `carry_calls` of them within `carry_bytes` of their entries, as (call, run id,
        # size of its entry); how many older ones were dropped; their entries' size.
        policy = workflows(False)[0].policy
        self.keeps_history = policy is not None and policy.uses("history")
        self.calls: collections.deque[tuple[dict[str, Any], str, int]] = collections.deque()
        self.dropped = 0
        self._bytes = 0
        self._segment_of: dict[str, Segment] = {}

    def submit(self, call: Call) -> None:
        if self._closed:
            call.resolve({"outcome": "gateway_stopped", "reason": "the gateway stopped"})
            return
        if self.current is None:
            self.current = self._start()
        self.current.queue.submit(call)

    async def started(self) -> str:
        """Start the current segment if there is none; its run's id once it is recorded."""
        if self.current is None:
            self.current = self._start()
        segment = self.current
        assert segment.task is not None
        started: list[asyncio.Future[Any]] = [segment.queue.run_id, segment.task]
        await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
        if not segment.queue.run_id.done():
            raise RuntimeError(f"the run did not start: {segment.queue.stopped}")
        return segment.queue.run_id.result()

    def retire(self) -> None:
        """Calls from now on go to a fresh segment (the tool list or the session's facts changed)."""
        if self.current is not None:
            self.current.queue.retire(drain=False)
            self.current = None

    def close(self) -> None:
        self._closed = True
        for segment in self.segments:
            segment.queue.close()

    async def wait_closed(self, timeout: float) -> None:
        tasks = [s.task for s in self.segments if s.task is not None]
        if not tasks:
            return
        _, pending = await asyncio.wait(tasks, timeout=timeout)
        for task in pending:
            log.error(
                "a run of %s did not stop within %.0f s; leaving it as it is", self.principal.name, timeout
            )
            task.cancel()
            with contextlib.suppress(BaseException):
                await task

    # -- segments ------------------------------------------------------------------------

    def _start(self) -> Segment:
        carried = self.carried()
        carrying = bool(self.facts) or bool(carried.calls) or carried.cut > 0
        workflow, policy_ref = self.workflows(carrying)
        queue = CallQueue(self.settings.rotate_every)
        segment = Segment(queue, workflow)
        queue.observed = lambda observation: self._observed(segment, observation)
        queue.started = lambda run_id: self._started(segment, run_id)
        self.segments.add(segment)
        task = self._drive(segment, policy_ref, carrying)
        # The segment's task sees the calls it carries (its `carry` step reads them).
        context = contextvars.copy_context()
        context.run(CARRYING.set, carried)
        segment.task = asyncio.create_task(task, name="mcp-gateway-run", context=context)
        return segment

    def _started(self, segment: Segment, run_id: str) -> None:
        self.run_ids.append(run_id)
        self._segment_of[run_id] = segment
        self.settings.runs[run_id] = self

    def carried(self) -> CarriedCalls:
        """The session's calls a fresh run carries: the latest, within the bound (oldest first),
        and how many older ones are left out."""
        if not self.keeps_history:
            return NO_CALLS
        return CarriedCalls([c for c, _, _ in self.calls], [r for _, r, _ in self.calls], self.dropped)

    def executed(self, entry: Entry) -> None:
        """A call of one of this lane's runs executed (its entry is committed): it is the
        session's, and a fresh segment that started without it is retired (its queued calls
        go to the next segment, which carries it)."""
        if not self.keeps_history:
            return
        try:
            record = entry.body
            if not isinstance(record, b.Executed):
                return
            call = history_item(record, entry.step_id, entry.state)
            size = len(entry.body_json)  # the entry holds the call, and its decision
            self.calls.append((call, entry.run_id, size))
            self._bytes += size
            bound = self.settings
            while self.calls and (len(self.calls) > bound.carry_calls or self._bytes > bound.carry_bytes):
                self._bytes -= self.calls.popleft()[2]
                self.dropped += 1
        except Exception:  # never a session history that silently lacks a call: count it cut
            log.exception("the gateway could not keep an executed call of run %s", entry.run_id)
            self.dropped += 1
        segment = self._segment_of.get(entry.run_id)
        current = self.current
        if current is not None and segment is not current:
            self.current = None
            for queued in current.queue.retire(drain=True):
                self.submit(queued)

    def _observed(self, segment: Segment, observation: dict[str, Any]) -> None:
        """A step of a segment was recorded: the facts its verification established are the
        session's now; a fresh segment started without them is retired."""
        verification = observation.get("verification")
        if not isinstance(verification, dict) or verification.get("ok") is not True:
            return
        facts = verification.get("facts")
        if not isinstance(facts, dict) or all(self.facts.get(k) == v for k, v in facts.items()):
            return
        self.facts.update(facts)
        if segment is not self.current:
            self.retire()

    async def _drive(self, segment: Segment, policy_ref: str | None, carrying: bool) -> None:
        runtime, queue = self.settings.runtime, segment.queue
        stopped: dict[str, Any] = {"outcome": "gateway_stopped", "reason": "the gateway's run stopped"}
        try:
            result = await runtime.start(
                segment.workflow,
                queue,
                input={
                    **self.settings.describe,
                    "caller": self.principal.principal_id,
                    "policy_for": self.policy_key,
                    "carried_facts": dict(self.facts),
                    "carried_from": list(self.run_ids) if carrying else [],
                },
                workflow_ref=WORKFLOW_REF,
                policy_ref=policy_ref,
                by=self.principal,
            )
            while result.status == "paused" and result.ticket_id:
                self._detach(segment)
                await self._await_decision(queue.current, result.ticket_id)
                result = await runtime.resume(result.run_id, segment.workflow, queue)
            if result.status != "completed":
                log.error(
                    "run %s is %s: %s: %s", result.run_id, result.status, result.reason_code, result.message
                )
                stopped = {
                    "outcome": "gateway_stopped",
                    "reason_code": result.reason_code,
                    "reason": f"the gateway's run {result.run_id} is {result.status}: {result.message}",
                }
        except Exception as exc:  # the journal failed, or a bug: no call may wait forever on it
            log.exception("a run of the gateway failed")
            stopped = {"outcome": "gateway_stopped", "reason": f"the gateway's run failed: {exc}"}
        finally:
            if self.current is segment:
                self.current = None
            queue.stop(stopped)
            self.segments.discard(segment)
            if queue.run_id.done() and not queue.run_id.cancelled():
                self._segment_of.pop(queue.run_id.result(), None)
                self.settings.runs.pop(queue.run_id.result(), None)

    def _detach(self, segment: Segment) -> None:
        """The segment's run is paused on a ticket: the caller's other calls go elsewhere."""
        if self.current is segment:
            self.current = None
        if not segment.queue.retired:
            for call in segment.queue.retire(drain=True):
                self.submit(call)

    async def _await_decision(self, call: Call | None, ticket_id: str) -> None:
        """Wait until the ticket is decided or has expired, telling the caller it waits."""
        settings, journal = self.settings, self.settings.runtime.journal
        ticket = await journal.get_ticket(ticket_id)
        db = settings.db_hint
        hint = f"tether approve {ticket_id}{db}   or   tether deny {ticket_id} --reason TEXT{db}"
        log.info(
            "%s(%s) of %s waits for a person (%s), at most %.0f s: %s",
            ticket.subject,
            _short(ticket.args),
            self.principal.name,
            ticket.approver,
            ticket.expires_at - time.time(),
            hint,
        )
        told = -math.inf
        while True:
            since = settings.decisions.generation
            ticket = await journal.get_ticket(ticket_id)
            if ticket.status != "pending" or ticket.expires_at <= time.time():
                break
            if settings.stopping.is_set() or (call is not None and call.abandoned):
                why = "the gateway stopped" if settings.stopping.is_set() else "the client cancelled the call"
                await self._close_ticket(ticket, f"{why} before anyone decided")
                return
            if call is not None and time.monotonic() - told >= PROGRESS_EVERY:
                told = time.monotonic()
                await call.tell(
                    f"waiting for a person to approve ticket {ticket_id} ({ticket.approver}): {hint}"
                )
            wait = min(PROGRESS_EVERY, ticket.expires_at - time.time())
            await settings.decisions.wait(since, wait)
        log.info("ticket %s: %s", ticket_id, ticket.status if ticket.status != "pending" else "expired")

    async def _close_ticket(self, ticket: Ticket, reason: str) -> None:
        """Nobody waits for the call any more (the gateway stops, or the client cancelled it):
        deny its ticket on the record, so that a late approval cannot carry out an effect its
        caller gave up on, and the run goes on instead of staying paused."""
        log.info("ticket %s: denied: %s", ticket.ticket_id, reason)
        with contextlib.suppress(TicketError):  # decided or expired in the meantime
            await self.settings.runtime.journal.decide_ticket(
                ticket.ticket_id, approve=False, by="mcp-gateway", reason=reason
            )


def _short(args: dict[str, Any], width: int = 120) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return text if len(text) <= width else text[: width - 1] + "…"
