"""What every `tether` command shares: consoles, options, error handling, JSON output.

Each command is one `asyncio.run` (`run_command`): the journal it opens, the workflow it
loads and the MCP connections listing opened all belong to that one event loop.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import typer
from rich.console import Console
from rich.markup import escape

from tether.errors import (
    AuthError,
    ConcurrentWriteError,
    DefinitionError,
    EditRefused,
    Forbidden,
    JournalError,
    JournalTampered,
    ModelSpecError,
    PolicyFileError,
    RunNotFound,
    RunStateError,
    TetherError,
    TicketConflict,
    TicketError,
)
from tether.identity import Principal
from tether.journal import DB_ENV, DEFAULT_DB, Journal, open_journal
from tether.models import Model, ReplayModel, resolve_model

out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)
T = TypeVar("T")

DbOption = Annotated[
    str | None,
    typer.Option(
        "--db",
        envvar=DB_ENV,
        metavar="PATH|URL",
        help="Journal: a SQLite path, sqlite:///path or postgresql://…. Default ./tether.db.",
    ),
]
JsonOption = Annotated[
    bool, typer.Option("--json", help='Print JSON for machines (errors too: {"error": {code, message}}).')
]
ModelOption = Annotated[
    str | None,
    typer.Option(
        "--model",
        help="Who proposes steps: script:FILE.json, function:module:attr, openai:MODEL, anthropic:MODEL, "
        "local, or rerun:RUN — the model answers recorded in RUN, proposed again; a re-run still "
        "executes its tools for real, writes included (replay:RUN is its deprecated name; "
        "`tether replay RUN` is the replay that never executes anything).",
    ),
]
WaitOption = Annotated[
    bool, typer.Option("--wait", help="When the run pauses on a ticket, wait for the decision and go on.")
]
ByOption = Annotated[str | None, typer.Option("--by", help="Who decides (default: your user name).")]
# Decisions from a shell that opened the journal are the local admin's (tether.identity): a
# name given here is shown beside that principal, never trusted in its place.
NoteByOption = Annotated[
    str | None,
    typer.Option(
        "--by",
        metavar="NAME",
        help="A display name shown with the decision. It is recorded as made by the local admin "
        "(local:USER@HOST) whatever is given: whoever can write the journal is an admin.",
    ),
]
FAILED_STATUSES = {"failed", "escalated", "effect_in_doubt"}

# The stable codes of `--json` errors, most specific first (RunNotFound is a JournalError).
ERROR_CODES: list[tuple[type[TetherError], str]] = [
    (RunNotFound, "not_found"),
    (TicketConflict, "conflict"),
    (TicketError, "ticket_error"),
    (Forbidden, "forbidden"),
    (EditRefused, "edit_refused"),
    (AuthError, "unauthenticated"),
    (ConcurrentWriteError, "conflict"),
    (JournalTampered, "journal_tampered"),
    (RunStateError, "run_state"),
    (DefinitionError, "bad_input"),
    (PolicyFileError, "bad_input"),
    (ModelSpecError, "bad_input"),
    (JournalError, "journal_error"),
]


class Output:
    """How this process reports errors; the command line sets it (`--json` asks for JSON).
    `db_hint` is ` --db WHERE` once a command opened a journal that is not the default one."""

    json_errors = False
    db_hint = ""


# A next step an error names (`tether resolve run_x --done`, from the kernel, which does not
# know which journal the command opened): the `--db` the command was given goes after the id.
_NEXT_STEP = re.compile(
    r"\btether (?:resume|resolve|pickup|approve|deny|answer|show|exchanges) (?:run|tkt)_\w+"
)


def with_db(message: str) -> str:
    """`message` with the command's `--db` added to every next step it suggests."""
    hint = Output.db_hint
    if not hint or hint in message:
        return message
    return _NEXT_STEP.sub(lambda m: m.group(0) + hint, message)


def print_error(code: str, message: str) -> None:
    """An error as the caller asked for output: `{"error": {...}}` on stdout, or text on stderr."""
    message = with_db(message)
    if Output.json_errors:
        print_json({"error": {"code": code, "message": message}})
    else:
        # Escaped: messages quote things like `pip install -e '.[local]'`, which is markup to rich.
        err.print(f"[bold red]error:[/] {escape(message)}")


