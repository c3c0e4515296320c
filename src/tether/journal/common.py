"""What every store shares: columns, encoding, the SQL fragments of the rules, and the words
of a refusal.

SQL here is written once for every database: `?` placeholders, `{now}` for the store's
clock and `{gated}` for "this commit's gate passed"; a dialect renders them for its
database (`journal/store.py`).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel

from tether.errors import ConcurrentWriteError
from tether.hashing import encode_json
from tether.journal.records import (
    GENESIS_HASH,
    Commit,
    Entry,
    LeaseHeld,
    ModelExchange,
    RunRecord,
    RunUpdate,
    Ticket,
    TicketStatus,
)

NOW = "{now}"
GATED = "{gated}"

JSON_FIELDS = frozenset({"input", "data", "facts", "checkpoint", "args"})
RUN_COLUMNS: tuple[str, ...] = tuple(RunRecord.model_fields)
# A run's data, kept out of the row every commit rewrites (table run_values, one row each),
# and written only when it changes.
VALUE_NAMES = ("input", "data", "facts")
TICKET_COLUMNS: tuple[str, ...] = tuple(Ticket.model_fields)
# An entry as stored (schema 9): its hash as 32 raw bytes, and no previous hash (a link is
# always the hash of the entry before it: reads take it from there).
ENTRY_COLUMNS = ("run_id", "seq", "kind", "step_id", "state", "body", "hash", "created_at")
EXCHANGE_COLUMNS = ("run_id", "seq", "step_id", "state", "model", "created_at", "body")
# What an exchange's JSON body holds: every field but its columns, in declaration order.
_EXCHANGE_BODY = tuple(f for f in ModelExchange.model_fields if f not in EXCHANGE_COLUMNS)
# Statuses a worker may pick up without a person; "paused" only once its ticket is settled.
ACTIVE_STATUSES = ("queued", "running")
WORK_CHANNEL = "tether_work"

# Every field of a run, in RunRecord's order, its values read from run_values.
RUN_FIELDS_SQL = ", ".join(
    f"coalesce((SELECT v.value FROM run_values v WHERE v.run_id = runs.run_id AND v.name = '{c}'), '{{}}')"
    if c in VALUE_NAMES
    else c
    for c in RUN_COLUMNS
)
RUN_SELECT = f"SELECT {RUN_FIELDS_SQL} FROM runs"
TICKET_SELECT = f"SELECT {', '.join(TICKET_COLUMNS)} FROM tickets"
# A run's entries from seq ? on, in order: the entry at that seq (when it is there) only
# gives the next its link (`decode_entries`).
ENTRY_SELECT = f"SELECT {', '.join(ENTRY_COLUMNS)} FROM entries WHERE run_id = ? AND seq >= ? ORDER BY seq"
# The same, of some kinds only (`AND kind IN (...)` appended): each row with the hash of the
# entry stored before it (`prev`, NULL for the first row read), the filter applied after.
_ENTRY_WINDOW = (
    f"SELECT {', '.join(ENTRY_COLUMNS)}, LAG(hash) OVER (ORDER BY seq) AS prev "
    "FROM entries WHERE run_id = ? AND seq >= ?"
)
ENTRY_SELECT_LINKED = f"SELECT {', '.join(ENTRY_COLUMNS)}, prev FROM ({_ENTRY_WINDOW}) e WHERE seq > ?"


def placeholders(n: int) -> str:
    return ", ".join("?" * n)


INSERT_ENTRY = f"INSERT INTO entries ({', '.join(ENTRY_COLUMNS)}) VALUES ({placeholders(len(ENTRY_COLUMNS))})"
INSERT_VALUE = "INSERT INTO run_values (run_id, name, value) VALUES (?, ?, ?)"


def encode(column: str, value: Any) -> Any:
    if isinstance(value, bool):  # stored as INTEGER on every database
        return int(value)
    return encode_json(value) if column in JSON_FIELDS else value


def decode_run(row: tuple[Any, ...]) -> RunRecord:
    values = dict(zip(RUN_COLUMNS, row, strict=True))
    for k in ("input", "data", "facts", "checkpoint"):
        values[k] = json.loads(values[k])
    return RunRecord.model_validate(values)


def decode_ticket(row: tuple[Any, ...]) -> Ticket:
    values = dict(zip(TICKET_COLUMNS, row, strict=True))
    values["args"] = json.loads(values["args"])
    return Ticket.model_validate(values)


def ticket_row(ticket: Ticket) -> tuple[Any, ...]:
    return tuple(encode(k, getattr(ticket, k)) for k in TICKET_COLUMNS)


def new_ticket_row(ticket: Ticket) -> tuple[Any, ...]:
    """A new ticket's parameters: no creation time (the store's clock gives it), and for the
    expiry its lifetime, which the store adds to its own now."""
    values = []
    for k in TICKET_COLUMNS:
        if k == "expires_at":
            values.append(ticket.expires_at - ticket.created_at)
        elif k != "created_at":
            values.append(encode(k, getattr(ticket, k)))
    return tuple(values)


def hash_hex(stored: Any) -> str:
    """A stored hash as the hex the chain and every reader use (a value that is not bytes,
    written by hand, is kept as its text: it then matches no hash, and the chain says so)."""
    return bytes(stored).hex() if isinstance(stored, bytes | memoryview) else str(stored)


def decode_entries(rows: list[tuple[Any, ...]], after_seq: int) -> list[Entry]:
    """The entries after `after_seq` of `ENTRY_SELECT`'s rows, each linked to the row before
    it; the first, when no row is before it, to the chain's start (reading from the
    beginning) or to "" (the entry at `after_seq` is not in the journal)."""
    out = []
    prev = GENESIS_HASH if after_seq == 0 else ""
    for run_id, seq, kind, step_id, state, body, stored, created_at in rows:
        hash_ = hash_hex(stored)
        if seq > after_seq:
            out.append(Entry(run_id, seq, kind, step_id, state, body, prev, hash_, created_at))
        prev = hash_
    return out


def decode_linked(rows: list[tuple[Any, ...]], after_seq: int) -> list[Entry]:
    """The entries of `ENTRY_SELECT_LINKED`'s rows (as `decode_entries` links them)."""
    first = GENESIS_HASH if after_seq == 0 else ""
    return [
        Entry(
            run_id,
            seq,
            kind,
            step_id,
            state,
            body,
            first if prev is None else hash_hex(prev),
            hash_hex(h),
            at,
        )
        for run_id, seq, kind, step_id, state, body, h, at, prev in rows
    ]


