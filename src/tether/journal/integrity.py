"""The chain is the truth: a run's rows are caches of its hash chain, checked against it.

A run's entries are hash-chained (`records.entry_hash`); its `runs` row (head, status,
owner, facts, pinned definition, pending step) and its `tickets` rows (status, decider,
reason, answer, bound arguments) are what the runtime reads to act, and they are mutable.
Before acting on a run (resuming it, using a ticket, recording a person's act) the runtime
checks each row it relies on against the entries (`check_run`) and refuses with
`JournalTampered` (reason `journal_tampered`) naming what disagrees.

The same findings serve `tether audit verify`, which adds signed checkpoints
(`tether.audit`): each `Finding` names the run, the first bad entry and the kind of damage:

- `edited`: an entry's content no longer matches its hash, or differs from a signed one;
- `deleted`: sequence numbers are missing (or entries after a cut were renumbered);
- `inserted`: an entry was put in the chain that was not written there (in the middle,
  or after the run's head);
- `reordered`: an entry sits at another place than the one it was written at;
- `truncated`: the chain ends before the head its row or a signed checkpoint records;
- `row_disagrees`: a `runs` or `tickets` row says something its chain does not;
- `triggers_missing`: the append-only triggers are gone, disabled or replaced.

Nothing here writes. Row checks are derived only from entry kinds this code knows: a run
whose chain holds a kind it does not know (a newer tether) is not judged on status, owner
or facts, rather than accused.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import msgspec

from tether.errors import JournalError, JournalTampered
from tether.hashing import encode_json, value_hash
from tether.journal import bodies as b
from tether.journal.records import FINISHED, GENESIS_HASH, Entry, RunRecord, Ticket, entry_hash
from tether.proposals import as_dict
from tether.sensitive import has_placeholder
from tether.tools import args_hash as tool_args_hash

Damage = Literal[
    "edited", "deleted", "inserted", "reordered", "truncated", "row_disagrees", "triggers_missing"
]


class Finding(msgspec.Struct, frozen=True, omit_defaults=True):
    """One thing found wrong: its kind, where (run, first bad entry), and what."""

    kind: str
    message: str
    run_id: str | None = None
    seq: int | None = None

    def __str__(self) -> str:
        where = f"run {self.run_id}" if self.run_id else "journal"
        at = f" seq {self.seq}" if self.seq is not None else ""
        return f"{where}{at}: {self.kind}: {self.message}"


# -- the chain -------------------------------------------------------------------------


def rehashes(e: Entry, seq: int, prev_hash: str | None = None) -> bool:
    """Whether the entry's hash is what it would be at `seq` after `prev_hash` (by default
    the hash of the entry stored before it)."""
    prev_hash = e.prev_hash if prev_hash is None else prev_hash
    return (
        entry_hash(e.run_id, seq, e.kind, e.step_id, e.state, e.body_json, prev_hash, e.created_at) == e.hash
    )


def _intact(entries: Sequence[Entry], prev: str, expected: int) -> bool:
    """Whether every entry is numbered on from `expected` and rehashes after the one before
    it (the first after `prev`): the common case, told in one tight pass."""
    for e in entries:
        if e.seq != expected:
            return False
        if entry_hash(e.run_id, e.seq, e.kind, e.step_id, e.state, e.body_json, prev, e.created_at) != e.hash:
            return False
        prev, expected = e.hash, expected + 1
    return True


def _written_after(
    e: Entry, pred: str, at: int | None, placed: Sequence[tuple[str, int]]
) -> tuple[int, str] | None:
    """(seq, hash) the entry rehashes at: after the entry stored before it (`pred`, written
    at `at`) where that one was written, else after one of `placed`."""
    if pred and at is not None and rehashes(e, at + 1, pred):
        return at + 1, pred
    return next(((w + 1, h) for h, w in placed if h != e.hash and rehashes(e, w + 1, h)), None)


def _origins(entries: Sequence[Entry], prev: str, expected: int) -> list[tuple[int | None, str | None]]:
    """Where each entry was written: (its sequence number then, the hash it was written
    after), by index; (seq, None) when what it was written after is gone (its successor
    says where it was written), (None, None) when nothing fits (its content was edited).

    No previous hash is stored: an entry that does not rehash after the one stored before
    it is tried after that one where that one was written, after every hash of the run
    whose place is known, and after that one at every place (the two moved together).
    Each hash is tried once per broken entry: O(n) per broken entry, and it runs only once
    a break was found."""
    found: list[tuple[int | None, str | None]] = [(None, None)] * len(entries)
    placed: list[tuple[str, int]] = [(GENESIS_HASH, 0)]  # (hash, the seq it was written at)
    if prev:
        placed.append((prev, expected - 1))
    last = max((e.seq for e in entries), default=0)
    before = prev
    broken: dict[int, int] = {}  # index -> how many of `placed` it was tried after
    for i, e in enumerate(entries):
        if before and rehashes(e, e.seq, before):
            found[i] = (e.seq, before)
            placed.append((e.hash, e.seq))
        else:
            broken[i] = 0
        before = e.hash
    written = dict(placed)
    scanned: set[int] = set()
    progress = True
    while broken and progress:  # an entry's origin may be placed by a later entry
        progress = False
        for i, tried in list(broken.items()):
            e = entries[i]
            pred = entries[i - 1].hash if i else prev
            at = written.get(pred) if pred else None
            hit = _written_after(e, pred, at, placed[tried:])
            broken[i] = len(placed)
            if hit is None and pred and at is None and i not in scanned:
                scanned.add(i)
                seq = next((s for s in range(1, last + 2) if rehashes(e, s, pred)), None)
                if seq is not None:
                    hit = (seq, pred)
                    written[pred] = seq - 1  # the entry before it moved with it
                    placed.append((pred, seq - 1))
            if hit is not None:
                found[i] = hit
                written[e.hash] = hit[0]
                placed.append((e.hash, hit[0]))
                del broken[i]
                progress = True
    for i in broken:
        at = written.get(entries[i].hash)
        if at is not None:
            found[i] = (at, None)
    return found


def chain_findings(run_id: str, entries: Sequence[Entry], *, whole: bool = True) -> list[Finding]:
    """What is wrong with a run's chain as stored (entries in seq order), first bad first.

    Every entry's hash covers its sequence number and its predecessor's hash, so an entry
    moved, removed or put in shows as a link that does not hold; the kind of damage is told
    from the place the entry does rehash at (where it was written) and the entry it rehashes
    after. A damage's consequences (every later entry shifted by one cut) are not repeated.
    `whole=False`: the entries are the chain's tail from the first one given on, linked to
    the entry stored before it (`Entry.prev_hash`; "" when that one is missing).
    """
    prev, expected = GENESIS_HASH, 1
    if not whole and entries:
        prev, expected = entries[0].prev_hash, entries[0].seq - (not entries[0].prev_hash)
    if _intact(entries, prev, expected):
        return []
    findings: list[Finding] = []
    origins = _origins(entries, prev, expected)
    seq_of = {e.hash: e.seq for e in entries}
    gap = False
    shift: int | None = None  # how far the entries are displaced after a cut or insertion
    displaced: set[int] = set()  # stored seqs holding an entry written elsewhere
    for i, e in enumerate(entries):
        if e.seq > expected:
            missing = f"seq {expected}" if e.seq == expected + 1 else f"seqs {expected}-{e.seq - 1}"
            findings.append(Finding("deleted", f"{missing} missing from the chain", run_id, expected))
            gap = True
        written_at, origin = origins[i]
        linked = origin == prev or gap
        after_gap, prev, expected, gap = gap, e.hash, e.seq + 1, False
        if written_at is None:
            shift = None
            if after_gap:
                continue  # what it was written after is the entry missing: already said
            findings.append(
                Finding(
                    "edited",
                    f"{e.kind} entry's content does not match its hash after any entry of the run"
                    + (f" (it, or seq {e.seq - 1} before it, was changed)" if i else ""),
                    run_id,
                    e.seq,
                )
            )
            continue
        if written_at == e.seq:
            shift = None
            if not linked:
                replaced = e.seq - 1
                findings.append(
                    Finding(
                        "edited",
                        f"seq {replaced} was replaced: seq {e.seq} was written after "
                        + (
                            f"seq {seq_of[origin]}" if origin in seq_of else "an entry no longer in the chain"
                        ),
                        run_id,
                        replaced,
                    )
                )
            continue
        offset = e.seq - written_at
        if linked and shift == offset:
            continue  # displaced by the same cut or insertion as the entry before it
        shift = offset
        origin_seq = 0 if origin == GENESIS_HASH else seq_of.get(origin) if origin else None
        if offset > 0 and origin_seq == written_at - 1 and written_at not in displaced:
            n = offset
            findings.append(
                Finding(
                    "inserted",
                    f"{n} entr{'y' if n == 1 else 'ies'} put in before the entry written as seq "
                    f"{written_at} (now seq {e.seq})",
                    run_id,
                    written_at,
                )
            )
        elif offset < 0 and origin is None:
            n = -offset
            findings.append(
                Finding(
                    "deleted",
                    f"the entry written as seq {written_at} is now seq {e.seq}: {n} entr"
                    f"{'y' if n == 1 else 'ies'} before it cut out and the rest renumbered",
                    run_id,
                    e.seq,
                )
            )
        else:
            displaced.add(e.seq)
            findings.append(
                Finding(
                    "reordered",
                    f"the entry written as seq {written_at} is stored as seq {e.seq}",
                    run_id,
                    e.seq,
                )
            )
    return findings


# -- what the chain says a run's rows should hold -------------------------------------------

UNKNOWN: Any = object()
# The status each kind leaves a run in (None: unchanged); kinds not here make it unknown.
_STATUS_OF: dict[str, str | None] = {
    "run_started": "running",
    "awaiting_approval": "paused",
    "awaiting_answer": "paused",
    "ticket_decided": None,
    "refused": "running",
    "intent": "running",
    "executed": "running",
    "verification_failed": "running",
    "tool_failed": "running",
    "transition": "running",
    "handoff_received": "running",
    "handoff_returned": "running",
    "answered": "running",
    "unanswered": "running",
    "effect_in_doubt": "effect_in_doubt",
    "effect_settled": "running",
    "step_done": "running",
    "step_failed": "failed",
    "escalated": "escalated",
    "failed": "failed",
    "migrated": None,
    "crashed": None,
    "upstream_restarted": None,
}
# A ticket's decisions that settle it (a later one would be a second verdict).
FINAL_DECISIONS = frozenset({"approved", "denied", "answered"})
# Kinds of the entries that may carry what the chain says before them (`carried_view`).
_OPENERS = frozenset({"run_started", "transition", "step_done"})
# Kinds whose entries only leave the run running, unless they continue a paused step (use a
# ticket) or carry a verifier's evidence (which may set facts).
_PLAIN_STEPS = frozenset({"executed", "refused"})
# In the text of a refusal a ticket decided (`_refused_while_waiting`): read by decoding it.
_BY_TICKET = '"rule_id":"approval:'
# Kinds that use an approved ticket (with `ticket_id` and `continuation`).
_USES_TICKET = frozenset({"intent", "executed", "verification_failed", "tool_failed", "transition"})


@dataclass
class ChainView:
    """What a run's entries say its rows should hold (UNKNOWN where they cannot say)."""

    status: Any = UNKNOWN
    owner: Any = UNKNOWN
    facts: Any = field(default_factory=dict)
    workflow_hash: str | None = None
    policy_hash: str | None = None
    # ticket id -> (seq, the awaiting entry), the decisions recorded, the entry that used it
    awaiting: dict[str, tuple[int, b.AwaitingApproval, str | None]] = field(default_factory=dict)
    decided: dict[str, list[tuple[int, float, b.TicketDecided]]] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)
    last_awaiting: str | None = None  # the ticket the run waits on, if paused
    # Entries whose carried facts or pins (`b.Carried`) are not what the entries before them
    # make: (seq, what differs).
    miscarried: list[tuple[int, str]] = field(default_factory=list)


