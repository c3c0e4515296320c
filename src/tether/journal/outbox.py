"""Webhooks and their outbox: what the journal keeps so that every ticket event is notified
exactly once per webhook, never lost and never invented.

A webhook (table `webhooks`) is a URL, the ticket events it subscribes to, a body format,
the name of the environment variable holding its signing secret (the secret itself is never
stored) and the base URL its links point at. When a ticket opens, is decided or expires,
the transaction that changes the ticket also writes one outbox row (table `webhook_outbox`)
per live webhook subscribed to that event: a ticket change that commits has its
notifications, one rolled back has none. The dispatcher (`tether/webhooks.py`, which holds
the HTTP) claims due rows with a lease, POSTs them, and settles each: delivered, retried
later, or failed. A row's `message_id` is the `webhook-id` header of every attempt, so a
receiver that remembers the ids it processed sees each event once, even when a dispatcher
died after sending and the row was sent again.

The SQL is the store's shared dialect (`?`, `{now}`, `{gated}`; see `journal/common.py`).
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from tether.errors import JournalError
from tether.journal.common import GATED, NOW, TICKET_SELECT, decode_ticket, placeholders
from tether.journal.records import Ticket

if TYPE_CHECKING:
    from tether.journal.store import Dialect, Tx

EventName = Literal["ticket.opened", "ticket.decided", "ticket.expired"]
EVENTS: tuple[EventName, ...] = ("ticket.opened", "ticket.decided", "ticket.expired")
FORMATS = ("standard", "slack")
DeliveryStatus = Literal["pending", "delivered", "failed"]
DELIVERY_STATUSES: tuple[DeliveryStatus, ...] = ("pending", "delivered", "failed")

WEBHOOK_COLUMNS = (
    "webhook_id",
    "url",
    "events",
    "format",
    "secret_env",
    "base_url",
    "created_at",
    "removed_at",
)
OUTBOX_COLUMNS = (
    "message_id",
    "webhook_id",
    "event",
    "ticket_id",
    "run_id",
    "ticket_status",
    "created_at",
    "status",
    "attempts",
    "next_attempt_at",
    "last_attempt_at",
    "last_status",
    "last_error",
    "delivered_at",
    "lease_owner",
    "lease_expires_at",
)
_DELIVERY_SELECT = (
    f"SELECT {', '.join('o.' + c for c in OUTBOX_COLUMNS)}, w.url, w.format, w.secret_env, w.base_url "
    "FROM webhook_outbox o JOIN webhooks w ON w.webhook_id = o.webhook_id"
)


def _enqueue_sql(*, gated: bool) -> str:
    """One outbox row per live webhook subscribed to the event (`events` is stored as
    `,a,b,`, matched with `%,event,%`). Gated: a write of a commit, applied only if the
    commit's gate passed."""
    return (
        "INSERT INTO webhook_outbox (message_id, webhook_id, event, ticket_id, run_id, ticket_status, "
        "created_at, status, attempts, next_attempt_at) "
        f"SELECT CAST(? AS TEXT) || w.webhook_id, w.webhook_id, ?, ?, ?, ?, {NOW}, 'pending', 0, {NOW} "
        "FROM webhooks w WHERE w.removed_at IS NULL AND w.events LIKE ?" + (f" AND {GATED}" if gated else "")
    )


ENQUEUE_GATED = _enqueue_sql(gated=True)
_ENQUEUE = _enqueue_sql(gated=False)


def event_row(event: EventName, ticket_id: str, run_id: str, ticket_status: str) -> tuple[Any, ...]:
    """The parameters of one event's enqueue. The message id is the ticket, the event and
    the webhook (`T.opened.wh_x`): a ticket opens, is decided and expires at most once."""
    suffix = event.removeprefix("ticket.")
    return (f"{ticket_id}.{suffix}.", event, ticket_id, run_id, ticket_status, f"%,{event},%")


@dataclass(frozen=True)
class Webhook:
    webhook_id: str
    url: str
    events: tuple[str, ...]
    format: str
    secret_env: str | None
    base_url: str
    created_at: float
    removed_at: float | None = None


