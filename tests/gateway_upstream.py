"""A small real MCP server (the official SDK's MCPServer, over stdio) for the gateway's tests.

    python tests/gateway_upstream.py CALLS.jsonl

Every call it receives is appended to CALLS.jsonl (tool, arguments, the request's `_meta`),
so a test can show what reached the upstream and what never did. Its tools:

    echo(text)               read: returns the text
    read_config()            read: a configuration with a (fake) AWS access key in it
    send(to, body, idempotency_key)   external: "sends" a message; the key is required here
    note(text)               external: a tool a test's policy asks a person about
    refund(order_id, amount) external: "refunds" an order (a test's policy allows one per order)
    delete_everything()      external: a tool a test's policy denies outright
    grow(name)               adds a read tool NAME and says the tool list changed
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from mcp.server.mcpserver import Context, MCPServer
from mcp.types import ToolAnnotations
from mcp_types.version import MODERN_PROTOCOL_VERSIONS

CALLS = Path(sys.argv[1]) if len(sys.argv) > 1 else None
server = MCPServer("tether-test-upstream")
READ = ToolAnnotations(read_only_hint=True)


def record(tool: str, args: dict[str, Any], ctx: Context | None = None) -> None:
    if CALLS is None:
        return
    meta = ctx.request_context.meta if ctx is not None else None
    line = {"tool": tool, "args": args, "meta": dict(meta) if meta else {}}
    with CALLS.open("a") as out:
        out.write(json.dumps(line) + "\n")


@server.tool(annotations=READ)
def echo(text: str, ctx: Context) -> str:
    """Return the text."""
    record("echo", {"text": text}, ctx)
    return text


@server.tool(annotations=READ)
def read_config(ctx: Context) -> str:
    """Read the configuration."""
    record("read_config", {}, ctx)
    return "region = eu-west-1\naws_access_key_id = " + "AKIA" + "ABCDEFGHIJKLMNOP\n"


@server.tool()
def send(to: str, body: str, idempotency_key: str, ctx: Context) -> str:
    """Send a message (once per idempotency key)."""
    record("send", {"to": to, "body": body, "idempotency_key": idempotency_key}, ctx)
    return f"sent to {to}"


@server.tool()
def note(text: str, ctx: Context) -> str:
    """Write a note."""
    record("note", {"text": text}, ctx)
    return "noted"


@server.tool()
def refund(order_id: str, amount: float, ctx: Context) -> str:
    """Refund an amount on an order."""
    record("refund", {"order_id": order_id, "amount": amount}, ctx)
    return f"refunded {amount:g} on {order_id}"


@server.tool()
def delete_everything(ctx: Context) -> str:
    """Delete everything."""
    record("delete_everything", {}, ctx)
    return "deleted"


@server.tool()
async def grow(name: str, ctx: Context) -> str:
    """Add a read tool named NAME."""
    record("grow", {"name": name}, ctx)

    def grown() -> str:
        return f"I am {name}"

    server.add_tool(grown, name=name, description=f"A tool added at run time: {name}", annotations=READ)
    if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS:
        await ctx.notify_tools_changed()  # a subscriptions/listen event
    else:
        await ctx.session.send_tool_list_changed()  # notifications/tools/list_changed
    return f"added {name}"


if __name__ == "__main__":
    server.run("stdio")
