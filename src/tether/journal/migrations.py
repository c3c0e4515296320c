"""Numbered schema versions, side by side for each store.

Version 1 is the schema of the first release; each later version lists what changes.
A store applies the versions its journal lacks, in order, in one transaction, and
records the result in its `meta` table (`schema_version`, and `migration:N` with when
it was applied). A journal whose version is newer than `LATEST` is refused.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tether.errors import JournalError
from tether.journal.common import pending_ticket_of, when
from tether.journal.records import GENESIS_HASH


@dataclass(frozen=True)
class Migration:
    version: int
    description: str
    # SQL statements, one each, or a function of the open connection for data changes.
    steps: tuple[str | Callable[[Any], None], ...]


META_SQL = "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)"


def _sqlite_fill_pending_tickets(db: sqlite3.Connection) -> None:
    rows = db.execute("SELECT run_id, checkpoint FROM runs WHERE status = 'paused'").fetchall()
    for run_id, checkpoint in rows:
        ticket_id = pending_ticket_of(json.loads(checkpoint))
        db.execute("UPDATE runs SET pending_ticket_id = ? WHERE run_id = ?", (ticket_id, run_id))


# Version 4, the same on both stores: a run's input, data and facts leave the row that every
# commit rewrites (SQLite rewrites a whole row, overflow pages included, on any UPDATE).
_LEAN_RUNS: tuple[str, ...] = (
    """CREATE TABLE run_values (
    run_id TEXT NOT NULL, name TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, name))""",
    *(
        f"INSERT INTO run_values (run_id, name, value) SELECT run_id, '{name}', {name} FROM runs"
        for name in ("input", "data", "facts")
    ),
    # claim reads unfinished runs oldest first; a run leaves the index when it finishes.
    """CREATE INDEX runs_unfinished ON runs (created_at, run_id)
    WHERE status IN ('queued', 'running', 'paused')""",
    "CREATE INDEX runs_by_lease_owner ON runs (lease_owner) WHERE lease_owner IS NOT NULL",
)


# Version 5, the same on both stores but for the time type: who acts (tether.identity).
# `tokens` holds each API token's principal, role and scope, and only the SHA-256 of the
# token; `ticket_approvals` one row per principal that approved a ticket needing several
# (`approvals: N`; the key keeps them distinct); a ticket carries what its rule required
# and, after an edit-and-approve, the hash of the arguments first proposed; a run, who
# started it (`forbid_self_approval`).
def _people(time_type: str) -> tuple[str, ...]:
    return (
        f"""CREATE TABLE tokens (
    token_id TEXT PRIMARY KEY, principal_id TEXT NOT NULL, name TEXT NOT NULL, kind TEXT NOT NULL,
    role TEXT NOT NULL, approver_for TEXT NOT NULL, workflows TEXT NOT NULL,
    token_hash TEXT NOT NULL UNIQUE, created_at {time_type} NOT NULL, expires_at {time_type},
    revoked_at {time_type}, revoked_by TEXT)""",
        f"""CREATE TABLE ticket_approvals (
    ticket_id TEXT NOT NULL, principal_id TEXT NOT NULL, args_hash TEXT NOT NULL,
    created_at {time_type} NOT NULL, PRIMARY KEY (ticket_id, principal_id))""",
        "ALTER TABLE tickets ADD COLUMN approvals_required INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE tickets ADD COLUMN forbid_self_approval INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tickets ADD COLUMN approvals INTEGER NOT NULL DEFAULT 0",
        "ALTER TABLE tickets ADD COLUMN original_args_hash TEXT",
        "ALTER TABLE runs ADD COLUMN started_by TEXT",
    )


# Version 6, the same on both stores (SQLite reads DOUBLE PRECISION as REAL): webhooks and
# the outbox of their deliveries. A ticket's event writes one outbox row per webhook that
# subscribes to it, in the transaction that changes the ticket (`journal/outbox.py`).
_WEBHOOKS: tuple[str, ...] = (
    """CREATE TABLE webhooks (
    webhook_id TEXT PRIMARY KEY, url TEXT NOT NULL, events TEXT NOT NULL, format TEXT NOT NULL,
    secret_env TEXT, base_url TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL,
    removed_at DOUBLE PRECISION)""",
    """CREATE TABLE webhook_outbox (
    message_id TEXT PRIMARY KEY, webhook_id TEXT NOT NULL, event TEXT NOT NULL,
    ticket_id TEXT NOT NULL, run_id TEXT NOT NULL, ticket_status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, status TEXT NOT NULL, attempts INTEGER NOT NULL,
    next_attempt_at DOUBLE PRECISION NOT NULL, last_attempt_at DOUBLE PRECISION,
    last_status INTEGER, last_error TEXT, delivered_at DOUBLE PRECISION,
    lease_owner TEXT, lease_expires_at DOUBLE PRECISION)""",
    # The dispatcher reads the pending rows that are due, soonest first.
    "CREATE INDEX webhook_outbox_due ON webhook_outbox (next_attempt_at) WHERE status = 'pending'",
    "CREATE INDEX webhook_outbox_by_age ON webhook_outbox (created_at)",
)


# Version 7 (audit), the same tables on both stores: signed checkpoints, append-only like the
# entries (tether.audit), and tickets found by run (a run's audit reads them all).
_CHECKPOINT_COLUMNS = """kind TEXT NOT NULL, run_id TEXT, seq BIGINT, hash TEXT, body TEXT NOT NULL,
    key_id TEXT NOT NULL, signature TEXT NOT NULL"""
_AUDIT_INDEXES: tuple[str, ...] = (
    "CREATE INDEX checkpoints_by_run ON checkpoints (run_id, seq)",
    "CREATE INDEX tickets_by_run ON tickets (run_id)",
)
SQLITE_AUDIT_TRIGGERS: tuple[str, ...] = (
    """CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS checkpoints_no_update BEFORE UPDATE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END""",
    """CREATE TRIGGER IF NOT EXISTS checkpoints_no_delete BEFORE DELETE ON checkpoints
    BEGIN SELECT RAISE(ABORT, 'checkpoints are append-only'); END""",
)
POSTGRES_APPEND_ONLY_FUNCTION = """CREATE OR REPLACE FUNCTION tether_append_only() RETURNS trigger
    LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'journal entries are append-only'
        USING ERRCODE = 'integrity_constraint_violation'; END $$"""
POSTGRES_AUDIT_TRIGGERS: tuple[str, ...] = tuple(
    f"""CREATE TRIGGER {table}_{name} BEFORE {events} ON {table}
    FOR EACH {each} EXECUTE FUNCTION tether_append_only()"""
    for table in ("entries", "checkpoints")
    for name, events, each in (
        ("no_update_or_delete", "UPDATE OR DELETE", "ROW"),
        ("no_truncate", "TRUNCATE", "STATEMENT"),
    )
)
# Version 8 (replay), the same on both stores: content-addressed definitions. A run pins its
# workflow and policy by hash (`run_started`, `migrated`); this table keeps what each hash
# covers — the workflow's description and the policy document, canonical JSON — so that a
# replay months later re-evaluates every decision under the text it was made under. A row
# is checked against its hash whenever it is read: an edited row is refused, never used.
_DEFINITIONS = """CREATE TABLE definitions (
    hash TEXT PRIMARY KEY, kind TEXT NOT NULL, body TEXT NOT NULL, created_at {time} NOT NULL)"""


# Version 9 (bytes per step), both stores: an entry's hash is stored as its 32 raw bytes, not
# 64 hex characters, and `prev_hash` is no longer a column: a link is always the hash of the
# entry before it (64 zeros for the first), which a read takes from there. The chain's
# formula is unchanged (the previous hash enters it as hex), so every hash ever computed and
# every signed checkpoint stays valid. Fail closed: a journal where a hash is not 64 hex
# characters, or where a stored `prev_hash` is not the hash of the entry stored before it
# (a chain broken there: dropping the column would lose what shows it), is refused, and the
# transaction leaves it as it was.
_LINKS_SQL = f"""SELECT run_id, seq, hash FROM (
    SELECT run_id, seq, hash, prev_hash,
        LAG(hash, 1, '{GENESIS_HASH}') OVER (PARTITION BY run_id ORDER BY seq) AS before
    FROM entries) e
    WHERE {{not_hex}} OR prev_hash <> before ORDER BY run_id, seq LIMIT 1"""


def _check_links(not_hex: str) -> Callable[[Any], None]:
    """The step that refuses to drop `prev_hash` from a journal whose chain it would hide."""

    def check(db: Any) -> None:
        row = db.execute(_LINKS_SQL.replace("{not_hex}", not_hex)).fetchone()
        if row is None:
            return
        run_id, seq, hash_ = row
        what = (
            "its hash is not 64 hex characters"
            if not isinstance(hash_, str) or len(hash_) != 64 or set(hash_) - set("0123456789abcdef")
            else "its prev_hash is not the hash of the entry stored before it"
        )
        raise JournalError(
            f"cannot upgrade the journal to schema version 9: run {run_id} seq {seq}: {what}, "
            "so its chain is broken there and this version, which stores no prev_hash, would lose "
            "what shows it; nothing was changed. Check it with `tether audit verify` under the "
            "tether that wrote it"
        )

    return check


_SQLITE_ENTRIES = """CREATE TABLE entries (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, step_id TEXT,
    state TEXT, body TEXT NOT NULL, hash BLOB NOT NULL CHECK (length(hash) = 32),
    created_at REAL NOT NULL, PRIMARY KEY (run_id, seq))"""


def _sqlite_hashes_as_bytes(db: sqlite3.Connection) -> None:
    """Rebuild `entries` without `prev_hash`, hashes as BLOBs, every rowid kept; the table's
    triggers are re-created from the very text they had (whatever state they were in: a
    migration neither restores nor drops a guard)."""
    triggers = [
        sql
        for (sql,) in db.execute(
            "SELECT sql FROM sqlite_master WHERE type = 'trigger' AND tbl_name = 'entries' ORDER BY name"
        )
    ]
    db.create_function("tether_unhex", 1, bytes.fromhex, deterministic=True)
    db.execute("ALTER TABLE entries RENAME TO entries_v8")
    db.execute(_SQLITE_ENTRIES)
    db.execute(
        "INSERT INTO entries (rowid, run_id, seq, kind, step_id, state, body, hash, created_at) "
        "SELECT rowid, run_id, seq, kind, step_id, state, body, tether_unhex(hash), created_at "
        "FROM entries_v8 ORDER BY rowid"
    )
    db.execute("DROP TABLE entries_v8")  # its triggers go with it; DROP fires none
    for sql in triggers:
        db.execute(sql)


SQLITE: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, append-only entries, tickets",
        (
            """CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY, workflow_name TEXT NOT NULL, workflow_version TEXT NOT NULL,
    workflow_hash TEXT NOT NULL, workflow_ref TEXT NOT NULL, policy_hash TEXT NOT NULL,
    policy_ref TEXT, model_spec TEXT, status TEXT NOT NULL, state TEXT NOT NULL, input TEXT NOT NULL,
    data TEXT NOT NULL, facts TEXT NOT NULL, checkpoint TEXT NOT NULL, owner TEXT,
    reason_code TEXT, message TEXT, created_at REAL NOT NULL, updated_at REAL NOT NULL,
    last_seq INTEGER NOT NULL, last_hash TEXT NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS runs_by_status ON runs (status, created_at)",
            """CREATE TABLE IF NOT EXISTS entries (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, kind TEXT NOT NULL, step_id TEXT,
    state TEXT, body TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    created_at REAL NOT NULL, PRIMARY KEY (run_id, seq))""",
            """CREATE TRIGGER IF NOT EXISTS entries_no_update BEFORE UPDATE ON entries
    BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END""",
            """CREATE TRIGGER IF NOT EXISTS entries_no_delete BEFORE DELETE ON entries
    BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END""",
            """CREATE TABLE IF NOT EXISTS tickets (
    ticket_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL,
    kind TEXT NOT NULL, subject TEXT NOT NULL, args TEXT NOT NULL, args_hash TEXT NOT NULL,
    approver TEXT NOT NULL, question TEXT, status TEXT NOT NULL, created_at REAL NOT NULL,
    expires_at REAL NOT NULL, decided_at REAL, decided_by TEXT, reason TEXT, answer TEXT,
    consumed_at REAL)""",
            "CREATE INDEX IF NOT EXISTS tickets_by_status ON tickets (status, created_at)",
        ),
    ),
    Migration(
        2,
        "run leases for workers",
        (
            "ALTER TABLE runs ADD COLUMN lease_owner TEXT",
            "ALTER TABLE runs ADD COLUMN lease_expires_at REAL",
            "ALTER TABLE runs ADD COLUMN pending_ticket_id TEXT",
            "CREATE INDEX runs_leased ON runs (workflow_name) WHERE lease_owner IS NOT NULL",
            _sqlite_fill_pending_tickets,
        ),
    ),
    Migration(
        3,
        "model exchanges, apart from the entries",
        (
            """CREATE TABLE exchanges (
    run_id TEXT NOT NULL, seq INTEGER NOT NULL, step_id TEXT, state TEXT NOT NULL,
    model TEXT NOT NULL, created_at REAL NOT NULL, body TEXT NOT NULL, PRIMARY KEY (run_id, seq))""",
            "CREATE INDEX exchanges_by_age ON exchanges (created_at)",
        ),
    ),
    Migration(
        4,
        "lean run rows: input, data and facts in run_values; indexes for claim and lease renewal",
        (
            *_LEAN_RUNS,
            "ALTER TABLE runs DROP COLUMN input",
            "ALTER TABLE runs DROP COLUMN data",
            "ALTER TABLE runs DROP COLUMN facts",
        ),
    ),
    Migration(5, "who acts: API tokens, approvals by distinct principals, run starters", _people("REAL")),
    Migration(6, "webhooks and the outbox of their deliveries", _WEBHOOKS),
    Migration(
        7,
        "signed checkpoints (append-only); tickets by run",
        (
            f"""CREATE TABLE checkpoints (id INTEGER PRIMARY KEY, {_CHECKPOINT_COLUMNS},
    created_at REAL NOT NULL)""",
            *_AUDIT_INDEXES,
            *SQLITE_AUDIT_TRIGGERS[2:],
        ),
    ),
    Migration(
        8,
        "definitions: the workflow descriptions and policy texts runs are pinned to, by hash",
        (_DEFINITIONS.replace("{time}", "REAL"),),
    ),
    Migration(
        9,
        "entries: hashes as 32 bytes, no prev_hash column (a link is the previous entry's hash)",
        (
            _check_links("typeof(hash) <> 'text' OR length(hash) <> 64 OR hash GLOB '*[^0-9a-f]*'"),
            _sqlite_hashes_as_bytes,
        ),
    ),
)

