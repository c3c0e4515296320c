"""`tether serve`: the HTTP API (and web interface) over one journal, workers in the same process."""

from __future__ import annotations

import asyncio
import logging
import os
from typing import Annotated

import typer

from tether.cli.common import (
    DbOption,
    ModelOption,
    err,
    fail,
    open_store,
    pinned_model_spec,
    without_password,
)
from tether.cli.workers import _roots
from tether.errors import TetherError
from tether.registry import ROOTS_ENV, Registry

app = typer.Typer()


@app.command()
def serve(
    db: DbOption = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface).")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on.")] = 8080,
    workflows: Annotated[
        list[str] | None,
        typer.Option(
            "--workflows",
            metavar="DIR",
            help=f"A folder of workflows the API may start and the workers drive (repeat; default "
            f"${ROOTS_ENV}). Without it the server only shows runs and decides tickets.",
        ),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            min=0,
            help="Workers driving runs inside this process (0: other processes do; default 1 with "
            "--workflows, else 0).",
        ),
    ] = None,
    concurrency: Annotated[int, typer.Option(min=1, help="Runs each in-process worker drives at once.")] = 8,
    model: ModelOption = None,
) -> None:
    """Serve the HTTP API (/api/v1, /openapi.json) and the web interface over the journal.

    One process is a working deployment: with --workflows and --workers N it also drives the
    runs it starts. Callers authenticate with API tokens (tether token create).
    """
    try:
        import uvicorn

        from tether.serve import build_app
        from tether.serve.web import SECRET_ENV, web_routes
    except ImportError as exc:
        fail(f"tether serve needs the serve extra ({exc}): pip install 'tether[serve]'")
    roots = _roots(workflows)
    if workers is None:
        workers = 1 if roots else 0
    if workers and not roots:
        fail(
            f"--workers {workers} needs the workflows to drive: --workflows DIR (or ${ROOTS_ENV}), "
            "or --workers 0"
        )
    logging.basicConfig(level=logging.INFO, format="%(asctime)s tether serve: %(message)s")
    try:
        registry = asyncio.run(Registry.load(roots)) if roots else None
    except TetherError as exc:
        fail(str(exc))
    for problem in registry.problems if registry else ():
        err.print(f"not loaded: {problem}", markup=False)
    journal = open_store(db, create=True)
    application = build_app(
        journal,
        registry=registry,
        model_spec=pinned_model_spec(model),
        workers=workers,
        concurrency=concurrency,
        close_journal=True,
        # The web interface at / (sessions signed with $TETHER_WEB_SECRET, else a random key).
        extra_routes=web_routes(secret=os.environ.get(SECRET_ENV)),
    )
    err.print(
        f"tether serve on http://{host}:{port} over {without_password(db) if db else 'the default journal'}: "
        f"{workers} worker(s), "
        + (
            f"{len(registry.workflows)} workflow version(s)"
            if registry
            else "no workflows (view and decide only)"
        ),
        markup=False,
    )
    uvicorn.run(application, host=host, port=port, log_level="info", lifespan="on")