@dataclass(frozen=True)
class Delivery:
    """One event for one webhook, with the webhook's address and how to sign and shape it."""

    message_id: str
    webhook_id: str
    event: str
    ticket_id: str
    run_id: str
    ticket_status: str
    created_at: float
    status: DeliveryStatus
    attempts: int
    next_attempt_at: float
    last_attempt_at: float | None
    last_status: int | None
    last_error: str | None
    delivered_at: float | None
    lease_owner: str | None
    lease_expires_at: float | None
    url: str
    format: str
    secret_env: str | None
    base_url: str


@dataclass(frozen=True)
class DueDelivery:
    """A claimed delivery with what its payload tells: the ticket, the run's workflow."""

    delivery: Delivery
    ticket: Ticket
    workflow: str
    workflow_version: str
    state: str


def _webhook(row: Sequence[Any]) -> Webhook:
    values = dict(zip(WEBHOOK_COLUMNS, row, strict=True))
    values["events"] = tuple(e for e in values["events"].split(",") if e)
    return Webhook(**values)


def _delivery(row: Sequence[Any]) -> Delivery:
    return Delivery(*row)


class OutboxStore:
    """The journal's webhooks and outbox; mixed into `SQLStore` (which owns `_d`)."""

    _d: Dialect

    async def _enqueue_events(
        self, tx: Tx, event: EventName, ticket_id: str, run_id: str, status: str
    ) -> None:
        """Inside the transaction that changes the ticket: its notifications, one per webhook."""
        await tx.execute(_ENQUEUE, event_row(event, ticket_id, run_id, status))

    # -- webhooks --------------------------------------------------------------------

    async def add_webhook(
        self, url: str, *, events: Sequence[str], format: str, secret_env: str | None, base_url: str
    ) -> Webhook:
        """Record a webhook (the caller checked its values: `tether/webhooks.py`)."""
        unknown = [e for e in events if e not in EVENTS]
        if unknown or not events:
            raise JournalError(f"webhook events must be some of {', '.join(EVENTS)}, not {list(events)}")
        if format not in FORMATS:
            raise JournalError(f"webhook format must be one of {', '.join(FORMATS)}, not {format!r}")
        webhook_id = "wh_" + secrets.token_hex(6)
        _, rows = await self._d.write(
            "INSERT INTO webhooks (webhook_id, url, events, format, secret_env, base_url, created_at) "
            f"VALUES (?, ?, ?, ?, ?, ?, {NOW}) RETURNING {', '.join(WEBHOOK_COLUMNS)}",
            (webhook_id, url, "," + ",".join(dict.fromkeys(events)) + ",", format, secret_env, base_url),
        )
        return _webhook(rows[0])

    async def list_webhooks(self, *, removed: bool = False) -> list[Webhook]:
        where = "" if removed else " WHERE removed_at IS NULL"
        rows = await self._d.read(
            f"SELECT {', '.join(WEBHOOK_COLUMNS)} FROM webhooks{where} ORDER BY created_at, webhook_id"
        )
        return [_webhook(r) for r in rows]

    async def remove_webhook(self, webhook_id: str) -> int:
        """Stop notifying the webhook: no new rows; its pending deliveries fail (the record
        of what was delivered stays). Returns how many pending deliveries were dropped."""
        async with self._d.transaction() as tx:
            removed = await tx.execute(
                f"UPDATE webhooks SET removed_at = {NOW} WHERE webhook_id = ? AND removed_at IS NULL",
                (webhook_id,),
            )
            if not removed:
                raise JournalError(f"no webhook {webhook_id!r} in {self._d.where} (or it was removed)")
            return await tx.execute(
                "UPDATE webhook_outbox SET status = 'failed', last_error = 'webhook removed', "
                "lease_owner = NULL, lease_expires_at = NULL WHERE webhook_id = ? AND status = 'pending'",
                (webhook_id,),
            )

    # -- deliveries ------------------------------------------------------------------

    async def list_deliveries(self, *, status: str | None = None, limit: int = 100) -> list[Delivery]:
        """The newest deliveries first (only those of `status` if given)."""
        where, params = (" WHERE o.status = ?", [status]) if status else ("", [])
        rows = await self._d.read(
            f"{_DELIVERY_SELECT}{where} ORDER BY o.created_at DESC, o.message_id LIMIT ?", (*params, limit)
        )
        return [_delivery(r) for r in rows]

    async def deliveries_due(self) -> bool:
        """Whether a delivery is due now (a read: an idle dispatcher takes no write lock)."""
        rows = await self._d.read(
            f"SELECT 1 FROM webhook_outbox WHERE status = 'pending' AND next_attempt_at <= {NOW} "
            f"AND (lease_owner IS NULL OR lease_expires_at <= {NOW}) LIMIT 1"
        )
        return bool(rows)

    async def claim_deliveries(self, owner: str, *, limit: int, lease_seconds: float) -> list[DueDelivery]:
        """Lease up to `limit` due deliveries to `owner`, soonest first, counting the attempt;
        no two claimers get the same row while its lease lives (PostgreSQL: SKIP LOCKED)."""
        async with self._d.transaction() as tx:
            # The dialect's SKIP LOCKED clause names the claimed table `r`.
            ids = await tx.fetch(
                "UPDATE webhook_outbox SET lease_owner = ?, "
                f"lease_expires_at = {NOW} + ?, attempts = attempts + 1, last_attempt_at = {NOW} "
                "WHERE message_id IN (SELECT r.message_id FROM webhook_outbox r "
                f"WHERE r.status = 'pending' AND r.next_attempt_at <= {NOW} "
                f"AND (r.lease_owner IS NULL OR r.lease_expires_at <= {NOW}) "
                f"ORDER BY r.next_attempt_at LIMIT ?{self._d.skip_locked}) RETURNING message_id",
                (owner, lease_seconds, limit),
            )
            if not ids:
                return []
            keys = [i for (i,) in ids]
            rows = await tx.fetch(
                f"{_DELIVERY_SELECT} WHERE o.message_id IN ({placeholders(len(keys))}) "
                "ORDER BY o.next_attempt_at, o.message_id",
                keys,
            )
            deliveries = [_delivery(r) for r in rows]
            ticket_ids = sorted({d.ticket_id for d in deliveries})
            tickets = {
                t.ticket_id: t
                for t in map(
                    decode_ticket,
                    await tx.fetch(
                        f"{TICKET_SELECT} WHERE ticket_id IN ({placeholders(len(ticket_ids))})", ticket_ids
                    ),
                )
            }
            run_ids = sorted({d.run_id for d in deliveries})
            runs = {
                r[0]: r[1:]
                for r in await tx.fetch(
                    "SELECT run_id, workflow_name, workflow_version, state FROM runs "
                    f"WHERE run_id IN ({placeholders(len(run_ids))})",
                    run_ids,
                )
            }
        return [
            DueDelivery(d, tickets[d.ticket_id], *runs[d.run_id])
            for d in deliveries
            if d.ticket_id in tickets and d.run_id in runs
        ]

    async def settle_delivery(
        self,
        message_id: str,
        owner: str,
        *,
        outcome: Literal["delivered", "retry", "failed"],
        http_status: int | None,
        error: str | None,
        retry_in: float = 0.0,
    ) -> bool:
        """Record an attempt's outcome, if `owner` still holds the row's lease (else another
        dispatcher took it over and this outcome is not recorded). Returns whether it was."""
        sets = ["last_status = ?", "last_error = ?", "lease_owner = NULL", "lease_expires_at = NULL"]
        params: list[Any] = [http_status, error]
        if outcome == "delivered":
            sets += ["status = 'delivered'", f"delivered_at = {NOW}"]
        elif outcome == "failed":
            sets.append("status = 'failed'")
        else:
            sets.append(f"next_attempt_at = {NOW} + ?")
            params.append(retry_in)
        changed, _ = await self._d.write(
            f"UPDATE webhook_outbox SET {', '.join(sets)} "
            "WHERE message_id = ? AND lease_owner = ? AND status = 'pending'",
            (*params, message_id, owner),
        )
        return changed == 1
