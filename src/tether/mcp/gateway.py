"""A governed MCP gateway: an MCP server in front of other MCP servers.

`tether mcp-gateway --upstream CMD --policy FILE` offers the upstream servers' tools to any
MCP client and takes every call through tether's kernel: arguments checked against the
upstream's schema, the policy's decision, an approval ticket where it asks, the journal.

The gateway is one governed run of a workflow built here: one agent state, `gateway`, whose
tools are the upstream tools, and the MCP client as its model. An incoming `tools/call` is
queued; `CallQueue.propose` hands it to the runtime as a tool_call proposal; the governed
step does the rest. When the runtime asks for the next proposal, the queue first answers the
previous call with what that step observed (the upstream's result, or a refusal with its
reason code). Calls are therefore serialized: one step at a time, in arrival order.

An `ask` pauses the run on a ticket. The gateway waits, polling the journal, until a person
decides from another process (`tether approve TICKET` / `tether deny`, or the HTTP approval
endpoint), then resumes the run, which executes the call or records the denial. Every ticket
expires after `--approval-timeout` at the latest; the resumed run records the expiry
(`approval_expired`) and the next call proceeds.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import re
import secrets
import shlex
import signal
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlparse

import msgspec

from tether import __version__
from tether.budget import Budget
from tether.decision import Decision
from tether.errors import PolicyFileError, TetherError, TicketError
from tether.identity import Principal
from tether.journal import Journal, Ticket
from tether.journal.common import SELF_DRIVEN
from tether.mcp.client import McpClient, McpError, McpServer, McpServerSpec, McpTool, McpToolError
from tether.mcp.gateway_config import GatewayConfig, ToolConfig
from tether.models.protocol import Exchange, ModelContext, ModelReply
from tether.policy import Policy
from tether.runtime import Runtime
from tether.tools import ToolContext, ValidatedArgs
from tether.workflow import AgentState, Terminal, Workflow

try:
    import anyio
    import mcp.types
    from mcp.server.context import ServerRequestContext
    from mcp.server.lowlevel import Server
    from mcp.server.stdio import stdio_server
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the MCP gateway needs the official MCP SDK ({exc}); install it with: pip install 'tether[mcp]'"
    ) from exc

log = logging.getLogger("tether.mcp.gateway")

STATE = "gateway"
# Marked self-driven: `tether resume` and workers cannot load it; only the gateway drives it.
WORKFLOW_REF = f"{SELF_DRIVEN}mcp-gateway>"
META_KEY = "tether"
# A fresh visit of the gateway state every so many calls (exit `rotate`), so that the visit's
# transcript, which the runtime keeps in memory, stays bounded however long the session.
ROTATE_EVERY = 200
# A gateway session is long and repeats itself (the same read, again and again): the limits
# are there only because a budget must have some.
BUDGET = Budget(max_steps=10**9, max_tool_calls=10**9, max_seconds=1e9, max_repeats=10**9)
PROGRESS_EVERY = 10.0  # seconds between progress notifications while a call waits for a person
MAX_MESSAGE_BYTES = 256 * 2**20  # one JSON-RPC message on stdin (a large write_file, say)
POLL_SECONDS = 0.25  # how often a waiting call looks for a person's decision in the journal
_NAMED = re.compile(r"([A-Za-z][A-Za-z0-9_-]*)=(\S.*)", re.S)


class GatewayError(TetherError):
    """The gateway cannot start: an upstream, its tools or the policy are not usable."""


@dataclass(frozen=True)
class Upstream:
    """One upstream server; `prefix` (its name, when given as NAME=CMD) prefixes its tools;
    `tools` is what a configuration file says about its tools (by the upstream's names)."""

    spec: McpServerSpec
    prefix: str | None = None
    key: str = ""
    tools: dict[str, ToolConfig] = field(default_factory=dict)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.spec.name,
            "command": self.spec.command,
            "url": self.spec.url,
            "prefix": self.prefix,
        }


