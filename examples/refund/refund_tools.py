"""Tools and the intake step of the refund example.

Orders come from `orders.json` beside this file. Refunds are written to a small SQLite
ledger (`$REFUND_LEDGER`, default `refund_ledger.sqlite` in the working directory); the
verifier re-reads the ledger instead of trusting what `issue_refund` returned.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from tether import Evidence, Next, ToolContext, tool

ORDERS = json.loads((Path(__file__).parent / "orders.json").read_text())


def _ledger() -> sqlite3.Connection:
    db = sqlite3.connect(os.environ.get("REFUND_LEDGER", "refund_ledger.sqlite"))
    db.execute(
        "CREATE TABLE IF NOT EXISTS refunds (idempotency_key TEXT PRIMARY KEY, "
        "order_id TEXT NOT NULL, amount REAL NOT NULL, reason TEXT NOT NULL)"
    )
    db.execute(
        "CREATE TABLE IF NOT EXISTS voids (idempotency_key TEXT PRIMARY KEY, "
        "order_id TEXT NOT NULL, amount REAL NOT NULL)"
    )
    return db


def intake(data: dict[str, Any]) -> Next:
    """Deterministic: check the request names a known order before any agent sees it."""
    order_id = str(data.get("order_id", "")).strip().upper()
    if order_id not in ORDERS:
        return Next("rejected", update={"rejection": f"unknown order {order_id or '(none)'}"})
    return Next("resolve", update={"order_id": order_id, "reason": str(data.get("reason", "not given"))})


def order_found(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """Establish the order's total as a fact for the policy, from the order book itself."""
    order = ORDERS.get(args["order_id"])
    if order is None:
        return Evidence(ok=False, detail={"missing": args["order_id"]})
    return Evidence(
        detail={"order_id": args["order_id"]},
        facts={"order_id": args["order_id"], "order_total": order["total"]},
    )


@tool(effect="read", verify=order_found)
def lookup_order(order_id: str) -> dict[str, Any]:
    """Look up an order: its customer, items and total paid."""
    order = ORDERS.get(order_id)
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


def void_recorded(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """Re-read the ledger: the void must be there, once, for the amount refunded."""
    with _ledger() as db:
        rows = db.execute(
            "SELECT amount FROM voids WHERE idempotency_key = ?", (ctx.idempotency_key,)
        ).fetchall()
    if len(rows) != 1 or abs(rows[0][0] - args["amount"]) > 1e-9:
        return Evidence(ok=False, detail={"ledger_rows": rows})
    return Evidence(detail={"voided": rows[0][0]})


@tool(effect="write", idempotent=True, verify=void_recorded)
def void_refund(order_id: str, amount: float, ctx: ToolContext) -> dict[str, Any]:
    """Void a refund of an order (the compensation of `issue_refund`: a rollback runs it)."""
    with _ledger() as db:
        db.execute("INSERT OR IGNORE INTO voids VALUES (?, ?, ?)", (ctx.idempotency_key, order_id, amount))
    return {"voided": amount, "order_id": order_id}
