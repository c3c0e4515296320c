"""What every `tether` command shares: consoles, options, error handling, JSON output."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, urlencode

import typer
from rich.console import Console
from rich.markup import escape

from tether.errors import TetherError
from tether.journal import DB_ENV, Journal, open_journal

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
T = TypeVar("T")

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar=DB_ENV,
        help="Journal: a SQLite path, sqlite:///path or postgresql://…. Default ./tether.db.",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON for machines.")]
ModelOption = Annotated[
    str | None, typer.Option("--model", help="Who proposes steps, e.g. script:proposals.json.")
]
WaitOption = Annotated[
    bool, typer.Option("--wait", help="When the run pauses on a ticket, wait for the decision and go on.")
]
ByOption = Annotated[str | None, typer.Option("--by", help="Who decides (default: your user name).")]
FAILED_STATUSES = {"failed", "escalated", "effect_in_doubt"}


def fail(message: str) -> NoReturn:
    # Escaped: messages quote things like `pip install -e '.[local]'`, which is markup to rich.
    err.print(f"[bold red]error:[/] {escape(message)}")
    raise typer.Exit(2)


def print_json(value: Any) -> None:
    """Plain JSON on stdout: never colour codes, whatever the terminal or FORCE_COLOR say."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except TetherError as exc:
        fail(str(exc))


def open_store(db: str | None) -> Journal:
    try:
        return open_journal(db)
    except TetherError as exc:
        fail(str(exc))


def short(value: Any, width: int = 70) -> str:
    """One line of at most `width` characters: strings as they are, anything else as JSON."""
    if value is None:
        return ""
    text = value if isinstance(value, str) else json.dumps(value, default=str)
    return text if len(text) <= width else text[: width - 1] + "…"


def pinned_model_spec(spec: str | None) -> str | None:
    """A model string that works from any folder (a worker's, a later `resume`'s): a
    script's or model file's path, and a `prices=` table's, made absolute."""
    if spec is None:
        return None
    prefix, _, arg = spec.partition(":")
    if prefix == "script" and arg:
        return f"script:{Path(arg).resolve()}"
    head, mark, query = spec.partition("?")
    file = arg.partition("?")[0]
    if prefix == "local" and file:
        head = f"local:{Path(file).expanduser().resolve()}"
    options = parse_qsl(query, keep_blank_values=True)
    if any(key == "prices" for key, _ in options):
        pinned = [(k, str(Path(v).expanduser().resolve()) if k == "prices" else v) for k, v in options]
        query = urlencode(pinned, safe="/:")
    return f"{head}{mark}{query}"
