"""The `tether` command line.

Exit codes: 0 when a run completes, pauses or is handed off (a normal stop); 1 when it
fails, escalates or has an effect in doubt, or a policy check or test finds problems;
2 for bad input (nothing was changed).
"""

from __future__ import annotations

import typer

from tether.cli import db, mcp, policy, runs, workers

app = typer.Typer(
    help="tether: run governed AI workflows and audit what they did.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
for group in (runs, workers, mcp):
    app.registered_commands.extend(group.app.registered_commands)
app.add_typer(policy.app, name="policy", help="Check, explain and test policies.")
app.add_typer(db.app, name="db", help="The journal's schema: upgrade it.")

__all__ = ["app"]
