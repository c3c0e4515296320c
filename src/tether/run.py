"""The in-memory view of a run being driven: its record, checkpoint, transcript and history.

Everything here is rebuilt from the journal on resume — the checkpoint from the run's row,
the transcript from the current visit's entries, `history` from the executed tool calls and
the values the run has seen (each only when the policy reads it) — and nothing lives only in
memory across a commit.
`RunCursor.commit` is the one way a run is written.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeGuard, overload

import msgspec

from tether.budget import Totals, Visit
from tether.decision import Decision
from tether.journal import Commit, Entry, Journal, ModelExchange, NewEntry, RunRecord, RunUpdate, Ticket
from tether.journal import bodies as b
from tether.models.protocol import Message
from tether.observe import NO_OBSERVER, Observer
from tether.policy import HISTORY_CUT, Evaluation, Policy
from tether.provenance import SeenValues
from tether.sensitive import Redactor
from tether.tools import ToolContext, Trust
from tether.workflow import Workflow

log = logging.getLogger("tether.run")
NO_HISTORY: list[dict[str, Any]] = []  # `history` when no rule reads it (never appended to)


class Pending(msgspec.Struct):
    """The step a paused run waits to continue: its proposal, decision and ticket."""

    step_id: str
    ticket_id: str
    proposal: dict[str, Any]
    decision: Decision


class Checkpoint(msgspec.Struct, omit_defaults=True):
    """Where a run is, beyond its state and data: kept in the run's row, rewritten per commit."""

    visit: Visit
    steps: int = 0  # step ids handed out ("s1", "s2", ...)
    totals: Totals = msgspec.field(default_factory=Totals)
    pending: Pending | None = None
    exchanges: int = 0  # model exchanges recorded
    crashes: int = 0  # times driving this run raised an unexpected error (poison runs)


def new_checkpoint(state: str) -> Checkpoint:
    return Checkpoint(visit=Visit(state, 1, 1))


class Transcript(Sequence[Message]):
    """A visit's messages for the model, made from its step records when a model reads them.

    Entries read back on resume, and records added as steps are taken, become messages only
    when a model reads the transcript: a scripted model never pays for them, and a resume
    costs a read of the visit's rows, not a rebuild of every message. A record added is kept
    as its entry's JSON text (a third of the decoded record: a run waiting on its model holds
    every step of its visit), decoded when a model reads it, as a resumed run's are.
    """

    def __init__(self, entries: Sequence[Entry] = ()) -> None:
        # Not yet turned into messages, oldest first: entries read back, then live records.
        self._sources: list[Entry | NewEntry] = [
            e for e in entries if e.kind in b.STEP_KINDS or e.kind == "step"
        ]
        self._messages: list[Message] = []
        # Per step already turned into messages: how many messages there were after it.
        self._ends: list[int] = []

    @property
    def steps(self) -> int:
        return len(self._ends) + len(self._sources)

    def add(self, record: b.Body, step_id: str | None, entry: NewEntry | None = None) -> None:
        """A committed record; `entry`, when given, is it as written (its text is kept)."""
        if isinstance(record, b.StepRecord) and b.KIND_OF[type(record)] in b.STEP_KINDS:
            self._sources.append(entry if entry is not None else NewEntry.of(record, step_id=step_id))

    def proposals_made(self) -> int:
        """How many proposals the visit holds, without making any message."""
        made = sum(1 for m in self._messages if m.role == "proposal")
        return made + sum(1 for source in self._sources if not _continues(source))

    def _settle(self) -> list[Message]:
        if self._sources:
            for source in self._sources:
                self._messages.extend(messages_for(b.decode(source.kind, source.body_json), source.step_id))
                self._ends.append(len(self._messages))
            self._sources = []
        return self._messages

    def observation_of(self, step_id: str) -> Mapping[str, Any] | None:
        """The last observation the transcript holds of a step (a continuation's, if any),
        without turning the steps after it into messages (tether.external asks after each
        call; nothing in its runs reads the messages)."""
        for source in reversed(self._sources):
            if source.step_id != step_id:
                continue
            record = b.decode(source.kind, source.body_json)
            if _in_transcript(record):
                return {"step_id": step_id, **_observed(record)}  # as messages_for makes it
        for message in reversed(self._messages):
            content = message.content
            if message.role != "proposal" and isinstance(content, dict) and content.get("step_id") == step_id:
                return content
        return None

    def messages_after(self, steps: int) -> int:
        """How many messages the first `steps` steps make."""
        self._settle()
        return self._ends[steps - 1] if steps else 0

    def view(self) -> TranscriptView:
        """What one model call sees: the messages so far, not those added after it."""
        return TranscriptView(self)

    def __len__(self) -> int:
        return len(self._settle())

    @overload
    def __getitem__(self, index: int) -> Message: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Message]: ...
    def __getitem__(self, index: int | slice) -> Message | Sequence[Message]:
        return self._settle()[index]

    def __iter__(self) -> Iterator[Message]:
        return iter(self._settle())


