"""The ASGI application `tether serve` runs: the API under `/api/v1`, `/openapi.json`, the
web interface's routes (given as `extra_routes`, mounted at `/`), and, in the same process,
the workers that drive the runs (`workers=N`) with their live events.

    app = build_app(journal, registry=registry, model_spec="script:proposals.json", workers=1)
    uvicorn.run(app, host="127.0.0.1", port=8080)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from tether.errors import TetherError
from tether.journal import Journal
from tether.registry import Registry
from tether.serve import api
from tether.serve.events import EventHub
from tether.serve.problems import Problem, handle
from tether.worker import Worker

log = logging.getLogger("tether.serve")


async def _http_error(request: Request, exc: Exception) -> Response:
    """Starlette's own refusals (no such route, wrong method) as problem JSON too."""
    assert isinstance(exc, HTTPException)
    code = {404: "no_route", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
    return Problem(exc.status_code, code, str(exc.detail)).response(
        headers=dict(exc.headers) if exc.headers else None
    )


def build_app(
    journal: Journal,
    *,
    registry: Registry | None = None,
    model_spec: str | None = None,
    workers: int = 0,
    concurrency: int = 8,
    extra_routes: Sequence[BaseRoute] = (),
    poll_seconds: float = 0.25,
    close_journal: bool = False,
) -> Starlette:
    """The app over `journal`. `registry`: the workflows runs may be started from (and the
    in-process workers drive); `model_spec`: the model those runs are given. `extra_routes`
    (the web interface) are served beside the API. With `close_journal` the journal is
    closed when the app shuts down."""
    hub = EventHub(journal, poll_seconds=poll_seconds)
    server = api.Server(journal, registry, model_spec, hub)
    document = api.openapi(registry)
    routes: list[BaseRoute] = [*api.routes(server), api.openapi_route(document), *extra_routes]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[dict[str, Any]]:
        running: list[Worker] = []
        tasks: list[asyncio.Task[Any]] = []
        if workers and registry is not None:
            for _ in range(workers):
                worker = Worker(journal, registry, concurrency=concurrency)
                worker.runtime.on_commit = hub.committed  # live events for what it commits
                running.append(worker)
                tasks.append(asyncio.create_task(worker.run()))
        try:
            yield {"tether": server}
        finally:
            hub.close()
            for worker in running:
                worker.stop()
            if tasks:
                await asyncio.gather(*tasks, return_exceptions=True)
            if close_journal:
                await journal.aclose()

    app = Starlette(
        routes=routes,
        lifespan=lifespan,
        exception_handlers={
            HTTPException: _http_error,
            Problem: handle,
            TetherError: handle,
            Exception: handle,
        },
    )
    app.state.tether = server
    return app
