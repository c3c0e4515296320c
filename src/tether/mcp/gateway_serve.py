"""The MCP gateway's transports: stdio (one local client) and streamable HTTP (callers with tokens).

Over HTTP every request to /mcp authenticates a tether token (`Authorization: Bearer tth_…`,
made with `tether token create`) before the MCP layer sees it: a missing, unknown, revoked or
expired token is refused with 401, a caller the gateway maps to no policy (or who may not
start runs) with 403. The principal rides with the request to the gateway's handlers
(`request.state.tether_principal`), so a revoked token stops working at its next request.

The approval routes (`GET /approvals`, `POST /approvals/TICKET/approve|deny`) authenticate
the same way and let a principal decide what it may decide (an approver for the ticket's
approver role, or an admin), recorded as that principal; a decision made here wakes the
waiting call at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from tether import identity
from tether.errors import AuthError, Forbidden, TicketError
from tether.mcp.gateway import LOCAL, WORKFLOW, Gateway

try:
    import anyio
    from mcp.server.stdio import stdio_server
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the MCP gateway needs the official MCP SDK ({exc}); install it with: pip install 'tether[mcp]'"
    ) from exc

log = logging.getLogger("tether.mcp.gateway")
MAX_MESSAGE_BYTES = 256 * 2**20  # one JSON-RPC message on stdin (a large write_file, say)
Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


# -- stdio -------------------------------------------------------------------------------


async def serve_stdio(gateway: Gateway, signals: StopSignals) -> None:
    """Serve one client over stdin/stdout until it closes them or a signal stops us."""
    server = gateway.server()
    await gateway.lane(LOCAL).started()  # the local user's run, open from the start
    stdin = await _StdinLines.open()
    try:
        async with anyio.create_task_group() as group:
            signals.on_stop(group.cancel_scope.cancel)
            async with stdio_server(stdin=stdin) as (read, write):  # type: ignore[arg-type]
                await server.run(read, write, server.create_initialization_options())
            group.cancel_scope.cancel()
    finally:
        if stdin is not None:
            stdin.close()


class _StdinLines:
    """stdin as lines, read by the event loop: a signal can end the serving at once, where
    the SDK's own reader blocks a thread that cancellation cannot interrupt (a SIGTERM would
    then leave the run open until the client closed stdin)."""

    def __init__(self, reader: asyncio.StreamReader, transport: asyncio.BaseTransport) -> None:
        self.reader, self.transport = reader, transport

    @classmethod
    async def open(cls) -> _StdinLines | None:
        """None when stdin is a regular file, which the loop cannot watch (the SDK's reader then)."""
        reader = asyncio.StreamReader(limit=MAX_MESSAGE_BYTES)
        protocol = asyncio.StreamReaderProtocol(reader)
        try:
            transport, _ = await asyncio.get_running_loop().connect_read_pipe(lambda: protocol, sys.stdin)
        except (ValueError, OSError):
            return None
        return cls(reader, transport)

    def __aiter__(self) -> _StdinLines:
        return self

    async def __anext__(self) -> str:
        line = await self.reader.readline()
        if not line:
            raise StopAsyncIteration
        return line.decode("utf-8", errors="replace")

    def close(self) -> None:
        self.transport.close()


# -- streamable HTTP ---------------------------------------------------------------------


async def serve_http(gateway: Gateway, signals: StopSignals, *, host: str, port: int) -> None:
    """Streamable HTTP at /mcp, and the approval routes at /approvals, until a signal."""
    import uvicorn

    web = uvicorn.Server(uvicorn.Config(http_app(gateway, host), host=host, port=port, log_level="warning"))
    signals.on_stop(lambda: setattr(web, "should_exit", True))
    log.info("MCP at http://%s:%d/mcp; approvals at http://%s:%d/approvals", host, port, host, port)
    await web.serve()


def http_app(gateway: Gateway, host: str) -> ASGIApp:
    """The gateway as an ASGI application: /mcp behind token authentication, /approvals."""
    server = gateway.server()
    app = server.streamable_http_app(host=host, custom_starlette_routes=approval_routes(gateway))
    return Authenticated(app, gateway)


class Authenticated:
    """ASGI: every request to /mcp authenticates its bearer token and is admitted by the
    gateway's access map before the MCP layer sees it."""

    def __init__(self, app: ASGIApp, gateway: Gateway) -> None:
        self.app, self.gateway = app, gateway

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith("/mcp"):
            await self.app(scope, receive, send)
            return
        from starlette.responses import JSONResponse

        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        try:
            principal = await identity.authenticate(self.gateway.journal, _bearer(headers))
            self.gateway.admit(principal)
        except AuthError as exc:
            challenge = {"WWW-Authenticate": f'Bearer error="invalid_token", error_description="{exc.code}"'}
            refusal = JSONResponse({"error": exc.code, "detail": str(exc)}, 401, headers=challenge)
            await refusal(scope, receive, send)
            return
        except Forbidden as exc:
            await JSONResponse({"error": "forbidden", "detail": str(exc)}, 403)(scope, receive, send)
            return
        scope.setdefault("state", {})["tether_principal"] = principal
        await self.app(scope, receive, send)


def _bearer(headers: dict[str, str]) -> str:
    value = headers.get("authorization", "")
    scheme, _, token = value.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise AuthError("send a tether token as `Authorization: Bearer tth_…`", code="unauthenticated")
    return token.strip()


def approval_routes(gateway: Gateway) -> list[Any]:
    """GET /approvals (the pending tickets of this gateway's runs the caller may decide) and
    POST /approvals/TICKET/approve|deny with JSON `{"reason": ...}`; each with a tether token."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    async def caller(request: Request) -> identity.Principal:
        headers = {k.lower(): v for k, v in request.headers.items()}
        return await identity.authenticate(gateway.journal, _bearer(headers))

    def refusal(exc: Exception) -> JSONResponse:
        if isinstance(exc, AuthError):
            return JSONResponse({"error": exc.code, "detail": str(exc)}, 401)
        if isinstance(exc, Forbidden):
            return JSONResponse({"error": "forbidden", "detail": str(exc)}, 403)
        return JSONResponse({"error": "conflict", "detail": str(exc)}, 409)

    async def pending(request: Request) -> JSONResponse:
        try:
            principal = await caller(request)
        except AuthError as exc:
            return refusal(exc)
        mine = gateway.run_ids
        tickets = [
            t.model_dump()
            for t in await gateway.journal.list_tickets("pending")
            if t.run_id in mine and identity.allowed(principal, "decide", workflow=WORKFLOW, ticket=t)
        ]
        return JSONResponse({"tickets": tickets})

    async def decide(request: Request) -> JSONResponse:
        verb, ticket_id = request.path_params["decision"], request.path_params["ticket_id"]
        if verb not in ("approve", "deny"):
            return JSONResponse({"error": f"POST /approvals/TICKET/approve or /deny, not {verb!r}"}, 404)
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            body = None
        if not isinstance(body, dict):
            return JSONResponse({"error": 'the body must be a JSON object: {"reason": ...}'}, 400)
        try:
            principal = await caller(request)
            status, answer = await _decided(
                gateway, principal, ticket_id, verb == "approve", str(body.get("reason") or "")
            )
            return JSONResponse(answer, status)
        except (AuthError, Forbidden, TicketError) as exc:
            return refusal(exc)

    return [
        Route("/approvals", pending, methods=["GET"]),
        Route("/approvals/{ticket_id}/{decision}", decide, methods=["POST"]),
    ]


async def _decided(
    gateway: Gateway, principal: identity.Principal, ticket_id: str, approve: bool, reason: str
) -> tuple[int, dict[str, Any]]:
    """Decide a ticket of this gateway's runs as `principal`, if it may; wake the waiting call."""
    ticket = await gateway.journal.get_ticket(ticket_id)
    if ticket.run_id not in gateway.run_ids:
        return 404, {"error": f"ticket {ticket_id} is not this gateway's"}
    identity.authorize(principal, "decide", workflow=WORKFLOW, ticket=ticket)
    decided = await gateway.journal.decide_ticket(ticket_id, approve=approve, by=principal, reason=reason)
    gateway.decisions.poke()  # the waiting call goes on now
    return 200, decided.model_dump()


class StopSignals:
    """SIGINT and SIGTERM stop serving; the runs then end and are recorded as such.

    Caught from the moment the command starts (`install`), not only once serving begins: a
    signal while the gateway starts (its upstreams listed, the local user's run opened) would
    otherwise kill the process with that run left open. One received before serving begins
    stops it as soon as it does (`on_stop`)."""

    def __init__(self) -> None:
        self.requested = False
        self._stop: Callable[[], None] | None = None

    def install(self) -> None:
        loop = asyncio.get_running_loop()

        def caught(*_: object) -> None:
            self.requested = True
            if self._stop is not None:
                loop.call_soon_threadsafe(self._stop)

        for sig in (signal.SIGINT, signal.SIGTERM):
            # signal.signal, not loop.add_signal_handler: uvicorn swaps handlers and re-raises
            # what it caught once it stops, which would otherwise kill us before the run ends.
            signal.signal(sig, caught)

    def on_stop(self, stop: Callable[[], None]) -> None:
        """Serving has begun: `stop` ends it, now if a signal came already."""
        self._stop = stop
        if self.requested:
            stop()