class TranscriptView(Sequence[Message]):
    """A transcript as it was when a model call began (made in O(1), decoded on use)."""

    def __init__(self, transcript: Transcript) -> None:
        self._transcript, self._steps = transcript, transcript.steps

    def proposals_made(self) -> int:
        if self._transcript.steps == self._steps:
            return self._transcript.proposals_made()
        return sum(1 for m in self if m.role == "proposal")

    def __len__(self) -> int:
        return self._transcript.messages_after(self._steps)

    @overload
    def __getitem__(self, index: int) -> Message: ...
    @overload
    def __getitem__(self, index: slice) -> Sequence[Message]: ...
    def __getitem__(self, index: int | slice) -> Message | Sequence[Message]:
        messages = self._transcript[: len(self)]
        return messages[index]

    def __iter__(self) -> Iterator[Message]:
        return iter(self._transcript[: len(self)])


def _continues(source: Entry | NewEntry) -> bool:
    """Whether a step continues a paused one (its proposal is already in the transcript)."""
    if source.kind in ("answered", "unanswered", "handoff_received", "handoff_returned"):
        return True  # continuations by their kind (the field is at its default, so not stored)
    if '"continuation":true' not in source.body_json:  # the common case, without decoding
        return False
    decoded = b.decode(source.kind, source.body_json)
    return isinstance(decoded, b.StepRecord) and decoded.continuation


def messages_for(record: b.Body | b.UnknownBody, step_id: str | None) -> list[Message]:
    """What one step adds to the transcript: the proposal (unless it continues a paused
    step, whose proposal is already there) and what the runtime observed."""
    if not _in_transcript(record):
        return []
    messages: list[Message] = []
    if not record.continuation:
        messages.append(Message.model_construct(role="proposal", content=b.proposed(record)))
    answered = isinstance(record, b.Answered) and not isinstance(record, b.Unanswered)
    role: Literal["person", "observation"] = "person" if answered else "observation"
    seen = {"step_id": step_id, **_observed(record)}
    messages.append(Message.model_construct(role=role, content=seen))
    return messages


def _in_transcript(record: b.Body | b.UnknownBody) -> TypeGuard[b.StepRecord]:
    """Whether a record is a step the transcript shows (its proposal and observation)."""
    return isinstance(record, b.StepRecord) and b.KIND_OF[type(record)] in b.STEP_KINDS


def _observed(record: b.StepRecord) -> dict[str, Any]:
    """What the runtime tells the model of a step's outcome (the shape adapters render)."""
    match record:
        case b.Refused(decision=d):
            return {"outcome": "refused", "reason_code": d.reason_code, "reason": d.reason}
        case b.AwaitingAnswer(ticket_id=t):
            return {"outcome": "awaiting_answer", "ticket_id": t}
        case b.AwaitingApproval(ticket_id=t):
            return {"outcome": "awaiting_approval", "ticket_id": t}
        case b.ToolFailed(error=error):
            return {"outcome": "tool_error", "reason_code": "tool_error", "error": error}
        case b.Executed(result=result, verification=verification):
            outcome = "verification_failed" if isinstance(record, b.VerificationFailed) else "executed"
            seen = {"outcome": outcome, "result": result}
            return seen if verification is None else seen | {"verification": verification}
        case b.Transition(next=to):
            return {"outcome": "transition", "to": to}
        case b.Answered(by=by, reason=reason, answer=answer):
            outcome = "unanswered" if isinstance(record, b.Unanswered) else "answered"
            return {"outcome": outcome, "answer": answer, "by": by, "reason": reason}
        case b.EffectSettled(done=done, by=by, note=note):
            settled = {"outcome": "executed" if done else "not_executed", "resolved_by": by, "note": note}
            return settled | {"result": None} if done else settled
        case b.HandedOff() | b.HandoffReceived() | b.HandoffReturned():
            return _handoff_observed(record)
    raise TypeError(f"no observation for {type(record).__name__}")


