"""Tools and the resolver of the refund skill (version 2).

Orders come from `$REFUND_ORDERS` (default: `orders.json` beside this file), read on every
call so a test can change an order between two steps. Refunds go to a SQLite ledger
(`$REFUND_LEDGER`, default `refund_ledger.sqlite` in the working directory); the verifier
re-reads the ledger instead of trusting what `issue_refund` returned.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from tether import Evidence, ToolContext, tool


def _orders() -> dict[str, Any]:
    path = os.environ.get("REFUND_ORDERS") or Path(__file__).with_name("orders.json")
    orders: dict[str, Any] = json.loads(Path(path).read_text())
    return orders


def _ledger() -> sqlite3.Connection:
    db = sqlite3.connect(os.environ.get("REFUND_LEDGER", "refund_ledger.sqlite"))
    db.execute(
        "CREATE TABLE IF NOT EXISTS refunds (idempotency_key TEXT PRIMARY KEY, "
        "order_id TEXT NOT NULL, amount REAL NOT NULL, reason TEXT NOT NULL)"
    )
    return db


def order_status(ctx: ToolContext, order_id: str) -> str:
    """Resolver: an order's status as the order book has it now ("missing" for no order)."""
    order = _orders().get(order_id)
    return str(order["status"]) if order is not None else "missing"


def order_found(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """Establish the order's total as a fact for the policy, from the order book itself."""
    order = _orders().get(args["order_id"])
    if order is None:
        return Evidence(ok=False, detail={"missing": args["order_id"]})
    return Evidence(
        detail={"order_id": args["order_id"]},
        facts={"order_id": args["order_id"], "order_total": order["total"]},
    )


@tool(effect="read", verify=order_found)
def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order: its customer, items, total paid and status."""
    order = _orders().get(order_id)
    if order is None:
        raise LookupError(f"no order {order_id}")
    return {"order_id": order_id, **order}


def refund_recorded(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """Re-read the ledger: the refund must be there, once, for the amount asked."""
    with _ledger() as db:
        rows = db.execute(
            "SELECT amount FROM refunds WHERE idempotency_key = ?", (ctx.idempotency_key,)
        ).fetchall()
    if len(rows) != 1 or abs(rows[0][0] - args["amount"]) > 1e-9:
        return Evidence(ok=False, detail={"ledger_rows": rows})
    return Evidence(detail={"ledger_amount": rows[0][0]}, facts={"refunded": args["amount"]})


@tool(effect="write", idempotent=True, verify=refund_recorded)
def issue_refund(order_id: str, amount: float, reason: str, ctx: ToolContext) -> dict[str, Any]:
    """Refund an amount of an order to the customer's original payment method."""
    with _ledger() as db:
        db.execute(
            "INSERT OR IGNORE INTO refunds VALUES (?, ?, ?, ?)",
            (ctx.idempotency_key, order_id, amount, reason),
        )
    return {"refunded": amount, "order_id": order_id}
