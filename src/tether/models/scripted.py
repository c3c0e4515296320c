"""Test doubles that stand in for a model's choices: scripted proposals and functions.

Neither keeps state between calls: the position in a script is the number of proposals
already in the transcript, so a run resumed in another process continues where it was.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tether.errors import ModelSpecError
from tether.models.protocol import ModelContext, ModelReply, Usage


class ScriptExhausted(RuntimeError):
    """The script has no proposal left for this state."""


class ScriptedModel:
    """Replays a fixed list of proposals, one per turn, per agent state.

    `script` is a list (used for every agent state) or a mapping of state name to list.
    Each item is a proposal object (`{"kind": "tool_call", ...}`), or `{"raw": ...}` to
    emit that raw output verbatim (for testing malformed output), optionally with
    `"usage": {"input_tokens": ..., "output_tokens": ..., "cost": ...}`.
    """

    def __init__(self, script: Sequence[Any] | Mapping[str, Sequence[Any]], name: str = "script"):
        self.script = script
        self.name = name

    async def propose(self, ctx: ModelContext) -> ModelReply:
        items = self.script.get(ctx.state, []) if isinstance(self.script, Mapping) else self.script
        turn = ctx.proposals_made
        if turn >= len(items):
            raise ScriptExhausted(
                f"script has {len(items)} proposal(s) for state {ctx.state!r}; turn {turn + 1} asked"
            )
        item = items[turn]
        if isinstance(item, dict):
            usage = Usage.model_validate(item.get("usage", {}))
            if "raw" in item:
                return ModelReply(output=item["raw"], usage=usage)
            item = {k: v for k, v in item.items() if k != "usage"}
            return ModelReply(output=item, usage=usage)
        return ModelReply(output=item)

    @classmethod
    def from_file(cls, path: str | Path) -> ScriptedModel:
        file = Path(path)
        try:
            content = json.loads(file.read_text())
        except FileNotFoundError:
            raise ModelSpecError(f"script file not found: {file}") from None
        except json.JSONDecodeError as exc:
            raise ModelSpecError(f"script file {file} is not JSON: {exc}") from None
        if isinstance(content, dict) and "proposals" in content:
            content = content["proposals"]
        if not isinstance(content, list | dict):
            raise ModelSpecError(
                f"script file {file} must hold a list of proposals or a mapping of state to list"
            )
        return cls(content, name=f"script:{file}")


ProposeFn = Callable[[ModelContext], Any]


class FunctionModel:
    """Wraps a function (sync or async) that takes the context and returns a proposal.

    The function may return a ModelReply, or raw output (a dict, JSON text, a proposal).
    """

    def __init__(self, fn: ProposeFn, name: str | None = None):
        self.fn = fn
        self.name = name or f"function:{getattr(fn, '__name__', 'anonymous')}"

    async def propose(self, ctx: ModelContext) -> ModelReply:
        result = self.fn(ctx)
        if inspect.isawaitable(result):
            result = await result
        return result if isinstance(result, ModelReply) else ModelReply(output=result)
