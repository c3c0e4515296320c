"""`tether pickup RUN`: a person picks up a handed-off run, after every value the handoff
relied on is read again (tether.handoffs).

Exit codes: 0 when the handoff is received (the run stays handed off, now the picker's),
or is turned back and the run then completes or pauses; 1 when, turned back, it fails or
escalates; 2 for bad input (a run that is not handed off, say), in which case nothing changed.
"""

from __future__ import annotations

import getpass
import json
from typing import Annotated

import msgspec
import typer
from rich.markup import escape

from tether.cli.common import (
    FAILED_STATUSES,
    ByOption,
    DbOption,
    JsonOption,
    ModelOption,
    db_hint,
    open_store,
    out,
    print_json,
    ready_model,
    run_command,
)
from tether.journal import bodies as b
from tether.loader import load_workflow_async
from tether.models import close_model
from tether.runtime import RunResult, Runtime

app = typer.Typer()


@app.command()
def pickup(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    by: ByOption = None,
    model: ModelOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Pick up a handed-off run: read again every value the handoff relied on. Unchanged, the
    handoff is yours; changed, it goes back to the state that made it, which the run's model
    (or --model) then continues, as resume does."""
    picker = by or getpass.getuser()

    async def main() -> tuple[RunResult, list[b.FactCheck], b.HandedOver | None]:
        async with open_store(db) as journal:
            record = await journal.get_run(run_id)
            wf = await load_workflow_async(
                record.workflow_ref, policy=record.policy_ref, pinned=record.workflow_hash
            )
            proposer, _ = await ready_model(model or record.model_spec, journal)
            try:
                result, differences = await Runtime(journal).pick_up(run_id, wf, by=picker, model=proposer)
            finally:
                await close_model(proposer)
            handed = next(
                (
                    e.body.handoff
                    for e in reversed(await journal.read_entries(run_id))
                    if isinstance(e.body, b.HandedOff)
                ),
                None,
            )
            return result, differences, handed if isinstance(handed, b.HandedOver) else None

    result, differences, handed = run_command(main)
    if as_json:
        print_json(
            {
                "run": result.__dict__,
                "received": not differences,
                "differences": msgspec.to_builtins(differences),
                "handoff": msgspec.to_builtins(handed),
            }
        )
    elif differences:
        out.print(f"run [bold]{result.run_id}[/]: the handoff is [bold red]turned back[/]; it relied on:")
        for d in differences:
            changed = d.error or f"{json.dumps(d.then)} → {json.dumps(d.now)}"
            out.print(f"  {escape(d.name)}: {escape(changed)}")
        out.print(f"run [bold]{result.run_id}[/] is [bold]{result.status}[/] in state {result.state}")
        if result.message:
            out.print(f"  {result.reason_code}: {escape(result.message)}")
    else:
        out.print(f"run [bold]{result.run_id}[/]: the handoff is [bold green]yours[/], {escape(picker)}")
        if result.message:
            out.print(f"  {escape(result.message)}")
        out.print(f"  what was handed over: tether show {result.run_id}{db_hint(db)}")
    if differences and result.status in FAILED_STATUSES:
        raise typer.Exit(1)
