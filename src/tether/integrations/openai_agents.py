"""Govern an OpenAI Agents SDK agent's function tools with tether (`pip install tether[openai-agents]`).

    governed = GovernedTools(journal, [lookup_order, refund], name="support",
                             policy=Policy.from_file("policy.yaml"), effects={"refund": "write"})
    agent = Agent(name="support", tools=governed.tools, model=...)
    result = await Runner.run(agent, "refund order A1", context={"conversation_id": "c-42"})

Each tool call the model makes is a governed step of one tether run per conversation
(tether.external): scope, arguments, policy, approval, intent, execution, verification,
record. The run is `tether show`, `audit` and inbox material like a native one.

Where the step is taken. The SDK asks a tool's `needs_approval` whether a call must pause
before it runs it; a governed tool answers by taking the call through tether there and then:
a call the policy allows is executed (the real tool runs, with an SDK ToolContext built from
the run's context) and the SDK goes on to `on_invoke_tool`, which returns what tether
recorded (a call id seen before is never run twice); a call the policy refuses is recorded
and the model gets the refusal, naming its reason code, as the tool's output; a call the
policy asks about pauses the tether run on a ticket bound to the arguments' fingerprint and
answers "needs approval", so the SDK ends the run with `result.interruptions`, the SDK's own
way. Consequence: the SDK's `on_tool_start` hooks see a governed call after tether took it,
and a tool with input guardrails (which would run after the effect) is refused at wrapping
(write the rule as tether policy).

Approvals. The tether ticket is the source of truth; the SDK approval is only how the run is
resumed. Save `result.to_state().to_json()`; a person decides the ticket from anywhere
(`tether approve TICKET`, the inbox); in any process, restore the state, call
`await governed.apply_decisions(state)` (each interruption whose ticket is decided is
approved on the SDK side; those still waiting are returned) and run the state again. The
tool then presents the call to tether, which runs the approved arguments once, or records
the denial (the model gets it as the tool's output). Arguments that differ from the
ticket's (a state file edited, an SDK approval of another call) are refused
(`approval_mismatch`) and nothing runs; an SDK approval of a call whose ticket is undecided
runs nothing either.

Conversation key: the tether run a call belongs to is named by the key `conversation`
derives from the SDK run's context object (by default its `conversation_id`, as a mapping
key or an attribute). The context travels in the serialized RunState, so a resumed run
continues the same tether run.
"""

from __future__ import annotations

import contextvars
import copy
import json
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from agents import (
    FunctionTool,
    RunContextWrapper,
    RunResult,
    RunResultStreaming,
    RunState,
    ToolApprovalItem,
    UserError,
)
from agents.exceptions import AgentsException
from agents.tool import set_function_tool_failure_error_function
from agents.tool_context import ToolContext as SdkToolContext

from tether.budget import Budget
from tether.errors import RunNotFound
from tether.external import CallOutcome, GovernedCalls, recorded_calls
from tether.identity import Principal
from tether.journal import Journal, Ticket
from tether.policy import Policy
from tether.tools import Effect, SchemaTool, ToolContext, Verifier

SOURCE = "openai-agents"


@dataclass(frozen=True)
class _SdkCall:
    context: RunContextWrapper[Any]
    call_id: str


# The SDK run context of the call tether is taking (set around GovernedCalls.call: the step
# runs the tool in the same task), and the idempotency key of the step running a tool.
_CALL: contextvars.ContextVar[_SdkCall | None] = contextvars.ContextVar("tether_sdk_call", default=None)
_KEY: contextvars.ContextVar[str | None] = contextvars.ContextVar("tether_idempotency_key", default=None)


def idempotency_key() -> str | None:
    """Inside a governed tool: tether's idempotency key for this execution (the same when tether
    re-runs an idempotent tool after a crash), to pass on to a service that accepts one."""
    return _KEY.get()


class ConversationKeyError(UserError):
    """The SDK run's context names no conversation, so no tether run can take the call."""


def conversation_id(context: Any) -> str:
    """The default conversation key: the context's `conversation_id` (mapping key or attribute)."""
    key = context.get("conversation_id") if isinstance(context, Mapping) else None
    key = key if key is not None else getattr(context, "conversation_id", None)
    if not isinstance(key, str) or not key:
        raise ConversationKeyError(
            "a governed tool needs a conversation key: run the agent with a context that has a "
            "conversation_id (Runner.run(..., context={'conversation_id': ...})), or pass "
            "GovernedTools(conversation=...)"
        )
    return key


@dataclass(frozen=True)
class PendingCall:
    """One interruption of a governed tool and the tether ticket it waits on."""

    item: ToolApprovalItem
    conversation: str
    call_id: str
    tool: str
    ticket: Ticket

    @property
    def ticket_id(self) -> str:
        return self.ticket.ticket_id

    @property
    def decided(self) -> bool:
        return self.ticket.status != "pending"


