"""Every limit a run lives under, and the counters they are checked against.

- `Budget`: one visit to an agent state (steps, tool calls, seconds, tokens, cost, repeats).
- `RunBudget`: the whole run, across every state and visit.
- `Limits`: sizes — a run's input, a model's output, a call's arguments, a tool's result.

Budgets are reserved before they are spent: a model call is made only if the step budget
allows it (and its output tokens are capped to what is left), a tool runs only if the
tool-call budget allows it. `Visit` and `Totals` are the counters, kept in the run's
checkpoint so that a resumed run carries on where it was.
"""

from __future__ import annotations

import functools

import msgspec
from pydantic import BaseModel, ConfigDict, Field

from tether.proposals import OutputLimits


class Budget(BaseModel):
    """Limits of one visit to an agent state, checked before every model and tool call."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int = Field(20, ge=1, description="proposals, including refused ones")
    max_tool_calls: int = Field(10, ge=0)
    max_seconds: float = Field(300.0, gt=0, description="active time; paused time is not counted")
    max_tokens: int | None = Field(None, ge=1)
    max_cost: float | None = Field(None, gt=0)
    max_repeats: int = Field(3, ge=1, description="same tool call, same arguments, in a row")


class RunBudget(BaseModel):
    """Limits over the whole run, across every state and visit (all optional)."""

    model_config = ConfigDict(extra="forbid")

    max_steps: int | None = Field(None, ge=1, description="proposals in all agent states together")
    max_tool_calls: int | None = Field(None, ge=0)
    max_tokens: int | None = Field(None, ge=1)
    max_cost: float | None = Field(None, gt=0)


class Limits(BaseModel):
    """Sizes a run's values may reach; beyond them a value is refused, never stored."""

    model_config = ConfigDict(extra="forbid")

    max_input_bytes: int = Field(1_000_000, ge=1, description="a run's input, as JSON")
    max_output_bytes: int = Field(1_000_000, ge=1, description="one model reply")
    max_depth: int = Field(32, ge=2, le=256, description="nesting of any value a model sends")
    max_args_bytes: int = Field(256_000, ge=1, description="one tool call's arguments, as JSON")
    max_result_bytes: int = Field(1_000_000, ge=1, description="one tool result, as JSON")

    def output(self) -> OutputLimits:
        return _limits(self.max_output_bytes, self.max_depth)

    def input(self) -> OutputLimits:
        return _limits(self.max_input_bytes, self.max_depth)

    def arguments(self) -> OutputLimits:
        return _limits(self.max_args_bytes, self.max_depth)


@functools.lru_cache(maxsize=64)
def _limits(max_bytes: int, max_depth: int) -> OutputLimits:
    """One (frozen) OutputLimits per pair: every step checks its proposal and result with one."""
    return OutputLimits(max_bytes=max_bytes, max_depth=max_depth)


class Visit(msgspec.Struct):
    """Counters of one visit to a state; the state's `Budget` applies to them."""

    state: str
    number: int
    started_seq: int
    steps: int = 0
    tool_calls: int = 0
    tokens: int = 0
    cost: float = 0.0
    active_seconds: float = 0.0
    # Only the last call is kept: the checkpoint stays the same size however long the run.
    last_call: str | None = None
    repeats: int = 0


class Totals(msgspec.Struct, omit_defaults=True):
    """Counters of the whole run; the workflow's `RunBudget` applies to them."""

    steps: int = 0
    tool_calls: int = 0
    tokens: int = 0
    cost: float = 0.0


def before_model_call(
    visit: Visit, totals: Totals, budget: Budget, run: RunBudget, seconds: float
) -> str | None:
    """Why no further model call may be made in this visit, or None."""
    for spent, limit, what in (
        (totals.steps, run.max_steps, "step"),
        (totals.tokens, run.max_tokens, "token"),
        (totals.cost, run.max_cost, "cost"),
    ):
        if limit is not None and spent >= limit:
            return f"the run's {what} budget of {limit:g} is spent"
    if visit.steps >= budget.max_steps:
        return f"step budget of {budget.max_steps} for state {visit.state!r} is spent"
    if seconds >= budget.max_seconds:
        return f"time budget of {budget.max_seconds:g}s for state {visit.state!r} is spent"
    if budget.max_tokens is not None and visit.tokens >= budget.max_tokens:
        return f"token budget of {budget.max_tokens} for state {visit.state!r} is spent"
    if budget.max_cost is not None and visit.cost >= budget.max_cost:
        return f"cost budget of {budget.max_cost:g} for state {visit.state!r} is spent"
    return None


def tokens_left(visit: Visit, totals: Totals, budget: Budget, run: RunBudget) -> int | None:
    """Output tokens the next model call may use (None: no token budget)."""
    left = [
        limit - spent
        for limit, spent in ((budget.max_tokens, visit.tokens), (run.max_tokens, totals.tokens))
        if limit is not None
    ]
    return max(0, min(left)) if left else None


def before_tool_call(visit: Visit, totals: Totals, budget: Budget, run: RunBudget) -> str | None:
    """Why no further tool may run in this visit, or None."""
    if visit.tool_calls >= budget.max_tool_calls:
        return f"tool-call budget of {budget.max_tool_calls} for this state is spent"
    if run.max_tool_calls is not None and totals.tool_calls >= run.max_tool_calls:
        return f"the run's tool-call budget of {run.max_tool_calls} is spent"
    return None


def repeated(visit: Visit, tool: str, args_hash: str, budget: Budget) -> str | None:
    """Count this call against the same call in a row; why it is a loop, or None."""
    visit.repeats = visit.repeats + 1 if visit.last_call == args_hash else 1
    visit.last_call = args_hash
    if visit.repeats > budget.max_repeats:
        return f"{tool} proposed {visit.repeats} times with the same arguments (limit {budget.max_repeats})"
    return None


def spend_model_call(visit: Visit, totals: Totals, tokens: int, cost: float) -> None:
    """A proposal was made: one step, and what the call cost (never negative: no refunds)."""
    tokens, cost = max(0, tokens), max(0.0, cost)
    visit.steps += 1
    totals.steps += 1
    visit.tokens += tokens
    totals.tokens += tokens
    visit.cost += cost
    totals.cost += cost


def spend_tool_call(visit: Visit, totals: Totals) -> None:
    visit.tool_calls += 1
    totals.tool_calls += 1