POSTGRES: tuple[Migration, ...] = (
    Migration(
        1,
        "runs, append-only entries, tickets",
        (
            """CREATE TABLE runs (
    run_id TEXT PRIMARY KEY, workflow_name TEXT NOT NULL, workflow_version TEXT NOT NULL,
    workflow_hash TEXT NOT NULL, workflow_ref TEXT NOT NULL, policy_hash TEXT NOT NULL,
    policy_ref TEXT, model_spec TEXT, status TEXT NOT NULL, state TEXT NOT NULL, input TEXT NOT NULL,
    data TEXT NOT NULL, facts TEXT NOT NULL, checkpoint TEXT NOT NULL, owner TEXT,
    reason_code TEXT, message TEXT, created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL, last_seq BIGINT NOT NULL, last_hash TEXT NOT NULL)""",
            "CREATE INDEX runs_by_status ON runs (status, created_at)",
            """CREATE TABLE entries (
    run_id TEXT NOT NULL, seq BIGINT NOT NULL, kind TEXT NOT NULL, step_id TEXT,
    state TEXT, body TEXT NOT NULL, prev_hash TEXT NOT NULL, hash TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, PRIMARY KEY (run_id, seq))""",
            """CREATE FUNCTION tether_append_only() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN RAISE EXCEPTION 'journal entries are append-only'
        USING ERRCODE = 'integrity_constraint_violation'; END $$""",
            """CREATE TRIGGER entries_no_update_or_delete BEFORE UPDATE OR DELETE ON entries
    FOR EACH ROW EXECUTE FUNCTION tether_append_only()""",
            """CREATE TRIGGER entries_no_truncate BEFORE TRUNCATE ON entries
    FOR EACH STATEMENT EXECUTE FUNCTION tether_append_only()""",
            """CREATE TABLE tickets (
    ticket_id TEXT PRIMARY KEY, run_id TEXT NOT NULL, step_id TEXT NOT NULL,
    kind TEXT NOT NULL, subject TEXT NOT NULL, args TEXT NOT NULL, args_hash TEXT NOT NULL,
    approver TEXT NOT NULL, question TEXT, status TEXT NOT NULL,
    created_at DOUBLE PRECISION NOT NULL, expires_at DOUBLE PRECISION NOT NULL,
    decided_at DOUBLE PRECISION, decided_by TEXT, reason TEXT, answer TEXT,
    consumed_at DOUBLE PRECISION)""",
            "CREATE INDEX tickets_by_status ON tickets (status, created_at)",
        ),
    ),
    Migration(
        2,
        "run leases for workers",
        (
            "ALTER TABLE runs ADD COLUMN lease_owner TEXT",
            "ALTER TABLE runs ADD COLUMN lease_expires_at DOUBLE PRECISION",
            "ALTER TABLE runs ADD COLUMN pending_ticket_id TEXT",
            "CREATE INDEX runs_leased ON runs (workflow_name) WHERE lease_owner IS NOT NULL",
            """UPDATE runs SET pending_ticket_id = checkpoint::json -> 'pending' ->> 'ticket_id'
    WHERE status = 'paused'""",
        ),
    ),
    Migration(
        3,
        "model exchanges, apart from the entries",
        (
            """CREATE TABLE exchanges (
    run_id TEXT NOT NULL, seq BIGINT NOT NULL, step_id TEXT, state TEXT NOT NULL,
    model TEXT NOT NULL, created_at DOUBLE PRECISION NOT NULL, body TEXT NOT NULL,
    PRIMARY KEY (run_id, seq))""",
            "CREATE INDEX exchanges_by_age ON exchanges (created_at)",
        ),
    ),
    Migration(
        4,
        "lean run rows: input, data and facts in run_values; indexes for claim and lease renewal",
        (*_LEAN_RUNS, "ALTER TABLE runs DROP COLUMN input, DROP COLUMN data, DROP COLUMN facts"),
    ),
    Migration(
        5, "who acts: API tokens, approvals by distinct principals, run starters", _people("DOUBLE PRECISION")
    ),
    Migration(6, "webhooks and the outbox of their deliveries", _WEBHOOKS),
    Migration(
        7,
        "signed checkpoints (append-only); tickets by run",
        (
            f"""CREATE TABLE checkpoints (id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    {_CHECKPOINT_COLUMNS}, created_at DOUBLE PRECISION NOT NULL)""",
            *_AUDIT_INDEXES,
            *POSTGRES_AUDIT_TRIGGERS[2:],
        ),
    ),
    Migration(
        8,
        "definitions: the workflow descriptions and policy texts runs are pinned to, by hash",
        (_DEFINITIONS.replace("{time}", "DOUBLE PRECISION"),),
    ),
    Migration(
        9,
        "entries: hashes as 32 bytes, no prev_hash column (a link is the previous entry's hash)",
        (
            _check_links("hash !~ '^[0-9a-f]{64}$'"),
            # Neither statement fires the append-only row triggers, which stay as they are.
            "ALTER TABLE entries DROP COLUMN prev_hash",
            "ALTER TABLE entries ALTER COLUMN hash TYPE BYTEA USING decode(hash, 'hex')",
            "ALTER TABLE entries ADD CONSTRAINT entries_hash_bytes CHECK (octet_length(hash) = 32)",
        ),
    ),
)

LATEST = SQLITE[-1].version
assert POSTGRES[-1].version == LATEST, "both stores must reach the same schema version"


def pending(migrations: tuple[Migration, ...], current: int, where: str) -> list[Migration]:
    """The migrations a journal at `current` needs; refuse one newer than this code."""
    if current > LATEST:
        raise JournalError(
            f"journal {where} has schema version {current}, newer than this tether "
            f"understands ({LATEST}); upgrade tether"
        )
    return [m for m in migrations if m.version > current]


def apply(db: Any, migration: Migration, placeholder: str) -> None:
    """Run one migration's steps and record it, on a connection already in a transaction."""
    for step in migration.steps:
        if callable(step):
            step(db)
        else:
            db.execute(step)
    upsert = (
        f"INSERT INTO meta (key, value) VALUES ({placeholder}, {placeholder}) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
    )
    db.execute(upsert, ("schema_version", str(migration.version)))
    db.execute(upsert, (f"migration:{migration.version}", f"{migration.description}; {when(time.time())}"))