class GovernedTools:
    """The agent's function tools, each call a governed step of the conversation's tether run.

    `tools` are the SDK's FunctionTools (from `@function_tool` or built by hand); `governed.tools`
    are what the Agent gets in their place. `effects` declares each tool's effect by name (`read`,
    `write`, `external`; a tool not named counts as `external`, which tether's default policy
    denies), `idempotent` names the tools that are safe to run again, `verify` gives tether
    verifiers by tool name. `conversation` derives the conversation key from the SDK run's
    context object (default: `conversation_id`); `by` is who starts each conversation's run.
    Use as an async context manager, or call `aclose`.
    """

    def __init__(
        self,
        journal: Journal,
        tools: Sequence[FunctionTool],
        *,
        name: str,
        policy: Policy | None = None,
        effects: Mapping[str, Effect] | None = None,
        idempotent: Collection[str] = (),
        verify: Mapping[str, Verifier] | None = None,
        conversation: Callable[[Any], str] = conversation_id,
        by: Principal | None = None,
        budget: Budget | None = None,
        escalate_to: str = "operator",
    ) -> None:
        effects, verify = dict(effects or {}), dict(verify or {})
        names = [_governable(tool) for tool in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"two tools share a name: {sorted(n for n in names if names.count(n) > 1)}")
        for what, given in (("effects", effects), ("idempotent", idempotent), ("verify", verify)):
            unknown = sorted(set(given) - set(names))
            if unknown:
                raise ValueError(f"{what} names no tool of the agent: {', '.join(unknown)} (tools: {names})")
        self.journal = journal
        self.by = by
        self._conversation = conversation
        self.calls = GovernedCalls(
            journal,
            [
                SchemaTool(
                    _executor(tool),
                    name=tool.name,
                    schema=tool.params_json_schema,
                    description=tool.description,
                    effect=effects.get(tool.name),
                    idempotent=True if tool.name in idempotent else None,
                    verify=verify.get(tool.name),
                )
                for tool in tools
            ],
            name=name,
            policy=policy,
            budget=budget,
            escalate_to=escalate_to,
            source=SOURCE,
        )
        self.tools: list[FunctionTool] = [self._governed(tool) for tool in tools]

    async def __aenter__(self) -> GovernedTools:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.calls.aclose()

    def conversation_of(self, context: RunContextWrapper[Any]) -> str:
        return self._conversation(context.context)

    def run_id(self, conversation: str) -> str:
        """The tether run of a conversation (`tether show RUN`)."""
        return self.calls.run_id_for(conversation)

    async def end(self, conversation: str, summary: str = "") -> CallOutcome:
        """Complete the conversation's tether run; it takes no calls after this."""
        return await self.calls.end(conversation, summary)

    # -- approvals ------------------------------------------------------------------------------

    async def pending(self, paused: RunState[Any, Any] | RunResult | RunResultStreaming) -> list[PendingCall]:
        """The interruptions of governed tools in a paused run (a result, or a restored state),
        each with the tether ticket it waits on; what a person decides with `tether approve`."""
        context: RunContextWrapper[Any] | None
        if isinstance(paused, RunState):
            # RunState keeps its context private in 0.24; it is the run's, restored with it.
            items, context = paused.get_interruptions(), paused._context
        else:
            items, context = paused.interruptions, paused.context_wrapper
        if context is None:
            raise UserError("the run state has no context, so it names no conversation")
        conversation = self.conversation_of(context)
        run_id = self.run_id(conversation)
        try:
            steps = await recorded_calls(self.journal, run_id)
            tickets = await self.journal.run_tickets(run_id)
        except RunNotFound:
            steps, tickets = {}, []
        by_step = {t.step_id: t for t in sorted(tickets, key=lambda t: t.created_at)}
        found = []
        for item in items:
            if not self._governs(item) or _arguments(item.arguments) is None:
                continue  # another tool's own approval, or a call tether never saw (see below)
            call_id = str(item.call_id)
            step = steps.get(call_id)
            ticket = by_step.get(step) if step is not None else None
            if ticket is None:
                raise UserError(
                    f"tether holds no ticket for call {call_id} ({item.tool_name}) of conversation "
                    f"{conversation!r} (run {run_id}): is the conversation key the one the run had?"
                )
            if ticket.status == "pending":  # by the store's clock, as tether itself decides
                ticket = await self.journal.expire_ticket(ticket.ticket_id)
            found.append(PendingCall(item, conversation, call_id, item.tool_name or "", ticket))
        return found

    async def apply_decisions(self, state: RunState[Any, Any]) -> list[PendingCall]:
        """Resume the SDK side of every interruption whose tether ticket a person has decided
        (approved, denied, or expired: the tool then presents the call and tether carries the
        decision out). Returns the calls still waiting; run the state again once this is empty
        (a call still waiting would only pause the run again)."""
        # A call whose arguments are not a JSON object never reaches tether: the SDK pauses it
        # without asking the tool. It is refused here, and nothing runs.
        for item in state.get_interruptions():
            if self._governs(item) and _arguments(item.arguments) is None:
                state.reject(item, rejection_message=_NOT_AN_OBJECT)
        waiting = []
        for call in await self.pending(state):
            if call.decided:
                state.approve(call.item)
            else:
                waiting.append(call)
        return waiting

    def _governs(self, item: ToolApprovalItem) -> bool:
        return item.tool_name is not None and self.calls.tool(item.tool_name) is not None

    # -- one governed tool --------------------------------------------------------------------

    def _governed(self, tool: FunctionTool) -> FunctionTool:
        name = tool.name

        async def needs_approval(
            context: RunContextWrapper[Any], params: dict[str, Any], call_id: str
        ) -> bool:
            outcome = await self._take(context, name, params, call_id)
            return outcome.outcome == "awaiting_approval"

        async def invoke(context: SdkToolContext[Any], arguments: str) -> Any:
            args = _arguments(arguments)
            if args is None:
                return _NOT_AN_OBJECT
            return _shown(await self._take(context, name, args, context.tool_call_id))

        return FunctionTool(
            name=name,
            description=tool.description,
            params_json_schema=tool.params_json_schema,
            on_invoke_tool=invoke,
            strict_json_schema=tool.strict_json_schema,
            is_enabled=tool.is_enabled,
            tool_output_guardrails=tool.tool_output_guardrails,
            needs_approval=needs_approval,
        )

    async def _take(
        self, context: RunContextWrapper[Any], tool: str, args: dict[str, Any], call_id: str
    ) -> CallOutcome:
        conversation = self.conversation_of(context)
        token = _CALL.set(_SdkCall(context, call_id))
        try:
            return await self.calls.call(conversation, tool, args, call_id=call_id, by=self.by)
        except AgentsException:
            raise
        except Exception as exc:  # the SDK would take any other failure of needs_approval as "ask"
            failure = f"{type(exc).__name__}: {exc}"
            raise UserError(f"tether could not take call {call_id} ({tool}): {failure}") from exc
        finally:
            _CALL.reset(token)


