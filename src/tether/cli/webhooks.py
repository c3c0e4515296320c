"""`tether webhooks`: the webhooks the journal notifies of ticket events, and their deliveries.

Webhooks are kept in the journal itself (not in a file), so every process that changes a
ticket — a worker, `tether approve`, `tether serve` — writes the same notifications.
"""

from __future__ import annotations

import os
from typing import Annotated

import typer

from tether.cli.common import DbOption, JsonOption, err, fail, open_store, out, print_json, run_command, short
from tether.journal.common import when
from tether.journal.outbox import DELIVERY_STATUSES, EVENTS, Delivery, Webhook
from tether.webhooks import (
    BASE_URL_ENV,
    DeliveryReport,
    WebhookError,
    check_events,
    check_secret_env,
    check_url,
    deliver_due,
    generate_secret,
    outbox_of,
)

app = typer.Typer(no_args_is_help=True)


@app.callback()
def webhooks() -> None:
    """Webhooks called when a ticket opens, is decided or expires (signed per Standard Webhooks)."""


def _webhook_json(w: Webhook) -> dict[str, object]:
    return {
        "webhook_id": w.webhook_id,
        "url": w.url,
        "events": list(w.events),
        "format": w.format,
        "secret_env": w.secret_env,
        "base_url": w.base_url,
        "created_at": when(w.created_at),
        "removed_at": when(w.removed_at) if w.removed_at else None,
    }


