"""Models: the protocol the kernel speaks, and the adapters that implement it.

`resolve_model("script:FILE.json")` turns a model string into a model; each prefix maps to
a factory in one registry, so adding a vendor adapter changes nothing in the kernel.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from pathlib import Path

from tether.errors import ModelSpecError
from tether.models.protocol import (
    BudgetLeft,
    ExitSpec,
    Message,
    Model,
    ModelContext,
    ModelReply,
    ToolSpec,
    Usage,
)
from tether.models.scripted import FunctionModel, ScriptedModel, ScriptExhausted

ModelFactory = Callable[[str, Path], Model]


def _script(arg: str, base: Path) -> Model:
    if not arg:
        raise ModelSpecError("script model needs a file: --model script:PATH.json")
    path = Path(arg)
    return ScriptedModel.from_file(path if path.is_absolute() else base / path)


REGISTRY: dict[str, ModelFactory] = {"script": _script}


def resolve_model(spec: str, base: Path | None = None) -> Model:
    """Resolve `PREFIX:ARGUMENT` (e.g. `script:proposals.json`) to a model."""
    prefix, _, arg = spec.partition(":")
    factory = REGISTRY.get(prefix)
    if factory is None:
        close = difflib.get_close_matches(prefix, REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        known = ", ".join(sorted(REGISTRY))
        raise ModelSpecError(f"unknown model {spec!r}: no adapter {prefix!r} (known: {known}).{hint}")
    return factory(arg, base or Path.cwd())


__all__ = [
    "REGISTRY",
    "BudgetLeft",
    "ExitSpec",
    "FunctionModel",
    "Message",
    "Model",
    "ModelContext",
    "ModelReply",
    "ScriptExhausted",
    "ScriptedModel",
    "ToolSpec",
    "Usage",
    "resolve_model",
]
