"""The journal: runs with their checkpoints, append-only entries, and approval tickets.

One interface, `Journal`; a URL or path picks the store (`postgresql://…` or
`postgres://…`, `sqlite:///path`, or a plain file path). Every store keeps the same
contract, checked by one test suite run against each: a `Commit` is applied whole or not
at all, entries are numbered and hash-chained per run, tickets are single-use, and a run
leased to a worker takes commits from that worker only. Model exchanges (prompts and
outputs) are stored beside the entries, written with the step they served, and may be
pruned on their own retention; the entries are append-only.

Time is the journal's: ticket decisions, expiry and use, lease expiry, fencing and claims
are decided on the store's clock. The `now=` arguments of `decide_ticket`, `expire_ticket`,
`acquire`, `claim` and `heartbeat` are still accepted (for one release) and ignored.
Concurrent commits in one process share transactions (group commit; `journal/store.py`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Collection, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, Self

from tether.errors import JournalError, TicketExpired
from tether.journal.integrity import Finding
from tether.journal.records import (
    FINISHED,
    Commit,
    Definition,
    Entry,
    LeaseHeld,
    ModelExchange,
    NewEntry,
    RunRecord,
    RunStatus,
    RunUpdate,
    Ticket,
    verify_chain,
)
from tether.journal.store import StoreStats

if TYPE_CHECKING:
    from tether.identity import Principal, TokenInfo

DEFAULT_DB = "tether.db"
DB_ENV = "TETHER_DB"


class Journal(Protocol):
    # (schema version found, schema version now): what opening this journal upgraded.
    migrated: tuple[int, int]
    # Commits, the transactions that carried them, and how many of those were synced.
    stats: StoreStats

    async def create_run(
        self, run: RunRecord, entries: list[NewEntry], *, lease_seconds: float | None = None
    ) -> list[Entry]:
        """Record a new run and its first entries. With `lease_seconds`, a run created leased
        (`lease_owner` set) is leased that long from the store's clock; without, the record's
        `lease_expires_at` is stored as given."""
        ...

    async def commit(self, commit: Commit) -> list[Entry]:
        """Apply the commit whole or not at all: fenced by the run's lease, refused if the run
        moved past `expected_seq`, a ticket used only if approved for `args_hash`, of this run
        and unexpired (`TicketExpired` otherwise); with `durable`, synced before it returns;
        with `release`, the lease is given up in the same transaction."""
        ...

    async def wait_for_room(self) -> None:
        """Return once the store can take another commit without its queue growing past a
        transaction's worth (backpressure: a run waits here before preparing its commit)."""
        ...

    async def get_run(self, run_id: str) -> RunRecord: ...

    async def list_runs(
        self, status: str | None = None, limit: int = 100, *, workflow: str | None = None
    ) -> list[RunRecord]: ...

    async def read_entries(
        self, run_id: str, after_seq: int = 0, *, kinds: Collection[str] | None = None
    ) -> list[Entry]:
        """A run's entries after `after_seq` in order; only those of `kinds` if given."""
        ...

    async def read_last_entries(self, run_id: str, count: int = 1) -> list[Entry]:
        """A run's last `count` entries, in order (the newest last)."""
        ...

    async def read_exchanges(self, run_id: str) -> list[ModelExchange]:
        """A run's model exchanges in order (those not pruned)."""
        ...

    async def prune_exchanges(self, before: float) -> int:
        """Delete model exchanges recorded before `before`; return how many. Entries,
        which hold every decision and the usage of every call, are never touched."""
        ...

    async def put_definitions(self, definitions: Collection[Definition]) -> None:
        """Keep workflow and policy definitions by hash (those already kept are left as
        they are: a hash names one text)."""
        ...

    async def get_definition(self, hash: str) -> Definition | None:
        """The definition kept under `hash`, or None. An edited row (its body no longer
        hashing to its key) raises `JournalError`: it is never returned."""
        ...

    async def get_ticket(self, ticket_id: str) -> Ticket: ...

    async def list_tickets(self, status: str | None = "pending") -> list[Ticket]: ...

    async def decide_ticket(
        self,
        ticket_id: str,
        *,
        approve: bool,
        by: Principal | str,
        reason: str = "",
        answer: str | None = None,
        edited: tuple[dict[str, Any], str] | None = None,
        now: float | None = None,
    ) -> Ticket:
        """Decide a pending ticket as principal `by`, before its expiry by the store's clock
        (`TicketExpired` after it), enforcing its rule's separation of duties; `edited` binds
        it to (arguments, hash) an approver set. Callers decide through `Runtime.decide`,
        which authorizes `by` and checks edited arguments; a string `by` (code that opens the
        journal itself) is recorded as `Principal.legacy(by)`, a local admin. `now` is ignored."""
        ...

    async def expire_ticket(self, ticket_id: str, now: float | None = None) -> Ticket:
        """Mark the ticket expired if, by the store's clock, it expired unused (pending, or
        approved too late); return it. `now` is ignored."""
        ...

    async def page_runs(
        self,
        *,
        status: str | None = None,
        workflow: str | None = None,
        workflows: Collection[str] | None = None,
        owner: str | None = None,
        since: float | None = None,
        until: float | None = None,
        after: tuple[float, str] | None = None,
        limit: int = 50,
    ) -> list[RunRecord]:
        """Runs newest first, filtered (created in [since, until)); `after` is the
        (created_at, run_id) of the previous page's last run (keyset pagination)."""
        ...

    async def get_runs(self, run_ids: Collection[str]) -> dict[str, RunRecord]:
        """Several runs by id in one query, without their input, data and facts (listings)."""
        ...

    async def last_seqs(self, run_ids: Collection[str]) -> dict[str, tuple[int, str]]:
        """Each run's (last entry number, status), in one query."""
        ...

    # -- tokens (tether.identity): stored as hashes, times by the store's clock ------------

    async def insert_token(self, info: TokenInfo, token_hash: str, expires_in: float | None) -> TokenInfo: ...

    async def find_token(self, token_hash: str) -> tuple[TokenInfo, float] | None:
        """The token with this hash, and the store's now (to judge its expiry)."""
        ...

    async def list_tokens(self) -> list[TokenInfo]: ...

    async def revoke_token(self, token_id: str, by: str) -> TokenInfo: ...

    # -- leases: which worker drives a run, until when (the store's clock) --------------

    async def due_tickets(self, limit: int = 100) -> list[str]:
        """Pending tickets past their deadline by the store's clock (the expiry sweeper's)."""
        ...

    async def sweep_ticket(
        self,
        ticket_id: str,
        consequence: Callable[[Ticket, RunRecord, float], tuple[list[NewEntry], RunUpdate | None]],
    ) -> Ticket | None:
        """Expire a due ticket with what `consequence` appends to its run, in one transaction."""
        ...

    async def list_actionable(self, *, owner: str | None = None, limit: int = 100) -> list[RunRecord]:
        """Runs waiting for a person: escalated, effect in doubt, or stuck."""
        ...

    async def acquire(
        self, run_id: str, worker_id: str, *, lease_seconds: float, now: float | None = None
    ) -> RunRecord:
        """Lease this run to `worker_id` (renewed if it already holds it); LeaseHeld if
        another worker holds a live lease."""
        ...

    async def claim(
        self,
        worker_id: str,
        *,
        lease_seconds: float,
        now: float | None = None,
        limits: Mapping[str, int] | None = None,
        skip_runs: Collection[str] = (),
    ) -> RunRecord | None:
        """Lease the oldest runnable run to `worker_id` and return it, already leased (no
        `acquire` needed), or None if there is none.

        Runnable: no live lease, a workflow a worker can load (not one built in code by the
        process driving it), and queued or running, or paused on a ticket that was decided
        or has expired. `limits` caps, per workflow name, how many of its runs may be leased
        at once; `skip_runs` are passed over (runs this worker found it cannot drive). No
        two claimers ever get the same run.
        """
        ...

    async def heartbeat(
        self, run_id: str, worker_id: str, *, lease_seconds: float, now: float | None = None
    ) -> bool:
        """Renew the lease if `worker_id` still holds it; False if it was lost."""
        ...

    async def renew_leases(self, worker_id: str, *, lease_seconds: float) -> set[str]:
        """Renew every lease `worker_id` holds in one statement; return the runs it holds."""
        ...

    async def release(self, run_id: str, worker_id: str) -> None:
        """Give the lease up (if `worker_id` holds it): the run is claimable at once."""
        ...

    async def prepare_to_wait(self) -> None:
        """Start listening for `wait_for_work`'s wake-ups now (PostgreSQL: LISTEN), so that
        one sent after the caller's next look is not missed."""
        ...

    async def wait_for_work(self, timeout: float) -> None:
        """Return when work may have appeared (a queued run, a decided ticket, a released
        run), or after `timeout` seconds; may return early."""
        ...

    async def now(self) -> float:
        """The store's clock (seconds since the epoch): the decision time conditions read as
        `now`, never the caller's."""

    # -- audit: the chain is the truth (tether.journal.integrity, tether.audit) ----------

    # What was wrong with the append-only triggers when the journal was opened; while this is
    # not empty nothing is written (JournalTampered).
    trigger_problems: list[Finding]
    # Signs a checkpoint after each decision (tether.audit.Auditor): set by `open_journal`
    # from $TETHER_AUDIT_KEY, or by the caller.
    auditor: Any

    async def check_triggers(self) -> list[Finding]:
        """The append-only triggers as the database has them now."""
        ...

    async def restore_triggers(self) -> list[Finding]:
        """Make the append-only triggers again; return what was wrong before."""
        ...

    async def add_checkpoint(
        self,
        kind: str,
        run_id: str | None,
        seq: int | None,
        hash_: str | None,
        body: str,
        key_id: str,
        signature: str,
    ) -> None:
        """Store a signed checkpoint (append-only)."""
        ...

    async def read_checkpoints(
        self, run_id: str | None = None, *, kind: str | None = None
    ) -> list[tuple[Any, ...]]:
        """Stored checkpoints, oldest first."""
        ...

    async def run_tickets(self, run_id: str) -> list[Ticket]:
        """Every ticket row of a run."""
        ...

    async def run_heads(self) -> list[tuple[str, int, str]]:
        """Every run's head as its chain has it: (run_id, seq, hash)."""
        ...

    async def run_ids(self) -> list[str]:
        """Every run's id, in the rows and in the chains."""
        ...

    def close(self) -> None: ...

    async def aclose(self) -> None: ...

    async def __aenter__(self) -> Self: ...

    async def __aexit__(self, *exc_info: object) -> None: ...


