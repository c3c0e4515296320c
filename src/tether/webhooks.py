"""Webhook delivery: the dispatcher that empties the journal's outbox over HTTP.

Every ticket event (`ticket.opened`, `ticket.decided`, `ticket.expired`) is written to the
outbox in the transaction that changes the ticket (`journal/outbox.py`). `deliver_due`
claims the rows that are due (leased, so concurrent dispatchers in several workers never
send a row at the same time), POSTs each, and records the outcome: delivered on a 2xx;
otherwise retried after an exponential backoff with jitter, until `max_attempts`, then
failed. Workers run it in a loop (`dispatch_forever`); `tether serve` runs the same loop;
`tether webhooks deliver` runs one pass.

Signing follows Standard Webhooks (https://www.standardwebhooks.com/), through its official
Python package: headers `webhook-id` (the outbox row's id: the same on every attempt, so a
receiver deduplicates on it), `webhook-timestamp` (this attempt's, in seconds) and
`webhook-signature: v1,<base64 HMAC-SHA256 of "id.timestamp.body">` with the secret given as
`whsec_<base64>`. The secret is read at delivery time from the environment variable the
webhook names; it is never stored in the journal. A webhook whose secret is missing or
malformed is not called unsigned: the attempt fails with that reason.

A `standard` body is `{"type", "timestamp", "data": {"ticket", "run", "link"}}`; a `slack`
body is `{"text": ...}` for a Slack incoming webhook. Neither carries the ticket's arguments
or a question's answer: the link leads to the inbox, where a signed-in person sees them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import os
import random
import re
import secrets
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Literal
from urllib.parse import urlsplit

from tether import __version__
from tether.errors import TetherError
from tether.journal.common import when
from tether.journal.outbox import EVENTS, FORMATS, DueDelivery, OutboxStore

if TYPE_CHECKING:  # imported where a POST is made: every command imports this module
    import httpx

log = logging.getLogger("tether.webhooks")

SECRET_PREFIX = "whsec_"
# Standard Webhooks: secrets of 24 to 64 random bytes.
SECRET_BYTES = (24, 64)
BASE_URL_ENV = "TETHER_BASE_URL"
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


class WebhookError(TetherError):
    """A webhook's configuration is refused; the message names what is wrong."""


@dataclass(frozen=True)
class DispatchSettings:
    """How deliveries are attempted. The defaults: 12 attempts, 5 s, 10 s, 20 s … apart,
    doubling up to an hour, less up to half of each (jitter): 1.2 to 2.4 hours in all."""

    max_attempts: int = 12
    base_delay: float = 5.0
    max_delay: float = 3600.0
    timeout: float = 10.0  # seconds for one POST, start to end
    batch: int = 50  # rows claimed at once
    # Connections open at once per dispatcher: httpx's pool spends more time arranging 50
    # concurrent requests than sending them (bench/webhooks.py: 51/s with 100, 175/s with 4).
    connections: int = 8

    @property
    def lease_seconds(self) -> float:
        """How long a claimed row stays with its dispatcher: one POST's timeout, and time to
        record its outcome. A dispatcher that dies leaves its rows to others after this."""
        return self.timeout + 5.0


@dataclass
class DeliveryReport:
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def outbox_of(journal: object) -> OutboxStore:
    """The journal's webhooks and outbox (every SQL store has them)."""
    if not isinstance(journal, OutboxStore):
        raise WebhookError(f"{type(journal).__name__} keeps no webhooks: open a SQLite or PostgreSQL journal")
    return journal


# -- configuration ---------------------------------------------------------------------


def generate_secret() -> str:
    """A new signing secret: `whsec_` and 32 random bytes in base64."""
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