def carried_view(e: Entry) -> ChainView | None:
    """What the chain says up to `e` when `e` says it itself: the run's start (nothing before
    it), or an entry opening a visit with the run's facts and pins carried (`b.Carried`); the
    view is to be folded on from `e` (included). None: `e` does not say."""
    if e.seq == 1 and e.kind == "run_started":
        return ChainView()
    if e.kind not in ("transition", "step_done") or '"carried":' not in e.body_json:
        return None
    record = e.body
    if not isinstance(record, b.Transition | b.StepDone) or record.carried is None:
        return None
    c = record.carried
    return ChainView(facts=dict(c.facts), workflow_hash=c.workflow_hash, policy_hash=c.policy_hash)


def derive(entries: Sequence[Entry], start: ChainView | None = None) -> ChainView:
    """Fold a run's entries into what its rows should hold: all of them, or (with `start`, the
    `carried_view` of the first) the tail from an entry that carries what came before."""
    view = start or ChainView()
    for e in entries:
        text = e.body_json
        if (
            e.kind in _PLAIN_STEPS
            and '"continuation":true' not in text
            and '"verification":' not in text
            and _BY_TICKET not in text
        ):
            # Most entries: a step that only says the run goes on (no ticket used, no facts
            # set), told from its canonical text without decoding it.
            view.status, view.owner, view.last_awaiting = "running", UNKNOWN, None
            continue
        record = e.body
        # The kind of the record read (a format 1 `step` entry is read as its typed record).
        kind = e.kind if isinstance(record, b.UnknownBody) else b.KIND_OF[type(record)]
        known = kind in _STATUS_OF or kind in ("run_finished", "handoff")
        if isinstance(record, b.UnknownBody) or not known:
            view.status = view.owner = view.facts = UNKNOWN  # a kind this tether cannot judge
            continue
        status = None if _refused_while_waiting(view, record) else _status_after(kind, record)
        if status is not None:
            view.status, view.owner, view.last_awaiting = status, UNKNOWN, None
        _record_on(view, e, kind, record)
        if view.facts is not UNKNOWN:
            view.facts = b.facts_after(view.facts, record)
        if isinstance(record, b.Transition | b.StepDone) and record.carried is not None:
            _check_carried(view, e.seq, record.carried)
    return view