def open_journal(
    target: str | None = None,
    *,
    durability: str = "normal",
    migrate: bool = True,
    pool_size: int | None = None,
) -> Journal:
    """Open the store named by `target`, `$TETHER_DB`, or `./tether.db` by default.

    `migrate=True` upgrades an older schema on opening; with False an older schema is
    refused (`tether db upgrade` does it explicitly). A newer schema is always refused.
    `pool_size` is PostgreSQL's connection-pool size (also `?pool_size=N` in the URL).
    With `$TETHER_AUDIT_KEY` set, every decision recorded through it is signed
    (`tether.audit`), and runtimes over it sign each run's head when the run stops.
    """
    journal = _open(target, durability=durability, migrate=migrate, pool_size=pool_size)
    from tether.audit import Auditor  # signing is optional: imported when the journal opens

    try:
        journal.auditor = Auditor.from_env()
    except BaseException:
        journal.close()
        raise
    return journal


def _open(target: str | None, *, durability: str, migrate: bool, pool_size: int | None) -> Journal:
    target = target or os.environ.get(DB_ENV) or DEFAULT_DB
    scheme = target.split("://", 1)[0] if "://" in target else ""
    if scheme in ("postgresql", "postgres"):
        try:
            from tether.journal.postgres import PostgresJournal
        except ImportError as exc:
            raise JournalError(
                f"a PostgreSQL journal needs psycopg 3 and psycopg-pool ({exc}): "
                "pip install 'tether[postgres]'"
            ) from None
        return PostgresJournal(target, durability=durability, migrate=migrate, pool_size=pool_size)
    if scheme == "sqlite":
        # sqlite:///relative/path and sqlite:////absolute/path, as SQLAlchemy spells them.
        target = target.removeprefix("sqlite://").removeprefix("/") or DEFAULT_DB
    elif scheme:
        raise JournalError(f"unsupported journal URL scheme {scheme!r} (supported: sqlite://, postgresql://)")
    from tether.journal.sqlite import SQLiteJournal

    return SQLiteJournal(Path(target), durability=durability, migrate=migrate)


def upgrade_journal(target: str | None = None) -> tuple[int, int]:
    """Bring a journal's schema to this tether's version; return (from, to)."""
    journal = open_journal(target, migrate=True)
    try:
        return journal.migrated
    finally:
        journal.close()


__all__ = [
    "DB_ENV",
    "DEFAULT_DB",
    "FINISHED",
    "Commit",
    "Definition",
    "Entry",
    "Journal",
    "LeaseHeld",
    "ModelExchange",
    "NewEntry",
    "RunRecord",
    "RunStatus",
    "RunUpdate",
    "StoreStats",
    "Ticket",
    "TicketExpired",
    "open_journal",
    "upgrade_journal",
    "verify_chain",
]