def fail(message: str, code: str = "bad_input") -> NoReturn:
    """Refuse with exit code 2: nothing was changed."""
    print_error(code, message)
    raise typer.Exit(2)


def fail_with(exc: TetherError) -> NoReturn:
    code = next((c for kind, c in ERROR_CODES if isinstance(exc, kind)), "bad_input")
    fail(str(exc), getattr(exc, "code", code) if isinstance(exc, AuthError) else code)


def local_principal(display_name: str | None = None) -> Principal:
    """Who a command that opened the journal directly acts as: the local admin
    (`local:USER@HOST`), with `--by`'s name, if given, for display only."""
    me = Principal.local()
    if not display_name:
        return me
    return Principal(principal_id=me.principal_id, name=display_name, kind="local", role="admin")


def print_json(value: Any) -> None:
    """Plain JSON on stdout: never colour codes, whatever the terminal or FORCE_COLOR say."""
    sys.stdout.write(json.dumps(value, indent=2, default=str) + "\n")


def run_command(main: Callable[[], Awaitable[T]]) -> T:
    """Run a command's coroutine: one event loop for the whole command; errors exit 2."""

    async def guarded() -> T:
        try:
            return await main()
        except TetherError as exc:
            fail_with(exc)

    return asyncio.run(guarded())


def run_async(coro: Awaitable[T]) -> T:
    """One coroutine in an event loop of its own (commands that make a single call)."""

    async def once() -> T:
        return await coro

    return run_command(once)


def sqlite_file(db: str | None) -> Path | None:
    """The file a journal target names, or None for a server (PostgreSQL)."""
    target = db or os.environ.get(DB_ENV) or DEFAULT_DB
    scheme = target.split("://", 1)[0] if "://" in target else ""
    if scheme in ("postgresql", "postgres"):
        return None
    if scheme == "sqlite":  # as open_journal reads it
        return Path(target.removeprefix("sqlite://").removeprefix("/") or DEFAULT_DB)
    return Path(target) if not scheme else None  # an unknown scheme: open_journal names it


def open_store(db: str | None, *, create: bool = False) -> Journal:
    """Open the journal. Only commands that write may create it: for the others a missing
    SQLite file is a mistyped path, refused rather than created empty."""
    file = sqlite_file(db)
    if not create and file is not None and not file.exists():
        fail(
            f"no journal at {file} (give the journal's path with --db or ${DB_ENV}; a command that "
            "only reads or decides never creates one)",
            "no_journal",
        )
    Output.db_hint = db_hint(db)
    try:
        journal = open_journal(db)
    except TetherError as exc:
        fail_with(exc)
    for problem in journal.trigger_problems:  # found at opening: nothing will be written
        err.print(
            f"[bold yellow]warning:[/] {escape(problem.message)}: this journal is read-only until "
            "`tether audit verify --all` finds it sound and `tether audit restore-triggers` is run"
        )
    return journal


async def ready_model(spec: str | None, journal: Journal) -> tuple[Model | None, str | None]:
    """The model a spec names, checked before anything is created: a replay of a run that
    is not there, or recorded nothing, is refused here rather than escalated later."""
    spec = pinned_model_spec(spec)  # so that `resume` works from any folder
    if spec is None:
        return None, None
    if spec.startswith("replay:"):
        err.print(
            "[yellow]note:[/] --model replay:RUN is now called rerun:RUN (it re-runs the recorded "
            "answers and executes the tools for real; `tether replay RUN` never acts)"
        )
    model = resolve_model(spec, journal=journal)
    if isinstance(model, ReplayModel):
        await model.load()
    return model, spec


def db_hint(db: str | None) -> str:
    """` --db WHERE` for the commands a hint suggests, when the journal is not the default one
    (nor the one $TETHER_DB names, which the next shell has too); a URL's password is left out."""
    if db is None or db == os.environ.get(DB_ENV):
        return ""
    return f" --db {shlex.quote(without_password(db))}"


def without_password(db: str) -> str:
    """The journal as it may be printed: a PostgreSQL URL's password is not."""
    url = urlsplit(db)
    if "://" not in db or url.password is None:
        return db
    return urlunsplit(url._replace(netloc=url.netloc.replace(f":{url.password}@", ":***@", 1)))


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