def parse_upstreams(values: Sequence[str]) -> list[Upstream]:
    """`--upstream` values: a command line (split like a shell) or a URL, optionally NAME=…"""
    if not values:
        raise GatewayError("give at least one --upstream (a server's command line, or its http(s) URL)")
    upstreams: list[Upstream] = []
    names: set[str] = set()
    for value in values:
        text = value.strip()
        named = _NAMED.fullmatch(text)
        target = named.group(2) if named else text
        if target.startswith(("http://", "https://")):
            fields: dict[str, Any] = {"url": target}
            default = urlparse(target).hostname or "upstream"
        else:
            try:
                argv = shlex.split(target)
            except ValueError as exc:
                raise GatewayError(f"--upstream {value!r}: {exc}") from None
            if not argv:
                raise GatewayError(f"--upstream {value!r}: no command")
            fields, default = {"command": argv}, Path(argv[0]).name
        if named:
            name = named.group(1)
            if name in names:
                raise GatewayError(f"two upstreams are named {name!r}; give each its own NAME=")
        else:
            candidates = itertools.chain([default], (f"{default}-{i}" for i in itertools.count(2)))
            name = next(n for n in candidates if n not in names)
        names.add(name)
        upstreams.append(Upstream(McpServerSpec(name=name, **fields), prefix=name if named else None))
    return upstreams


def config_upstreams(config: GatewayConfig) -> list[Upstream]:
    """The upstreams a configuration file declares."""
    return [
        Upstream(
            McpServerSpec(
                name=u.name, command=u.command, url=u.url, env=u.env, cwd=u.cwd, timeout=u.timeout
            ),
            prefix=u.key if u.prefix else None,
            key=u.key,
            tools=u.tools,
        )
        for u in config.upstreams
    ]


def _tools_only(policy: Policy) -> Policy:
    """The gateway's exits are its own (the session ends, the visit rotates): a policy
    that governs exits is refused rather than left to block them."""
    exit_rules = [r.id for r in policy.rules if r.exit is not None]
    if exit_rules or policy.document.defaults.exit != "allow":
        what = (
            f"rule(s) {', '.join(exit_rules)}"
            if exit_rules
            else f"defaults.exit: {policy.document.defaults.exit}"
        )
        raise PolicyFileError(
            f"{policy.source}: {what}: a gateway's policy governs tools only (its own exits, taken "
            "when the session ends, must stay allowed); remove the exit rules"
        )
    return policy


class _GatewayPolicy(Policy):
    """The policy file as written, with every approval's expiry capped at --approval-timeout:
    the ticket on the record carries the deadline the gateway keeps."""

    def __init__(self, policy: Policy, approval_timeout: float) -> None:
        super().__init__(
            policy.document,
            policy.source,
            evaluation_budget=policy.evaluation_budget,
            resolve_seconds=policy.resolve_seconds,
        )
        self.approval_timeout = approval_timeout

    def decide(
        self,
        *,
        kind: Literal["tool", "exit"],
        name: str,
        effect: str,
        variables: Any,
        resolvers: Any = None,
        evaluation: Any = None,
        provenance: Any = None,
    ) -> Decision:
        decision = super().decide(
            kind=kind,
            name=name,
            effect=effect,
            variables=variables,
            resolvers=resolvers,
            evaluation=evaluation,
            provenance=provenance,
        )
        if decision.decision == "ask" and (decision.expires_in or math.inf) > self.approval_timeout:
            return msgspec.structs.replace(decision, expires_in=self.approval_timeout)
        return decision