def _refused_while_waiting(view: ChainView, record: b.Body) -> bool:
    """A call presented while the run waited on its ticket, refused by that ticket (its rule
    `approval:TICKET`, the ticket the chain says the run waits on) as a step of its own
    (tether.external): the run goes on waiting, its status, owner and pending step unchanged.
    A refusal that continues the paused step (the ticket denied or expired) moves it on."""
    return (
        isinstance(record, b.Refused)
        and not record.continuation
        and view.status == "paused"
        and view.last_awaiting is not None
        and record.decision.rule_id == f"approval:{view.last_awaiting}"
    )


def _check_carried(view: ChainView, seq: int, carried: b.Carried) -> None:
    """An entry's carried facts and pins against what the entries before it make."""
    said = []
    if view.workflow_hash is not None and carried.workflow_hash != view.workflow_hash:
        said.append("workflow_hash")
    if view.policy_hash is not None and carried.policy_hash != view.policy_hash:
        said.append("policy_hash")
    if view.facts is not UNKNOWN and not _same(carried.facts, view.facts):
        said.append("facts")
    if said:
        what = ", ".join(said)
        view.miscarried.append((seq, f"the {what} it carries are not what the entries before it make"))


def _status_after(kind: str, record: b.Body) -> str | None:
    """The status an entry leaves its run in (None: unchanged)."""
    match record:
        case b.RunFinished():
            return record.status
        case b.HandedOff():
            return "running" if record.handoff.to_state else "handed_off"
        case b.HandoffReceived():
            return "running" if record.to_state else "handed_off"
        case b.Crashed() if record.retry_in is None:
            return "failed"
    return _STATUS_OF.get(kind)


