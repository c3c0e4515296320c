"""Tools: plain Python functions whose JSON schema comes from their type hints.

A tool declares its effect (`read`, `write`, `external`) and whether repeating it is
harmless (`idempotent`). A tool that declares no effect counts as `external`, the most
restrictive: default policy denies it, so forgetting to declare never lets a write run.
A tool may name a verifier that reads the resulting state and returns `Evidence`; the
runtime never takes a tool's own return value as proof.

For provenance (`tether.provenance`), a tool declares whether its results are content
others wrote (`results="untrusted"`: an inbox, a web page, a shared file, a transaction
memo) or the system's own (`"trusted"`, the default for Python tools: a team's own code
over its own systems; MCP tools are untrusted unless declared otherwise), which of its
parameters are security-relevant (`security=["recipient", "amount"]`: recipients, URLs,
amounts, credentials, file paths; an `external` tool that declares none counts every
parameter, `security=[]` says none is), and whether it is `sensitive` (passwords,
deletions, permission changes: asked every time under the policy's safe defaults).

Argument lists, mappings and strings are bounded: where the author's type gives no
maximum length, `MAX_ITEMS` and `MAX_STRING_CHARS` apply (raise either per argument with
`Annotated[list[str], Field(max_length=N)]`), so no proposal can make validation or a
policy condition over its arguments work on unbounded input. The defaults are enforced at
validation and not written into `json_schema()` (the declared schema, which the workflow
hash covers).
"""

from __future__ import annotations

import functools
import inspect
import sys
from collections import abc
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from types import UnionType
from typing import Annotated, Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

import msgspec
import typing_extensions
from pydantic import BaseModel, ConfigDict, Field, PydanticUserError, ValidationError, create_model
from pydantic.errors import PydanticSchemaGenerationError
from pydantic.fields import FieldInfo
from pydantic_core import to_jsonable_python

from tether.hashing import encode_json, value_hash
from tether.proposals import DEFAULT_LIMITS, json_value_problem

Effect = Literal["read", "write", "external"]
Trust = Literal["trusted", "untrusted"]
TRUSTS: tuple[Trust, ...] = ("trusted", "untrusted")
EFFECTS: tuple[Effect, ...] = ("read", "write", "external")
UNDECLARED_EFFECT: Effect = "external"
# Default bounds for arguments whose type names none. Lists and mappings: a policy condition
# may compare every item with every other (CEL has comprehensions), which took 11 ms at 100
# items and 0.8 s at 1,000 (docs/decisions.md), and the engine cannot be interrupted mid-condition.
# Strings: CEL has no loop over characters, so a string costs a condition linear time at most.
MAX_ITEMS = 100
MAX_STRING_CHARS = 100_000


@dataclass(frozen=True)
class ToolContext:
    """What the runtime hands a tool or verifier that asks for it by annotation."""

    run_id: str
    step_id: str
    idempotency_key: str
    data: Mapping[str, Any] = field(default_factory=dict)
    facts: Mapping[str, Any] = field(default_factory=dict)
    # The tool call's trace context as headers (W3C `traceparent`, `tracestate`), when the
    # runtime has an observer (tether.observe): a tool passes it on to what it calls.
    trace: Mapping[str, str] = field(default_factory=dict)
    # Servers the call found started again before it went out (an MCP gateway's upstreams,
    # tether.mcp.gateway), told by the tool: the runtime records each as an
    # `upstream_restarted` entry, with the step, just before the step's outcome.
    restarts: list[Restart] = field(default_factory=list)


class Restart(NamedTuple):
    """A server a tool calls went away and was started again (`restart`: how many times so
    far; `at`: when, in seconds since the epoch)."""

    upstream: str
    restart: int
    at: float


class Evidence(BaseModel):
    """What a verifier established by reading the resulting state.

    `facts` become facts of the run that later policy conditions can use.
    """

    ok: bool = True
    detail: dict[str, Any] = Field(default_factory=dict)
    facts: dict[str, Any] = Field(default_factory=dict)