class Connections:
    """Which connection each upstream is on: a server that went away is started again at the
    next call (`McpServer`), and the first step after that records the restart (in its
    result's `_meta`, or its error), so the journal shows where the upstream's state may have
    been lost."""

    def __init__(self) -> None:
        self._current: dict[str, McpClient] = {}
        self._restarts: dict[str, int] = {}
        self._unreported: list[dict[str, Any]] = []

    def client(self, server: McpServer) -> McpClient:
        """The connection a request to `server` goes out on; a new one is a restart."""
        client = server.client()
        known = self._current.get(server.spec.name)
        if known is not None and known is not client:
            count = self._restarts[server.spec.name] = self._restarts.get(server.spec.name, 0) + 1
            log.warning("upstream %s went away; started again (restart %d)", server.spec.name, count)
            self._unreported.append({"upstream": server.spec.name, "restart": count, "at": time.time()})
        self._current[server.spec.name] = client
        return client

    def take(self) -> list[dict[str, Any]]:
        """The restarts not yet recorded with a step."""
        taken, self._unreported = self._unreported, []
        return taken

    async def call(self, server: McpServer, name: str, arguments: dict[str, Any]) -> dict[str, Any]:
        """One of the upstream's tools, called outside any step (a resolver's or a verifier's
        read): its result as JSON."""
        result = await self.client(server).call_tool(name, arguments)
        return result.model_dump(mode="json", by_alias=True, exclude_none=True)


class PassThroughTool(McpTool):
    """An upstream tool whose whole result (content, structuredContent, _meta) is kept: the
    journal records it and the MCP client gets back what the upstream answered."""

    connections: Connections | None = None

    async def call(self, args: ValidatedArgs | dict[str, Any], ctx: ToolContext) -> Any:
        if not isinstance(args, ValidatedArgs):
            args = self.validate(args)
        source: Any = self.source
        restarts: list[dict[str, Any]] = []
        if self.connections is not None and isinstance(source, McpServer):
            source = self.connections.client(source)
            restarts = self.connections.take()
        said = f" [the upstream was started again before this call: {restarts}]" if restarts else ""
        try:
            result = await source.call_tool(self.remote_name, args.values)
        except Exception as exc:
            if not restarts:
                raise
            raise McpError(f"{self.server}/{self.remote_name}: {exc}{said}") from None
        if result.is_error:
            text = " ".join(b.text for b in result.content if isinstance(b, mcp.types.TextContent)).strip()
            text = text or "the server reported an error"
            raise McpToolError(f"{self.server}/{self.remote_name}: {text}{said}")
        dumped: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        if restarts:
            dumped["_meta"] = {**(dumped.get("_meta") or {}), f"{META_KEY}/upstream_restarts": restarts}
        return dumped