@app.command()
def add(
    url: Annotated[str, typer.Argument(help="Where to POST the events (http:// or https://).")],
    events: Annotated[
        str, typer.Option(help=f"Comma-separated events to send: some of {', '.join(EVENTS)}.")
    ] = ",".join(EVENTS),
    format: Annotated[
        str, typer.Option(help="Body: standard (JSON event) or slack (a Slack incoming webhook's {text}).")
    ] = "standard",
    secret_env: Annotated[
        str | None,
        typer.Option(
            help="Environment variable holding the whsec_ signing secret in the delivering processes "
            "(workers, tether serve). Required for the standard format; the secret is never stored."
        ),
    ] = None,
    base_url: Annotated[
        str | None,
        typer.Option(
            envvar=BASE_URL_ENV,
            help="Where people open tether's web interface; links are BASE/inbox/TICKET "
            f"(default ${BASE_URL_ENV}).",
        ),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Notify URL of ticket events, from now on."""
    try:
        target = check_url(url, "the webhook's URL")
        chosen = check_events([e.strip() for e in events.split(",") if e.strip()])
        env = check_secret_env(secret_env, format)
        if base_url is None:
            raise WebhookError(
                f"give --base-url (or ${BASE_URL_ENV}): the address people open tether's inbox at, "
                "for the link in each notification"
            )
        base = check_url(base_url, "--base-url")
    except WebhookError as exc:
        fail(str(exc))

    async def main() -> Webhook:
        async with open_store(db, create=True) as journal:
            return await outbox_of(journal).add_webhook(
                target, events=chosen, format=format, secret_env=env, base_url=base
            )

    webhook = run_command(main)
    if as_json:
        print_json(_webhook_json(webhook))
        return
    out.print(
        f"webhook {webhook.webhook_id}: {webhook.url} gets {', '.join(webhook.events)} ({webhook.format})",
        markup=False,
    )
    if env is not None and env not in os.environ:
        err.print(
            f"note: ${env} is not set in this shell; set it in every process that delivers "
            "(tether worker, tether serve, tether webhooks deliver)",
            markup=False,
        )


@app.command("list")
def list_(
    removed: Annotated[bool, typer.Option("--removed", help="Include removed webhooks.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """The webhooks the journal notifies."""

    async def main() -> list[Webhook]:
        async with open_store(db) as journal:
            return await outbox_of(journal).list_webhooks(removed=removed)

    hooks = run_command(main)
    if as_json:
        print_json([_webhook_json(w) for w in hooks])
        return
    if not hooks:
        out.print("no webhooks (add one: tether webhooks add URL --secret-env NAME --base-url URL)")
    for w in hooks:
        gone = f"  removed {when(w.removed_at)}" if w.removed_at else ""
        secret = f"secret ${w.secret_env}" if w.secret_env else "unsigned"
        out.print(f"{w.webhook_id}  {w.url}  {','.join(w.events)}  {w.format}  {secret}{gone}", markup=False)


@app.command()
def remove(
    webhook_id: Annotated[str, typer.Argument(metavar="WEBHOOK")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Stop notifying a webhook; its pending deliveries are marked failed."""

    async def main() -> int:
        async with open_store(db) as journal:
            return await outbox_of(journal).remove_webhook(webhook_id)

    dropped = run_command(main)
    if as_json:
        print_json({"webhook_id": webhook_id, "removed": True, "pending_dropped": dropped})
        return
    out.print(f"webhook {webhook_id} removed; {dropped} pending delivery(ies) dropped", markup=False)


def _delivery_json(d: Delivery) -> dict[str, object]:
    return {
        "message_id": d.message_id,
        "event": d.event,
        "ticket_id": d.ticket_id,
        "run_id": d.run_id,
        "webhook_id": d.webhook_id,
        "url": d.url,
        "status": d.status,
        "attempts": d.attempts,
        "last_status": d.last_status,
        "last_error": d.last_error,
        "created_at": when(d.created_at),
        "last_attempt_at": when(d.last_attempt_at) if d.last_attempt_at else None,
        "next_attempt_at": when(d.next_attempt_at) if d.status == "pending" else None,
        "delivered_at": when(d.delivered_at) if d.delivered_at else None,
    }


@app.command()
def deliveries(
    status: Annotated[
        str | None, typer.Option(help=f"Only deliveries in this status: {', '.join(DELIVERY_STATUSES)}.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many, newest first.")] = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Notifications sent and to send: event, URL, attempts, last outcome, next attempt."""
    if status is not None and status not in DELIVERY_STATUSES:
        fail(f"--status must be one of {', '.join(DELIVERY_STATUSES)}, not {status!r}")

    async def main() -> list[Delivery]:
        async with open_store(db) as journal:
            return await outbox_of(journal).list_deliveries(status=status, limit=limit)

    rows = run_command(main)
    if as_json:
        print_json([_delivery_json(d) for d in rows])
        return
    if not rows:
        out.print("no deliveries" + (f" {status}" if status else ""))
    for d in rows:
        last = f"HTTP {d.last_status}" if d.last_status else ""
        if d.last_error and not d.last_status:
            last = short(d.last_error, 60)
        after = {
            "pending": f"next {when(d.next_attempt_at)}",
            "delivered": f"at {when(d.delivered_at)}",
            "failed": short(d.last_error or "", 60),
        }[d.status]
        fields = [d.message_id, d.event, d.url, d.status, f"attempts {d.attempts}", last, after]
        out.print("  ".join(f for f in fields if f), markup=False)


@app.command()
def deliver(
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Deliver every notification due now, once (workers and `tether serve` do it continually)."""

    async def main() -> DeliveryReport:
        total = DeliveryReport()
        async with open_store(db) as journal:
            while True:
                report = await deliver_due(outbox_of(journal))
                total.claimed += report.claimed
                total.delivered += report.delivered
                total.retried += report.retried
                total.failed += report.failed
                total.errors += report.errors
                if not report.claimed:
                    return total

    total = run_command(main)
    if as_json:
        print_json(total.__dict__)
        return
    out.print(
        f"{total.delivered} delivered, {total.retried} to retry, {total.failed} failed "
        f"(of {total.claimed} attempted)",
        markup=False,
    )
    for line in total.errors:
        err.print(line, markup=False)


@app.command("new-secret")
def new_secret(as_json: JsonOption = False) -> None:
    """Print a new signing secret (whsec_…): give it to the receiver, and set it in the
    environment variable a webhook's --secret-env names."""
    secret = generate_secret()
    if as_json:
        print_json({"secret": secret})
        return
    out.print(secret, markup=False)


__all__ = ["app"]