class ArgumentError(ValueError):
    """Arguments do not match a tool's schema; `errors` lists each problem."""

    def __init__(self, tool: str, errors: list[dict[str, Any]]) -> None:
        self.tool = tool
        self.errors = errors
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '(arguments)'}: {e['msg']}" for e in errors]
        super().__init__(f"invalid arguments for tool {tool!r}: " + "; ".join(parts))


Verifier = Callable[..., "Evidence | Awaitable[Evidence]"]


class ValidatedArgs(NamedTuple):
    """A call's arguments after validation, as every later stage uses them: `values` in
    their JSON form, `encoded` (canonical JSON, made once), `hash` (the fingerprint a
    ticket binds: tool name and arguments), and `model` (the typed values the tool gets)."""

    values: dict[str, Any]
    encoded: str
    hash: str
    model: BaseModel | None = None

    @classmethod
    def of(cls, tool: str, values: dict[str, Any], model: BaseModel | None = None) -> ValidatedArgs:
        encoded = encode_json(values)
        return cls(values, encoded, args_hash(tool, encoded), model)


def checked_json(tool: str, args: Any, max_bytes: int, *, checked: bool = False) -> str:
    """Refuse arguments that are not a JSON object of finite, bounded values (any tool);
    return them encoded. `checked`: the values were already found to be JSON (they are part
    of a parsed proposal), only their size is left to check."""
    if not isinstance(args, dict):
        raise ArgumentError(tool, [{"loc": (), "msg": "arguments must be an object"}])
    problem = None if checked else json_value_problem(args)
    if problem is not None:
        raise ArgumentError(tool, [{"loc": (), "msg": problem.replace("output", "arguments")}])
    encoded = encode_json(args)
    if len(encoded) > max_bytes:
        message = f"arguments are {len(encoded):,} bytes as JSON; the limit is {max_bytes:,}"
        raise ArgumentError(tool, [{"loc": (), "msg": message}])
    return encoded


def args_hash(tool: str, encoded_args: str) -> str:
    """The fingerprint of a call: canonical JSON of {"args": ..., "tool": ...}, hashed."""
    return value_hash(f'{{"args":{encoded_args},"tool":{encode_json(tool)}}}')


class Compensation:
    """How to undo a `write` or `external` tool's effect (a rollback runs it: tether.compensation).

    `tool` is the compensating tool (itself a write); `args` says where each of its
    arguments comes from: `args.NAME` (the original call's argument) or `result.PATH`
    (a field of what the original call returned, dotted for nested objects). Checked when
    declared: every source names a parameter or the result, every required parameter of
    the compensating tool is given, and nothing else is.
    """

    def __init__(self, of: Tool, tool: Tool, args: Mapping[str, str] | None = None) -> None:
        if tool.effect == "read":
            raise ValueError(f"compensation {tool.name!r} of {of.name!r} is a read: it cannot undo an effect")
        if of.effect == "read":
            raise ValueError(f"tool {of.name!r} is a read: it has no effect to compensate")
        params = tool.json_schema().get("properties") or {}
        required = set(tool.json_schema().get("required") or [])
        original = set((of.json_schema().get("properties") or {}).keys())
        if args is None:  # by name: each parameter from the original call's argument of that name
            missing = sorted(p for p in params if p not in original and p in required)
            if missing:
                raise ValueError(
                    f"compensation {tool.name!r} of {of.name!r}: parameter(s) {', '.join(missing)} "
                    f"are not arguments of {of.name!r}; say where each comes from with "
                    "args: {NAME: args.X | result.PATH}"
                )
            args = {p: f"args.{p}" for p in params if p in original}
        unknown = sorted(set(args) - set(params))
        if unknown:
            raise ValueError(
                f"compensation {tool.name!r}: no parameter(s) {', '.join(unknown)} "
                f"(its parameters: {', '.join(sorted(params)) or 'none'})"
            )
        missing = sorted(required - set(args))
        if missing:
            raise ValueError(
                f"compensation {tool.name!r}: required parameter(s) {', '.join(missing)} not given"
            )
        for name, source in args.items():
            head, _, rest = str(source).partition(".")
            if head == "args" and rest not in original:
                raise ValueError(
                    f"compensation {tool.name!r}, argument {name!r}: {source!r} names no argument of "
                    f"{of.name!r} (its arguments: {', '.join(sorted(original)) or 'none'})"
                )
            if head not in ("args", "result") or (head == "args" and not rest):
                raise ValueError(
                    f"compensation {tool.name!r}, argument {name!r}: {source!r} must be args.NAME or "
                    "result or result.PATH"
                )
        self.of, self.tool, self.args = of.name, tool, dict(args)

    def derive(self, args: Mapping[str, Any], result: Any) -> dict[str, Any]:
        """The compensating call's arguments, from the original call's `args` and `result`;
        LookupError naming the missing value when one is not there."""
        derived: dict[str, Any] = {}
        for name, source in self.args.items():
            head, _, path = source.partition(".")
            value: Any = args if head == "args" else result
            for part in path.split(".") if path else ():
                if not isinstance(value, Mapping) or part not in value:
                    raise LookupError(f"{source} is not in the recorded call (needed for {name!r})")
                value = value[part]
            derived[name] = value
        return derived

    def describe(self) -> dict[str, Any]:
        return {"tool": self.tool.name, "fn": f"{self.tool.fn.__module__}:{self.tool.fn.__qualname__}"} | {
            "args": self.args
        }


