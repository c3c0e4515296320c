"""`tether mcp-gateway`: an MCP server that governs the tools of other MCP servers."""

from __future__ import annotations

import logging
import secrets
import sys
from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from tether.cli.common import DbOption, db_hint, fail, fail_with, open_store, run_command
from tether.errors import TetherError
from tether.policy import Policy

app = typer.Typer()


class Transport(StrEnum):
    stdio = "stdio"
    http = "http"


@app.command("mcp-gateway")
def mcp_gateway(
    upstream: Annotated[
        list[str] | None,
        typer.Option(
            "--upstream",
            help="An upstream MCP server: its command line (one string, split like a shell) or its "
            "http(s) URL; NAME=… prefixes its tools with NAME_. Repeat for several.",
        ),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option("--policy", help="The policy every call is decided by.")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A gateway configuration file (YAML): upstreams, their tools' effects, verifiers and "
            "facts, the policy and its resolvers over the upstreams' read tools. Instead of "
            "--upstream and --policy.",
        ),
    ] = None,
    db: DbOption = None,
    approval_timeout: Annotated[
        float,
        typer.Option(
            "--approval-timeout", min=0.1, help="Seconds a call waits for a person before approval_expired."
        ),
    ] = 300.0,
    transport: Annotated[Transport, typer.Option(help="stdio (one client) or http (streamable HTTP).")] = (
        Transport.stdio
    ),
    host: Annotated[str, typer.Option(help="http: the address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="http: the port to listen on.")] = 8765,
    approval_token: Annotated[
        str | None,
        typer.Option(
            envvar="TETHER_APPROVAL_TOKEN",
            help="http: the bearer token of the /approvals endpoint (default: a new one, logged).",
        ),
    ] = None,
) -> None:
    """Serve the upstreams' tools over MCP, each call governed by the policy and journaled.

    On stdio, stdout carries the protocol only; logs go to stderr.
    """
    try:
        from tether.mcp.gateway import Gateway, config_upstreams, parse_upstreams, serve_http, serve_stdio
        from tether.mcp.gateway_config import GatewayConfig, load_config
    except ImportError as exc:
        fail(str(exc))
    _log_to_stderr()
    configured: GatewayConfig | None = None
    try:
        if config is not None:
            if upstream or policy is not None:
                fail("give either --config FILE or --upstream and --policy, not both")
            configured = load_config(config)
            upstreams, governing, policy_ref = (
                config_upstreams(configured),
                configured.policy,
                configured.policy_ref,
            )
        else:
            if policy is None:
                fail("give --policy FILE (and --upstream), or --config FILE")
            upstreams = parse_upstreams(upstream or [])
            governing, policy_ref = Policy.from_file(policy), str(policy.resolve())
    except TetherError as exc:
        fail_with(exc)
    token = approval_token or secrets.token_urlsafe(24)

    async def serve() -> None:
        async with open_store(db, create=True) as journal:
            gateway = Gateway(
                upstreams,
                governing,
                journal,
                policy_ref=policy_ref,
                approval_timeout=approval_timeout,
                db_hint=db_hint(db),
                config=configured,
            )
            async with gateway:
                if transport is Transport.http:
                    if approval_token is None:
                        logging.getLogger("tether.mcp.gateway").info(
                            "approval token (or set TETHER_APPROVAL_TOKEN): %s", token
                        )
                    await serve_http(gateway, host=host, port=port, approval_token=token)
                else:
                    await serve_stdio(gateway)

    run_command(serve)


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tether mcp-gateway: %(message)s"))
    logger = logging.getLogger("tether.mcp.gateway")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