def _record_on(view: ChainView, e: Entry, kind: str, record: b.Body) -> None:
    """What an entry says of the run's pins, owner and tickets."""
    match record:
        case b.RunStarted():
            view.workflow_hash, view.policy_hash = record.workflow.hash, record.policy_hash
        case b.Migrated():
            view.workflow_hash, view.policy_hash = record.to.hash, record.to.policy_hash
        case b.AwaitingApproval():  # and AwaitingAnswer
            view.awaiting[record.ticket_id] = (e.seq, record, e.step_id)
            view.last_awaiting = record.ticket_id
            view.owner = record.decision.approver or UNKNOWN
        case b.TicketDecided():
            view.decided.setdefault(record.ticket_id, []).append((e.seq, e.created_at, record))
        case b.Escalated():  # and Failed
            view.owner = record.owner
        case b.HandedOff():
            view.owner = record.handoff.owner if not record.handoff.to_state else UNKNOWN
        case b.HandoffReceived():
            view.owner = UNKNOWN if record.to_state else record.by
        case b.ToolStep() | b.Transition() if kind in _USES_TICKET and record.continuation:
            if record.ticket_id is not None:
                view.used.setdefault(record.ticket_id, e.seq)


def _same(a: Any, b_: Any) -> bool:
    return encode_json(a) == encode_json(b_)


