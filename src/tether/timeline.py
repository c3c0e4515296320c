"""A run's journal as a timeline of rows a person (or a program) can read."""

from __future__ import annotations

from typing import Any

from tether.journal import Entry


def timeline(entries: list[Entry]) -> list[dict[str, Any]]:
    """One row per journal entry: proposal → decision and rule → outcome → result."""
    rows = []
    for e in entries:
        body = e.body
        decision = body.get("decision") or {}
        row: dict[str, Any] = {
            "seq": e.seq,
            "kind": e.kind,
            "step_id": e.step_id,
            "state": e.state,
            "proposal": body.get("proposal") if body.get("proposal") is not None else body.get("raw"),
            "decision": decision.get("decision"),
            "rule_id": decision.get("rule_id"),
            "policy_hash": decision.get("policy_hash"),
            "reason_code": body.get("reason_code") or decision.get("reason_code"),
            "reason": decision.get("reason"),
            "outcome": body.get("outcome") or _outcome_of(e),
            "args_hash": body.get("args_hash"),
            "ticket_id": body.get("ticket_id"),
            "result": body.get("result"),
            "source": body.get("source"),
            "verification": body.get("verification"),
            "error": body.get("error"),
            "detail": _detail(e),
        }
        rows.append(row)
    return rows


def _outcome_of(e: Entry) -> str:
    return {
        "run_started": "started",
        "intent": "intent recorded, effect starting",
        "ticket_decided": e.body.get("status", ""),
        "run_finished": e.body.get("status", ""),
        "escalated": "escalated",
        "failed": "failed",
        "effect_in_doubt": "effect_in_doubt",
        "handoff": "handoff",
    }.get(e.kind, e.kind)


def _detail(e: Entry) -> Any:
    body = e.body
    if e.kind == "ticket_decided":
        said = body.get("answer") or body.get("reason")
        return f"{body.get('ticket_id')} by {body.get('by')}" + (f": {said}" if said else "")
    if e.kind in ("escalated", "failed", "effect_in_doubt"):
        return body.get("message")
    if e.kind == "handoff":
        return body.get("handoff")
    if e.kind == "run_started":
        return body.get("workflow")
    if body.get("error"):
        return body["error"]
    if body.get("next"):
        return {"next": body["next"]}
    return body.get("observation", {}).get("reason") if body.get("observation") else None
