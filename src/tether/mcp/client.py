"""MCP servers as tool sources: a connection per server, its tools governed like native ones.

The `mcp` SDK's clients are async context managers bound to the task that entered them
(anyio cancel scopes). `McpClient` therefore holds its connection in a dedicated background
task that enters those contexts and runs every request on behalf of whichever task asks;
a tool call works from any task of the event loop that opened the connection. Closing the
client, or the end of that loop (asyncio.run cancels the task), leaves the contexts in the
same task, which ends a stdio server's process.

`McpServer` is what a loaded workflow's tools hold: a server connected lazily, on first use,
with one `McpClient` per event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib
import logging
import math
import os
import re
import tempfile
import threading
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from tether.tools import (
    Effect,
    SchemaError,
    SchemaTool,
    Tool,
    ToolContext,
    Trust,
    ValidatedArgs,
    Verifier,
    schema_validator,
)

try:
    import anyio
    import mcp.types
    from mcp import Client, MCPError, StdioServerParameters
    from mcp.client.stdio import stdio_client
    from mcp.client.streamable_http import streamable_http_client
    from mcp.client.subscriptions import ListenNotSupportedError
    from mcp.shared._httpx_utils import create_mcp_http_client
    from mcp.types import CONNECTION_CLOSED, METHOD_NOT_FOUND
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"MCP tools need the official MCP SDK ({exc}); install it with: pip install 'tether[mcp]'"
    ) from exc

T = TypeVar("T")
_log = logging.getLogger("tether.mcp")

# Connections' tasks, held until they end.
_connections: set[asyncio.Task[None]] = set()

# How much of a server's stderr an error quotes when the server fails to start or dies.
_STDERR_TAIL = 1500
# `${NAME}` in a value of a server's `env`: the variable NAME of tether's own environment.
_VARIABLE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


class McpServerSpec(BaseModel):
    """One upstream MCP server: a command run over stdio, or a streamable HTTP endpoint."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1)
    command: list[str] | None = None
    url: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    # HTTP headers sent to a url server (e.g. `Authorization: Bearer ${TOKEN}`).
    headers: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    # Seconds one request may take (connecting, listing, a tool call); a hung server
    # becomes a tool_error instead of a run that never moves.
    timeout: float = Field(60.0, gt=0)

    @model_validator(mode="after")
    def _one_transport(self) -> McpServerSpec:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of 'command' (a stdio server) or 'url' (streamable HTTP)")
        if self.command is not None and (not self.command or not all(self.command)):
            raise ValueError("'command' must be a non-empty list of non-empty strings (the server's argv)")
        if self.url is not None:
            if not self.url.startswith(("http://", "https://")):
                raise ValueError(f"'url' must be an http:// or https:// endpoint, not {self.url!r}")
            if self.env or self.cwd:
                raise ValueError("'env' and 'cwd' apply to a command, not to a url")
        elif self.headers:
            raise ValueError("'headers' apply to a url, not to a command")
        return self

    def where(self) -> str:
        """The server as a person would recognise it in an error message."""
        return f"MCP server {self.name!r} ({self.url or ' '.join(self.command or [])})"

    def environment(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """`env` with each `${NAME}` replaced by the variable NAME of `environ` (tether's own
        environment): a secret stays out of the files that name the server, and out of the
        journal, which records the spec, never the expanded values. `$${NAME}` is a literal
        `${NAME}`. A variable that is not set is refused with `McpError` naming it."""
        return self._expanded(self.env, "env", environ)

    def header_values(self, environ: Mapping[str, str] | None = None) -> dict[str, str]:
        """`headers`, with `${NAME}` expanded as in `environment`."""
        return self._expanded(self.headers, "header", environ)

    def _expanded(
        self, values: dict[str, str], what: str, environ: Mapping[str, str] | None
    ) -> dict[str, str]:
        source = os.environ if environ is None else environ
        expanded: dict[str, str] = {}
        for key, value in values.items():
            missing = [
                m.group(1) for m in _VARIABLE.finditer(value) if m.group(1) not in source and not _escaped(m)
            ]
            if missing:
                raise McpError(
                    f"{self.where()}: {what} {key} names ${{{missing[0]}}}, which is not set in tether's "
                    f"environment; set {missing[0]} (or write $${{{missing[0]}}} for a literal)"
                )
            expanded[key] = _VARIABLE.sub(
                lambda m: m.group(0) if _escaped(m) else source[m.group(1)], value
            ).replace("$${", "${")
        return expanded


class ToolOverride(BaseModel):
    """What a workflow author declares about an MCP tool, over what its server hints."""

    model_config = ConfigDict(extra="forbid")

    effect: Effect | None = None
    idempotent: bool | None = None
    verify: str | None = None
    name: str | None = None


class McpError(RuntimeError):
    """An MCP server could not be reached, or a call to it failed."""


class McpToolError(McpError):
    """The server ran the tool and reported an error (`isError`)."""


class ToolSource(Protocol):
    """Whatever can call a tool on a server: an `McpClient`, or a lazily connected `McpServer`."""

    spec: McpServerSpec

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> mcp.types.CallToolResult: ...


@dataclass(frozen=True)
class McpToolRef:
    """Stands in for a native tool's function: one per server tool, so the workflow's identity
    checks and its description (`fn`) treat two mentions of the same tool as the same tool."""

    server: str
    tool: str

    def __repr__(self) -> str:
        return f"mcp:{self.server}/{self.tool}"


class McpTool(SchemaTool):
    """A tool an MCP server offers, governed exactly like a native tool.

    Arguments are checked against the server's `inputSchema` before the server is called;
    the effect comes from the workflow's declaration, else from the server's annotations
    (conservatively: only `readOnlyHint` makes a read).
    """

    results: Trust = "untrusted"  # what a server returns is someone else's content unless declared

    def __init__(
        self,
        source: ToolSource,
        listed: mcp.types.Tool,
        *,
        name: str | None = None,
        effect: Effect | None = None,
        idempotent: bool | None = None,
        verify: Verifier | None = None,
        fn: McpToolRef | None = None,
    ) -> None:
        self.source = source
        self.remote_name = listed.name
        self.server = source.spec.name
        # Never called: an MCP tool is invoked through its server; `fn` only identifies it.
        self.fn = fn or McpToolRef(self.server, listed.name)  # type: ignore[assignment]
        self.name = name or listed.name
        hinted_effect, hinted_idempotent = effect_from_annotations(listed.annotations)
        self.effect = effect or hinted_effect
        # Said by the workflow, or by the server's annotations (a tool with neither is undeclared).
        self.effect_declared = effect is not None or listed.annotations is not None
        if idempotent is not None:
            self.idempotent = idempotent
        elif effect is None:
            self.idempotent = hinted_idempotent
        else:  # a declared effect with no word on repeats: reads are harmless, nothing else is
            self.idempotent = effect == "read"
        self.verifier = verify
        self.description = listed.description or listed.title or ""
        self.is_async = True
        self.input_schema: dict[str, Any] = dict(listed.input_schema)
        try:
            self._validator = schema_validator(self.input_schema, f"{self.server}/{listed.name}")
        except SchemaError as exc:
            raise McpError(str(exc)) from None

    def __repr__(self) -> str:
        return (
            f"McpTool({self.name!r}, server={self.server!r}, effect={self.effect!r}, "
            f"idempotent={self.idempotent})"
        )

    async def call(self, args: ValidatedArgs | dict[str, Any], ctx: ToolContext) -> Any:
        """Call the tool on its server; an `isError` result raises `McpToolError`."""
        if not isinstance(args, ValidatedArgs):
            args = self.validate(args)
        try:
            result = await self.source.call_tool(self.remote_name, args.values)
        except MCPError as exc:  # a protocol-level failure (a timeout, a refused request)
            raise McpError(f"{self.server}/{self.remote_name}: {exc.message}") from None
        if result.is_error:
            detail = _text_of(result) or "the server reported an error"
            raise McpToolError(f"{self.server}/{self.remote_name}: {detail}")
        if result.structured_content is not None:
            return result.structured_content
        return [block.model_dump(mode="json", by_alias=True, exclude_none=True) for block in result.content]


def effect_from_annotations(annotations: mcp.types.ToolAnnotations | None) -> tuple[Effect, bool]:
    """The effect and idempotence a server's hints allow us to assume, conservatively.

    Hints come from the server, not from the workflow's author: only `readOnlyHint` makes a
    read; anything else is `external`, idempotent only if the server says both that repeats
    are harmless and that the tool is not destructive. An author's declaration overrides both.
    """
    if annotations is not None and annotations.read_only_hint:
        return "read", True
    idempotent = (
        annotations is not None
        and annotations.idempotent_hint is True
        and annotations.destructive_hint is False
    )
    return "external", idempotent


class McpClient:
    """One connection to one server, usable from any task of the loop that started it.

    `on_tools_changed`, when given, is awaited each time the server says its tool list
    changed (`notifications/tools/list_changed`, or a `subscriptions/listen` event on a
    2026-07-28 connection), in the connection's task: it should only schedule the re-listing.
    """

    def __init__(self, spec: McpServerSpec, on_tools_changed: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.on_tools_changed = on_tools_changed
        self._env: dict[str, str] | None = None  # the expanded env (a command) or headers (a url)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Future[None] | None = None
        self._inbox: Any = None  # the send side of the jobs stream
        self._pending: set[asyncio.Future[Any]] = set()
        self._failure: McpError | None = None
        self._ending = False

    async def __aenter__(self) -> McpClient:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def closed(self) -> bool:
        """True once the connection is ending: `aclose` was called, or the server went away."""
        return self._task is not None and (self._ending or self._task.done())

    async def start(self) -> None:
        """Connect (once); raise `McpError` naming the server when it cannot be reached."""
        loop = asyncio.get_running_loop()
        if self._task is None:
            spec = self.spec
            self._env = spec.environment() if spec.command is not None else spec.header_values()
            send, receive = anyio.create_memory_object_stream[tuple[Any, asyncio.Future[Any]]](math.inf)
            self._loop, self._inbox, self._ready = loop, send, loop.create_future()
            self._task = loop.create_task(self._serve(receive), name=f"mcp:{self.spec.name}")
            # The loop keeps only weak references to tasks: a dropped client still shuts down.
            _connections.add(self._task)
            self._task.add_done_callback(_connections.discard)
        elif loop is not self._loop:
            raise McpError(f"{self.spec.where()}: this connection belongs to another event loop")
        assert self._ready is not None
        # Shielded: a caller cancelled while connecting must not cancel the connection itself.
        await asyncio.shield(self._ready)

    async def aclose(self) -> None:
        """End the connection: calls under way finish, then a stdio server's process ends."""
        if self._task is None or self._loop is None:
            return
        if asyncio.get_running_loop() is self._loop:
            self._end()
            await asyncio.shield(self._task)
        elif not self._loop.is_closed():  # the connection's own loop ends it, in its own thread
            self._loop.call_soon_threadsafe(self._end)

    async def list_tools(self) -> list[mcp.types.Tool]:
        async def listing(client: Client) -> list[mcp.types.Tool]:
            tools: list[mcp.types.Tool] = []
            cursor: str | None = None
            while True:
                page = await client.list_tools(cursor=cursor, cache_mode="bypass")  # a change is read at once
                tools.extend(page.tools)
                cursor = page.next_cursor
                if not cursor:
                    return tools

        return await self._submit(listing)

    async def call_tool(
        self, name: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> mcp.types.CallToolResult:
        return await self._submit(lambda client: client.call_tool(name, arguments, meta=meta))  # type: ignore[arg-type]

    def tools(
        self, listed: Iterable[mcp.types.Tool], overrides: Mapping[str, ToolOverride] | None = None
    ) -> list[McpTool]:
        """Tools for `listed` (from `list_tools`), with the author's `overrides` by tool name."""
        return _build_tools(self, listed, overrides or {})

    # -- the connection's own task ---------------------------------------------------

    async def _submit(self, job: Callable[[Client], Awaitable[T]]) -> T:
        await self.start()
        assert self._loop is not None
        if asyncio.get_running_loop() is not self._loop:
            raise McpError(f"{self.spec.where()}: this connection belongs to another event loop")
        future: asyncio.Future[T] = self._loop.create_future()
        try:
            self._inbox.send_nowait((job, future))
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            raise self._closed_error() from None
        self._pending.add(future)
        future.add_done_callback(self._pending.discard)
        return await future

    async def _serve(self, inbox: Any) -> None:
        assert self._ready is not None
        with tempfile.TemporaryFile() as stderr:
            try:
                async with Client(
                    self._transport(stderr),
                    read_timeout_seconds=self.spec.timeout,
                    message_handler=self._notified if self.on_tools_changed else None,
                ) as client:
                    self._ready.set_result(None)
                    async with anyio.create_task_group() as jobs, inbox:
                        listening = anyio.CancelScope()
                        if self.on_tools_changed is not None:
                            jobs.start_soon(self._listen, client, listening)
                        async for job, future in inbox:
                            jobs.start_soon(self._run_job, client, job, future)
                        listening.cancel()  # the jobs under way finish; nothing more is listened to
            except Exception as exc:  # the server could not start, or went away
                self._failure = McpError(f"{self.spec.where()}: {_describe(exc)}{_tail(stderr)}")
                if not self._ready.done():
                    self._ready.set_exception(self._failure)
            finally:
                self._end()
                inbox.close()
                for future in list(self._pending):
                    if not future.done():
                        future.set_exception(self._closed_error())
                if not self._ready.done():
                    self._ready.set_exception(self._closed_error())
                _mark_retrieved(self._ready)

    def _end(self) -> None:
        """No new requests: the jobs under way finish, then the connection closes."""
        self._ending = True
        self._inbox.close()

    async def _notified(self, message: Any) -> None:
        """A notification on a handshake-era connection: the tool list changed, or not ours."""
        if isinstance(message, mcp.types.ToolListChangedNotification) and self.on_tools_changed:
            self.on_tools_changed()

    async def _listen(self, client: Client, scope: anyio.CancelScope) -> None:
        """On a 2026-07-28 connection, tool list changes come on a `subscriptions/listen`
        stream, open while the connection is (an earlier protocol sends notifications instead)."""
        assert self.on_tools_changed is not None
        with scope:
            try:
                async with client.listen(tools_list_changed=True) as events:
                    async for _ in events:
                        self.on_tools_changed()
            except ListenNotSupportedError:
                return  # an earlier protocol: notifications come through `_notified`
            except Exception as exc:  # the stream dropped: the tool list stays as last listed
                if isinstance(exc, MCPError) and exc.code == METHOD_NOT_FOUND:
                    return  # the server offers no change events: its tools are as listed
                _log.warning(
                    "%s: its tool list changes are no longer followed: %s", self.spec.where(), _describe(exc)
                )

    async def _run_job(
        self, client: Client, job: Callable[[Client], Awaitable[Any]], future: asyncio.Future[Any]
    ) -> None:
        """Run one request in the connection's task; a caller that gives up cancels it."""
        if future.done():
            return
        with anyio.CancelScope() as scope:
            future.add_done_callback(lambda f: scope.cancel() if f.cancelled() else None)
            try:
                result = await job(client)
            except Exception as exc:
                if isinstance(exc, MCPError) and exc.code == CONNECTION_CLOSED:
                    self._end()  # the server went away: this connection is over
                if not future.done():
                    future.set_exception(exc)
                return
            if not future.done():
                future.set_result(result)

    def _transport(self, stderr: IO[bytes]) -> AbstractAsyncContextManager[Any]:
        spec = self.spec
        if spec.url is not None:
            return _http_transport(spec.url, self._env or {})
        assert spec.command is not None
        params = StdioServerParameters(
            command=spec.command[0], args=spec.command[1:], env=self._env or None, cwd=spec.cwd
        )
        return stdio_client(params, errlog=stderr)  # type: ignore[arg-type]

    def _closed_error(self) -> McpError:
        return self._failure or McpError(f"{self.spec.where()}: the connection is closed")


class McpServer:
    """A server a workflow names, connected lazily: one `McpClient` per event loop.

    The first call in a loop connects; the connection lives until `aclose()` in that loop or
    the loop's end. A connection the server dropped is replaced at the next call.
    """

    def __init__(self, spec: McpServerSpec, on_tools_changed: Callable[[], None] | None = None) -> None:
        self.spec = spec
        self.on_tools_changed = on_tools_changed
        self._clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, McpClient] = (
            weakref.WeakKeyDictionary()
        )

    def client(self) -> McpClient:
        """The connection of the running loop, created (not yet started) when missing or dropped."""
        loop = asyncio.get_running_loop()
        client = self._clients.get(loop)
        if client is None or client.closed:
            client = self._clients[loop] = McpClient(self.spec, self.on_tools_changed)
        return client

    async def call_tool(
        self, name: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None
    ) -> mcp.types.CallToolResult:
        return await self.client().call_tool(name, arguments, meta)

    def tools(self, *names: str, overrides: Mapping[str, ToolOverride] | None = None) -> list[McpTool]:
        """List the server's tools now and build them (all, or those named), connected lazily.

        For workflows written in Python; synchronous, like building any other workflow.
        """
        listed = list_tools_now([self])[self.spec.name]
        if isinstance(listed, McpError):
            raise listed
        offered = {t.name: t for t in listed}
        unknown = [n for n in names if n not in offered]
        if unknown:
            offers = ", ".join(sorted(offered))
            raise McpError(f"{self.spec.where()} has no tool {', '.join(unknown)} (it offers: {offers})")
        chosen = [offered[n] for n in names] if names else listed
        return _build_tools(self, chosen, overrides or {})

    async def aclose(self) -> None:
        """Close the running loop's connection, if there is one."""
        client = self._clients.pop(asyncio.get_running_loop(), None)
        if client is not None:
            await client.aclose()


def _build_tools(
    source: ToolSource, listed: Iterable[mcp.types.Tool], overrides: Mapping[str, ToolOverride]
) -> list[McpTool]:
    tools = []
    for item in listed:
        declared = overrides.get(item.name) or ToolOverride()
        verify = _import_verifier(declared.verify) if declared.verify else None
        tools.append(
            McpTool(
                source,
                item,
                name=declared.name,
                effect=declared.effect,
                idempotent=declared.idempotent,
                verify=verify,
            )
        )
    return tools


def list_tools_now(servers: Iterable[McpServer]) -> dict[str, list[mcp.types.Tool] | McpError]:
    """List several servers' tools from synchronous code, even inside a running loop
    (`McpServer.tools()`, for workflows built in Python).

    The servers are listed together over short-lived connections, in a helper thread with its
    own loop; the tools' own connections open later, lazily, in the loop that runs them. A
    server that cannot be listed maps to its error. (The loader lists in its own loop instead.)
    """
    servers = list(servers)
    outcome: dict[str, list[mcp.types.Tool] | McpError] = {}

    async def listing(server: McpServer) -> None:
        try:
            async with McpClient(server.spec) as client:
                outcome[server.spec.name] = await client.list_tools()
        except McpError as exc:
            outcome[server.spec.name] = exc
        except Exception as exc:  # a protocol-level refusal of tools/list
            outcome[server.spec.name] = McpError(f"{server.spec.where()}: {_describe(exc)}")

    async def all_of_them() -> None:
        await asyncio.gather(*(listing(server) for server in servers))

    worker = threading.Thread(target=asyncio.run, args=(all_of_them(),), name="mcp-list-tools")
    worker.start()
    worker.join()
    for server in servers:
        unfinished = McpError(f"{server.spec.where()}: listing its tools did not finish")
        outcome.setdefault(server.spec.name, unfinished)
    return outcome


async def close_servers(tools: Iterable[Tool]) -> None:
    """Close the running loop's connections of every MCP server these tools use."""
    servers = {id(t.source): t.source for t in tools if isinstance(t, McpTool)}
    for source in servers.values():
        if isinstance(source, McpServer | McpClient):
            await source.aclose()


@contextlib.asynccontextmanager
async def _http_transport(url: str, headers: dict[str, str]) -> AsyncIterator[Any]:
    """Streamable HTTP with the server's headers (its client closed with the connection)."""
    async with (
        create_mcp_http_client(headers=headers) as http,
        streamable_http_client(url, http_client=http) as streams,
    ):
        yield streams


def _escaped(match: re.Match[str]) -> bool:
    """`$${NAME}`: a literal `${NAME}`, not a variable."""
    return match.string[max(0, match.start() - 1) : match.start()] == "$"


def _tail(stderr: IO[bytes]) -> str:
    """The end of what a stdio server wrote to stderr: often the reason it stopped."""
    size = stderr.seek(0, 2)
    stderr.seek(max(0, size - _STDERR_TAIL))
    tail = stderr.read().decode(errors="replace").strip()
    return f"; the server's stderr ends with:\n{tail}" if tail else ""


def _mark_retrieved(future: asyncio.Future[Any]) -> None:
    """A failure to connect reaches the callers through `start`; none may be waiting now."""
    if not future.cancelled():
        future.exception()


def _text_of(result: mcp.types.CallToolResult) -> str:
    return " ".join(b.text for b in result.content if isinstance(b, mcp.types.TextContent)).strip()


def _describe(exc: BaseException) -> str:
    """The innermost cause of a failure, without the task groups' wrapping."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def _import_verifier(ref: str) -> Verifier:
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise McpError(f"verifier {ref!r} is not an import path of the form module:name")
    obj: Any = importlib.import_module(module)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj  # type: ignore[no-any-return]
