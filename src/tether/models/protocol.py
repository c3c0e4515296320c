"""The one narrow interface between the runtime and whatever proposes steps.

Context in: instructions, the transcript of this state visit, the allowed tools and exits
with their schemas, the budget left. Reply out: raw output the runtime parses into a
proposal, plus usage. A model never executes anything; vendor adapters implement this.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field


class Usage(BaseModel):
    """What one model call cost, as the adapter reports it; never negative (a negative
    figure is an adapter's error, refused here, never a refund of the budget)."""

    input_tokens: int = Field(0, ge=0)
    output_tokens: int = Field(0, ge=0)
    cost: float = Field(0.0, ge=0, allow_inf_nan=False)

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens


class ToolSpec(BaseModel):
    name: str
    description: str
    effect: str
    parameters: dict[str, Any]


class ExitSpec(BaseModel):
    name: str
    target: str


@dataclass(frozen=True, slots=True)
class BudgetLeft:
    """What is left of the state's budget when the model is asked (made for every proposal:
    a plain dataclass, not a pydantic model, costs a tenth as much to make)."""

    steps: int
    tool_calls: int
    seconds: float
    tokens: int | None = None
    cost: float | None = None


class Message(BaseModel):
    """One transcript entry: the model's proposal, or what the runtime observed."""

    role: Literal["proposal", "observation", "person"]
    content: Any


class ModelContext(BaseModel):
    run_id: str
    state: str
    instructions: str
    # A sequence of messages (the runtime passes a read-only view of the visit's transcript).
    transcript: Sequence[Message] = Field(default_factory=list)
    tools: list[ToolSpec] = Field(default_factory=list)
    exits: list[ExitSpec] = Field(default_factory=list)
    budget_left: BudgetLeft
    data: dict[str, Any] = Field(default_factory=dict)
    # Facts a person's answer may establish here (a question's `fact`): name -> what it is.
    facts_from_answers: dict[str, str] = Field(default_factory=dict)

    @property
    def proposals_made(self) -> int:
        counted = getattr(self.transcript, "proposals_made", None)
        if counted is not None:
            return int(counted())
        return sum(1 for m in self.transcript if m.role == "proposal")


class Attempt(BaseModel):
    """One try at calling a model: how it ended and how long it took."""

    number: int
    seconds: float
    error: str | None = None
    reason_code: str | None = None
    retry_in: float | None = None


class Exchange(BaseModel):
    """What went over the wire, kept apart from the step records: the request as the
    vendor received it, its raw response, and every attempt. Adapters fill it in."""

    request: Any = None
    response: Any = None
    attempts: list[Attempt] = Field(default_factory=list)


class ModelReply(BaseModel):
    """Raw output (JSON text, a dict, or a proposal object) and what it cost."""

    output: Any
    usage: Usage = Field(default_factory=Usage)
    exchange: Exchange | None = None


class ModelCallError(Exception):
    """A model call that failed for good (after retries), with its reason code.

    The runtime records it with the exchange and escalates the run; it never crashes it.
    """

    def __init__(
        self,
        reason_code: str,
        message: str,
        *,
        request: Any = None,
        attempts: list[Attempt] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.request = request
        self.attempts = attempts or []


@runtime_checkable
class Model(Protocol):
    name: str

    async def propose(self, ctx: ModelContext) -> ModelReply: ...
