"""Models: the protocol the kernel speaks, and the adapters that implement it.

`resolve_model("script:FILE.json")` (or `"function:module:attr"`) turns a model string into
a model; each prefix maps to a factory in one registry, so adding a vendor adapter changes
nothing in the kernel. A factory gets the text after the prefix and a `ModelEnv`: the folder
relative paths resolve against, and the journal (for models that read it, such as replay).
"""

from __future__ import annotations

import difflib
import importlib
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tether.errors import ModelSpecError
from tether.models.protocol import (
    Attempt,
    BudgetLeft,
    Exchange,
    ExitSpec,
    Message,
    Model,
    ModelCallError,
    ModelContext,
    ModelReply,
    ToolSpec,
    Usage,
)
from tether.models.replay import ReplayModel
from tether.models.scripted import FunctionModel, ScriptedModel, ScriptExhausted


@dataclass(frozen=True)
class ModelEnv:
    """What a model factory may use besides its argument."""

    base: Path
    # The run's journal (a tether.journal.Journal), when the caller has one open.
    journal: Any = None


ModelFactory = Callable[[str, ModelEnv], Model]


def _script(arg: str, env: ModelEnv) -> Model:
    if not arg:
        raise ModelSpecError("script model needs a file: --model script:PATH.json")
    path = Path(arg)
    return ScriptedModel.from_file(path if path.is_absolute() else env.base / path)


def _function(arg: str, env: ModelEnv) -> Model:
    """`function:module:attr`: a Python callable taking the context, as a FunctionModel."""
    module_name, _, attr = arg.partition(":")
    if not module_name or not attr:
        raise ModelSpecError(f"function model needs module:attribute, got {arg!r}")
    sys.path.insert(0, str(env.base))
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ModelSpecError(f"cannot load function model {arg!r}: {exc}") from None
    finally:
        sys.path.remove(str(env.base))
    if not callable(fn):
        raise ModelSpecError(f"function model {arg!r} is not callable")
    return FunctionModel(fn, name=f"function:{arg}")


def _rerun(arg: str, env: ModelEnv, prefix: str = "rerun") -> Model:
    """`rerun:RUN_ID`: the recorded answers of another run in the same journal, proposed
    again; everything else runs for real, tools included (`tether replay` never acts)."""
    if not arg:
        raise ModelSpecError(f"{prefix} model needs a run: --model rerun:RUN_ID")
    if env.journal is None:
        raise ModelSpecError(f"{prefix} model needs the journal holding the recorded run")
    return ReplayModel(env.journal, arg, prefix=prefix)


def _replay(arg: str, env: ModelEnv) -> Model:
    """`replay:RUN_ID`: the name `rerun:` had before `tether replay` existed (deprecated:
    it re-runs the answers and executes the tools, which a replay never does)."""
    return _rerun(arg, env, prefix="replay")


def _openai(arg: str, env: ModelEnv) -> Model:
    """`openai:MODEL?base_url=...`: an OpenAI-compatible server (the openai extra)."""
    from tether.models.openai import OpenAIModel

    return OpenAIModel.from_spec(arg, env.base)


def _local(arg: str, env: ModelEnv) -> Model:
    """`local` (the bundled SmolLM2) or `local:PATH.gguf`, run in-process (the local extra)."""
    from tether.models.local import LocalModel

    return LocalModel.from_spec(arg, env.base)


def _anthropic(arg: str, env: ModelEnv) -> Model:
    """`anthropic:MODEL?...`: Anthropic's Messages API (the anthropic extra)."""
    from tether.models.anthropic import AnthropicModel

    return AnthropicModel.from_spec(arg, env.base)


REGISTRY: dict[str, ModelFactory] = {
    "script": _script,
    "function": _function,
    "rerun": _rerun,
    "replay": _replay,  # deprecated alias of rerun
    "openai": _openai,
    "anthropic": _anthropic,
    "local": _local,
}


async def close_model(model: Model | None) -> None:
    """Release what an adapter holds (an HTTP client, a loaded model); most hold nothing."""
    aclose = getattr(model, "aclose", None)
    if aclose is not None:
        await aclose()


def resolve_model(spec: str, base: Path | None = None, *, journal: Any = None) -> Model:
    """Resolve `PREFIX:ARGUMENT` (e.g. `script:proposals.json`) to a model."""
    prefix, _, arg = spec.partition(":")
    if "?" in prefix:  # options without an argument: `local?seed=1`
        prefix, mark, query = spec.partition("?")
        arg = mark + query
    factory = REGISTRY.get(prefix)
    if factory is None:
        close = difflib.get_close_matches(prefix, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(REGISTRY))
        raise ModelSpecError(f"unknown model {spec!r}: no adapter {prefix!r} (known: {known}).{hint}")
    return factory(arg, ModelEnv(base or Path.cwd(), journal))


__all__ = [
    "REGISTRY",
    "Attempt",
    "BudgetLeft",
    "Exchange",
    "ExitSpec",
    "FunctionModel",
    "Message",
    "Model",
    "ModelCallError",
    "ModelContext",
    "ModelEnv",
    "ModelReply",
    "ReplayModel",
    "ScriptExhausted",
    "ScriptedModel",
    "ToolSpec",
    "Usage",
    "close_model",
    "resolve_model",
]
