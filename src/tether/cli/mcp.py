"""`tether mcp-gateway`: an MCP server that governs the tools of other MCP servers."""

from __future__ import annotations

import logging
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
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A gateway configuration file (YAML): upstreams, their tools' effects, verifiers and "
            "facts, the policy of every caller and its resolvers over the upstreams' read tools. "
            "Instead of --upstream and --policy.",
        ),
    ] = None,
    policy: Annotated[
        Path | None,
        typer.Option("--policy", help="The policy of every caller not mapped by --policy-for."),
    ] = None,
    policy_for: Annotated[
        list[str] | None,
        typer.Option(
            "--policy-for",
            help="KEY=FILE: the policy of the callers KEY names over http: a principal id "
            "(person:alice, service:ci-bot) or role:ROLE. Repeat for several; a principal id "
            "wins over its role, and a caller matched by none (and no --policy) is refused.",
        ),
    ] = None,
    db: DbOption = None,
    approval_timeout: Annotated[
        float,
        typer.Option(
            "--approval-timeout", min=0.1, help="Seconds a call waits for a person before approval_expired."
        ),
    ] = 300.0,
    transport: Annotated[
        Transport, typer.Option(help="stdio (the local user) or http (streamable HTTP, tether tokens).")
    ] = Transport.stdio,
    host: Annotated[str, typer.Option(help="http: the address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="http: the port to listen on.")] = 8765,
    secret_pattern: Annotated[
        list[str] | None,
        typer.Option(
            "--secret-pattern",
            help="NAME=REGEX: one more kind of secret redacted from tool results (besides the "
            "defaults: API keys, AWS keys, GitHub tokens, private keys, JWTs). Repeat for several.",
        ),
    ] = None,
    no_default_secrets: Annotated[
        bool, typer.Option("--no-default-secrets", help="Scan results only for the --secret-pattern kinds.")
    ] = False,
) -> None:
    """Serve the upstreams' tools over MCP, each call governed by its caller's policy and journaled.

    On stdio the caller is the local user, governed by --policy; stdout carries the protocol
    only, logs go to stderr. Over http each caller presents a tether token (`tether token
    create --kind service --name NAME --role operator`) as `Authorization: Bearer TOKEN`.
    """
    try:
        from tether.mcp.gateway import (
            Gateway,
            GatewayError,
            config_upstreams,
            parse_upstreams,
        )
        from tether.mcp.gateway_config import GatewayConfig, load_config
        from tether.mcp.gateway_serve import StopSignals, serve_http, serve_stdio
        from tether.mcp.secrets_scan import SecretPatternError, SecretScan
    except ImportError as exc:
        fail(str(exc))
    _log_to_stderr()
    configured: GatewayConfig | None = None
    try:
        if config is not None:
            if upstream or policy is not None:
                raise GatewayError("give either --config FILE or --upstream and --policy, not both")
            configured = load_config(config)
            upstreams, policy_file = config_upstreams(configured), None
        else:
            upstreams, policy_file = parse_upstreams(upstream or []), policy
        if transport is Transport.stdio and policy_file is None and configured is None:
            raise GatewayError("over stdio the caller is the local user: give its --policy FILE")
        if transport is Transport.stdio and policy_for:
            raise GatewayError("--policy-for maps the principals of tokens: it applies to --transport http")
        governing = configured.policy if configured is not None else None
        if policy_file is not None:
            governing = Policy.from_file(policy_file)
        policies = _policies_for(policy_for or [])
        if governing is None and not policies:
            raise GatewayError("give --policy FILE (any caller) or --policy-for KEY=FILE")
        scan = SecretScan.with_extra(secret_pattern or [], defaults=not no_default_secrets)
    except TetherError as exc:
        fail_with(exc)
    except SecretPatternError as exc:
        fail(str(exc))

    async def serve() -> None:
        signals = StopSignals()
        signals.install()  # before anything starts: a signal during start-up stops it cleanly
        async with open_store(db, create=True) as journal:
            gateway = Gateway(
                upstreams,
                governing,
                journal,
                policies=policies,
                approval_timeout=approval_timeout,
                db_hint=db_hint(db),
                secrets=scan,
                config=configured,
            )
            async with gateway:
                if transport is Transport.http:
                    await serve_http(gateway, signals, host=host, port=port)
                else:
                    await serve_stdio(gateway, signals)

    run_command(serve)


def _policies_for(values: list[str]) -> dict[str, Policy]:
    """`--policy-for KEY=FILE` values, each key once."""
    from tether.mcp.gateway import GatewayError, check_access_key

    policies: dict[str, Policy] = {}
    for value in values:
        key, sep, path = value.partition("=")
        if not sep or not path:
            raise GatewayError(f"--policy-for {value!r}: give KEY=FILE (e.g. service:ci-bot=ci.yaml)")
        if check_access_key(key.strip()) in policies:
            raise GatewayError(f"--policy-for {key.strip()} is given twice")
        policies[key.strip()] = Policy.from_file(Path(path))
    return policies


def _log_to_stderr() -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("tether mcp-gateway: %(message)s"))
    logger = logging.getLogger("tether.mcp.gateway")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