class Tool:
    """A callable the runtime may execute on a model's behalf, with its contract."""

    # What a tool's results are when it does not say (see the module's docstring).
    results: Trust = "trusted"
    # How its effect is undone by a rollback, if it says (tether.compensation).
    compensation: Compensation | None = None
    security: tuple[str, ...] | None = None  # None: not declared
    sensitive: bool = False
    # Parameters (NAME) and result fields (`result`, `result.PATH`) never recorded in clear
    # (tether.sensitive); from `Annotated[..., Sensitive]` hints and declarations.
    sensitive_fields: frozenset[str] = frozenset()

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        effect: Effect | None = None,
        idempotent: bool | None = None,
        verify: Verifier | None = None,
        description: str | None = None,
        results: Trust | None = None,
        security: Sequence[str] | None = None,
        sensitive: bool = False,
    ) -> None:
        if effect is not None and effect not in EFFECTS:
            raise ValueError(f"tool effect must be one of {EFFECTS}, not {effect!r}")
        self.fn = fn
        self.name = name or fn.__name__
        # No declaration means the most restrictive effect; `effect_declared` lets checks and
        # denials say so, rather than leave the author puzzled by `default:external`.
        self.effect_declared = effect is not None
        self.effect: Effect = UNDECLARED_EFFECT if effect is None else effect
        # Reads are harmless to repeat; anything else must say so explicitly.
        self.idempotent = (effect == "read") if idempotent is None else idempotent
        self.verifier = verify
        self.description = description or _first_paragraph(inspect.getdoc(fn))
        self.args_model, self._context_param = _args_model(fn, self.name)
        self.is_async = inspect.iscoroutinefunction(fn)
        self.declare(results=results, security=security, sensitive=sensitive)
        self.declare_sensitive(_sensitive_hints(fn))

    def declare_sensitive(self, fields: Sequence[str]) -> None:
        """Add sensitive fields: parameter names, `result`, or `result.PATH` (dotted)."""
        if isinstance(fields, str):
            raise ValueError(f"tool {self.name!r}: sensitive_fields must be a list of names")
        params = set((self.json_schema().get("properties") or {}).keys()) if fields else set()
        for f in fields:
            head, _, rest = f.partition(".")
            if f in params or (head == "result" and all(rest.split("."))) or f == "result":
                continue
            raise ValueError(
                f"tool {self.name!r}: sensitive field {f!r} is neither a parameter "
                f"({', '.join(sorted(params)) or 'none'}) nor result / result.PATH"
            )
        if fields:
            self.sensitive_fields = self.sensitive_fields | frozenset(fields)

    def declare(
        self,
        *,
        results: Trust | None = None,
        security: Sequence[str] | None = None,
        sensitive: bool | None = None,
    ) -> None:
        """Declare what provenance needs: the trust of the results, the security-relevant
        parameters (each must be one of the tool's), whether the tool is sensitive."""
        if results is not None:
            if results not in TRUSTS:
                raise ValueError(f"tool {self.name!r}: results must be one of {TRUSTS}, not {results!r}")
            self.results = results
        if security:  # checked against the schema only when given (made lazily otherwise)
            if isinstance(security, str):
                raise ValueError(f"tool {self.name!r}: security must be a list of parameter names")
            params = set((self.json_schema().get("properties") or {}).keys())
            unknown = [p for p in security if p not in params]
            if unknown:
                raise ValueError(
                    f"tool {self.name!r}: security names unknown parameter(s) "
                    f"{', '.join(map(repr, unknown))} "
                    f"(its parameters: {', '.join(sorted(params)) or 'none'})"
                )
        if security is not None:
            self.security = tuple(dict.fromkeys(security))
        if sensitive is not None:
            self.sensitive = bool(sensitive)
        self.__dict__.pop("info", None)  # what conditions see as `tool` is made again

    def compensate_with(self, tool: Tool, args: Mapping[str, str] | None = None) -> Tool:
        """Declare how this tool's effect is undone: `tool` called with arguments derived as
        `args` says (see `Compensation`); ValueError when they do not fit. Returns self."""
        self.compensation = Compensation(self, tool, args)
        return self

    def __repr__(self) -> str:
        return f"Tool({self.name!r}, effect={self.effect!r}, idempotent={self.idempotent})"

    def json_schema(self) -> dict[str, Any]:
        """The arguments' schema as the function declares them: what the model is shown and
        the workflow hash covers. The default bounds are enforced by `args_model` but not
        shown, so that they leave the hash of workflows (and the runs pinned to them) as is.
        A fresh copy on each call (callers may change theirs), decoded from the schema made
        once: pydantic takes about 2 ms to make it, and a run's start needs it several times."""
        schema: dict[str, Any] = msgspec.json.decode(self._schema_json)
        return schema

    @functools.cached_property
    def _schema_json(self) -> bytes:
        return msgspec.json.encode(self._declared_model.model_json_schema())

    @functools.cached_property
    def _declared_model(self) -> type[BaseModel]:
        return _args_model(self.fn, self.name, bounded=False)[0]

    @functools.cached_property
    def info(self) -> dict[str, Any]:
        """What policy conditions see as `tool`."""
        return {
            "name": self.name,
            "effect": self.effect,
            "idempotent": self.idempotent,
            "effect_declared": self.effect_declared,
            "results": self.results,
            "security": list(self.security) if self.security is not None else None,
            "sensitive": self.sensitive,
        }

    def validate(
        self, args: Any, *, max_bytes: int = DEFAULT_LIMITS.max_bytes, checked: bool = False
    ) -> ValidatedArgs:
        """Validate arguments strictly, once: JSON values only (finite numbers, bounded
        nesting and size; `checked` when a parsed proposal's already were), then the tool's
        schema in JSON mode (no "12" for a number, but ISO strings for dates)."""
        encoded = checked_json(self.name, args, max_bytes, checked=checked)
        try:
            model = self.args_model.model_validate_json(encoded)
        except ValidationError as exc:
            errors = [{"loc": e["loc"], "msg": e["msg"]} for e in exc.errors()]
            raise ArgumentError(self.name, errors) from None
        return ValidatedArgs.of(self.name, model.model_dump(mode="json"), model)

    async def call(self, args: ValidatedArgs | dict[str, Any], ctx: ToolContext) -> Any:
        """Run the tool on arguments (validated here unless they already were); return a
        JSON-compatible result."""
        if not isinstance(args, ValidatedArgs):
            args = self.validate(args)
        # Iterated, not dict(model): dict() would ask the model for `keys` first, which pydantic
        # answers by raising AttributeError twice (~20,000 machine instructions per call, measured).
        values = dict(iter(args.model)) if args.model is not None else dict(args.values)
        if self._context_param:
            values[self._context_param] = ctx
        result = self.fn(**values)
        if inspect.isawaitable(result):
            result = await result
        return to_jsonable_python(result)

    async def verify(self, args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence | None:
        """Run the verifier, if any. Returns None when the tool declares none."""
        if self.verifier is None:
            return None
        evidence = self.verifier(args, result, ctx)
        if inspect.isawaitable(evidence):
            evidence = await evidence
        if not isinstance(evidence, Evidence):
            raise TypeError(
                f"verifier of tool {self.name!r} returned {type(evidence).__name__}, expected tether.Evidence"
            )
        return evidence


class SchemaTool(Tool):
    """A tool declared by a JSON Schema rather than a Python signature: an MCP server's, or an
    agent framework's (tether.integrations). `fn` is called with the validated arguments as
    one dict (and the ToolContext); its result must be JSON-compatible.

    Arguments are checked against the schema as strictly as a native tool's: JSON Schema's
    types are already strict (no "12" for a number), and an object schema that names its
    properties refuses others unless it says otherwise (`additionalProperties`).
    """

    def __init__(
        self,
        fn: Callable[[dict[str, Any], ToolContext], Any],
        *,
        name: str,
        schema: Mapping[str, Any],
        description: str = "",
        effect: Effect | None = None,
        idempotent: bool | None = None,
        verify: Verifier | None = None,
        results: Trust | None = None,
    ) -> None:
        if effect is not None and effect not in EFFECTS:
            raise ValueError(f"tool effect must be one of {EFFECTS}, not {effect!r}")
        self.fn = fn
        self.name = name
        self.effect_declared = effect is not None
        self.effect = UNDECLARED_EFFECT if effect is None else effect
        self.idempotent = (effect == "read") if idempotent is None else idempotent
        self.verifier = verify
        self.description = description
        self.is_async = True
        self.input_schema: dict[str, Any] = dict(schema)
        self._validator = schema_validator(self.input_schema, name)
        if results is not None:
            self.declare(results=results)

    def json_schema(self) -> dict[str, Any]:
        return self.input_schema

    def validate(
        self, args: Any, *, max_bytes: int = DEFAULT_LIMITS.max_bytes, checked: bool = False
    ) -> ValidatedArgs:
        """Check arguments against the schema; return them with top-level defaults."""
        checked_json(self.name, args, max_bytes, checked=checked)
        errors = sorted(self._validator.iter_errors(args), key=lambda e: [str(p) for p in e.absolute_path])
        if errors:
            raise ArgumentError(self.name, [schema_problem(e) for e in errors])
        values = dict(args)
        for key, prop in (self.input_schema.get("properties") or {}).items():
            if key not in values and isinstance(prop, dict) and "default" in prop:
                values[key] = prop["default"]
        return ValidatedArgs.of(self.name, values)

    async def call(self, args: ValidatedArgs | dict[str, Any], ctx: ToolContext) -> Any:
        if not isinstance(args, ValidatedArgs):
            args = self.validate(args)
        result = self.fn(dict(args.values), ctx)
        if inspect.isawaitable(result):
            result = await result
        return to_jsonable_python(result)


class SchemaError(ValueError):
    """A tool's JSON Schema cannot be used: not an object schema, or not valid."""


def schema_validator(schema: dict[str, Any], where: str) -> Any:
    """A validator for a tool's JSON Schema, as strict as a native tool's arguments."""
    import jsonschema

    if schema.get("type", "object") != "object":
        raise SchemaError(f"{where}: the input schema is not an object schema: {schema!r}")
    if "properties" in schema and "additionalProperties" not in schema and "patternProperties" not in schema:
        schema = {**schema, "additionalProperties": False}
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaError(f"{where}: the input schema is invalid: {exc.message}") from None
    return cls(schema)


def schema_problem(error: Any) -> dict[str, Any]:
    """One JSON Schema validation problem, located like pydantic's (`loc`, `msg`)."""
    loc = tuple(error.absolute_path)
    if error.validator == "required":
        missing = [p for p in error.validator_value if p not in error.instance]
        return {"loc": (*loc, *missing[:1]), "msg": "Field required"}
    if error.validator == "additionalProperties" and error.validator_value is False:
        known = set(error.schema.get("properties") or {})
        extra = sorted(k for k in error.instance if k not in known)
        return {"loc": loc, "msg": f"unknown field(s) {', '.join(extra)} (not in the tool's schema)"}
    return {"loc": loc, "msg": error.message}


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    effect: Effect | None = None,
    idempotent: bool | None = None,
    verify: Verifier | None = None,
    description: str | None = None,
    results: Trust | None = None,
    security: Sequence[str] | None = None,
    sensitive: bool = False,
) -> Any:
    """Declare a function as a tool: `@tool(effect="read")` or `@tool(effect="write", verify=...)`;
    `@tool(effect="read", results="untrusted")` for content others wrote,
    `@tool(effect="external", security=["recipient"])` for its security-relevant parameters.

    Without `effect`, the tool counts as `external` (see the module's docstring).
    """

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(
            f,
            name=name,
            effect=effect,
            idempotent=idempotent,
            verify=verify,
            description=description,
            results=results,
            security=security,
            sensitive=sensitive,
        )

    return wrap(fn) if fn is not None else wrap


