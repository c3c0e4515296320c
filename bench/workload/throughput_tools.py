"""Trivial tools for bench/throughput.py: the runtime's cost, not the tools', is measured."""

from __future__ import annotations

from typing import Any

from tether import Evidence, ToolContext, tool

PAYLOAD = "x" * 80  # with the key names, a result serializes to about 100 bytes


@tool(effect="read")
def lookup(i: int) -> dict[str, Any]:
    """Look item i up (a read); returns about 100 bytes."""
    return {"i": i, "payload": PAYLOAD}


def recorded(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
    """A verifier that trusts nothing it has to read: the write is in memory only."""
    return Evidence(ok=result.get("i") == args["i"])


@tool(effect="write", idempotent=True, verify=recorded)
def record(i: int, ctx: ToolContext) -> dict[str, Any]:
    """Record item i (an idempotent write, keyed by the step's idempotency key)."""
    return {"i": i, "key": ctx.idempotency_key}
