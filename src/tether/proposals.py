"""What a model may propose, and the parser that turns raw model output into it.

Proposal kinds: call a tool, take an exit, ask a person a question, hand off to a named
owner, or finish (the exit named "finish"). Anything else is malformed output.

Raw output is untrusted: whatever its size, depth or shape, parsing ends in a proposal or
in `MalformedProposal`, never in another exception. Before a value is interpreted it is
checked against `OutputLimits` (bytes, nesting depth, number of values; numbers finite),
so nothing downstream — hashing, policy, storage — ever meets a value it cannot hold.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Any

import msgspec


class ToolCall(msgspec.Struct, frozen=True, tag="tool_call", tag_field="kind", forbid_unknown_fields=True):
    tool: str
    args: dict[str, Any] = {}


class Exit(msgspec.Struct, frozen=True, tag="exit", tag_field="kind", forbid_unknown_fields=True):
    """Leave the agent state through a declared exit, optionally setting run data."""

    exit: str
    update: dict[str, Any] = {}
    summary: str = ""


class Question(
    msgspec.Struct,
    frozen=True,
    tag="question",
    tag_field="kind",
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    """Pause and ask a person; the answer comes back as an observation. With `fact`, one the
    state declares in `facts_from_answers`, the answer also becomes `facts.NAME`."""

    question: str
    fact: str | None = None


class Handoff(
    msgspec.Struct,
    frozen=True,
    tag="handoff",
    tag_field="kind",
    forbid_unknown_fields=True,
    omit_defaults=True,
):
    """Hand the run to a named owner (or an agent state the envelope routes to), with a note
    of why and what is open: `risks` and pending `questions` (the runtime adds the rest)."""

    to: str
    note: str = ""
    risks: list[str] = []
    questions: list[str] = []


class Finish(msgspec.Struct, frozen=True, tag="finish", tag_field="kind", forbid_unknown_fields=True):
    """Done: shorthand for the exit named "finish"."""

    update: dict[str, Any] = {}
    summary: str = ""


Proposal = ToolCall | Exit | Question | Handoff | Finish
PROPOSAL_TYPES = (ToolCall, Exit, Question, Handoff, Finish)


@dataclass(frozen=True)
class OutputLimits:
    """What raw model output may be before it is even read (documented in docs/security.md)."""

    max_bytes: int = 1_000_000
    max_depth: int = 32
    max_values: int = 100_000


DEFAULT_LIMITS = OutputLimits()


class MalformedProposal(ValueError):
    """Raw model output that is not a proposal; `raw` keeps what was received."""

    def __init__(self, message: str, raw: Any) -> None:
        super().__init__(message)
        self.raw = raw


def parse_proposal(raw: Any, limits: OutputLimits = DEFAULT_LIMITS) -> Proposal:
    """Parse a model's raw output (JSON text, a dict, or a proposal object)."""
    if isinstance(raw, PROPOSAL_TYPES):
        return raw
    value = raw
    if isinstance(raw, str | bytes):
        if len(raw) > limits.max_bytes:
            raise MalformedProposal(f"output is {len(raw):,} bytes; the limit is {limits.max_bytes:,}", raw)
        try:
            value = msgspec.json.decode(raw)
        except RecursionError:
            raise MalformedProposal(f"output is nested deeper than {limits.max_depth} levels", raw) from None
        except msgspec.DecodeError as exc:
            raise MalformedProposal(f"output is not JSON: {exc}", raw) from None
    problem = json_value_problem(value, limits)
    if problem:
        raise MalformedProposal(problem, raw)
    if isinstance(value, list):
        raise MalformedProposal(f"{len(value)} proposals in one reply; propose one step at a time", raw)
    if not isinstance(value, dict):
        raise MalformedProposal(f"output must be a JSON object, got {type(value).__name__}", raw)
    try:
        proposal: Proposal = msgspec.convert(value, Proposal)
        return proposal
    except msgspec.ValidationError as exc:
        # msgspec says "Expected `object`, got `str` - at `$.args`": the place first, as elsewhere.
        problem, _, where = str(exc).partition(" - at `")
        place = where.rstrip("`").removeprefix("$").removeprefix(".") or "(proposal)"
        raise MalformedProposal(f"not a valid proposal: {place}: {problem}", raw) from None


def json_value_problem(value: Any, limits: OutputLimits = DEFAULT_LIMITS) -> str | None:
    """Why `value` is not a JSON value within `limits`, or None. Iterative: no depth breaks it."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    seen = 0
    while stack:
        item, depth = stack.pop()
        seen += 1
        if seen > limits.max_values:
            return f"output holds more than {limits.max_values:,} values"
        kind = type(item)
        # Strings and small integers first, by exact type: every step checks its proposal
        # and its result, and these are most of what they hold.
        if kind is str and len(item) <= limits.max_bytes:
            continue
        if kind is int and -(2**63) <= item < 2**64:
            continue
        problem = _nested_problem(item, depth, stack, limits)
        if problem is not None:
            return problem
    return None


def _nested_problem(item: Any, depth: int, stack: list[tuple[Any, int]], limits: OutputLimits) -> str | None:
    """An array's or object's problem (its children pushed on `stack`), or a scalar's."""
    if not isinstance(item, dict | list | tuple):
        return _scalar_problem(item, limits)
    if depth > limits.max_depth:
        return f"output is nested deeper than {limits.max_depth} levels"
    # Iterated by map and zip: no Python frame per key or child.
    if isinstance(item, dict):
        if not all(map(isinstance, item, itertools.repeat(str))):
            return "object keys must be strings"
        stack.extend(zip(item.values(), itertools.repeat(depth + 1)))
    else:
        stack.extend(zip(item, itertools.repeat(depth + 1)))
    return None


def _scalar_problem(item: Any, limits: OutputLimits) -> str | None:
    if item is None or isinstance(item, bool):
        return None
    if isinstance(item, str):
        if len(item) > limits.max_bytes:
            return f"a string of {len(item):,} characters exceeds the limit of {limits.max_bytes:,}"
        return None
    if isinstance(item, int):
        return None if -(2**63) <= item < 2**64 else f"integer {item:.3e} is out of range (64 bits)"
    if isinstance(item, float):
        return None if math.isfinite(item) else f"numbers must be finite, not {item}"
    return f"{type(item).__name__} is not a JSON value"


def as_dict(proposal: Proposal) -> dict[str, Any]:
    """A proposal as plain JSON values, `kind` first (how transcripts and records show it)."""
    values: dict[str, Any] = msgspec.to_builtins(proposal)
    return values


def proposal_json_schema() -> dict[str, Any]:
    """The JSON schema of a proposal, for adapters that constrain model output. Each kind
    is a definition (`$defs`) whose `kind` property is a `const`."""
    schema: dict[str, Any] = msgspec.json.schema(Proposal)
    for definition in schema["$defs"].values():
        tag = definition["properties"]["kind"]
        if list(tag) == ["enum"] and len(tag["enum"]) == 1:
            definition["properties"]["kind"] = {"const": tag["enum"][0]}
    return schema
