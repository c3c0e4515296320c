"""A governed MCP gateway: an MCP server in front of other MCP servers.

`tether mcp-gateway --upstream CMD --policy FILE` offers the upstream servers' tools to MCP
clients and takes every call through tether's kernel: arguments checked against the
upstream's schema, the policy's decision, an approval ticket where it asks, the journal.

Who calls decides which policy governs: over stdio the caller is the local user; over
streamable HTTP every request to /mcp presents a tether token (`Authorization: Bearer`),
refused with 401 when it is missing, unknown, revoked or expired. `Access` maps the
principal to a policy (by principal id, then by role, then `*`: `--policy-for KEY=FILE`,
`--policy FILE` for `*`); a caller with no mapping is refused (fail closed), and one must
be allowed to start runs of the gateway's workflow (role operator, or admin).

Each policy governs a `Governance`: the gateway workflow built over the upstream tools with
that policy (one agent state, `gateway`, the MCP client as its model), and the tools its
callers are shown: a tool the policy can never allow (every call denied, whatever the run
holds: tether.analysis.reach) is hidden from `tools/list`; called anyway, the kernel refuses
it like any denied call. Each caller's calls go to runs of its own, started by (and recorded
as) its principal: the caller's `Lane` (tether.mcp.gateway_lanes, which also says how a call
waiting for a person leaves the caller's other calls free, and how facts carry over).

Upstream results pass through `PassThroughTool`: a secret in them is redacted before the
journal or the client see it, and becomes the run's fact `secrets_seen`
(tether.mcp.secrets_scan); an upstream tool whose schema takes an idempotency key gets
tether's (`RUN:STEP`, the same on a retry of the step), and every call carries it in
`_meta["tether/idempotency_key"]`. When an upstream says its tool list changed, the gateway
lists it again, checks every policy against the new tools, and tells its own clients
(`notifications/tools/list_changed`, or a `subscriptions/listen` event): a change a policy
cannot govern (a rule naming a tool that is gone) is refused and the last good list is kept.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import itertools
import logging
import re
import shlex
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from tether import __version__
from tether.analysis.reach import never_allowed
from tether.errors import DefinitionError, Forbidden, PolicyFileError, TetherError
from tether.identity import ROLES, Principal, authorize
from tether.journal import Entry, Journal
from tether.journal import bodies as b
from tether.mcp.client import McpClient, McpError, McpServer, McpServerSpec, McpTool, McpToolError
from tether.mcp.gateway_config import GatewayConfig, ToolConfig
from tether.mcp.gateway_lanes import (
    BUDGET,
    CARRY,
    CARRY_BYTES,
    CARRY_CALLS,
    ROTATE_EVERY,
    STATE,
    Call,
    Decisions,
    Lane,
    LaneSettings,
    carry_facts,
)
from tether.mcp.secrets_scan import FACT, META, SecretScan, findings_of, seen_after
from tether.policy import Policy
from tether.runtime import Runtime
from tether.tools import Evidence, Restart, ToolContext, ValidatedArgs
from tether.workflow import AgentState, Step, Terminal, Workflow

try:
    import mcp.types
    from mcp.server.context import ServerRequestContext
    from mcp.server.lowlevel import Server
    from mcp.server.session import ServerSession
    from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ToolsListChanged
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise ImportError(
        f"the MCP gateway needs the official MCP SDK ({exc}); install it with: pip install 'tether[mcp]'"
    ) from exc

log = logging.getLogger("tether.mcp.gateway")

WORKFLOW = "mcp-gateway"
META_KEY = "tether"
IDEMPOTENCY_META = "tether/idempotency_key"
# Arguments through which an upstream tool takes an idempotency key, if its schema has one.
IDEMPOTENCY_ARGS = ("idempotency_key", "idempotencyKey")
ANY_CALLER = "*"
# Handshake-era client connections told of tool list changes (the most recent ones).
MAX_LISTENERS = 1000
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
            McpServerSpec(name=u.name, command=u.command, url=u.url, env=u.env, cwd=u.cwd, timeout=u.timeout),
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


class Connections:
    """Which connection each upstream is on: a server that went away is started again at the
    next call (`McpServer`), and the first step whose call goes out after that records the
    restart: an `upstream_restarted` entry just before the step's outcome (through
    `ToolContext.restarts`), so the journal shows where the upstream's state may have been
    lost. The caller is told too, in the result's `_meta["tether/upstream_restarts"]` (or the
    error's text): the journal is not the client's to read, and a client that keeps state
    upstream is the one that must know it may be gone."""

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
    journal records it and the MCP client gets back what the upstream answered, with any
    secret in it redacted (`scan`). A parameter named like an idempotency key is filled in
    with tether's when the caller gives none (it is then not required of the caller)."""

    def __init__(
        self,
        source: McpServer,
        listed: mcp.types.Tool,
        *,
        name: str,
        scan: SecretScan | None,
        declared: ToolConfig | None = None,
        connections: Connections | None = None,
    ) -> None:
        properties = listed.input_schema.get("properties") or {}
        self.key_param = next((k for k in IDEMPOTENCY_ARGS if k in properties), None)
        required = listed.input_schema.get("required")
        if self.key_param and isinstance(required, list) and self.key_param in required:
            schema = {**listed.input_schema, "required": [r for r in required if r != self.key_param]}
            listed = listed.model_copy(update={"input_schema": schema})
        options: dict[str, Any] = {}
        if declared is not None:  # what a configuration file says of the tool
            options = {"effect": declared.effect, "idempotent": declared.idempotent}
            if declared.verifies and connections is not None:
                options["verify"] = declared.verifier(functools.partial(connections.call, source))
        super().__init__(source, listed, name=name, **options)
        self.listed = listed.model_copy(update={"name": name})
        self.scan = scan
        self.connections = connections

    async def call(self, args: ValidatedArgs | dict[str, Any], ctx: ToolContext) -> Any:
        if not isinstance(args, ValidatedArgs):
            args = self.validate(args)
        values = dict(args.values)
        if self.key_param is not None and self.key_param not in values:
            values[self.key_param] = ctx.idempotency_key
        assert isinstance(self.source, McpServer)
        source: McpServer | McpClient = self.source
        restarts: list[dict[str, Any]] = []
        if self.connections is not None:
            source = self.connections.client(self.source)
            restarts = self.connections.take()
            ctx.restarts.extend(Restart(r["upstream"], r["restart"], r["at"]) for r in restarts)
        said = f" [the upstream was started again before this call: {restarts}]" if restarts else ""
        try:
            result = await source.call_tool(self.remote_name, values, {IDEMPOTENCY_META: ctx.idempotency_key})
        except Exception as exc:
            if not restarts:
                raise
            raise McpError(f"{self.server}/{self.remote_name}: {exc}{said}") from None
        if result.is_error:
            text = " ".join(
                block.text for block in result.content if isinstance(block, mcp.types.TextContent)
            ).strip()
            if self.scan is not None:
                text, _ = self.scan.text(text)
            text = text or "the server reported an error"
            raise McpToolError(f"{self.server}/{self.remote_name}: {text}{said}")
        dumped: dict[str, Any] = result.model_dump(mode="json", by_alias=True, exclude_none=True)
        if restarts:
            dumped["_meta"] = {**(dumped.get("_meta") or {}), f"{META_KEY}/upstream_restarts": restarts}
        if self.scan is None:
            return dumped
        redacted, found = self.scan.value(dumped)
        if found:
            meta = redacted.get("_meta") if isinstance(redacted.get("_meta"), dict) else {}
            redacted["_meta"] = {**meta, META: [f.as_dict() for f in found]}
            log.warning(
                "%s returned %d secret(s) (%s): redacted",
                self.name,
                len(found),
                ", ".join(sorted({f.kind for f in found})),
            )
        return redacted

    async def verify(self, args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence | None:
        """The declared verifier's evidence, with the secrets the result carried as the
        run's fact `secrets_seen` (every kind seen so far in the session)."""
        evidence = await super().verify(args, result, ctx)
        found = findings_of(result)
        if not found:
            return evidence
        facts = {FACT: seen_after(ctx.facts, found)}
        if evidence is None:
            detail: dict[str, Any] = {"secrets": found}
            if self.effect != "read":
                detail["effect"] = (
                    "not re-read: the tool declares no verifier (this evidence is the secrets scan)"
                )
            return Evidence(ok=True, detail=detail, facts=facts)
        return evidence.model_copy(
            update={"detail": {**evidence.detail, "secrets": found}, "facts": {**evidence.facts, **facts}}
        )


@dataclass(frozen=True)
class Access:
    """Which policy governs a caller: the one mapped to its principal id (`person:alice`),
    else to its role (`role:operator`), else to any caller (`*`); none: refused."""

    policies: Mapping[str, Policy]

    def __post_init__(self) -> None:
        if not self.policies:
            raise GatewayError("give a policy: --policy FILE (any caller) or --policy-for KEY=FILE")
        for key in self.policies:
            check_access_key(key)

    def key_for(self, principal: Principal) -> str:
        """The key of the caller's policy; `Forbidden` when none maps it or it may not call tools."""
        for key in (principal.principal_id, f"role:{principal.role}", ANY_CALLER):
            if key in self.policies:
                authorize(principal, "start", workflow=WORKFLOW)
                return key
        raise Forbidden(
            f"{principal.describe()} has no policy at this gateway: map one with --policy-for "
            f"{principal.principal_id}=FILE (or role:{principal.role}=FILE)"
        )


def check_access_key(key: str) -> str:
    """A `--policy-for` key: `*`, `role:ROLE`, or a principal id (`person:NAME`, `service:NAME`)."""
    kind, sep, name = key.partition(":")
    if key == ANY_CALLER or (kind == "role" and name in ROLES):
        return key
    if sep and kind in ("person", "service", "local") and name:
        return key
    raise GatewayError(
        f"--policy-for {key!r}: give a principal id (person:NAME, service:NAME), role:ROLE "
        f"({', '.join(ROLES)}) or * (any caller)"
    )


@dataclass(frozen=True)
class Governance:
    """One policy over the gateway's current tools: the workflows its callers' runs follow
    (plain, and starting with the `carry` state) and the tools they are shown."""

    key: str
    policy: Policy
    workflow: Workflow
    carrying: Workflow
    offered: list[mcp.types.Tool]
    hidden: dict[str, str]  # tool -> why no call of it can be allowed


def govern(
    key: str,
    policy: Policy,
    tools: Sequence[PassThroughTool],
    config: GatewayConfig | None = None,
    resolvers: Mapping[str, Callable[..., Any]] | None = None,
    approval_timeout: float | None = None,
) -> Governance:
    """Build the workflows of `policy` over `tools` (checking its rules against them), with
    a configuration's resolvers and what its `defer` does."""
    agent = AgentState(
        name=STATE,
        instructions="Calls from an MCP client, proxied to upstream MCP servers.",
        tools=tuple(tools),
        exits={"rotate": STATE, "end": "ended"},
        budget=BUDGET,
        on_defer=config.defer if config is not None else "hand_off",
        # Every ticket expires at --approval-timeout at the latest: the caller cannot wait
        # longer. Capped here, not in the decision, so that replay re-decides it as recorded.
        max_ticket_seconds=approval_timeout,
    )
    ended = Terminal("ended")
    try:
        workflow = Workflow(WORKFLOW, __version__, STATE, [agent, ended], policy=policy, resolvers=resolvers)
        carry = Step(CARRY, carry_facts, next=(STATE,))
        carrying = Workflow(
            WORKFLOW, __version__, CARRY, [carry, agent, ended], policy=policy, resolvers=resolvers
        )
    except DefinitionError as exc:
        raise GatewayError(f"policy for {key}: {exc}") from None
    hidden = {t.name: why for t in tools if (why := never_allowed(workflow, STATE, t)) is not None}
    offered = [t.listed for t in tools if t.name not in hidden]
    return Governance(key, policy, workflow, carrying, offered, hidden)


class Gateway:
    """Upstream connections, their tools as each policy governs them, the callers' lanes,
    and the MCP server's handlers.

    Use as an async context manager: entering connects every upstream, lists its tools and
    checks every policy against them; leaving ends every caller's runs, then the upstreams.
    `policy` governs any caller (`*`); `policies` maps principal ids and roles to theirs.
    """

    def __init__(
        self,
        upstreams: Sequence[Upstream],
        policy: Policy | None,
        journal: Journal,
        *,
        policies: Mapping[str, Policy] | None = None,
        approval_timeout: float = 300.0,
        db_hint: str = "",
        rotate_every: int = ROTATE_EVERY,
        secrets: SecretScan | None = None,
        config: GatewayConfig | None = None,
        carry_calls: int = CARRY_CALLS,
        carry_bytes: int = CARRY_BYTES,
    ) -> None:
        """`config` (a configuration file, `gateway_config`) adds the policy's resolvers over
        the upstreams' read tools, what the upstreams' tools do, and what a defer does; its
        upstreams and policy are the ones given here (`config_upstreams(config)`, `config.policy`).
        `carry_calls` and `carry_bytes` bound the session's calls a fresh run of it carries in
        `history` (tether.mcp.gateway_lanes)."""
        self.config = config
        self.connections = Connections()
        self.upstreams = list(upstreams)
        mapped = {**(policies or {}), **({ANY_CALLER: policy} if policy is not None else {})}
        self.access = Access({k: _tools_only(p) for k, p in mapped.items()})
        self.journal = journal
        self.approval_timeout = approval_timeout
        self.scan = secrets if secrets is not None else SecretScan()
        self.runtime = Runtime(journal, on_commit=self._committed)
        self.decisions = Decisions(journal)
        self.servers: list[McpServer] = []
        self.tools: list[PassThroughTool] = []
        self.governance: dict[str, Governance] = {}
        self.lanes: dict[str, Lane] = {}
        self.bus = InMemorySubscriptionBus()
        self._stopping = asyncio.Event()
        self._settings = LaneSettings(
            runtime=self.runtime,
            decisions=self.decisions,
            stopping=self._stopping,
            approval_timeout=approval_timeout,
            db_hint=db_hint,
            rotate_every=rotate_every,
            carry_calls=carry_calls,
            carry_bytes=carry_bytes,
            describe={
                "upstreams": [u.describe() for u in self.upstreams],
                "approval_timeout": approval_timeout,
                **({"configuration": config.describe()} if config is not None else {}),
            },
        )
        self._listeners: collections.OrderedDict[int, ServerSession] = collections.OrderedDict()
        self._relisting: asyncio.Task[None] | None = None
        self._relist_again = False

    async def __aenter__(self) -> Gateway:
        try:
            await self.start()
        except BaseException:
            await self.aclose()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    @property
    def run_ids(self) -> set[str]:
        """Every run this gateway started, of every caller."""
        return {run_id for lane in self.lanes.values() for run_id in lane.run_ids}

    # -- starting and stopping ---------------------------------------------------------

    async def start(self) -> None:
        self.servers = [McpServer(u.spec, self._tools_changed) for u in self.upstreams]
        self.tools, self.governance = await self._listing()
        await self.decisions.start()
        for governance in self.governance.values():
            log.info(
                "policy %s for %s: %d tool(s) offered, %d hidden (%s)",
                governance.policy.source,
                governance.key,
                len(governance.offered),
                len(governance.hidden),
                ", ".join(sorted(governance.hidden)) or "none",
            )
        log.info(
            "governs %d tool(s) of %s; journal:%s",
            len(self.tools),
            ", ".join(u.spec.name for u in self.upstreams),
            self._settings.db_hint or " ./tether.db",
        )

    async def aclose(self) -> None:
        """End every caller's runs (a call under way finishes first), then the upstream connections."""
        self._stopping.set()
        self.decisions.poke()
        if self._relisting is not None:
            self._relisting.cancel()
        for lane in self.lanes.values():
            lane.close()
        for lane in self.lanes.values():
            await lane.wait_closed(timeout=30)
        await self.decisions.aclose()
        for server in self.servers:
            with contextlib.suppress(Exception):
                await server.aclose()

    async def _listing(self) -> tuple[list[PassThroughTool], dict[str, Governance]]:
        """List every upstream's tools and govern them with every policy."""
        for server in self.servers:
            self.connections.client(server)  # the connection listed on: not a restart
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
                declared = upstream.tools.get(item.name)
                try:
                    tool = PassThroughTool(
                        server,
                        item,
                        name=name,
                        scan=self.scan,
                        declared=declared,
                        connections=self.connections,
                    )
                except McpError as exc:
                    raise GatewayError(str(exc)) from None
                tools.append(tool)
        resolvers = self._resolvers()
        policies = self.access.policies.items()
        governance = {
            key: govern(key, policy, tools, self.config, resolvers, self.approval_timeout)
            for key, policy in policies
        }
        return tools, governance

    def _resolvers(self) -> dict[str, Callable[..., Any]]:
        """The policy's resolvers a configuration declares, over the upstreams' read tools."""
        if self.config is None:
            return {}
        by_key = {u.key: s for u, s in zip(self.upstreams, self.servers, strict=True)}
        return {
            name: resolver.resolver(name, functools.partial(self.connections.call, by_key[resolver.upstream]))
            for name, resolver in self.config.resolvers.items()
        }

    def _committed(self, entries: list[Entry]) -> None:
        """Entries of the callers' runs, once committed: each executed call is its session's."""
        for entry in entries:
            if entry.kind in b.EXECUTED_KINDS:
                lane = self._settings.runs.get(entry.run_id)
                if lane is not None:
                    lane.executed(entry)

    # -- callers ---------------------------------------------------------------------------

    def admit(self, principal: Principal) -> str:
        """The caller's policy key (`Forbidden` when it has none, or may not call tools)."""
        return self.access.key_for(principal)

    def lane(self, principal: Principal) -> Lane:
        lane = self.lanes.get(principal.principal_id)
        if lane is None:
            key = self.admit(principal)

            def workflows(carrying: bool) -> tuple[Workflow, str | None]:
                governance = self.governance[key]
                chosen = governance.carrying if carrying else governance.workflow
                return chosen, governance.policy.source

            lane = self.lanes[principal.principal_id] = Lane(principal, key, workflows, self._settings)
        return lane

    # -- upstream tool lists ---------------------------------------------------------------

    def _tools_changed(self) -> None:
        """An upstream says its tools changed: list again (once more if it says so meanwhile)."""
        if self._stopping.is_set():
            return
        if self._relisting is not None and not self._relisting.done():
            self._relist_again = True
            return
        self._relisting = asyncio.get_running_loop().create_task(self._relist(), name="mcp-gateway-relist")

    async def _relist(self) -> None:
        while True:
            self._relist_again = False
            try:
                tools, governance = await self._listing()
            except (GatewayError, McpError) as exc:
                log.error(
                    "an upstream's tools changed, and the new list is refused: %s; the last list stays", exc
                )
            else:
                before = {t.name for t in self.tools}
                after = {t.name for t in tools}
                self.tools, self.governance = tools, governance
                log.info(
                    "the upstream tools changed: added %s; removed %s",
                    ", ".join(sorted(after - before)) or "none",
                    ", ".join(sorted(before - after)) or "none",
                )
                for lane in self.lanes.values():
                    lane.retire()  # the next call starts a run over the new tools
                await self._tell_clients()
            if not self._relist_again:
                return

    async def _tell_clients(self) -> None:
        await self.bus.publish(ToolsListChanged())
        for session in list(self._listeners.values()):
            with contextlib.suppress(Exception):  # best effort, like every notification
                await session.send_tool_list_changed()

    def _listening(self, ctx: ServerRequestContext[Any]) -> None:
        """Remember a handshake-era connection, to tell it when the tool list changes."""
        params = ctx.session.client_params
        if params is None:
            return
        self._listeners[id(params)] = ctx.session
        self._listeners.move_to_end(id(params))
        while len(self._listeners) > MAX_LISTENERS:
            self._listeners.popitem(last=False)

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
            on_subscriptions_listen=ListenHandler(self.bus),
        )

    def caller(self, ctx: ServerRequestContext[Any]) -> Principal:
        """Who makes this request: the principal the HTTP layer authenticated, or, on a
        transport without tokens (stdio, in-process), the local user."""
        if ctx.request is None:
            return LOCAL
        principal = getattr(getattr(ctx.request, "state", None), "tether_principal", None)
        if not isinstance(principal, Principal):  # never served without the authentication layer
            raise Forbidden("this request was not authenticated")
        return principal

    async def list_tools(
        self, ctx: ServerRequestContext[Any], params: mcp.types.PaginatedRequestParams | None
    ) -> mcp.types.ListToolsResult:
        key = self.admit(self.caller(ctx))
        self._listening(ctx)
        return mcp.types.ListToolsResult(tools=self.governance[key].offered)

    async def call_tool(
        self, ctx: ServerRequestContext[Any], params: mcp.types.CallToolRequestParams
    ) -> mcp.types.CallToolResult:
        lane = self.lane(self.caller(ctx))
        self._listening(ctx)
        call = Call(
            tool=params.name,
            args=dict(params.arguments or {}),
            request={"method": "tools/call", "request_id": ctx.request_id, "client": _client(ctx)},
            ctx=ctx,
        )
        lane.submit(call)
        try:
            # Shielded: a client that cancels does not cancel the step (it may be under way).
            observation = await asyncio.shield(call.answer)
        except asyncio.CancelledError:
            call.abandoned = True
            self.decisions.poke()  # a call waiting for a person gives up at once
            raise
        return result_of(call.tool, observation, call.run_id)


LOCAL = Principal.local()


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