def _handoff_observed(record: b.HandedOff | b.HandoffReceived | b.HandoffReturned) -> dict[str, Any]:
    """A handoff as its sender sees it, turned back (with what changed), or received by an
    agent state (the handoff record without the run's data, which the model has anyway)."""
    if isinstance(record, b.HandedOff):
        routed = {"to_state": record.handoff.to_state} if record.handoff.to_state else {}
        return {"outcome": "handed_off", "owner": record.handoff.owner, **routed}
    if isinstance(record, b.HandoffReturned):
        return {
            "outcome": "handoff_returned",
            "by": record.by,
            "reason": "a value the handoff relied on changed before it was picked up; act on the new value",
            "differences": msgspec.to_builtins(record.differences),
        }
    handed = msgspec.to_builtins(record.handoff) if record.handoff is not None else {}
    handed = {k: v for k, v in handed.items() if k not in ("data", "at_seq")}
    return {"outcome": "handoff_received", "by": record.by, "handoff": handed}


def history_item(record: b.ToolStep, step_id: str | None, state: str | None) -> dict[str, Any]:
    """A tool call whose effect happened, as policy conditions see it in `history`: with its
    result as recorded (what the journal holds: sensitive values fingerprinted, an oversized
    result replaced by a note saying so)."""
    outcome = "verification_failed" if isinstance(record, b.VerificationFailed) else "executed"
    result = record.result if isinstance(record, b.Executed) else None
    return {
        "tool": record.tool,
        "args": record.args,
        "result": result,
        "step_id": step_id,
        "state": state,
        "outcome": outcome,
    }


def history_from(entries: Sequence[Entry]) -> list[dict[str, Any]]:
    """The run's executed tool calls, from its journal: those a deterministic step carried
    into it (`step_done`'s `history`: a gateway session's earlier calls), then its own."""
    return history_and_cut(entries)[0]


def history_and_cut(entries: Sequence[Entry]) -> tuple[list[dict[str, Any]], int]:
    """`history_from`, and how many earlier calls it lacks (the carried ones' `cut`)."""
    items: list[dict[str, Any]] = []
    cut = 0
    for e in entries:
        if e.kind in b.EXECUTED_KINDS or e.kind == "step":
            record = e.body
            if isinstance(record, b.Executed):
                items.append(history_item(record, e.step_id, e.state))
        elif e.kind == "step_done" and '"history":' in e.body_json:
            carried = carried_history(e.body)
            if carried is not None:
                items.extend(carried.calls)
                cut += carried.cut
    return items, cut


def carried_history(record: b.Body | b.UnknownBody) -> b.CarriedHistory | None:
    """The calls a deterministic step carried into the run's `history`, if any."""
    return record.history if isinstance(record, b.StepDone) else None


