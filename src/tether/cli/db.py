"""`tether db upgrade`: bring a journal's schema to this tether's version.

Opening a journal upgrades it anyway; this command does it on purpose (before starting
a fleet of workers, say) and says what it did.
"""

from __future__ import annotations

import os
from urllib.parse import urlsplit, urlunsplit

import typer

from tether.cli.common import DbOption, fail, out
from tether.errors import TetherError
from tether.journal import DB_ENV, DEFAULT_DB, upgrade_journal

app = typer.Typer(no_args_is_help=True)


@app.callback()
def db() -> None:
    """The journal's database: schema versions."""


@app.command()
def upgrade(db: DbOption = None) -> None:
    """Apply the schema migrations the journal lacks, in order, in one transaction."""
    where = _shown(db or os.environ.get(DB_ENV) or DEFAULT_DB)
    try:
        before, after = upgrade_journal(db)
    except TetherError as exc:
        fail(str(exc))
    if before == after:
        out.print(f"journal {where} is at schema version {after}; nothing to do")
    else:
        out.print(f"journal {where} upgraded: schema version {before} → {after}")


def _shown(target: str) -> str:
    """The journal's location as it may be printed: without a password."""
    parts = urlsplit(target)
    if "://" not in target or parts.password is None:
        return target
    return urlunsplit(parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)))
