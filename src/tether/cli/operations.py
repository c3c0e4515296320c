"""Commands a person uses on a run that stopped for them: cancel, retry, take over, and
the list of runs waiting for someone (`tether escalations`).

The command opens the journal directly, so it acts as the local administrator
(`Principal.local()`, recorded as such in the run's journal): see docs/operations.md.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape

from tether.cli.common import (
    DbOption,
    JsonOption,
    db_hint,
    fail,
    open_store,
    out,
    print_json,
    run_command,
    short,
)
from tether.identity import Principal
from tether.operations import Actionable, Operations, Outcome, actionable

app = typer.Typer()


def _show(outcome: Outcome, as_json: bool, db: str | None, done: str) -> None:
    if as_json:
        print_json(outcome.as_dict())
        return
    run = outcome.run
    out.print(f"run [bold]{run.run_id}[/] {done}: now [bold]{run.status}[/] in state {run.state}")
    report = outcome.rollback
    if report is not None:
        out.print(f"  {escape(report.summary())}")
        for item in report.details:
            why = item.get("reason") or item.get("error") or item.get("message") or ""
            out.print(
                f"  - step {item['step_id']}: {item['outcome']} ({item['tool']})"
                + (f": {escape(why)}" if why else "")
            )
        for missing in report.uncompensated:
            out.print(f"  - step {missing.step_id}: NOT undone ({missing.tool}): {escape(missing.reason)}")
    hint = db_hint(db)
    if run.status == "queued":
        out.print(f"  a worker drives it next (tether worker), or: tether resume {run.run_id}{hint}")
    out.print(f"  timeline: tether show {run.run_id}{hint}")
    if report is not None and not report.complete:
        raise typer.Exit(1)


@app.command()
def cancel(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    reason: Annotated[str, typer.Option("--reason", help="Why (recorded).")] = "",
    rollback: Annotated[
        bool,
        typer.Option(
            "--rollback",
            help="Undo the run's effects first: their compensations, newest first, each governed.",
        ),
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Cancel a run (withdrawing any pending ticket); with --rollback, undo its effects first.

    Exit code 1 when the rollback could not undo every effect (each is listed)."""

    async def main() -> Outcome:
        async with open_store(db) as journal:
            return await Operations(journal).cancel(run_id, Principal.local(), reason, rollback=rollback)

    _show(run_command(main), as_json, db, "cancelled")


@app.command()
def retry(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    note: Annotated[str, typer.Option("--note", help="Why, or what was fixed (recorded).")] = "",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Send an escalated, failed or stuck run back into its state with a fresh budget."""

    async def main() -> Outcome:
        async with open_store(db) as journal:
            return await Operations(journal).retry(run_id, Principal.local(), note)

    _show(run_command(main), as_json, db, "retried")


@app.command()
def takeover(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    exit: Annotated[str, typer.Option("--exit", help="The exit of the run's state to take.")],
    data: Annotated[
        str, typer.Option("--data", help="Data to merge into the run's, as a JSON object.")
    ] = "{}",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Take over a run: choose an exit of its state, with data, in place of the model
    (checked as a model's exit: offered there, the skill's contract, the policy)."""
    try:
        values: Any = json.loads(data)
    except json.JSONDecodeError as exc:
        fail(f"--data is not JSON: {exc}")
    if not isinstance(values, dict):
        fail("--data must be a JSON object")

    async def main() -> Outcome:
        async with open_store(db) as journal:
            return await Operations(journal).take_over(run_id, Principal.local(), exit, values)

    _show(run_command(main), as_json, db, f"taken over through exit {exit!r}")


@app.command()
def escalations(
    owner: Annotated[str | None, typer.Option("--owner", help="Only runs escalated to this role.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs.")] = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Runs waiting for a person (escalated, effect in doubt, stuck) and what can be done."""

    async def main() -> list[Actionable]:
        async with open_store(db) as journal:
            return await actionable(journal, owner=owner, limit=limit)

    items = run_command(main)
    if as_json:
        print_json([i.as_dict() for i in items])
        return
    if not items:
        out.print("no run is waiting for a person")
        return
    hint = db_hint(db)
    for item in items:
        r = item.run
        out.print(
            f"[bold]{r.run_id}[/] {r.workflow_name} {r.workflow_version}: {r.status} in {r.state}"
            f" (owner {r.owner or '-'}) {r.reason_code or ''}: {escape(short(r.message, 200))}"
        )
        for action in item.actions:
            out.print(f"    {_command(action, r.run_id)}{hint}")


def _command(action: str, run_id: str) -> str:
    return {
        "cancel": f"tether cancel {run_id} --reason TEXT [--rollback]",
        "retry": f"tether retry {run_id} --note TEXT",
        "take_over": f"tether takeover {run_id} --exit EXIT --data JSON",
        "resolve": f"tether resolve {run_id} --done | --not-done",
    }[action]
