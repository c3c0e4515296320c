"""`tether token create / list / revoke`: the API tokens of people and services.

These commands open the journal directly, so they act as the local admin (whoever can write
the database administers tether: docs/security.md). A token's plaintext is printed once,
when it is created; the journal keeps only its SHA-256.
"""

from __future__ import annotations

import re
from typing import Annotated

import typer
from rich.markup import escape

from tether.cli.common import (
    DbOption,
    JsonOption,
    fail,
    local_principal,
    open_store,
    out,
    print_json,
    run_command,
)
from tether.identity import ROLES, TokenInfo, create_token, list_tokens, revoke_token
from tether.journal.common import when

app = typer.Typer(no_args_is_help=True)

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", text.strip())
    if match is None or float(match[1]) <= 0:
        fail(f"--expires must be a positive number with a unit s, m, h or d (e.g. 30d), not {text!r}")
    return float(match[1]) * _UNITS[match[2]]


@app.callback()
def token() -> None:
    """API tokens: who may use `tether serve`, with which role and scope."""


@app.command()
def create(
    name: Annotated[str, typer.Argument(help="Who holds it (a person or a service); shown in the record.")],
    role: Annotated[str, typer.Option("--role", help=f"One of {', '.join(ROLES)}.")],
    approver_for: Annotated[
        list[str] | None,
        typer.Option(
            "--approver-for",
            metavar="ROLE",
            help="An approver role a policy names (`approver: supervisor`) this token may decide; repeat "
            "for several. Required for role approver.",
        ),
    ] = None,
    workflow: Annotated[
        list[str] | None,
        typer.Option(
            "--workflow", metavar="NAME", help="Limit the token to this workflow; repeat for several."
        ),
    ] = None,
    expires: Annotated[
        str | None, typer.Option("--expires", metavar="AGE", help="Lifetime, e.g. 30d, 12h (default: never).")
    ] = None,
    service: Annotated[
        bool, typer.Option("--service", help="The holder is a service, not a person.")
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Create a token; its secret is printed once and never stored."""
    lifetime = _seconds(expires) if expires is not None else None

    async def main() -> tuple[str, TokenInfo]:
        async with open_store(db, create=True) as journal:
            return await create_token(
                journal,
                name=name,
                role=role,
                approver_for=approver_for or (),
                workflows=workflow or (),
                expires_in=lifetime,
                kind="service" if service else "person",
            )

    secret, info = run_command(main)
    if as_json:
        print_json(info.as_dict() | {"token": secret})
        return
    out.print(f"token {info.token_id} for {escape(info.principal_id)} ({_scope(info)})")
    out.print(f"  {secret}")
    out.print("  shown once: store it now (tether keeps only its hash). Give it as $TETHER_TOKEN.")


@app.command("list")
def list_(db: DbOption = None, as_json: JsonOption = False) -> None:
    """Every token: whose, role and scope, expiry, and whether it was revoked (never a secret)."""

    async def main() -> list[TokenInfo]:
        async with open_store(db) as journal:
            return await list_tokens(journal)

    tokens = run_command(main)
    if as_json:
        print_json([t.as_dict() for t in tokens])
        return
    if not tokens:
        out.print("no tokens")
    for t in tokens:
        state = f"revoked {when(t.revoked_at)} by {t.revoked_by}" if t.revoked_at else _expiry(t)
        made = f"created {when(t.created_at)}"
        out.print(f"[bold]{t.token_id}[/]  {escape(t.principal_id)}  {_scope(t)}  {made}  {state}")


@app.command()
def revoke(
    token_id: Annotated[
        str, typer.Argument(metavar="ID", help="The token's id (tok_…), from `tether token list`.")
    ],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Revoke a token at once: it never authenticates again."""

    async def main() -> TokenInfo:
        async with open_store(db) as journal:
            return await revoke_token(journal, token_id, local_principal())

    info = run_command(main)
    if as_json:
        print_json(info.as_dict())
        return
    out.print(f"token {info.token_id} of {escape(info.principal_id)} revoked {when(info.revoked_at)}")


def _expiry(t: TokenInfo) -> str:
    return f"expires {when(t.expires_at)}" if t.expires_at is not None else "never expires"


def _scope(t: TokenInfo) -> str:
    parts: list[str] = [t.role]
    if t.approver_for:
        parts.append("for " + ", ".join(t.approver_for))
    if t.workflows:
        parts.append("workflows " + ", ".join(t.workflows))
    return "; ".join(parts)