class RunCursor:
    # One per run being driven, alive while it waits on its model: no per-instance dict.
    __slots__ = (
        "_buffered",
        "_dirty",
        "_evaluation",
        "_exchanges",
        "_run_seen",
        "_since",
        "_stored_status",
        "checkpoint",
        "clock",
        "history",
        "history_cut",
        "journal",
        "lease",
        "observer",
        "on_commit",
        "policy",
        "record",
        "redactor",
        "released",
        "seen",
        "transcript",
        "workflow",
    )

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
        # The status the run's row holds: written again only when it changes (an UPDATE that
        # names `status` rewrites the two indexes on it: ~6 µs of a step's commit).
        self._stored_status = record.status
        self.checkpoint = msgspec.convert(record.checkpoint, Checkpoint)
        # Told of every entry once it is committed (progress, tracing); it cannot change them.
        self.on_commit = on_commit
        self.workflow = workflow
        self.policy = policy
        self.journal = journal
        self.clock = clock
        self.transcript = Transcript()
        # Executed tool calls, kept only when a rule reads `history`; how many earlier calls
        # it lacks (calls carried into the run were cut at their bound: tether.policy).
        self.history: list[dict[str, Any]] | None = [] if policy.uses("history") else None
        self.history_cut = 0
        # What the run has seen (input, answers, tool results), kept only when the policy
        # traces provenance: indexed from the committed entries.
        self.seen: SeenValues | None = self._new_seen(record.input) if policy.uses_provenance else None
        # (owner, seconds): every commit is fenced by this lease and renews it.
        self.lease = lease
        # The policy engine's context for this run's decisions (made at the first decision: a
        # run waiting on its first model call holds none), and what conditions see as `run`.
        self._evaluation: Evaluation | None = None
        self._run_seen: dict[str, Any] | None = None
        self._since = time.monotonic()
        self._buffered: list[NewEntry] = []
        # The record's fields changed since the last commit (a dict: an empty set is 216 bytes).
        self._dirty: dict[str, None] = {}
        # Set when a commit gave the lease back with it (the run stopped: paused, ended).
        self.released = False
        self._exchanges: list[ModelExchange] = []
        # Fingerprints the workflow's sensitive fields in everything written (tether.sensitive);
        # None when it declares none. Refuses (SensitiveKeyMissing) when no key is configured.
        self.redactor = Redactor.for_workflow(workflow)
        # Told of runs, steps, model and tool calls as spans (tether.observe); the runtime's.
        self.observer: Observer = NO_OBSERVER

    @property
    def run_id(self) -> str:
        return self.record.run_id

    @property
    def visit(self) -> Visit:
        return self.checkpoint.visit

    @property
    def totals(self) -> Totals:
        return self.checkpoint.totals

    def clear_notice(self) -> None:
        """The next commit clears the run's owner, reason and message (it moves on)."""
        self.record.owner = self.record.reason_code = self.record.message = None
        self._dirty |= dict.fromkeys(("owner", "reason_code", "message"))

    def new_step_id(self) -> str:
        self.checkpoint.steps += 1
        return f"s{self.checkpoint.steps}"

    def next_exchange_seq(self) -> int:
        self.checkpoint.exchanges += 1
        return self.checkpoint.exchanges

    def record_exchange(self, exchange: ModelExchange) -> None:
        """Keep a model exchange to be written with the next commit (the step it served)."""
        self._exchanges.append(exchange)

    def active_seconds(self) -> float:
        """Time spent working in this visit; time paused between processes is not counted."""
        return self.visit.active_seconds + (time.monotonic() - self._since)

    def enter(self, state: str, *, entries_in_commit: int = 0) -> None:
        """Start a new visit; the caller commits it with `entries_in_commit` entries."""
        self.record.state = state
        started = self.record.last_seq + len(self._buffered) + entries_in_commit
        self.checkpoint.visit = Visit(state, self.visit.number + 1, started)
        self.transcript = Transcript()
        self._since = time.monotonic()

    def carried(self, facts: dict[str, Any] | None = None) -> b.Carried:
        """What the entry opening a visit carries (the run's facts after it, given when it
        changes them, and its pins): where a resume starts checking the row against the chain."""
        record = self.record
        return b.Carried(record.workflow_hash, record.policy_hash, record.facts if facts is None else facts)

    def position(self) -> tuple[str, Visit, Transcript, float]:
        """Where the run is (state, visit, transcript), to go back to if a move is not recorded."""
        return self.record.state, self.checkpoint.visit, self.transcript, self._since

    def restore(self, position: tuple[str, Visit, Transcript, float]) -> None:
        self.record.state, self.checkpoint.visit, self.transcript, self._since = position

    async def load(self, read: Sequence[Entry] = ()) -> list[Entry]:
        """Rebuild what a resumed run needs: the current visit's transcript, and `history`
        and the seen values if the policy reads them. Reads the visit's entries (returned),
        and the run's only for those, unless `read` (the run's entries from at most the
        visit's opening on, as the check before acting read them) holds them already."""
        started = self.visit.started_seq
        if read and read[0].seq <= started + 1:
            visit = [e for e in read if e.seq > started] if read[0].seq <= started else list(read)
        else:
            visit = await self.journal.read_entries(self.run_id, started)
        self.transcript = Transcript(visit)
        if self.history is not None or self.seen is not None:
            whole = bool(read) and read[0].seq == 1
            entries = list(read) if whole else await self.journal.read_entries(self.run_id)
            if self.history is not None:
                self.history, self.history_cut = history_and_cut(entries)
            if self.seen is not None:
                self.seen = self._new_seen()
                for entry in entries:
                    self.seen.add_entry(entry)
        return visit

    def _new_seen(self, given: dict[str, Any] | None = None) -> SeenValues:
        tools = self.workflow.tools()

        def trust_of(name: str) -> Trust:
            tool = tools.get(name)
            return tool.results if tool is not None else "trusted"

        seen = SeenValues(trust_of)
        if given is not None:
            seen.add_input(given)
        return seen

    def observe(self, record: b.Body, step_id: str | None, entry: NewEntry | None = None) -> None:
        """What a committed step adds to the transcript and to `history` (`entry`: the
        record as written, when the caller has it)."""
        self.transcript.add(record, step_id, entry)
        if self.history is not None and isinstance(record, b.Executed):
            self.history.append(history_item(record, step_id, self.record.state))
        elif isinstance(record, b.StepDone) and record.history is not None:
            self.history_cut += record.history.cut
            if self.history is not None:
                self.history.extend(record.history.calls)

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
                self._dirty[key] = None
        if buffer:
            self._buffered.extend(entries)
            return []
        self.visit.active_seconds = self.active_seconds()
        self._since = time.monotonic()
        checkpoint: dict[str, Any] = msgspec.to_builtins(self.checkpoint)
        self.record.checkpoint = checkpoint
        names = {"state", "checkpoint", *self._dirty}
        if self.record.status != self._stored_status:
            names.add("status")
        fields = {k: getattr(self.record, k) for k in names}
        # The commit that stops the run gives its lease back too: one transaction, not two.
        release = self.lease is not None and self.record.status not in ("running", "queued")
        written = await self.journal.commit(
            Commit(
                run_id=self.run_id,
                expected_seq=self.record.last_seq,
                expected_hash=self.record.last_hash,
                entries=[*self._buffered, *entries],
                update=RunUpdate(**fields),
                new_tickets=tickets or [],
                consume=consume,
                exchanges=self._redacted_exchanges(),
                durable=durable,
                lease_owner=self.lease[0] if self.lease else None,
                lease_seconds=self.lease[1] if self.lease else None,
                release=release,
            )
        )
        self.released = release
        self._stored_status = self.record.status
        self._buffered, self._dirty, self._exchanges = [], {}, []
        if written:
            self.record.last_seq, self.record.last_hash = written[-1].seq, written[-1].hash
            if self.seen is not None:
                for entry in written:
                    self.seen.add_entry(entry)
            if self.on_commit is not None:
                try:
                    self.on_commit(written)
                except Exception:  # an observer's failure (a closed terminal, say) is not the run's
                    log.exception("on_commit observer failed for run %s", self.run_id)
        return written

    async def decision_time(self) -> float | None:
        """The store's clock, when the policy reads `now` (else None: no read is made)."""
        return await self.journal.now() if self.policy.uses("now") else None

    def _redacted_exchanges(self) -> list[ModelExchange]:
        """The exchanges to write, with every sensitive value seen so far scrubbed from them
        (a prompt quoting a result, a response proposing an argument)."""
        red = self.redactor
        if red is None or not self._exchanges:
            return self._exchanges
        fields = ("request", "response", "output", "error")
        return [x.model_copy(update={f: red.scrub(getattr(x, f)) for f in fields}) for x in self._exchanges]

    async def decide(
        self,
        *,
        kind: Literal["tool", "exit"],
        tool: dict[str, Any],
        args: dict[str, Any],
        step_id: str,
        now: float | None = None,
    ) -> Decision:
        """Ask the policy about a proposal, with this run's variables and resolvers.

        `tool` is what conditions see as `tool`: `name` and `effect` (and `idempotent` for tools).
        `now` is the decision's time, from `decision_time()` (the store's clock). Asynchronous
        resolvers are awaited before the evaluation (`Policy.adecide`), within the policy's
        `resolve_seconds`.
        """
        record = self.record
        if self._run_seen is None or self._run_seen["state"] != record.state:
            self._run_seen = {
                "id": self.run_id,
                "workflow": record.workflow_name,
                "version": record.workflow_version,
                "state": record.state,
            }
        variables: dict[str, Any] = {
            "args": args,
            "data": record.data,
            "facts": record.facts,
            "history": self.history if self.history is not None else NO_HISTORY,
            "tool": tool,
            "run": self._run_seen,
            "now": now,
        }
        if self.history_cut:
            variables[HISTORY_CUT] = self.history_cut
        resolvers = None
        if self.policy.functions:  # bound per decision: a resolver gets this step's context
            ctx = ToolContext(
                run_id=self.run_id,
                step_id=step_id,
                idempotency_key=f"{self.run_id}:{step_id}",
                data=record.data,
                facts=record.facts,
            )
            resolvers = {n: functools.partial(fn, ctx) for n, fn in self.workflow.resolvers.items()}
        if self._evaluation is None:
            self._evaluation = self.policy.evaluation(self.workflow.resolvers)
        return await self.policy.adecide(
            kind=kind,
            name=tool["name"],
            effect=tool["effect"],
            variables=variables,
            resolvers=resolvers,
            evaluation=self._evaluation,
            provenance=self.seen.trace if self.seen is not None else None,
        )