@dataclass(eq=False)
class _Call:
    """One tools/call from the client, waiting for the observation of its step."""

    tool: str
    args: dict[str, Any]
    request: dict[str, Any]
    ctx: ServerRequestContext[Any] | None = None
    answer: asyncio.Future[dict[str, Any]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    abandoned: bool = False  # the client cancelled it
    _progress: int = 0

    def resolve(self, observation: dict[str, Any]) -> None:
        if not self.answer.done():
            self.answer.set_result(observation)

    async def tell(self, message: str) -> None:
        """A progress notification (if the client asked for them): it may show the message,
        and a client that resets its request timeout on progress keeps waiting."""
        if self.ctx is None:
            return
        self._progress += 1
        with contextlib.suppress(Exception):  # the client may be gone; the call goes on
            await self.ctx.session.report_progress(self._progress, None, message)


class CallQueue:
    """The gateway's model: the MCP client's calls as proposals, one at a time, in arrival order."""

    name = "mcp-client"

    def __init__(self, rotate_every: int = ROTATE_EVERY) -> None:
        self.rotate_every = rotate_every
        self.current: _Call | None = None
        self.run_id: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self.stopped: dict[str, Any] | None = None
        self._calls: asyncio.Queue[_Call | None] = asyncio.Queue()
        self._closing = False

    def submit(self, call: _Call) -> None:
        if self.stopped is not None:
            call.resolve(self.stopped)
        else:
            self._calls.put_nowait(call)

    def close(self) -> None:
        """Take no more calls: the next proposal ends the run."""
        self._closing = True
        self._calls.put_nowait(None)

    def stop(self, observation: dict[str, Any]) -> None:
        """The run no longer takes calls: answer every waiting one with `observation`."""
        self.stopped = observation
        waiting: list[_Call | None] = [self.current] if self.current else []
        while not self._calls.empty():
            waiting.append(self._calls.get_nowait())
        for call in waiting:
            if call is not None:
                call.resolve(observation)
        self.current = None

    async def propose(self, ctx: ModelContext) -> ModelReply:
        if not self.run_id.done():
            self.run_id.set_result(ctx.run_id)
        if self.current is not None:
            # The runtime asks for the next step only once this call's step is recorded.
            self.current.resolve(ctx.transcript[-1].content if ctx.transcript else {})
            self.current = None
        if ctx.proposals_made >= self.rotate_every:
            return ModelReply(output={"kind": "exit", "exit": "rotate"})
        call = await self._calls.get()
        while call is not None and call.abandoned:  # the client gave up before its turn
            call = await self._calls.get()
        if call is None or self._closing:  # calls still queued are answered, not run
            self.current = call
            self.stop({"outcome": "gateway_stopped", "reason": "the gateway stopped"})
            return ModelReply(output={"kind": "exit", "exit": "end", "summary": "the gateway stopped"})
        self.current = call
        return ModelReply(
            output={"kind": "tool_call", "tool": call.tool, "args": call.args},
            exchange=Exchange(request=call.request),
        )


class Gateway:
    """Upstream connections, the governed run that proxies them, and the MCP server's handlers.

    Use as an async context manager: entering connects every upstream, lists its tools, checks
    the policy against them and starts the run; leaving ends the run and the upstreams.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        policy: Policy,
        journal: Journal,
        *,
        policy_ref: str | None = None,
        approval_timeout: float = 300.0,
        db_hint: str = "",
        rotate_every: int = ROTATE_EVERY,
        config: GatewayConfig | None = None,
    ) -> None:
        """`config` (a configuration file, `gateway_config`) adds the policy's resolvers over
        the upstreams' read tools and what a defer does; its upstreams and policy are the
        ones given here (`config_upstreams(config)`, `config.policy`)."""
        self.config = config
        self.connections = Connections()
        self.upstreams = list(upstreams)
        self.policy: Policy = _GatewayPolicy(_tools_only(policy), approval_timeout)
        self.journal = journal
        self.policy_ref = policy_ref
        self.approval_timeout = approval_timeout
        self.db_hint = db_hint  # e.g. " --db PATH", for the commands the log suggests
        self.rotate_every = rotate_every
        self.runtime = Runtime(journal)
        self.servers: list[McpServer] = []
        self.offered: list[mcp.types.Tool] = []
        self.workflow: Workflow | None = None
        self.model: CallQueue | None = None
        self.run_id: str | None = None
        self._driver: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()

    async def __aenter__(self) -> Gateway:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    # -- starting and stopping ---------------------------------------------------------

    async def start(self) -> None:
        self.servers = [McpServer(u.spec) for u in self.upstreams]
        for server in self.servers:
            self.connections.client(server)  # the first connection of each: not a restart
        listings = await asyncio.gather(*(_list(s) for s in self.servers), return_exceptions=True)
        for failure in listings:
            if isinstance(failure, BaseException):
                raise failure
        tools: list[PassThroughTool] = []
        owner: dict[str, str] = {}
        for upstream, server, listed in zip(self.upstreams, self.servers, listings, strict=True):
            assert isinstance(listed, list)
            _check_declared(upstream, listed, self.config)
            for item in listed:
                name = f"{upstream.prefix}_{item.name}" if upstream.prefix else item.name
                if name in owner:
                    raise GatewayError(_clash(name, owner[name], upstream.spec.name))
                owner[name] = upstream.spec.name
                tools.append(self._tool(upstream, server, item, name))
                self.offered.append(item.model_copy(update={"name": name}))
        self.workflow = Workflow(
            "mcp-gateway",
            __version__,
            STATE,
            [
                AgentState(
                    name=STATE,
                    instructions="Calls from an MCP client, proxied to upstream MCP servers.",
                    tools=tuple(tools),
                    exits={"rotate": STATE, "end": "ended"},
                    budget=BUDGET,
                    on_defer="hand_off" if self.config is None else self.config.defer,
                ),
                Terminal("ended"),
            ],
            policy=self.policy,
            resolvers=self._resolvers(),
        )
        self.model = CallQueue(self.rotate_every)
        self._driver = asyncio.create_task(self._drive(), name="mcp-gateway-run")
        started: list[asyncio.Future[Any]] = [self.model.run_id, self._driver]
        await asyncio.wait(started, return_when=asyncio.FIRST_COMPLETED)
        if not self.model.run_id.done():
            raise GatewayError(f"the gateway's run did not start: {self.model.stopped}")
        self.run_id = self.model.run_id.result()
        log.info(
            "run %s governs %d tool(s) of %s; policy %s; journal:%s",
            self.run_id,
            len(tools),
            ", ".join(u.spec.name for u in self.upstreams),
            self.policy.source,
            self.db_hint or " ./tether.db",
        )

    def _tool(
        self, upstream: Upstream, server: McpServer, item: mcp.types.Tool, name: str
    ) -> PassThroughTool:
        """An upstream tool as the gateway offers it, with what a configuration says of it."""
        declared = upstream.tools.get(item.name)
        options: dict[str, Any] = {}
        if declared is not None:
            options = {"effect": declared.effect, "idempotent": declared.idempotent}
            if declared.verifies:
                options["verify"] = declared.verifier(functools.partial(self.connections.call, server))
        try:
            tool = PassThroughTool(server, item, name=name, **options)
        except McpError as exc:
            raise GatewayError(str(exc)) from None
        tool.connections = self.connections
        return tool

    def _resolvers(self) -> dict[str, Callable[..., Any]]:
        """The policy's resolvers a configuration declares, over the upstreams' read tools."""
        if self.config is None:
            return {}
        by_key = {u.key: s for u, s in zip(self.upstreams, self.servers, strict=True)}
        return {
            name: resolver.resolver(name, functools.partial(self.connections.call, by_key[resolver.upstream]))
            for name, resolver in self.config.resolvers.items()
        }

    async def aclose(self) -> None:
        """End the run (a call under way finishes first), then the upstream connections."""
        self._stopping.set()
        if self.model is not None:
            self.model.close()
        if self._driver is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._driver), timeout=30)
            except TimeoutError:
                log.error("the run did not stop within 30 s; leaving it as it is")
                self._driver.cancel()
                with contextlib.suppress(BaseException):
                    await self._driver
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.aclose()

    # -- the run -----------------------------------------------------------------------

    async def _drive(self) -> None:
        assert self.model is not None and self.workflow is not None
        stopped: dict[str, Any] = {"outcome": "gateway_stopped", "reason": "the gateway's run stopped"}
        try:
            result = await self.runtime.start(
                self.workflow,
                self.model,
                input={
                    "upstreams": [u.describe() for u in self.upstreams],
                    "policy": self.policy_ref or self.policy.source,
                    "approval_timeout": self.approval_timeout,
                    **({"configuration": self.config.describe()} if self.config is not None else {}),
                },
                workflow_ref=WORKFLOW_REF,
                policy_ref=self.policy_ref,
            )
            while result.status == "paused" and result.ticket_id:
                await self._await_decision(result.ticket_id)
                result = await self.runtime.resume(result.run_id, self.workflow, self.model)
            if result.status != "completed":
                log.error(
                    "run %s is %s: %s: %s", result.run_id, result.status, result.reason_code, result.message
                )
                stopped = {
                    "outcome": "gateway_stopped",
                    "reason_code": result.reason_code,
                    "reason": f"the gateway's run {result.run_id} is {result.status}: {result.message}",
                }
        except Exception as exc:  # the journal failed, or a bug: no call may wait forever on it
            log.exception("the gateway's run failed")
            stopped = {"outcome": "gateway_stopped", "reason": f"the gateway's run failed: {exc}"}
        finally:
            self.model.stop(stopped)

    async def _await_decision(self, ticket_id: str) -> None:
        """Wait until the ticket is decided or has expired, telling the caller it waits."""
        assert self.model is not None
        call = self.model.current
        ticket = await self.journal.get_ticket(ticket_id)
        db = self.db_hint
        hint = f"tether approve {ticket_id}{db}   or   tether deny {ticket_id} --reason TEXT{db}"
        log.info(
            "%s(%s) waits for a person (%s), at most %.0f s: %s",
            ticket.subject,
            _short(ticket.args),
            ticket.approver,
            ticket.expires_at - time.time(),
            hint,
        )
        told = -math.inf
        while ticket.status == "pending" and ticket.expires_at > time.time():
            if self._stopping.is_set() or (call is not None and call.abandoned):
                why = "the gateway stopped" if self._stopping.is_set() else "the client cancelled the call"
                await self._close_ticket(ticket, f"{why} before anyone decided")
                return
            if call is not None and time.monotonic() - told >= PROGRESS_EVERY:
                told = time.monotonic()
                await call.tell(
                    f"waiting for a person to approve ticket {ticket_id} ({ticket.approver}): {hint}"
                )
            with contextlib.suppress(TimeoutError):
                wait = min(POLL_SECONDS, max(0.0, ticket.expires_at - time.time()))
                await asyncio.wait_for(self._stopping.wait(), timeout=wait)
            ticket = await self.journal.get_ticket(ticket_id)
        log.info("ticket %s: %s", ticket_id, ticket.status if ticket.status != "pending" else "expired")

    async def _close_ticket(self, ticket: Ticket, reason: str) -> None:
        """Nobody waits for the call any more (the gateway stops, or the client cancelled it):
        deny its ticket on the record, so that a late approval cannot carry out an effect its
        caller gave up on, and the run goes on instead of staying paused."""
        log.info("ticket %s: denied: %s", ticket.ticket_id, reason)
        with contextlib.suppress(TicketError):  # decided or expired in the meantime
            await self.journal.decide_ticket(ticket.ticket_id, approve=False, by="mcp-gateway", reason=reason)

    # -- the MCP server ----------------------------------------------------------------

    def server(self) -> Server[Any]:
        """The low-level MCP server whose handlers are this gateway's."""
        return Server(
            "tether-mcp-gateway",
            version=__version__,
            instructions=(
                "Tools of other MCP servers, governed by tether: each call is checked by a policy, "
                "may wait for a person's approval, and is recorded. A refused call returns an error "
                "naming its reason code."
            ),
            on_list_tools=self.list_tools,
            on_call_tool=self.call_tool,
        )

    async def list_tools(
        self, ctx: ServerRequestContext[Any], params: mcp.types.PaginatedRequestParams | None
    ) -> mcp.types.ListToolsResult:
        return mcp.types.ListToolsResult(tools=self.offered)

    async def call_tool(
        self, ctx: ServerRequestContext[Any], params: mcp.types.CallToolRequestParams
    ) -> mcp.types.CallToolResult:
        assert self.model is not None
        call = _Call(
            tool=params.name,
            args=dict(params.arguments or {}),
            request={"method": "tools/call", "request_id": ctx.request_id, "client": _client(ctx)},
            ctx=ctx,
        )
        self.model.submit(call)
        try:
            # Shielded: a client that cancels does not cancel the step (it may be under way).
            observation = await asyncio.shield(call.answer)
        except asyncio.CancelledError:
            call.abandoned = True
            raise
        return result_of(call.tool, observation, self.run_id)


def result_of(tool: str, observation: dict[str, Any], run_id: str | None) -> mcp.types.CallToolResult:
    """What the client gets: the upstream's result, or an error naming the reason code."""
    outcome = observation.get("outcome")
    facts = {"run_id": run_id, "step_id": observation.get("step_id"), "outcome": outcome}
    # An effect that happened is answered with the upstream's result, even when its
    # verification failed (the outcome in `_meta` says so): the client must know it happened.
    if outcome in ("executed", "verification_failed") and isinstance(observation.get("result"), dict):
        result = mcp.types.CallToolResult.model_validate(observation["result"])
        result.meta = {**(result.meta or {}), META_KEY: facts}
        return result
    code = observation.get("reason_code")
    if outcome == "refused":
        reason = observation.get("reason") or "no reason given"
        text = f"tether refused {tool} ({code}): {reason}"
    elif outcome == "tool_error":
        reason = observation.get("error") or "the upstream failed"
        text = f"{tool} failed upstream ({code}): {reason}"
    elif outcome == "handed_off":
        code = code or "deferred"
        reason = f"handed to {observation.get('owner')}, who takes it from here"
        text = f"tether did not run {tool}: it is {reason}"
    else:
        reason = observation.get("reason") or f"the step ended {outcome}"
        text = f"tether could not take {tool}: {reason}"
    if run_id and observation.get("step_id"):
        text += f" [run {run_id}, step {observation['step_id']}]"
    details = {**facts, "reason_code": code, "reason": reason}
    return mcp.types.CallToolResult(
        content=[mcp.types.TextContent(type="text", text=text)],
        structured_content=details,
        is_error=True,
        _meta={META_KEY: details},
    )


# -- transports ---------------------------------------------------------------------------


async def serve_stdio(gateway: Gateway) -> None:
    """Serve one client over stdin/stdout until it closes them or a signal stops us."""
    server = gateway.server()
    stdin = await _StdinLines.open()
    try:
        async with anyio.create_task_group() as group:
            _on_signals(group.cancel_scope.cancel)
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


async def serve_http(gateway: Gateway, *, host: str, port: int, approval_token: str) -> None:
    """Streamable HTTP at /mcp, and the approval endpoint at /approvals, until a signal."""
    import uvicorn

    server = gateway.server()
    app = server.streamable_http_app(
        host=host, custom_starlette_routes=approval_routes(gateway, approval_token)
    )
    web = uvicorn.Server(uvicorn.Config(app, host=host, port=port, log_level="warning"))
    _on_signals(lambda: setattr(web, "should_exit", True))
    log.info("MCP at http://%s:%d/mcp; approvals at http://%s:%d/approvals", host, port, host, port)
    await web.serve()


def approval_routes(gateway: Gateway, token: str) -> list[Any]:
    """GET /approvals (this run's pending tickets) and POST /approvals/TICKET/approve|deny,
    with JSON `{"by": ..., "reason": ...}`; every request needs `Authorization: Bearer TOKEN`."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    def refused(request: Request) -> JSONResponse | None:
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if secrets.compare_digest(given.encode(), token.encode()):
            return None
        return JSONResponse({"error": "missing or wrong approval token (Authorization: Bearer …)"}, 401)

    async def pending(request: Request) -> JSONResponse:
        if (no := refused(request)) is not None:
            return no
        tickets = [t for t in await gateway.journal.list_tickets("pending") if t.run_id == gateway.run_id]
        return JSONResponse({"run_id": gateway.run_id, "tickets": [t.model_dump() for t in tickets]})

    async def decide(request: Request) -> JSONResponse:
        if (no := refused(request)) is not None:
            return no
        verb, ticket_id = request.path_params["decision"], request.path_params["ticket_id"]
        if verb not in ("approve", "deny"):
            return JSONResponse({"error": f"POST /approvals/TICKET/approve or /deny, not {verb!r}"}, 404)
        try:
            body = await request.json() if await request.body() else {}
        except ValueError:
            return JSONResponse({"error": 'the body must be JSON: {"by": ..., "reason": ...}'}, 400)
        if not isinstance(body, dict):
            return JSONResponse({"error": "the body must be a JSON object"}, 400)
        try:
            ticket = await gateway.journal.get_ticket(ticket_id)
            if ticket.run_id != gateway.run_id:
                return JSONResponse({"error": f"ticket {ticket_id} is not this gateway's"}, 404)
            decided = await gateway.journal.decide_ticket(
                ticket_id,
                approve=verb == "approve",
                # Whoever holds the gateway's one approval token: recorded as the gateway's own
                # principal (it writes the journal: a local admin); the name given is shown only.
                by=Principal(
                    principal_id="local:mcp-gateway-approvals",
                    name=str(body.get("by") or f"http:{request.client.host if request.client else '?'}"),
                    kind="local",
                    role="admin",
                ),
                reason=str(body.get("reason") or ""),
            )
        except TicketError as exc:
            return JSONResponse({"error": str(exc)}, 409)
        return JSONResponse(decided.model_dump())

    return [
        Route("/approvals", pending, methods=["GET"]),
        Route("/approvals/{ticket_id}/{decision}", decide, methods=["POST"]),
    ]


def _on_signals(stop: Callable[[], None]) -> None:
    """SIGINT and SIGTERM stop serving; the run then ends and is recorded as such."""
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        # signal.signal, not loop.add_signal_handler: uvicorn swaps handlers and re-raises
        # what it caught once it stops, which would otherwise kill us before the run ends.
        signal.signal(sig, lambda *_: loop.call_soon_threadsafe(stop))


async def _list(server: McpServer) -> list[mcp.types.Tool]:
    try:
        return await server.client().list_tools()
    except McpError as exc:
        raise GatewayError(f"cannot list the upstream's tools: {exc}") from None
    except Exception as exc:  # a protocol-level refusal of tools/list
        raise GatewayError(f"{server.spec.where()}: cannot list its tools: {exc}") from None


def _check_declared(upstream: Upstream, listed: list[mcp.types.Tool], config: GatewayConfig | None) -> None:
    """Every tool a configuration declares, reads or resolves through must be offered."""
    offered = {t.name for t in listed}
    named = [(tool, "tools") for tool in upstream.tools]
    named += [(t.read.tool, f"tools.{tool}.verify.read") for tool, t in upstream.tools.items() if t.read]
    if config is not None:
        resolvers = config.resolvers.items()
        named += [(r.tool, f"resolver {n!r}") for n, r in resolvers if r.upstream == upstream.key]
    for tool, where in named:
        if tool not in offered:
            raise GatewayError(
                f"{config.source if config else 'configuration'}: upstream {upstream.key!r}: {where} names "
                f"{tool!r}, which the upstream does not offer (it offers: {', '.join(sorted(offered))})"
            )


def _clash(tool: str, first: str, second: str) -> str:
    return (
        f"upstreams {first!r} and {second!r} both offer a tool named {tool!r}; a gateway offers each "
        f"name once. Name the upstreams to prefix their tools: --upstream {first}=CMD offers "
        f"{first}_{tool}, --upstream {second}=CMD offers {second}_{tool}"
    )


def _client(ctx: ServerRequestContext[Any]) -> dict[str, Any] | None:
    params = ctx.session.client_params
    info = params.client_info if params is not None else None
    return info.model_dump(mode="json", exclude_none=True) if info is not None else None


def _short(args: dict[str, Any], width: int = 120) -> str:
    text = ", ".join(f"{k}={v!r}" for k, v in args.items())
    return text if len(text) <= width else text[: width - 1] + "…"
