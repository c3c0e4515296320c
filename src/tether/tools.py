"""Tools: plain Python functions whose JSON schema comes from their type hints.

A tool declares its effect (`read`, `write`, `external`) and whether repeating it is
harmless (`idempotent`). A tool may name a verifier that reads the resulting state and
returns `Evidence`; the runtime never takes a tool's own return value as proof.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model
from pydantic_core import to_jsonable_python

from tether.hashing import canonical_json

Effect = Literal["read", "write", "external"]
EFFECTS: tuple[Effect, ...] = ("read", "write", "external")


@dataclass(frozen=True)
class ToolContext:
    """What the runtime hands a tool or verifier that asks for it by annotation."""

    run_id: str
    step_id: str
    idempotency_key: str
    data: Mapping[str, Any] = field(default_factory=dict)
    facts: Mapping[str, Any] = field(default_factory=dict)


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


class Tool:
    """A callable the runtime may execute on a model's behalf, with its contract."""

    def __init__(
        self,
        fn: Callable[..., Any],
        *,
        name: str | None = None,
        effect: Effect = "read",
        idempotent: bool | None = None,
        verify: Verifier | None = None,
        description: str | None = None,
    ) -> None:
        if effect not in EFFECTS:
            raise ValueError(f"tool effect must be one of {EFFECTS}, not {effect!r}")
        self.fn = fn
        self.name = name or fn.__name__
        self.effect: Effect = effect
        # Reads are harmless to repeat; anything else must say so explicitly.
        self.idempotent = (effect == "read") if idempotent is None else idempotent
        self.verifier = verify
        self.description = description or _first_paragraph(inspect.getdoc(fn))
        self.args_model, self._context_param = _args_model(fn, self.name)
        self.is_async = inspect.iscoroutinefunction(fn)

    def __repr__(self) -> str:
        return f"Tool({self.name!r}, effect={self.effect!r}, idempotent={self.idempotent})"

    def json_schema(self) -> dict[str, Any]:
        return self.args_model.model_json_schema()

    def validate(self, args: Any) -> dict[str, Any]:
        """Validate arguments strictly; return them in their canonical JSON form."""
        if not isinstance(args, dict):
            raise ArgumentError(self.name, [{"loc": (), "msg": "arguments must be an object"}])
        try:
            # JSON-mode strictness: no "12" for a number, but ISO strings for dates.
            model = self.args_model.model_validate_json(canonical_json(args))
        except ValidationError as exc:
            errors = [{"loc": e["loc"], "msg": e["msg"]} for e in exc.errors()]
            raise ArgumentError(self.name, errors) from None
        return model.model_dump(mode="json")

    async def call(self, args: dict[str, Any], ctx: ToolContext) -> Any:
        """Run the tool on validated arguments; return a JSON-compatible result."""
        values = dict(self.args_model.model_validate_json(canonical_json(args)))
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


def tool(
    fn: Callable[..., Any] | None = None,
    *,
    name: str | None = None,
    effect: Effect = "read",
    idempotent: bool | None = None,
    verify: Verifier | None = None,
    description: str | None = None,
) -> Any:
    """Declare a function as a tool: `@tool` or `@tool(effect="write", verify=...)`."""

    def wrap(f: Callable[..., Any]) -> Tool:
        return Tool(
            f, name=name, effect=effect, idempotent=idempotent, verify=verify, description=description
        )

    return wrap(fn) if fn is not None else wrap


def _first_paragraph(doc: str | None) -> str:
    return doc.split("\n\n", 1)[0].strip() if doc else ""


def _args_model(fn: Callable[..., Any], tool_name: str) -> tuple[type[BaseModel], str | None]:
    """Build a strict pydantic model from the function's parameters."""
    hints = get_type_hints(fn)
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
        fields[param.name] = (annotation, default)
    model = create_model(  # type: ignore[call-overload]
        f"{tool_name}_args",
        __config__=ConfigDict(strict=True, extra="forbid"),
        **fields,
    )
    return model, context_param