def entry_row(e: Entry) -> tuple[Any, ...]:
    """An entry as stored: its body is the canonical JSON text its hash covers; the hash as
    its 32 bytes."""
    return (e.run_id, e.seq, e.kind, e.step_id, e.state, e.body_json, bytes.fromhex(e.hash), e.created_at)


def exchange_row(x: ModelExchange) -> tuple[Any, ...]:
    """An exchange as stored: the columns it is found by, the rest as one JSON body."""
    # Read field by field, not model_dump: every writer builds its values as plain JSON data
    # (tether.step), so a dump would only copy them (≈30 µs per governed call measured).
    body = {name: getattr(x, name) for name in _EXCHANGE_BODY}
    return (x.run_id, x.seq, x.step_id, x.state, x.model, x.created_at, json.dumps(body, default=_plain))


def _plain(value: Any) -> Any:
    """A value json cannot encode as it is: a model's data, else its text (as before)."""
    return value.model_dump() if isinstance(value, BaseModel) else str(value)


def decode_exchange(row: tuple[Any, ...]) -> ModelExchange:
    values = dict(zip(EXCHANGE_COLUMNS, row, strict=True))
    return ModelExchange.model_validate(values | json.loads(values.pop("body")))


def run_row(run: RunRecord) -> dict[str, Any]:
    """The `runs` row of a new run: every record field but its values, plus the ticket it
    waits on."""
    return {k: encode(k, getattr(run, k)) for k in RUN_COLUMNS if k not in VALUE_NAMES} | {
        "pending_ticket_id": pending_ticket_of(run.checkpoint)
    }


def value_rows(run: RunRecord) -> list[tuple[str, str, str]]:
    """The run_values rows of a new run."""
    return [(run.run_id, name, encode(name, getattr(run, name))) for name in VALUE_NAMES]