def principal_names(by: Any) -> set[str]:
    """The ways a row may name the principal an entry records (a name, an id, the JSON of a
    principal): compared generically, whatever the entry holds."""
    if by is None:
        return {""}
    if isinstance(by, str):
        return {by}
    values = by if isinstance(by, dict) else msgspec.to_builtins(by)
    names = {encode_json(values)}
    if isinstance(values, dict):
        names |= {str(v) for k, v in values.items() if k in ("principal_id", "id", "name") and v}
    return names


def _row_names(value: Any) -> str:
    if isinstance(value, str) and value.startswith("{"):
        try:
            return encode_json(json.loads(value))
        except ValueError:
            return value
    return "" if value is None else str(value)


# -- rows against their chain ------------------------------------------------------------


def head_findings(run: RunRecord, entries: Sequence[Entry]) -> list[Finding]:
    """The row's head (last_seq, last_hash) against the chain's last entry."""
    run_id = run.run_id
    last_seq = entries[-1].seq if entries else 0
    last_hash = entries[-1].hash if entries else GENESIS_HASH
    if run.last_seq > last_seq:
        return [
            Finding(
                "truncated",
                f"the run's row records its head at seq {run.last_seq}, the chain ends at seq {last_seq}",
                run_id,
                last_seq + 1,
            )
        ]
    if run.last_seq < last_seq:
        return [
            Finding(
                "inserted",
                f"seqs {run.last_seq + 1}-{last_seq} are beyond the head the run's row records "
                f"(seq {run.last_seq})",
                run_id,
                run.last_seq + 1,
            )
        ]
    if run.last_hash != last_hash:
        return [
            Finding(
                "row_disagrees", f"the row's head hash is not the hash of seq {last_seq}", run_id, last_seq
            )
        ]
    return []