_NOT_AN_OBJECT = "tether: refused (invalid_arguments): the arguments are not a JSON object; nothing was run"


def _governable(tool: FunctionTool) -> str:
    """The tool's name, if tether can govern it as it is; a clear error if not."""
    if not isinstance(tool, FunctionTool):
        raise TypeError(f"GovernedTools takes the SDK's FunctionTools, not {type(tool).__name__}")
    problems = []
    if tool.needs_approval is not False:
        problems.append("it has needs_approval (write the approval as an `ask` rule of the tether policy)")
    if tool.tool_input_guardrails:
        problems.append(
            "it has input guardrails, which would run after tether executed the call (write them "
            "as tether policy)"
        )
    if tool.timeout_seconds is not None:
        problems.append("it has a timeout, which would cut a governed effect off mid-way")
    if problems:
        raise ValueError(f"tool {tool.name!r} cannot be governed as it is: " + "; ".join(problems))
    return tool.name


def _executor(tool: FunctionTool) -> Callable[[dict[str, Any], ToolContext], Any]:
    """The real tool, as tether's step runs it: the SDK's invoker with the SDK context of the
    call being taken, its failures raised (tether records them as tool_error) rather than
    turned into text for the model."""
    inner = copy.copy(tool)
    set_function_tool_failure_error_function(inner, None)

    async def run(values: dict[str, Any], ctx: ToolContext) -> Any:
        call = _CALL.get()
        if call is None:
            raise RuntimeError(f"{tool.name} runs only inside an Agents SDK run")
        arguments = json.dumps(values, ensure_ascii=False)
        sdk = call.context
        context = SdkToolContext.from_agent_context(
            sdk,
            call.call_id,
            tool_call=sdk.tool_call if isinstance(sdk, SdkToolContext) else None,
            tool_name=tool.name,
            tool_arguments=arguments,  # what tether validated (and a person approved)
        )
        token = _KEY.set(ctx.idempotency_key)
        try:
            return await inner.on_invoke_tool(context, arguments)
        finally:
            _KEY.reset(token)

    return run


def _arguments(raw: str | None) -> dict[str, Any] | None:
    try:
        value = json.loads(raw or "{}")
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _shown(outcome: CallOutcome) -> str:
    """What the model gets as the tool's output: the recorded result (as tether recorded it,
    redactions included), or what became of the call and why."""
    if outcome.executed:
        result = outcome.result
        return result if isinstance(result, str) else json.dumps(result, ensure_ascii=False)
    return f"tether: {outcome.describe()}"