def _sensitive_hints(fn: Callable[..., Any]) -> list[str]:
    """The parameters (and `result`) whose type hint is `Annotated[..., Sensitive]`."""
    from tether.sensitive import is_marker

    hints = get_type_hints(fn, include_extras=True)
    found: list[str] = []
    for name, hint in hints.items():
        if get_origin(hint) is Annotated and any(is_marker(m) for m in get_args(hint)[1:]):
            found.append("result" if name == "return" else name)
    return found


def _first_paragraph(doc: str | None) -> str:
    return doc.split("\n\n", 1)[0].strip() if doc else ""


def _args_model(
    fn: Callable[..., Any], tool_name: str, *, bounded: bool = True
) -> tuple[type[BaseModel], str | None]:
    """Build a strict pydantic model from the function's parameters (`bounded`: with the
    default maximum lengths where the types give none)."""
    hints = get_type_hints(fn, include_extras=True)  # keep Annotated[..., Field(...)] constraints
    fields: dict[str, Any] = {}
    context_param: str | None = None
    for param in inspect.signature(fn).parameters.values():
        annotation = hints.get(param.name, Any)
        if annotation is ToolContext:
            context_param = param.name
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name!r}: *args and **kwargs cannot be described")
        default = ... if param.default is param.empty else param.default
        declared = isinstance(default, FieldInfo) and _declares_max_length(default.metadata)
        annotation = _portable(annotation)
        fields[param.name] = (_bounded(annotation, declared=declared) if bounded else annotation, default)
    try:
        model = create_model(
            f"{tool_name}_args",
            __config__=ConfigDict(strict=True, extra="forbid"),
            **fields,
        )
    except (PydanticUserError, PydanticSchemaGenerationError) as exc:
        # Named here: the module's import is where it surfaces, against whichever state and
        # tool first imported the module.
        where = getattr(fn, "__module__", "?") + "." + getattr(fn, "__qualname__", tool_name)
        first = str(exc).split("\n")[0]
        raise TypeError(
            f"tool {tool_name!r} ({where}): its parameters cannot be described: {first}"
        ) from None
    return model, context_param