def row_findings(run: RunRecord, view: ChainView, tickets: dict[str, Ticket] | None = None) -> list[Finding]:
    """The run's row (status, owner, facts, pins, pending step) against its chain."""
    said: list[str] = []
    if view.workflow_hash is not None and run.workflow_hash != view.workflow_hash:
        said.append(f"workflow_hash is {run.workflow_hash[:19]}…, the chain pins {view.workflow_hash[:19]}…")
    if view.policy_hash is not None and run.policy_hash != view.policy_hash:
        said.append(f"policy_hash is {run.policy_hash[:19]}…, the chain pins {view.policy_hash[:19]}…")
    queued = view.status == "running" and run.status == "queued"  # not started by a worker yet
    if view.status is not UNKNOWN and run.status != view.status and not queued:
        said.append(f"status is {run.status!r}, the chain says {view.status!r}")
    if view.facts is not UNKNOWN and not _same(run.facts, view.facts):
        changed = sorted(
            k for k in {*run.facts, *view.facts} if not _same(run.facts.get(k), view.facts.get(k))
        )
        said.append(f"facts differ from the chain's ({', '.join(changed)})")
    pending_ticket = view.last_awaiting if view.status == "paused" else None
    owner = view.owner
    if pending_ticket is not None and owner is UNKNOWN and tickets and pending_ticket in tickets:
        owner = tickets[pending_ticket].approver  # the ask named no approver: the state's
    judged = view.status in ("paused", "escalated", "failed", "handed_off") and owner is not UNKNOWN
    if judged and (run.owner or None) != (owner or None):
        said.append(f"owner is {run.owner!r}, the chain says {owner!r}")
    if pending_ticket is not None:
        said += _pending_problems(run, view, pending_ticket)
    return [Finding("row_disagrees", message, run.run_id) for message in said]


def _pending_problems(run: RunRecord, view: ChainView, ticket_id: str) -> list[str]:
    """The checkpoint of a paused run waits on the step its chain paused on."""
    pending = run.checkpoint.get("pending")
    seq, awaiting, step_id = view.awaiting[ticket_id]
    if not isinstance(pending, dict) or pending.get("ticket_id") != ticket_id:
        named = pending.get("ticket_id") if isinstance(pending, dict) else None
        return [f"the checkpoint waits on {named!r}, the chain on ticket {ticket_id} (seq {seq})"]
    if pending.get("step_id") != step_id or not _same(pending.get("proposal"), as_dict(awaiting.proposal)):
        return [f"the pending proposal differs from the one recorded at seq {seq}"]
    return []


def ticket_findings(ticket: Ticket, view: ChainView) -> list[Finding]:
    """One ticket row against the chain: asked for these arguments, decided once, by whom,
    how, and used at most once."""
    tid, run_id = ticket.ticket_id, ticket.run_id
    asked = view.awaiting.get(tid)
    if asked is None:
        return [Finding("inserted", f"ticket {tid}: no entry of the chain asked for it", run_id)]
    seq, awaiting, step_id = asked
    kind = "question" if isinstance(awaiting, b.AwaitingAnswer) else "approval"
    decisions = view.decided.get(tid, [])
    # The last decision settles it; one recorded after a final one (a second verdict) is not
    # how a ticket is decided. Partial decisions (a status still pending) may precede it.
    last = decisions[-1] if decisions else None
    said: list[tuple[str, int | None]] = []
    # Bound to what the chain asked for, or to what its decision approved (edited arguments).
    bound = last[2].args_hash if last is not None and last[2].args_hash else awaiting.args_hash
    if ticket.args_hash != bound:
        said.append((f"bound to {ticket.args_hash[:19]}…, the chain to {bound[:19]}…", seq))
    elif has_placeholder(ticket.args):
        # Sensitive values are stored as fingerprints (tether.sensitive) and the hash is over
        # the real values, so it cannot be computed again here: the row must hold exactly
        # the (fingerprinted) arguments the chain asked about, unless a decision edited them.
        asked_args = as_dict(awaiting.proposal).get("args")
        if (
            bound == awaiting.args_hash
            and asked_args is not None
            and encode_json(asked_args) != encode_json(ticket.args)
        ):
            said.append(("its arguments are not the ones the chain asked about", seq))
    elif _args_fingerprint(ticket) != ticket.args_hash:
        said.append(("its arguments do not match the hash it is bound to", seq))
    if ticket.kind != kind or ticket.step_id != step_id:
        said.append((f"kind/step {ticket.kind}/{ticket.step_id}, the chain asked {kind}/{step_id}", seq))
    said += _decision_problems(ticket, last, view.used.get(tid))
    out = [Finding("row_disagrees", f"ticket {tid}: {message}", run_id, at) for message, at in said]
    final = [d for d in decisions if d[2].status in FINAL_DECISIONS]
    if len(final) > 1:
        seqs = ", ".join(str(d[0]) for d in final)
        out.append(
            Finding(
                "inserted", f"ticket {tid}: decided {len(final)} times (seqs {seqs})", run_id, final[1][0]
            )
        )
    return out


