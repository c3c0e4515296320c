"""`tether submit` and `tether worker`: runs queued in the journal, driven by any number of workers."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated

import typer

from tether.cli.common import (
    DbOption,
    JsonOption,
    fail,
    open_store,
    out,
    pinned_model_spec,
    print_json,
    run_async,
)
from tether.errors import TetherError
from tether.loader import load_workflow, workflow_ref
from tether.runtime import Runtime
from tether.worker import Worker, install_signal_handlers

app = typer.Typer()


@app.command()
def submit(
    workflow: Annotated[str, typer.Argument(help="Directory, workflow YAML file, or module:attr.")],
    input: Annotated[str, typer.Option("--input", help="Run input as a JSON object.")] = "{}",
    model: Annotated[
        str | None, typer.Option(help="Model the workers will use, e.g. script:FILE.json.")
    ] = None,
    policy: Annotated[Path | None, typer.Option(help="Policy file overriding the workflow's.")] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Queue a run for the workers; prints its id at once."""
    try:
        data = json.loads(input)
        wf = load_workflow(workflow, policy=policy)
    except json.JSONDecodeError as exc:
        fail(f"--input is not JSON: {exc}")
    except TetherError as exc:
        fail(str(exc))
    if not isinstance(data, dict):
        fail("--input must be a JSON object")
    spec = pinned_model_spec(model)
    runtime = Runtime(open_store(db))
    result = run_async(
        runtime.submit(
            wf,
            input=data,
            workflow_ref=workflow_ref(workflow),
            policy_ref=str(policy.resolve()) if policy else None,
            model_spec=spec,
        )
    )
    if as_json:
        print_json(result.__dict__)
    else:
        out.print(f"run [bold]{result.run_id}[/] queued; a worker will pick it up (tether worker)")


@app.command()
def migrate(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    to: Annotated[str, typer.Option("--to", help="The workflow (folder, YAML file) to move the run to.")],
    policy: Annotated[Path | None, typer.Option(help="Policy file overriding the workflow's.")] = None,
    by: Annotated[str | None, typer.Option(help="Who moves it (recorded).")] = None,
    db: DbOption = None,
) -> None:
    """Move an unfinished run to another version of its workflow (recorded in its journal)."""
    import getpass

    try:
        wf = load_workflow(to, policy=policy)
    except TetherError as exc:
        fail(str(exc))
    runtime = Runtime(open_store(db))
    result = run_async(
        runtime.migrate(
            run_id,
            wf,
            by=by or getpass.getuser(),
            workflow_ref=workflow_ref(to),
            policy_ref=str(policy.resolve()) if policy else None,
        )
    )
    out.print(
        f"run {result.run_id} now runs on {wf.name} version {wf.version}; it is {result.status}: "
        f"tether resume {result.run_id}"
    )


@app.command()
def worker(
    db: DbOption = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Runs driven at once by this process.")] = 8,
    lease: Annotated[
        float, typer.Option(min=1.0, help="Seconds a claimed run stays leased without renewal.")
    ] = 15.0,
    limit: Annotated[
        list[str] | None,
        typer.Option(help="WORKFLOW=N: at most N runs of that workflow at once (repeatable)."),
    ] = None,
    until_idle: Annotated[bool, typer.Option(help="Exit when nothing is runnable.")] = False,
    worker_id: Annotated[str | None, typer.Option(help="Name in leases (default host:pid:random).")] = None,
) -> None:
    """Claim runnable runs and drive them; SIGTERM drains gracefully."""
    limits: dict[str, int] = {}
    for item in limit or []:
        name, _, number = item.partition("=")
        if not name or not number.isdigit():
            fail(f"--limit takes WORKFLOW=N, not {item!r}")
        limits[name] = int(number)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    store = open_store(db)

    async def go() -> None:
        w = Worker(store, worker_id=worker_id, concurrency=concurrency, lease_seconds=lease, limits=limits)
        install_signal_handlers(w)
        out.print(
            f"worker {w.worker_id} on {db or 'the default journal'}: concurrency {concurrency}, "
            f"lease {lease:g}s" + (f", limits {limits}" if limits else "")
        )
        stats = await w.run(until_idle=until_idle)
        out.print(
            f"worker {w.worker_id} stopped: claimed {stats.claimed}, outcomes {stats.stopped}, "
            f"errors {stats.errors}"
        )

    try:
        asyncio.run(go())
    except TetherError as exc:
        fail(str(exc))
