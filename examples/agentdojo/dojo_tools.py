"""AgentDojo's tools as tether tools, acting on the environment a run names.

AgentDojo (PyPI `agentdojo`, MIT) defines each suite's tools as plain functions over a
pydantic environment (a bank account, a Slack workspace, an inbox and a drive, a travel
booking system), with the parts of the environment a tool needs injected as `Depends`
parameters. Here each one becomes a `tether.Tool`:

- its schema is AgentDojo's own parameter model, without the injected parts, so the model
  sees the same parameters and descriptions it would see in AgentDojo;
- its effect (`read`, `write`, `external`), whether its results are content other people
  wrote, and which of its parameters are security-relevant come from the suite's
  declarations (`dojo_suites.py`): AgentDojo's functions say none of that;
- it acts on the environment whose key is in the run's input (`data.environment`): a
  run is pinned to one environment, registered with `attach` before the run starts. The
  environment is a live Python object (AgentDojo scores a run by comparing it before and
  after), so it lives in this process, like the database file of the retail example lives
  on one disk.

AgentDojo's own `FunctionsRuntime` runs the call (its validation, its dependency
injection, its errors), so the tool behaves exactly as in AgentDojo; an error AgentDojo
reports becomes a `tool_error` the model is told about.
"""

from __future__ import annotations

import inspect
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from agentdojo.functions_runtime import Function, FunctionsRuntime, TaskEnvironment
from pydantic import Field

from tether import Tool, ToolContext
from tether.tools import Effect

_ENVIRONMENTS: dict[str, TaskEnvironment] = {}


def attach(environment: TaskEnvironment) -> str:
    """Register an environment for runs to act on; the key goes in the run's input."""
    key = "env_" + secrets.token_hex(6)
    _ENVIRONMENTS[key] = environment
    return key


def detach(key: str) -> None:
    _ENVIRONMENTS.pop(key, None)


def environment_of(data: Mapping[str, Any]) -> TaskEnvironment:
    key = data.get("environment")
    if not isinstance(key, str) or key not in _ENVIRONMENTS:
        raise LookupError(f"the run names no attached AgentDojo environment (data.environment={key!r})")
    return _ENVIRONMENTS[key]


class ToolFailed(RuntimeError):
    """AgentDojo's function refused the call (a missing file, an unknown user, ...)."""


@dataclass(frozen=True)
class Declaration:
    """What a security team declares about one AgentDojo tool.

    `untrusted_results`: its results hold content other people wrote (an email, a web page,
    a file, a message, a transaction memo). `security`: the parameters whose values decide
    where data or money goes or what is changed (recipients, URLs, account details,
    credentials). `sensitive`: asked every time, whoever proposes it and with what.
    """

    effect: Effect
    untrusted_results: bool = False
    security: tuple[str, ...] = ()
    sensitive: bool = False


def tether_tool(function: Function, declaration: Declaration, *, provenance: bool = True) -> Tool:
    """One AgentDojo function as a tether tool with the declared contract (`provenance=False`:
    its results declared trusted whatever the declaration says)."""
    runtime = FunctionsRuntime([function])
    name = function.name

    def call(**kwargs: Any) -> Any:
        ctx: ToolContext = kwargs.pop("ctx")
        try:
            result, _ = runtime.run_function(environment_of(ctx.data), name, kwargs, raise_on_error=True)
        except (ValueError, KeyError, IndexError, TypeError) as exc:
            raise ToolFailed(f"{type(exc).__name__}: {exc}") from None
        return result

    parameters = []
    annotations: dict[str, Any] = {}
    for pname, field in function.parameters.model_fields.items():
        default = Field(description=field.description or "")
        if not field.is_required():
            default = Field(default=field.default, description=field.description or "")
        parameters.append(inspect.Parameter(pname, inspect.Parameter.KEYWORD_ONLY, default=default))
        annotations[pname] = field.annotation
    parameters.append(inspect.Parameter("ctx", inspect.Parameter.KEYWORD_ONLY))
    annotations["ctx"] = ToolContext
    call.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    call.__annotations__ = annotations
    call.__name__ = call.__qualname__ = name
    return Tool(
        call,
        name=name,
        effect=declaration.effect,
        idempotent=declaration.effect == "read",
        description=function.description,
        results="untrusted" if declaration.untrusted_results and provenance else "trusted",
        security=declaration.security,
        sensitive=declaration.sensitive,
    )
