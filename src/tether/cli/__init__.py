"""The `tether` command line.

Exit codes: 0 when a run completes, pauses or is handed off (a normal stop); 1 when it
fails, escalates or has an effect in doubt, or a policy check or test finds problems;
2 for bad input (nothing was changed). With `--json`, errors are JSON on stdout too:
`{"error": {"code": ..., "message": ...}}`, with the same exit code.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from tether import __version__
from tether.cli import (
    analysis,
    audit,
    db,
    handoffs,
    mcp,
    operations,
    policy,
    replay,
    runs,
    serve,
    testing,
    tokens,
    webhooks,
    workers,
)
from tether.cli.common import Output, print_error


class _Commands(TyperGroup):
    """Usage errors (a missing argument, an unknown option) as JSON when `--json` was asked for."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        Output.json_errors = "--json" in argv
        if not Output.json_errors or not standalone_mode:
            return super().main(argv, prog_name, complete_var, standalone_mode, windows_expand_args, **extra)
        try:
            code = super().main(
                argv,
                prog_name,
                complete_var,
                standalone_mode=False,
                windows_expand_args=windows_expand_args,
                **extra,
            )
        except Exception as exc:
            # Click's usage errors (typer vendors click, so matched by what they offer).
            format_message = getattr(exc, "format_message", None)
            if format_message is None:
                raise
            print_error("bad_input", format_message())
            sys.exit(getattr(exc, "exit_code", 2))
        sys.exit(code if isinstance(code, int) else 0)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"tether {__version__}")
        raise typer.Exit()


# Plain help (rich_markup_mode=None): flags are shown as flags, not with a `<bool>` metavar.
app = typer.Typer(
    cls=_Commands,
    help="tether: run governed AI workflows and audit what they did.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print tether's version and exit."),
    ] = False,
    audit_key: Annotated[
        Path | None,
        typer.Option(
            "--audit-key",
            help="Sign a checkpoint of each run's head whenever it stops, and of each decision, "
            "with this Ed25519 key file (or set $TETHER_AUDIT_KEY; see `tether audit keygen`).",
        ),
    ] = None,
) -> None:
    """tether: run governed AI workflows and audit what they did."""
    if audit_key is not None:
        os.environ["TETHER_AUDIT_KEY"] = str(audit_key.resolve())


for group in (runs, operations, handoffs, workers, mcp, analysis, testing, serve, replay):
    app.registered_commands.extend(group.app.registered_commands)
app.add_typer(policy.app, name="policy", help="Check, explain and test policies.")
app.add_typer(audit.app, name="audit", help="Verify the journal, sign checkpoints, export runs for auditors.")
app.add_typer(db.app, name="db", help="The journal's database: schema upgrades, model-exchange retention.")
app.add_typer(tokens.app, name="token", help="API tokens: create, list, revoke (roles and scopes).")
app.add_typer(webhooks.app, name="webhooks", help="Webhooks notified of ticket events, and their deliveries.")

__all__ = ["app"]