_TYPED_DICTS: dict[type, Any] = {}


def _portable(annotation: Any) -> Any:
    """The annotation with each `typing.TypedDict` in it (which pydantic refuses before
    Python 3.12) made a `typing_extensions.TypedDict` with the same fields, required keys and
    name. Unchanged on Python 3.12 and later, and where it holds none."""
    if sys.version_info >= (3, 12):
        return annotation
    if isinstance(annotation, type) and typing_extensions.is_typeddict(annotation):
        if type(annotation).__module__ != "typing":
            return annotation
        if annotation not in _TYPED_DICTS:
            hints = get_type_hints(annotation, include_extras=True)
            required: frozenset[str] = getattr(annotation, "__required_keys__", frozenset())
            fields: dict[str, Any] = {}
            for key, hint in hints.items():
                if get_origin(hint) in (typing_extensions.Required, typing_extensions.NotRequired):
                    hint = get_args(hint)[0]
                mark = typing_extensions.Required if key in required else typing_extensions.NotRequired
                fields[key] = mark[_portable(hint)]
            made = typing_extensions.TypedDict(annotation.__name__, fields)  # type: ignore[misc]
            made.__module__, made.__doc__ = annotation.__module__, annotation.__doc__
            _TYPED_DICTS[annotation] = made
        return _TYPED_DICTS[annotation]
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is None or origin is Literal or not args:
        return annotation
    if origin is Annotated:
        base = _portable(args[0])
        return annotation if base is args[0] else Annotated[base, *annotation.__metadata__]
    portable = tuple(_portable(a) for a in args)
    if all(p is a for p, a in zip(portable, args, strict=True)):
        return annotation
    if origin in (Union, UnionType):
        return Union[portable]  # noqa: UP007 (built from a tuple)
    return origin[portable[0] if len(portable) == 1 else portable]