def update_values(update: RunUpdate | None) -> tuple[dict[str, Any], dict[str, str]]:
    """The `runs` columns and the run_values a `RunUpdate` sets (only the fields it was given)."""
    if update is None:
        return {}, {}
    given = update.given()
    sets = {k: encode(k, v) for k, v in given.items() if k not in VALUE_NAMES}
    values = {k: encode(k, v) for k, v in given.items() if k in VALUE_NAMES}
    if "checkpoint" in given:
        sets["pending_ticket_id"] = pending_ticket_of(given["checkpoint"] or {})
    return sets, values


def pending_ticket_of(checkpoint: dict[str, Any]) -> str | None:
    """The ticket a paused run waits on, kept in its own column so `claim` can join on it."""
    pending = checkpoint.get("pending")
    ticket_id = pending.get("ticket_id") if isinstance(pending, dict) else None
    return ticket_id if isinstance(ticket_id, str) else None


def when(t: float | None) -> str:
    if t is None:
        return "-"
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def lease_is_live(holder: str | None, expires_at: float | None, now: float) -> bool:
    return holder is not None and expires_at is not None and expires_at > now


def lease_held(run_id: str, holder: str | None, expires_at: float | None) -> LeaseHeld:
    return LeaseHeld(
        f"run {run_id} is leased to {holder} until {when(expires_at)}; wait for it to expire or be released",
        run_id=run_id,
        holder=holder,
        expires_at=expires_at,
    )


def fence_refusal(
    commit: Commit, last_seq: int, holder: str | None, expires_at: float | None, now: float
) -> ConcurrentWriteError | None:
    """Why the run's row refuses this commit (its lease, or its sequence), or None if it does not."""
    run_id, writer = commit.run_id, commit.lease_owner
    if writer is not None and holder != writer:
        who = f"{holder} until {when(expires_at)}" if holder else "nobody (the lease was released)"
        return LeaseHeld(
            f"run {run_id} is leased to {who}, not to {writer}: this worker lost its lease and "
            "must stop driving the run",
            run_id=run_id,
            holder=holder,
            expires_at=expires_at,
        )
    if writer is None and lease_is_live(holder, expires_at, now):
        return LeaseHeld(
            f"run {run_id} is leased to {holder} until {when(expires_at)}; only that worker may write to it",
            run_id=run_id,
            holder=holder,
            expires_at=expires_at,
        )
    if last_seq != commit.expected_seq:
        return ConcurrentWriteError(
            f"run {run_id} moved on (journal at seq {last_seq}, writer expected {commit.expected_seq}); "
            "another process is working on it"
        )
    return None


def fence_sql(writer: str | None) -> tuple[str, tuple[Any, ...]]:
    """The condition under which a commit by `writer` (a lease owner, or None) may apply."""
    if writer is not None:
        return "lease_owner = ?", (writer,)
    return f"(lease_owner IS NULL OR lease_expires_at <= {NOW})", ()


# A workflow_ref starting so names a workflow built in code by the one process that drives
# its runs (an MCP gateway's, "<mcp-gateway>"): no worker could load it, so none claims them.
SELF_DRIVEN = "<"


def runnable_sql(table: str) -> str:
    """Runs a worker may claim now: nobody holds a live lease, the workflow is loadable from
    its ref, and the run is queued or running, or paused on a ticket that was decided or has
    expired. The first term is the predicate of the partial index `runs_unfinished`."""
    return f"""{table}.status IN ('queued', 'running', 'paused')
        AND ({table}.lease_owner IS NULL OR {table}.lease_expires_at <= {NOW})
        AND substr({table}.workflow_ref, 1, 1) <> '{SELF_DRIVEN}'
        AND ({table}.status IN ('queued', 'running') OR EXISTS (
            SELECT 1 FROM tickets t WHERE t.ticket_id = {table}.pending_ticket_id
            AND (t.status <> 'pending' OR t.expires_at <= {NOW})))"""


def decided_status(ticket: Ticket, approve: bool) -> TicketStatus:
    if ticket.kind == "question":
        return "answered" if approve else "denied"
    return "approved" if approve else "denied"
