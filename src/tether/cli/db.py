"""`tether db upgrade` brings a journal's schema to this tether's version; `tether db
prune-exchanges` applies the retention of model exchanges.

Opening a journal upgrades it anyway; `upgrade` does it on purpose (before starting a
fleet of workers, say) and says what it did.
"""

from __future__ import annotations

import os
import re
import time
from typing import Annotated

import typer

from tether.cli.common import DbOption, fail, fail_with, open_store, out, run_command, without_password
from tether.errors import TetherError
from tether.journal import DB_ENV, DEFAULT_DB, upgrade_journal

app = typer.Typer(no_args_is_help=True)


@app.callback()
def db() -> None:
    """The journal's database: schema versions, retention of model exchanges."""


@app.command()
def upgrade(db: DbOption = None) -> None:
    """Apply the schema migrations the journal lacks, in order, in one transaction."""
    where = without_password(db or os.environ.get(DB_ENV) or DEFAULT_DB)
    try:
        before, after = upgrade_journal(db)
    except TetherError as exc:
        fail_with(exc)
    if before == after:
        out.print(f"journal {where} is at schema version {after}; nothing to do")
    else:
        out.print(f"journal {where} upgraded: schema version {before} → {after}")


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


@app.command("prune-exchanges")
def prune_exchanges(
    older_than: Annotated[
        str, typer.Option(help="Age of the exchanges to delete: e.g. 30d, 12h, 90m, 3600s.")
    ],
    db: DbOption = None,
) -> None:
    """Delete recorded model exchanges (prompts, raw responses) older than a given age.

    Step entries, which hold every proposal, decision and the usage of every call, are
    never touched; runs whose exchanges are gone can no longer be replayed.
    """
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd])", older_than.strip())
    if match is None:
        fail(f"--older-than must be a number with a unit s, m, h or d (e.g. 30d), not {older_than!r}")
    seconds = float(match[1]) * _UNITS[match[2]]

    async def main() -> int:
        async with open_store(db) as journal:
            return await journal.prune_exchanges(before=time.time() - seconds)

    out.print(f"deleted {run_command(main)} model exchange(s) older than {older_than}")