def parse_secret(value: str, name: str = "the secret") -> bytes:
    """The key of a `whsec_<base64>` secret, refused unless well formed and 24–64 bytes."""
    if not value.startswith(SECRET_PREFIX):
        raise WebhookError(f"{name} must start with {SECRET_PREFIX!r} (make one: tether webhooks new-secret)")
    try:
        key = base64.b64decode(value[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise WebhookError(f"{name} is not {SECRET_PREFIX}<base64>: its base64 does not decode") from None
    low, high = SECRET_BYTES
    if not low <= len(key) <= high:
        raise WebhookError(f"{name} decodes to {len(key)} bytes; a signing secret has {low} to {high}")
    return key


def check_url(url: str, what: str) -> str:
    """An absolute http(s) URL, without its trailing slash."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookError(f"{what} must be an absolute http:// or https:// URL, not {url!r}")
    return url.rstrip("/")


def check_events(events: Sequence[str]) -> list[str]:
    unknown = [e for e in events if e not in EVENTS]
    if unknown or not events:
        raise WebhookError(f"events must be some of {', '.join(EVENTS)}; not {', '.join(unknown) or 'none'}")
    return list(dict.fromkeys(events))


def check_secret_env(name: str | None, format: str) -> str | None:
    if format not in FORMATS:
        raise WebhookError(f"format must be one of {', '.join(FORMATS)}, not {format!r}")
    if name is None:
        if format == "standard":
            raise WebhookError(
                "a standard webhook is signed: give --secret-env NAME, the environment variable that "
                "holds its whsec_ secret in the processes that deliver (workers, tether serve)"
            )
        return None
    if not _ENV_NAME.fullmatch(name):
        raise WebhookError(f"--secret-env takes an environment variable's name, not {name!r}")
    if name in os.environ:  # checked here too when this shell has it; delivery checks it always
        parse_secret(os.environ[name], f"${name}")
    return name


# -- bodies and signatures --------------------------------------------------------------


def _iso(t: float | None) -> str | None:
    if t is None:
        return None
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def link(due: DueDelivery) -> str:
    return f"{due.delivery.base_url}/inbox/{due.ticket.ticket_id}"


def standard_body(due: DueDelivery) -> dict[str, Any]:
    """The event as Standard Webhooks suggests (type, timestamp, data): the ticket as it was at
    the event, without its arguments or answer (the link leads to them)."""
    d, t = due.delivery, due.ticket
    decided = d.event == "ticket.decided" or (d.event == "ticket.expired" and t.decided_by is not None)
    ticket: dict[str, Any] = {
        "id": t.ticket_id,
        "kind": t.kind,
        "status": d.ticket_status,
        "subject": t.subject,
        "approver": t.approver,
        "step_id": t.step_id,
        "args_hash": t.args_hash,
        "created_at": _iso(t.created_at),
        "expires_at": _iso(t.expires_at),
    }
    if t.question is not None:
        ticket["question"] = t.question
    if decided:
        ticket |= {"decided_by": t.decided_by, "decided_at": _iso(t.decided_at), "reason": t.reason or ""}
    return {
        "type": d.event,
        "timestamp": _iso(d.created_at),
        "data": {
            "ticket": ticket,
            "run": {
                "id": d.run_id,
                "workflow": due.workflow,
                "workflow_version": due.workflow_version,
                "state": due.state,
            },
            "link": link(due),
        },
    }


def _slack_escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def slack_body(due: DueDelivery) -> dict[str, Any]:
    """A Slack incoming-webhook message: one line of text with a link to the inbox."""
    d, t = due.delivery, due.ticket
    e = _slack_escape
    what = f"question {e(t.question or t.subject)}" if t.kind == "question" else f"approval of {e(t.subject)}"
    upper = what[:1].upper() + what[1:]  # not str.capitalize, which lowercases the question
    where = f"run {e(d.run_id)} ({e(due.workflow)}, state {e(due.state)})"
    if d.event == "ticket.opened":
        head = f"New {what} for {e(t.approver)}: {where}; decide before {when(t.expires_at)}"
    elif d.event == "ticket.decided":
        reason = f": {e(t.reason)}" if t.reason else ""
        head = f"{upper} {e(d.ticket_status)} by {e(t.decided_by or '?')}{reason} — {where}"
    else:
        head = f"{upper} expired ({e(t.ticket_id)}) — {where}"
    return {"text": f"{head}. <{link(due)}|Open {e(t.ticket_id)} in the tether inbox>"}


def body_of(due: DueDelivery) -> str:
    shaped = slack_body(due) if due.delivery.format == "slack" else standard_body(due)
    return json.dumps(shaped, separators=(",", ":"), ensure_ascii=False)


def signature_headers(secret: str, message_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The Standard Webhooks headers of one attempt."""
    from standardwebhooks.webhooks import Webhook as Signer

    key = parse_secret(secret)
    signature = Signer(key).sign(message_id, datetime.fromtimestamp(timestamp, UTC), body)
    return {"webhook-id": message_id, "webhook-timestamp": str(timestamp), "webhook-signature": signature}


def backoff(attempts: int, settings: DispatchSettings, rng: Callable[[], float] = random.random) -> float:
    """Seconds before the next attempt after `attempts` failed ones: doubling from the base
    delay up to the cap, then a random half of it taken off (jitter: retries of many rows
    that failed together do not all come back at once)."""
    delay = min(settings.max_delay, settings.base_delay * 2.0 ** max(0, attempts - 1))
    return delay / 2 + rng() * delay / 2


# -- delivery --------------------------------------------------------------------------


def http_client(settings: DispatchSettings) -> httpx.AsyncClient:
    """The client a dispatcher POSTs with: no redirects followed (a 3xx is a failure, never a
    POST elsewhere), `settings.connections` at most."""
    import httpx

    limits = httpx.Limits(max_connections=settings.connections)
    return httpx.AsyncClient(timeout=settings.timeout, follow_redirects=False, limits=limits)


def dispatcher_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:webhooks:{secrets.token_hex(3)}"


async def deliver_due(
    store: OutboxStore,
    *,
    owner: str | None = None,
    client: httpx.AsyncClient | None = None,
    settings: DispatchSettings | None = None,
    rng: Callable[[], float] = random.random,
) -> DeliveryReport:
    """Claim the deliveries due now (up to `settings.batch`), POST them concurrently and
    record each outcome. Returns what happened; a journal error propagates."""
    settings = settings or DispatchSettings()
    owner = owner or dispatcher_id()
    report = DeliveryReport()
    claimed = await store.claim_deliveries(owner, limit=settings.batch, lease_seconds=settings.lease_seconds)
    report.claimed = len(claimed)
    if not claimed:
        return report
    own_client = client is None
    http = client or http_client(settings)
    try:
        await asyncio.gather(*(_attempt(store, owner, http, due, settings, rng, report) for due in claimed))
    finally:
        if own_client:
            await http.aclose()
    return report


async def _attempt(
    store: OutboxStore,
    owner: str,
    http: httpx.AsyncClient,
    due: DueDelivery,
    settings: DispatchSettings,
    rng: Callable[[], float],
    report: DeliveryReport,
) -> None:
    import httpx

    d = due.delivery
    status: int | None = None
    try:
        body = body_of(due)
        headers = {"content-type": "application/json", "user-agent": f"tether/{__version__}"}
        if d.secret_env is not None:
            secret = os.environ.get(d.secret_env)
            if secret is None:
                raise WebhookError(
                    f"${d.secret_env} (this webhook's secret) is not set where it is delivered"
                )
            headers |= signature_headers(secret, d.message_id, int(datetime.now(UTC).timestamp()), body)
        async with asyncio.timeout(settings.timeout):  # the whole exchange, not each read
            response = await http.post(d.url, content=body.encode(), headers=headers)
        status = response.status_code
        error = None if response.is_success else f"HTTP {status}: {response.text[:200]}"
    except WebhookError as exc:
        error = str(exc)
    except TimeoutError:
        error = f"no response within {settings.timeout:g}s"
    except httpx.HTTPError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if error is None:
        outcome: Literal["delivered", "retry", "failed"] = "delivered"
        report.delivered += 1
    elif d.attempts >= settings.max_attempts:
        outcome = "failed"
        report.failed += 1
    else:
        outcome = "retry"
        report.retried += 1
    if error is not None:
        report.errors.append(f"{d.message_id} → {d.url}: {error}")
        log.warning("webhook %s to %s, attempt %d: %s", d.message_id, d.url, d.attempts, error)
    await store.settle_delivery(
        d.message_id,
        owner,
        outcome=outcome,
        http_status=status,
        error=error,
        retry_in=backoff(d.attempts, settings, rng),
    )


async def dispatch_forever(
    store: OutboxStore,
    stop: asyncio.Event,
    *,
    owner: str | None = None,
    interval: float = 1.0,
    settings: DispatchSettings | None = None,
) -> None:
    """Deliver what is due every `interval` seconds (at once again after a full batch) until
    `stop` is set. An idle pass is one read; a journal error is logged and retried."""
    settings = settings or DispatchSettings()
    owner = owner or dispatcher_id()
    http: httpx.AsyncClient | None = None  # made when there is something to send
    try:
        while not stop.is_set():
            full = False
            try:
                if await store.deliveries_due():
                    if http is None:
                        http = http_client(settings)
                    report = await deliver_due(store, owner=owner, client=http, settings=settings)
                    full = report.claimed >= settings.batch
            except TetherError as exc:
                log.error("webhook delivery: %s", exc)
            if full:
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=interval)
    finally:
        if http is not None:
            await http.aclose()
