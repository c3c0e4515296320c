"""The records every journal store keeps, with the same meaning on every store."""

from __future__ import annotations

import hashlib
from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType
from pydantic import BaseModel, Field

from tether.errors import ConcurrentWriteError
from tether.hashing import canonical_json, encode_json, fingerprint, sha256_hex
from tether.journal import bodies

RunStatus = Literal[
    "queued",
    "running",
    "paused",
    "completed",
    "failed",
    "escalated",
    "handed_off",
    "effect_in_doubt",
    "cancelled",
]
FINISHED: frozenset[str] = frozenset({"completed", "failed", "escalated", "handed_off", "cancelled"})
TicketKind = Literal["approval", "question"]
# `withdrawn`: its run was cancelled or taken over by a person before anyone decided it.
TicketStatus = Literal["pending", "approved", "denied", "answered", "consumed", "expired", "withdrawn"]
GENESIS_HASH = "0" * 64


class RunRecord(BaseModel):
    """A run and its checkpoint: where it is, its data and facts, its counters."""

    run_id: str
    workflow_name: str
    workflow_version: str
    workflow_hash: str
    workflow_ref: str
    policy_hash: str
    policy_ref: str | None = None
    model_spec: str | None = None
    status: RunStatus = "running"
    state: str
    input: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    facts: dict[str, Any] = Field(default_factory=dict)
    checkpoint: dict[str, Any] = Field(default_factory=dict)
    owner: str | None = None
    reason_code: str | None = None
    message: str | None = None
    created_at: float
    updated_at: float
    last_seq: int = 0
    last_hash: str = GENESIS_HASH
    # Who is driving the run, until when (a process renews it while it works).
    lease_owner: str | None = None
    lease_expires_at: float | None = None
    # The principal id of who started the run (tether.identity); None before schema 5.
    started_by: str | None = None


class NewEntry(msgspec.Struct, frozen=True):
    """An entry about to be appended: its kind (the type of its body) and the body as the
    canonical JSON text that is stored and hashed. The text is made once, by the writer."""

    kind: str
    body_json: str
    step_id: str | None = None
    state: str | None = None

    @classmethod
    def of(cls, record: bodies.Body, *, step_id: str | None = None, state: str | None = None) -> NewEntry:
        """The entry that stores a typed record: its kind, and its body encoded once."""
        return cls(bodies.KIND_OF[type(record)], encode_json(record), step_id, state)


class Entry(msgspec.Struct):
    """An append-only journal entry; `hash` chains it to the run's previous entry.

    `body_json` is the exact text stored and hashed; `body` decodes it. `prev_hash` is the
    hash of the entry stored before it in its run (64 zeros for the first), read with it:
    since schema 9 it is not a column (a chain's link is always its predecessor's hash),
    and it is "" when a read starts after a sequence number no entry holds. Hashes are hex
    here, 32 raw bytes in the store.
    """

    run_id: str
    seq: int
    kind: str
    step_id: str | None
    state: str | None
    body_json: str
    prev_hash: str
    hash: str
    created_at: float

    @property
    def body(self) -> bodies.Body | bodies.UnknownBody:
        """The typed record this entry holds (decoded on each access: bind it once)."""
        return bodies.decode(self.kind, self.body_json)

    def as_dict(self) -> dict[str, Any]:
        """The entry as plain JSON values, its body as its record (for `show --json`)."""
        values = {f: getattr(self, f) for f in self.__struct_fields__ if f != "body_json"}
        record = self.body
        body = record.body if isinstance(record, bodies.UnknownBody) else msgspec.to_builtins(record)
        return values | {"body": body}


class _Header(msgspec.Struct):
    """An entry's header as hashed: canonical JSON (`encode_json`), fields in sorted order."""

    created_at: float
    kind: str
    run_id: str
    seq: int
    state: str | None
    step_id: str | None


_header_encoder = msgspec.json.Encoder()


def entry_hash(
    run_id: str,
    seq: int,
    kind: str,
    step_id: str | None,
    state: str | None,
    body_json: str,
    prev_hash: str,
    created_at: float,
) -> str:
    """SHA-256 of the previous hash, the header's canonical JSON and the body's text (the
    header encoded from a struct: the bytes `encode_json` makes of it as a dict, faster)."""
    digest = hashlib.sha256(prev_hash.encode())
    digest.update(_header_encoder.encode(_Header(created_at, kind, run_id, seq, state, step_id)))
    digest.update(body_json.encode())
    return digest.hexdigest()


def chain(run_id: str, start_seq: int, prev_hash: str, entries: list[NewEntry], now: float) -> list[Entry]:
    """Number and hash new entries after (start_seq, prev_hash)."""
    out: list[Entry] = []
    for i, e in enumerate(entries, start=start_seq + 1):
        h = entry_hash(run_id, i, e.kind, e.step_id, e.state, e.body_json, prev_hash, now)
        out.append(Entry(run_id, i, e.kind, e.step_id, e.state, e.body_json, prev_hash, h, now))
        prev_hash = h
    return out


def verify_chain(entries: list[Entry]) -> list[str]:
    """Return the problems found in a run's chain (gaps, edits); empty when intact. Each
    entry is rehashed after the one before it: an entry edited, moved or linked to another
    predecessor does not match its hash there."""
    problems: list[str] = []
    prev, expected_seq = GENESIS_HASH, 1
    for e in entries:
        if e.seq != expected_seq:
            problems.append(f"seq {expected_seq} missing (found {e.seq})")
        computed = entry_hash(e.run_id, e.seq, e.kind, e.step_id, e.state, e.body_json, prev, e.created_at)
        if computed != e.hash:
            problems.append(f"seq {e.seq}: content does not match its hash")
        prev, expected_seq = e.hash, e.seq + 1
    return problems