def _decision_problems(
    ticket: Ticket, decision: tuple[int, float, b.TicketDecided] | None, used: int | None
) -> list[tuple[str, int | None]]:
    """A ticket's status, decider, reason and answer against its decision and use."""
    status = ticket.status
    if decision is None:
        if status in ("approved", "denied", "answered", "consumed"):
            return [(f"{status}, but no decision of it is in the chain", None)]
        return []
    d_seq, d_at, d = decision
    if status == "pending":
        return [(f"pending, but the chain records it {d.status} at seq {d_seq}", d_seq)]
    said: list[tuple[str, int | None]] = []
    if status == "consumed" and used is None:
        said.append(("consumed, but no entry of the chain used it", None))
    if status == "approved" and used is not None:
        said.append((f"approved (usable again), but the chain used it at seq {used}", used))
    expected = {"consumed": ("approved",), "expired": ("approved", "answered")}.get(status, (status,))
    if d.status not in expected:
        said.append((f"{status}, but the chain records it {d.status} at seq {d_seq}", d_seq))
    if _row_names(ticket.decided_by) not in {_row_names(n) for n in principal_names(d.by)}:
        said.append((f"decided_by {ticket.decided_by!r}, the chain records {d.by!r} at seq {d_seq}", d_seq))
    if (ticket.reason or "") != (d.reason or "") or (ticket.answer or None) != (d.answer or None):
        said.append((f"reason/answer differ from the decision at seq {d_seq}", d_seq))
    if ticket.decided_at is not None and abs(ticket.decided_at - d_at) > 1e-6:
        said.append((f"decided_at differs from the decision at seq {d_seq}", d_seq))
    return said


def _args_fingerprint(ticket: Ticket) -> str:
    encoded = encode_json(ticket.args)
    if ticket.kind == "approval" and not ticket.subject.startswith("exit:"):
        return tool_args_hash(ticket.subject, encoded)
    return value_hash(encoded)


def run_findings(
    run: RunRecord, entries: Sequence[Entry], tickets: Sequence[Ticket], *, anchor: int | None = None
) -> list[Finding]:
    """Everything wrong with one run: its chain, its row and its tickets against the chain.

    `entries` is the whole chain, or (with `anchor`) its tail, of which `entries[anchor]`
    carries what the chain says before it (`carried_view`): the tail is checked link by
    link, and the rows against the view folded on from the anchor."""
    found = chain_findings(run.run_id, entries, whole=anchor is None)
    found += head_findings(run, entries)
    start = carried_view(entries[anchor]) if anchor is not None else None
    view = derive(entries[anchor or 0 :], start)
    found += [Finding("edited", f"seq {seq}: {message}", run.run_id, seq) for seq, message in view.miscarried]
    by_id = {t.ticket_id: t for t in tickets}
    found += row_findings(run, view, by_id)
    for ticket in tickets:
        found += ticket_findings(ticket, view)
    return found


def _anchor(entries: Sequence[Entry]) -> int | None:
    """The index of the last entry that carries what the chain says before it."""
    for i in range(len(entries) - 1, -1, -1):
        if entries[i].kind in _OPENERS and carried_view(entries[i]) is not None:
            return i
    return None


