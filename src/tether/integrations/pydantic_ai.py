"""Govern a pydantic-ai agent's tool calls: each one a governed step of a tether run.

    governance = Governance(journal, name="support-bot", policy=Policy.from_file("policy.yaml"),
                            effects={"read_order": "read", "refund": "write"})
    agent = Agent(model, toolsets=[governance.wrap(FunctionToolset([read_order, refund]))],
                  output_type=[str, DeferredToolRequests])
    # or, for every tool the agent has (its own @agent.tool ones too):
    agent = Agent(model, tools=[read_order, refund], capabilities=[governance.capability()],
                  output_type=[str, DeferredToolRequests])

`GovernedToolset` wraps any pydantic-ai toolset (`WrapperToolset`); `Governed` is the
capability that wraps the agent's assembled toolset. Each call the model makes goes through
`tether.external.GovernedCalls`: scope, arguments, budget, policy, approval, intent, execution,
verification, record. What the model gets back is pydantic-ai's own:

- executed: the result tether recorded (JSON), as the tool's return;
- refused (policy_denied, approval_denied, approval_mismatch, approval_pending, unknown_tool,
  budget_exhausted ...): a `ToolDenied`, the framework's own denial (a tool return with outcome
  `denied`) naming the reason code and the policy's reason, so the model reads why and goes on;
- tool_error: the tool's own `ModelRetry`/`ToolFailed` as it raised it, anything else a
  `ToolFailed` (the failure is recorded, the run is not crashed); verification_failed,
  effect_in_doubt and a stopped run: a `ToolFailed` naming the reason code;
- awaiting_approval: `ApprovalRequired` with the ticket in its metadata
  (`requests.metadata[call_id]["tether"]`), so the agent run ends with `DeferredToolRequests`
  (the agent's `output_type` must include it). A person decides the ticket (`tether approve`,
  the inbox); the app then runs the agent again with the message history and
  `deferred_tool_results=resume_results(requests)`, which presents each such call again:
  tether carries out the person's decision (the ticket's arguments run, once, or the denial
  reaches the model). The framework's own approval (`True`, `ToolApproved`) decides nothing:
  a call whose ticket is undecided pauses again, and one presented with other arguments
  (`ToolApproved(override_args=...)`, an edited history) is refused with `approval_mismatch`.

The tether run is keyed to the conversation: by default pydantic-ai's `conversation_id`
(given to `agent.run(conversation_id=...)`, else carried by the message history, else a fresh
one), so a conversation resumed from its message history, in another process, continues the
same tether run; `conversation=` derives the key another way (from the app's deps, say). The
tools' effects are what the app declares here (an undeclared tool counts as `external`, the
most restrictive), never what the framework or the model says. A conversation's tool set is
pinned with its run: the same conversation continued with other tools (or another policy)
takes no call (each is told `stopped`, naming the version the run is pinned to), as a run
resumed on another workflow version is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic_ai import RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.exceptions import ApprovalRequired, ModelRetry, ToolFailed
from pydantic_ai.tools import AgentDepsT, DeferredToolRequests, DeferredToolResults, ToolApproved, ToolDenied
from pydantic_ai.toolsets import AbstractToolset, ToolsetTool, WrapperToolset
from pydantic_core import to_jsonable_python

from tether.budget import Budget
from tether.external import CallOutcome, GovernedCalls, conversation_run_id
from tether.hashing import encode_json
from tether.identity import Principal
from tether.journal import Journal
from tether.policy import Policy
from tether.tools import Effect, SchemaTool, ToolContext, Trust, Verifier

SOURCE = "pydantic-ai"
METADATA_KEY = "tether"  # where an ApprovalRequired's metadata carries the ticket

ConversationKey = Callable[[RunContext[Any]], str]
Starter = Principal | Callable[[RunContext[Any]], Principal | None]


@dataclass
class _Call:
    """The framework's side of the call being governed, for the step's tool to run it with."""

    name: str
    ctx: RunContext[Any]
    tool: ToolsetTool[Any]
    toolset: AbstractToolset[Any]
    raised: Exception | None = None  # what the framework's tool raised, if it failed


# Set around GovernedCalls.call (the step runs in the caller's task): what the step's tool
# needs to run the framework's tool, and the tether context the framework's tool may read.
_CALL: ContextVar[_Call | None] = ContextVar("tether_pydantic_ai_call", default=None)
_TOOL_CONTEXT: ContextVar[ToolContext | None] = ContextVar("tether_pydantic_ai_tool_context", default=None)


def tool_context() -> ToolContext | None:
    """Inside a governed tool: tether's context of the call (run id, step id, and the
    idempotency key to pass on to what the tool calls, so a re-run after a crash is harmless)."""
    return _TOOL_CONTEXT.get()


def resume_results(requests: DeferredToolRequests) -> DeferredToolResults:
    """The `deferred_tool_results` to resume a paused agent run with: every call tether asked
    about presented again (`ToolApproved`), for tether to carry out the person's decision on
    its ticket. Calls deferred by anything else are left for the application to answer."""
    return DeferredToolResults(
        approvals={
            call.tool_call_id: ToolApproved()
            for call in requests.approvals
            if METADATA_KEY in (requests.metadata.get(call.tool_call_id) or {})
        }
    )


class Governance:
    """What governs a pydantic-ai agent's tool calls: the journal the runs are recorded in,
    the workflow `name` they are listed under, the `policy` (tether's default without one),
    each tool's declared `effect` (`read` / `write` / `external`; undeclared: `external`),
    `idempotent`, `verify` (a tether verifier) and `results` trust, by tool name.

    `conversation` derives a run context's conversation key (default: its `conversation_id`);
    `by` is the principal who starts a conversation's run (or a function of the run context).
    Close it (`aclose`, or `async with`) when done: the runs it holds are let go.
    """

    def __init__(
        self,
        journal: Journal,
        *,
        name: str,
        policy: Policy | None = None,
        effects: Mapping[str, Effect] | None = None,
        idempotent: Mapping[str, bool] | None = None,
        verify: Mapping[str, Verifier] | None = None,
        results: Mapping[str, Trust] | None = None,
        budget: Budget | None = None,
        escalate_to: str = "operator",
        conversation: ConversationKey | None = None,
        by: Starter | None = None,
        source: str = SOURCE,
    ) -> None:
        self.journal = journal
        self.name = name
        self.policy = policy
        self.effects = dict(effects or {})
        self.idempotent = dict(idempotent or {})
        self.verifiers = dict(verify or {})
        self.results = dict(results or {})
        self.budget = budget
        self.escalate_to = escalate_to
        self.source = source
        self._conversation = conversation
        self._by = by
        self._calls: dict[tuple[tuple[str, str, str], ...], GovernedCalls] = {}
        self._latest: GovernedCalls | None = None

    async def __aenter__(self) -> Governance:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def wrap(self, toolset: AbstractToolset[AgentDepsT]) -> GovernedToolset[AgentDepsT]:
        """`toolset` with each of its tool calls governed."""
        return GovernedToolset(toolset, self)

    def capability(self) -> Governed[Any]:
        """A capability governing every tool call of the agent it is given to."""
        return Governed(self)

    def conversation_of(self, ctx: RunContext[Any]) -> str:
        key = self._conversation(ctx) if self._conversation is not None else ctx.conversation_id
        if not isinstance(key, str) or not key:
            raise ValueError(
                "a governed tool call needs its conversation's key: the run context has no "
                f"conversation_id and no conversation= function gave one (got {key!r})"
            )
        return key

    def run_id_for(self, conversation: str) -> str:
        """The tether run a conversation's tool calls are steps of."""
        return conversation_run_id(self.name, conversation)

    async def end(self, conversation: str, summary: str = "") -> CallOutcome:
        """Complete the conversation's run: it takes no tool calls after this. Call it after
        an agent run of the conversation in this process (the run is pinned to its tool set,
        which that agent run listed)."""
        if self._latest is None:
            raise ValueError(
                f"cannot end conversation {conversation!r} yet: no agent run of {self.name!r} has "
                "listed its tools in this process (end it after running the agent)"
            )
        return await self._latest.end(conversation, summary)

    async def aclose(self) -> None:
        for calls in self._calls.values():
            await calls.aclose()

    def calls_for(self, tools: Mapping[str, ToolsetTool[Any]]) -> GovernedCalls:
        """The GovernedCalls for this tool set (one per distinct set: its run's workflow)."""
        key = tuple(
            sorted(
                (name, encode_json(t.tool_def.parameters_json_schema), t.tool_def.description or "")
                for name, t in tools.items()
            )
        )
        calls = self._calls.get(key)
        if calls is None:
            declared = set(self.effects) | set(self.idempotent) | set(self.verifiers) | set(self.results)
            unknown = sorted(declared - set(tools))
            if unknown:  # a misspelt name would leave the real tool undeclared
                raise ValueError(
                    f"declared for tool(s) {', '.join(unknown)}, which the agent does not have "
                    f"(its tools: {', '.join(sorted(tools)) or 'none'})"
                )
            calls = GovernedCalls(
                self.journal,
                [self._tool(name, t) for name, t in sorted(tools.items())],
                name=self.name,
                policy=self.policy,
                budget=self.budget,
                escalate_to=self.escalate_to,
                source=self.source,
            )
            self._calls[key] = calls
        self._latest = calls
        return calls

    def starter(self, ctx: RunContext[Any]) -> Principal | None:
        return self._by if self._by is None or isinstance(self._by, Principal) else self._by(ctx)

    def _tool(self, name: str, tool: ToolsetTool[Any]) -> SchemaTool:
        return SchemaTool(
            _runner(name),
            name=name,
            schema=tool.tool_def.parameters_json_schema,
            description=tool.tool_def.description or "",
            effect=self.effects.get(name),
            idempotent=self.idempotent.get(name),
            verify=self.verifiers.get(name),
            results=self.results.get(name),
        )


def _runner(name: str) -> Callable[[dict[str, Any], ToolContext], Any]:
    """The tether tool's body: run the framework's tool with the arguments the step settled on
    (the ticket's, after an approval), validated again the framework's way."""

    async def run(values: dict[str, Any], context: ToolContext) -> Any:
        call = _CALL.get()
        if call is None or call.name != name:
            raise RuntimeError(f"tool {name!r} runs only inside a governed pydantic-ai tool call")
        args = call.tool.args_validator.validate_json(
            encode_json(values), context=call.ctx.validation_context
        )
        token = _TOOL_CONTEXT.set(context)
        try:
            return await call.toolset.call_tool(name, args, call.ctx, call.tool)
        except Exception as exc:
            call.raised = exc
            raise
        finally:
            _TOOL_CONTEXT.reset(token)

    return run


@dataclass
class _Bound:
    """One agent run's share of a governed toolset: its conversation, and what to let go at
    the run's end (so another process can take the conversation's next call at once)."""

    conversation: str
    calls: GovernedCalls | None = None
    taken: list[GovernedCalls] = field(default_factory=list)


@dataclass
class GovernedToolset(WrapperToolset[AgentDepsT]):
    """A pydantic-ai toolset whose every tool call is a governed step (see the module's doc)."""

    governance: Governance
    bound: _Bound | None = field(default=None, repr=False)

    async def for_run(self, ctx: RunContext[AgentDepsT]) -> AbstractToolset[AgentDepsT]:
        wrapped = await self.wrapped.for_run(ctx)
        return replace(self, wrapped=wrapped, bound=_Bound(self.governance.conversation_of(ctx)))

    async def __aexit__(self, *args: Any) -> bool | None:
        bound = self.bound
        try:
            if bound is not None:
                for calls in bound.taken:
                    await calls.release(bound.conversation)
                bound.taken.clear()
        finally:
            exited = await self.wrapped.__aexit__(*args)
        return exited

    async def get_tools(self, ctx: RunContext[AgentDepsT]) -> dict[str, ToolsetTool[AgentDepsT]]:
        tools = await self.wrapped.get_tools(ctx)
        if self.bound is not None:
            self.bound.calls = self.governance.calls_for(tools)
        return tools

    async def call_tool(
        self, name: str, tool_args: dict[str, Any], ctx: RunContext[AgentDepsT], tool: ToolsetTool[AgentDepsT]
    ) -> Any:
        bound = self.bound
        if bound is not None and bound.calls is not None:
            calls, conversation = bound.calls, bound.conversation
        else:  # called outside an agent run's lifecycle
            calls = self.governance.calls_for(await self.wrapped.get_tools(ctx))
            conversation = self.governance.conversation_of(ctx)
        if bound is not None and not any(taken is calls for taken in bound.taken):
            bound.taken.append(calls)
        call = _Call(name, ctx, tool, self.wrapped)
        token = _CALL.set(call)
        try:
            outcome = await calls.call(
                conversation,
                name,
                to_jsonable_python(tool_args),
                call_id=ctx.tool_call_id,
                by=self.governance.starter(ctx),
            )
        finally:
            _CALL.reset(token)
        return _answer(outcome, call.raised)


def _answer(outcome: CallOutcome, raised: Exception | None) -> Any:
    """What became of the call, the way pydantic-ai tells a model (see the module's doc)."""
    if outcome.outcome == "executed":
        return outcome.result
    said = outcome.describe()
    if outcome.outcome == "awaiting_approval":
        ticket = {"ticket_id": outcome.ticket_id, "run_id": outcome.run_id, "step_id": outcome.step_id}
        raise ApprovalRequired(metadata={METADATA_KEY: ticket})
    if outcome.outcome == "refused":
        return ToolDenied(said)
    if outcome.outcome == "tool_error" and isinstance(raised, ModelRetry | ToolFailed):
        raise raised
    raise ToolFailed(said)


@dataclass
class Governed(AbstractCapability[AgentDepsT]):
    """A capability that governs every tool call of the agent it is given to: it wraps the
    agent's assembled toolset (its own tools and every toolset) in a `GovernedToolset`."""

    governance: Governance

    @classmethod
    def get_serialization_name(cls) -> str | None:
        return None  # built from live objects (a journal), not from a spec

    def get_wrapper_toolset(self, toolset: AbstractToolset[AgentDepsT]) -> AbstractToolset[AgentDepsT] | None:
        return GovernedToolset(toolset, self.governance)


__all__: Sequence[str] = (
    "Governance",
    "Governed",
    "GovernedToolset",
    "resume_results",
    "tool_context",
)