class Ticket(BaseModel):
    """A durable, single-use ticket: an approval bound to exact arguments, or a question."""

    ticket_id: str
    run_id: str
    step_id: str
    kind: TicketKind
    subject: str
    args: dict[str, Any] = Field(default_factory=dict)
    args_hash: str
    approver: str
    question: str | None = None
    status: TicketStatus = "pending"
    created_at: float
    expires_at: float
    decided_at: float | None = None
    decided_by: str | None = None
    reason: str | None = None
    answer: str | None = None
    consumed_at: float | None = None
    # What the rule that asked required (schema 5): how many distinct principals must
    # approve, and whether the run's starter may be one of them; approvals so far.
    approvals_required: int = 1
    forbid_self_approval: bool = False
    approvals: int = 0
    # Set when an approver edited the arguments: the hash of those first proposed
    # (`args`/`args_hash` are then the edited ones, the ones the run executes).
    original_args_hash: str | None = None


class RunUpdate(msgspec.Struct):
    """Fields of the run's checkpoint to change; fields left UNSET stay as they are."""

    status: RunStatus | UnsetType = UNSET
    state: str | UnsetType = UNSET
    data: dict[str, Any] | UnsetType = UNSET
    facts: dict[str, Any] | UnsetType = UNSET
    checkpoint: dict[str, Any] | UnsetType = UNSET
    owner: str | UnsetType | None = UNSET
    reason_code: str | UnsetType | None = UNSET
    message: str | UnsetType | None = UNSET
    # Set only by an explicit migration to another version of the workflow.
    workflow_version: str | UnsetType = UNSET
    workflow_hash: str | UnsetType = UNSET
    workflow_ref: str | UnsetType = UNSET
    policy_hash: str | UnsetType = UNSET
    policy_ref: str | UnsetType | None = UNSET

    def given(self) -> dict[str, Any]:
        """The fields this update sets."""
        return {f: v for f, v in msgspec.structs.asdict(self).items() if v is not UNSET}


class ModelExchange(BaseModel):
    """One call to a model, kept apart from the step records (it is not hash-chained and
    has its own retention): what was asked, what came back, what it cost, how it failed.

    `seq` numbers a run's exchanges from 1; `output` is the raw output the kernel parsed,
    the basis of replay. `request` and `response` are the vendor's, when the adapter
    reports them.
    """

    run_id: str
    seq: int
    step_id: str | None = None
    state: str
    model: str
    created_at: float
    seconds: float = 0.0
    output: Any = None
    usage: dict[str, Any] = Field(default_factory=dict)
    error: str | None = None
    reason_code: str | None = None
    request: Any = None
    response: Any = None
    attempts: list[dict[str, Any]] = Field(default_factory=list)


class Commit(msgspec.Struct):
    """Everything one governed step writes, applied in one transaction or not at all.

    `expected_seq` is the run's last sequence number as the writer knows it; if another
    process appended meanwhile the commit is refused. `consume` marks an approved ticket
    used, only if it is bound to `args_hash` and has not expired by the journal's clock.
    `durable` forces a sync to disk (intents): the commit returns only once it is synced.
    """

    run_id: str
    expected_seq: int
    expected_hash: str
    entries: list[NewEntry] = []
    update: RunUpdate | None = None
    new_tickets: list[Ticket] = []
    consume: tuple[str, str] | None = None
    # Model exchanges made for this step, written in the same transaction.
    exchanges: list[ModelExchange] = []
    durable: bool = False
    # Fencing: with a lease owner the commit applies only while that owner holds the run's
    # lease, and renews it for `lease_seconds`; without one, only while nobody holds it.
    lease_owner: str | None = None
    lease_seconds: float | None = None
    # Give the lease up in the same transaction (a run pausing or finishing): the run is
    # claimable at once, without a second transaction to release it.
    release: bool = False
    # A pending ticket of this run to withdraw with the commit (a person cancelled the run,
    # or took it over): no one can decide it any more.
    withdraw: str | None = None


class LeaseHeld(ConcurrentWriteError):
    """The run's lease is not the writer's: another worker holds it, or it was given up.

    `holder` and `expires_at` describe the lease as the journal has it (None: no lease).
    """

    def __init__(self, message: str, *, run_id: str, holder: str | None, expires_at: float | None) -> None:
        super().__init__(message)
        self.run_id, self.holder, self.expires_at = run_id, holder, expires_at


class Definition(msgspec.Struct, frozen=True):
    """What a definition hash covers, kept so a run can be re-evaluated under it later:
    `kind` is `workflow` (the workflow's description, `Workflow.describe()`) or `policy`
    (the policy document as hashed, `PolicyDocument.hashed()`); `body` is its canonical
    JSON, whose fingerprint is `hash` (checked whenever it is read back)."""

    hash: str
    kind: Literal["workflow", "policy"]
    body: str

    @classmethod
    def of(cls, kind: Literal["workflow", "policy"], content: Any) -> Definition:
        return cls(fingerprint(content), kind, canonical_json(content))

    def intact(self) -> bool:
        """Whether the body is what the hash covers (a row edited in the database is not)."""
        return self.hash == "sha256:" + sha256_hex(self.body)