_SEQUENCES = (list, set, frozenset, tuple, abc.Sequence, abc.Set, abc.MutableSequence, abc.MutableSet)
_MAPPINGS = (dict, abc.Mapping, abc.MutableMapping)


def _bounded(annotation: Any, *, declared: bool = False) -> Any:
    """The annotation with a maximum length on every list, mapping and string in it that
    has none (`declared`: the parameter's own `Field(...)` already gives the outer one)."""
    origin = get_origin(annotation)
    if origin is Annotated:
        base, *metadata = get_args(annotation)
        declared = declared or _declares_max_length(metadata)
        bound = _default_bound(base)
        # Bound what it holds; its own bound is decided here when it has one (not a union).
        inner = _bounded(base, declared=declared or bound is not None)
        extra = [Field(max_length=bound)] if bound is not None and not declared else []
        return Annotated[(inner, *metadata, *extra)]
    if origin in (Union, UnionType):
        return Union[tuple(_bounded(a, declared=declared) for a in get_args(annotation))]  # noqa: UP007
    args = get_args(annotation)
    if origin is not None and args and (origin in _SEQUENCES or origin in _MAPPINGS):
        annotation = origin[tuple(a if a is Ellipsis else _bounded(a) for a in args)]
    bound = _default_bound(annotation)
    if bound is None or declared:
        return annotation
    return Annotated[annotation, Field(max_length=bound)]


def _default_bound(annotation: Any) -> int | None:
    if annotation is str or annotation is bytes:
        return MAX_STRING_CHARS
    origin = get_origin(annotation) or annotation
    if origin is tuple and get_args(annotation) and Ellipsis not in get_args(annotation):
        return None  # a fixed-length tuple is bounded by its own type
    return MAX_ITEMS if origin in _SEQUENCES or origin in _MAPPINGS else None


def _declares_max_length(metadata: Any) -> bool:
    for item in metadata:
        if isinstance(item, FieldInfo) and _declares_max_length(item.metadata):
            return True
        if getattr(item, "max_length", None) is not None:
            return True
    return False
