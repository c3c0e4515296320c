"""`tether submit`, `tether migrate` and `tether worker`: runs queued in the journal, driven by
any number of workers."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from tether.cli.common import (
    DbOption,
    JsonOption,
    ModelOption,
    NoteByOption,
    db_hint,
    err,
    fail,
    local_principal,
    open_store,
    out,
    pinned_model_spec,
    print_json,
    ready_model,
    run_command,
    without_password,
)
from tether.loader import load_workflow_async, workflow_ref
from tether.registry import ROOTS_ENV, Registry
from tether.runtime import RunResult, Runtime
from tether.webhooks import DispatchSettings
from tether.worker import Worker, install_signal_handlers

app = typer.Typer()


@app.command()
def submit(
    workflow: Annotated[str, typer.Argument(help="Directory, workflow YAML file, or module:attr.")],
    input: Annotated[str, typer.Option("--input", help="Run input as a JSON object.")] = "{}",
    model: ModelOption = None,
    policy: Annotated[Path | None, typer.Option(help="Policy file overriding the workflow's.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue a run for the workers; prints its id at once."""
    try:
        data = json.loads(input)
    except json.JSONDecodeError as exc:
        fail(f"--input is not JSON: {exc}")
    if not isinstance(data, dict):
        fail("--input must be a JSON object")

    async def main() -> RunResult:
        wf = await load_workflow_async(workflow, policy=policy)
        spec = pinned_model_spec(model)
        async with open_store(db, create=True) as journal:
            if spec is not None and spec.startswith(("rerun:", "replay:")):
                await ready_model(spec, journal)  # a recording that is not there: refused now
            return await Runtime(journal).submit(
                wf,
                input=data,
                workflow_ref=workflow_ref(workflow),
                policy_ref=str(policy.resolve()) if policy else None,
                model_spec=spec,
                by=local_principal(),
            )

    result = run_command(main)
    if as_json:
        print_json(result.__dict__)
    else:
        out.print(
            f"run [bold]{result.run_id}[/] queued; a worker started with this workflow's folder under its "
            f"--workflows will pick it up (tether worker --workflows DIR{db_hint(db)})"
        )


@app.command()
def migrate(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    to: Annotated[str, typer.Option("--to", help="The workflow (folder, YAML file) to move the run to.")],
    policy: Annotated[Path | None, typer.Option(help="Policy file overriding the workflow's.")] = None,
    by: NoteByOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Move an unfinished run to another version of its workflow (recorded in its journal)."""

    async def main() -> tuple[RunResult, str, str]:
        async with open_store(db) as journal:
            await journal.get_run(run_id)  # an unknown run before loading anything
            wf = await load_workflow_async(to, policy=policy)
            result = await Runtime(journal).migrate(
                run_id,
                wf,
                by=local_principal(by).principal_id,  # the local admin; --by is shown only
                workflow_ref=workflow_ref(to),
                policy_ref=str(policy.resolve()) if policy else None,
            )
            return result, wf.name, wf.version

    result, name, version = run_command(main)
    if as_json:
        print_json({**result.__dict__, "workflow_name": name, "workflow_version": version})
        return
    out.print(
        f"run {result.run_id} now runs on {name} version {version}; it is {result.status}: "
        f"tether resume {result.run_id}{db_hint(db)}"
    )


def _roots(given: list[str] | None) -> list[str]:
    """--workflows values, else $TETHER_WORKFLOWS; each may list several folders like PATH."""
    values = given or ([os.environ[ROOTS_ENV]] if os.environ.get(ROOTS_ENV) else [])
    return [part for value in values for part in value.split(os.pathsep) if part]


@app.command()
def worker(
    workflows: Annotated[
        list[str] | None,
        typer.Option(
            "--workflows",
            metavar="DIR",
            help=f"A folder of workflows this worker may drive (repeat, or separate with "
            f"'{os.pathsep}'; default ${ROOTS_ENV}). Every workflow under it is loaded at start; "
            "a run pinned to any other workflow is set aside, never loaded from the path it names.",
        ),
    ] = None,
    db: DbOption = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Runs driven at once by this process.")] = 8,
    lease: Annotated[
        float, typer.Option(min=1.0, help="Seconds a claimed run stays leased without renewal.")
    ] = 15.0,
    limit: Annotated[
        list[str] | None,
        typer.Option(metavar="WORKFLOW=N", help="At most N runs of that workflow at once (repeatable)."),
    ] = None,
    until_idle: Annotated[bool, typer.Option("--until-idle", help="Exit when nothing is runnable.")] = False,
    worker_id: Annotated[str | None, typer.Option(help="Name in leases (default host:pid:random).")] = None,
    webhooks: Annotated[
        bool, typer.Option(help="Also deliver the journal's webhook notifications (tether webhooks).")
    ] = True,
    webhook_timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds one webhook POST may take before it counts as failed.")
    ] = 10.0,
    as_json: JsonOption = False,
) -> None:
    """Claim runnable runs and drive them; SIGTERM drains gracefully.

    Logs a line per claimed and per settled run on stderr, and prints a summary on exit.
    """
    limits: dict[str, int] = {}
    for item in limit or []:
        name, _, number = item.partition("=")
        if not name or not number.isdigit():
            fail(f"--limit takes WORKFLOW=N, not {item!r}")
        limits[name] = int(number)
    roots = _roots(workflows)
    if not roots:
        fail(f"give the worker the folders of the workflows it may drive: --workflows DIR (or ${ROOTS_ENV})")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tether worker: %(message)s")

    async def main() -> dict[str, Any]:
        registry = await Registry.load(roots)
        for problem in registry.problems:
            err.print(f"not loaded: {problem}", markup=False)
        if not registry.workflows:
            fail(f"no workflow could be loaded from {', '.join(roots)}: this worker would drive nothing")
        async with open_store(db, create=True) as store:
            w = Worker(
                store,
                registry,
                worker_id=worker_id,
                concurrency=concurrency,
                lease_seconds=lease,
                limits=limits,
                webhooks=webhooks,
                webhook_settings=DispatchSettings(timeout=webhook_timeout),
            )
            install_signal_handlers(w)
            names = sorted({f"{wf.name} {wf.version}" for wf in registry.workflows.values()})
            err.print(
                f"worker {w.worker_id} on {without_password(db) if db else 'the default journal'}: "
                f"concurrency {concurrency}, lease {lease:g}s"
                + (f", limits {limits}" if limits else "")
                + f"; {len(names)} workflow version(s): {', '.join(names)}",
                markup=False,
            )
            stats = await w.run(until_idle=until_idle)
            return {
                "worker_id": w.worker_id,
                "claimed": stats.claimed,
                "stopped": stats.stopped,
                "set_aside": stats.set_aside,
                "errors": stats.errors,
                "tickets_expired": stats.expired,
            }

    summary = run_command(main)
    if as_json:
        print_json(summary)
        return
    stopped = ", ".join(f"{n} {status}" for status, n in sorted(summary["stopped"].items())) or "none"
    out.print(
        f"worker {summary['worker_id']} stopped: claimed {summary['claimed']}; runs stopped: {stopped}; "
        f"set aside {summary['set_aside']}; errors {summary['errors']}; "
        f"tickets expired {summary['tickets_expired']}",
        markup=False,
    )
