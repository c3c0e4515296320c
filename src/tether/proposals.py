"""What a model may propose, and the parser that turns raw model output into it.

Proposal kinds: call a tool, take an exit, ask a person a question, hand off to a named
owner, or finish (the exit named "finish"). Anything else is malformed output.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError


class _Proposal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolCall(_Proposal):
    kind: Literal["tool_call"] = "tool_call"
    tool: str
    args: dict[str, Any] = Field(default_factory=dict)


class Exit(_Proposal):
    """Leave the agent state through a declared exit, optionally setting run data."""

    kind: Literal["exit"] = "exit"
    exit: str
    update: dict[str, Any] = Field(default_factory=dict)
    summary: str = ""


class Question(_Proposal):
    """Pause and ask a person; the answer comes back as an observation."""

    kind: Literal["question"] = "question"
    question: str


class Handoff(_Proposal):
    """Hand the run to a named owner, with a note of why."""

    kind: Literal["handoff"] = "handoff"
    to: str
    note: str = ""


class Finish(_Proposal):
    """Done: shorthand for the exit named "finish"."""

    kind: Literal["finish"] = "finish"
    update: dict[str, Any] = Field(default_factory=dict)
    summary: str = ""


Proposal = Annotated[ToolCall | Exit | Question | Handoff | Finish, Field(discriminator="kind")]
_adapter: TypeAdapter[Proposal] = TypeAdapter(Proposal)


class MalformedProposal(ValueError):
    """Raw model output that is not a proposal; `raw` keeps what was received."""

    def __init__(self, message: str, raw: Any) -> None:
        super().__init__(message)
        self.raw = raw


def parse_proposal(raw: Any) -> ToolCall | Exit | Question | Handoff | Finish:
    """Parse a model's raw output (JSON text, a dict, or a proposal object)."""
    if isinstance(raw, ToolCall | Exit | Question | Handoff | Finish):
        return raw
    value = raw
    if isinstance(raw, str):
        try:
            value = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise MalformedProposal(f"output is not JSON: {exc.msg} at char {exc.pos}", raw) from None
    if isinstance(value, list):
        raise MalformedProposal(f"{len(value)} proposals in one reply; propose one step at a time", raw)
    if not isinstance(value, dict):
        raise MalformedProposal(f"output must be a JSON object, got {type(value).__name__}", raw)
    try:
        return _adapter.validate_python(value)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or '(proposal)'}: {e['msg']}" for e in exc.errors()
        )
        raise MalformedProposal(f"not a valid proposal: {problems}", raw) from None


def proposal_json_schema() -> dict[str, Any]:
    """The JSON schema of a proposal, for adapters that constrain model output."""
    return _adapter.json_schema()