async def check_run(
    journal: Any, run: RunRecord, *, doing: str, ticket: Ticket | None = None, whole: bool = False
) -> list[Entry]:
    """Refuse (`JournalTampered`) to act on a run whose rows disagree with its chain: the
    chain itself, the row's head, status, owner, facts, pins and pending step, and `ticket`
    (the one about to be acted on, else a paused run's pending one).

    What is read is what acting reads: the entries from the opening of the run's current
    visit on (its transcript, its pending ticket's request and decision, any intent in
    doubt), every one rehashed and linked to the next up to the row's head, and the rows
    checked against the facts and pins the opening entry carries (`b.Carried`) folded with
    the entries after it. The whole chain is read and checked instead when `whole` (the
    caller acts on every entry: `history`, provenance, a handoff's relied-on results),
    when the row says the run is over (nothing is acted on; the refusal names any damage),
    and when the visit's opening carries nothing (runs recorded before it did, a take-over).
    `tether audit verify` always walks the whole chain. Returns the entries read, in order:
    from the visit's opening entry on, or all of them."""
    problems = list(getattr(journal, "trigger_problems", ()))
    anchor: int | None = None
    entries: list[Entry] = []
    if not whole and run.status not in FINISHED:
        visit = run.checkpoint.get("visit")
        opened = visit.get("started_seq") if isinstance(visit, dict) else None
        if isinstance(opened, int) and 1 <= opened <= run.last_seq:
            entries = await journal.read_entries(run.run_id, opened - 1)
            anchor = _anchor(entries) if entries and entries[0].seq == opened else None
    if anchor is None:
        entries = await journal.read_entries(run.run_id)
    tickets = [ticket] if ticket is not None else []
    if ticket is None and run.status == "paused":
        pending = run.checkpoint.get("pending")
        if isinstance(pending, dict) and isinstance(pending.get("ticket_id"), str):
            try:
                tickets = [await journal.get_ticket(pending["ticket_id"])]
            except JournalError:
                tickets = []
    problems += run_findings(run, entries, tickets, anchor=anchor)
    if problems:
        raise JournalTampered(problems, doing=doing)
    return entries


# -- the append-only triggers -------------------------------------------------------------

# Each store's triggers: (name, table, what its body must do); read at every opening.
SQLITE_TRIGGERS_SQL = "SELECT name, tbl_name, 'O', sql FROM sqlite_master WHERE type = 'trigger'"
POSTGRES_TRIGGERS_SQL = """SELECT t.tgname, c.relname, t.tgenabled::text, p.prosrc FROM pg_trigger t
    JOIN pg_class c ON c.oid = t.tgrelid JOIN pg_proc p ON p.oid = t.tgfoid
    WHERE NOT t.tgisinternal AND t.tgrelid IN (to_regclass('entries'), to_regclass('checkpoints'))
    UNION ALL SELECT 'session_replication_role', '', current_setting('session_replication_role'), ''"""
_EXPECTED_TRIGGERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sqlite": (
        ("entries_no_update", "entries"),
        ("entries_no_delete", "entries"),
        ("checkpoints_no_update", "checkpoints"),
        ("checkpoints_no_delete", "checkpoints"),
    ),
    "postgres": (
        ("entries_no_update_or_delete", "entries"),
        ("entries_no_truncate", "entries"),
        ("checkpoints_no_update_or_delete", "checkpoints"),
        ("checkpoints_no_truncate", "checkpoints"),
    ),
}
_REFUSES = {"sqlite": "RAISE(ABORT", "postgres": "RAISE EXCEPTION"}


def trigger_findings(store: Literal["sqlite", "postgres"], rows: Sequence[Sequence[Any]]) -> list[Finding]:
    """The append-only triggers as the database has them (rows of the store's
    `*_TRIGGERS_SQL`): each present, enabled, and still refusing."""
    found = {
        str(name): (str(table), str(enabled), str(source or "")) for name, table, enabled, source in rows
    }
    out = []
    role = found.pop("session_replication_role", None)
    if role is not None and role[1] != "origin":
        out.append(
            Finding(
                "triggers_missing",
                f"session_replication_role is {role[1]!r}: the append-only triggers do not fire",
            )
        )
    for name, table in _EXPECTED_TRIGGERS[store]:
        have = found.get(name)
        if have is None or have[0] != table:
            out.append(Finding("triggers_missing", f"trigger {name} on {table} is gone"))
        elif have[1] not in ("O", "A"):
            out.append(Finding("triggers_missing", f"trigger {name} on {table} is disabled"))
        elif _REFUSES[store] not in have[2].upper().replace("RAISE (", "RAISE("):
            out.append(Finding("triggers_missing", f"trigger {name} on {table} no longer refuses changes"))
    return out
