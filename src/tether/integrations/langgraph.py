"""LangGraph's tool calls as governed steps of a tether run: `GovernedToolNode`.

A drop-in `ToolNode` (langgraph.prebuilt) whose every tool call goes through tether
(tether.external) before the tool runs:

    AIMessage.tool_calls[i]  ->  GovernedCalls.call(thread_id, name, args, call_id=id)
        executed            ->  ToolMessage(the tool's content)
        refused, tool_error,
        verification_failed,
        effect_in_doubt,
        stopped             ->  ToolMessage(status="error", what tether decided and why)
        awaiting_approval   ->  interrupt({"tether": "approval", "ticket_id": ..., ...})

- The conversation is the LangGraph thread (`config["configurable"]["thread_id"]`): one
  tether run per thread, whichever process runs it. Each call is keyed by the id the model
  gave it in `AIMessage.tool_calls`.
- `ask`: the node calls LangGraph's `interrupt()` with the tether ticket; the thread pauses
  the LangGraph way. A person decides the ticket with tether (`tether approve TICKET`, the
  inbox). `Command(resume=...)` then re-runs the node: the call is presented to tether again
  and tether carries out the ticket's decision: the approved arguments run once, a denial is
  the tool's error. The resume value authorizes nothing: a thread resumed before anyone
  decided pauses again on the same ticket, and a call whose arguments were changed in the
  thread's state since (`update_state`) is refused (`approval_mismatch`) and nothing runs.
- Intents before effects: a node LangGraph re-runs (after an interrupt, after a crash between
  the tool's effect and LangGraph's checkpoint) presents call ids tether has recorded; each
  gets its recorded result, never a second execution. A crash while the effect was under way
  leaves the call `effect_in_doubt` (an idempotent tool runs again with the same
  idempotency key, `idempotency_key()` inside the tool).

The tool itself runs through the ToolNode's own execution (injected state, store, runtime),
with the arguments tether validated, and only from inside tether's step. Async graphs only
(`ainvoke`, `astream`): a synchronous run of the node is refused before any tool runs.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from langchain_core.messages import ToolCall, ToolMessage
from langchain_core.runnables import RunnableConfig
from langchain_core.tools import BaseTool
from langchain_core.utils.function_calling import convert_to_openai_tool
from langgraph.prebuilt import ToolNode
from langgraph.prebuilt.tool_node import ToolCallRequest
from langgraph.types import Command, interrupt

from tether.budget import Budget
from tether.external import CallOutcome, GovernedCalls
from tether.identity import Principal
from tether.journal import Journal
from tether.policy import Policy
from tether.tools import EFFECTS, Effect, SchemaTool, ToolContext, Verifier

SOURCE = "langgraph"
Execute = Callable[[ToolCallRequest], Awaitable[ToolMessage | Command[Any]]]


@dataclass
class _Live:
    """The call a GovernedToolNode is presenting to tether, for the tool tether runs."""

    request: ToolCallRequest
    execute: Execute
    produced: dict[str, ToolMessage] = field(default_factory=dict)  # step id -> live message


_LIVE: ContextVar[_Live | None] = ContextVar("tether_langgraph_call", default=None)
_KEY: ContextVar[str | None] = ContextVar("tether_langgraph_idempotency_key", default=None)


def idempotency_key() -> str | None:
    """Inside a tool a GovernedToolNode runs: tether's idempotency key for this effect (the
    same when tether runs an idempotent tool again after a crash); pass it to the system the
    tool changes. None elsewhere."""
    return _KEY.get()


class ToolFailed(RuntimeError):
    """The tool ran and reported an error (an error ToolMessage): recorded as tool_error."""


class GovernedToolNode(ToolNode):
    """A ToolNode whose calls are governed steps of one tether run per LangGraph thread.

    `tools` as for ToolNode; `journal` the tether journal; `workflow` names the tether
    workflow (and so the runs in `tether runs`); `policy` decides each call (default: tether's
    default policy). Each tool's effect is declared by name in `effects` (`read`, `write`,
    `external`; an undeclared tool counts as `external`), `idempotent` names the tools safe to
    run again, `verify` gives a tether verifier per tool name. `by` is the principal the
    runs start as. Close with `aclose` (or `async with`): the runs held between calls are
    let go. Create it inside the event loop that runs the graph.
    """

    def __init__(
        self,
        tools: Sequence[BaseTool | Callable[..., Any]],
        *,
        journal: Journal,
        workflow: str,
        policy: Policy | None = None,
        effects: Mapping[str, Effect] | None = None,
        idempotent: Collection[str] = (),
        verify: Mapping[str, Verifier] | None = None,
        budget: Budget | None = None,
        escalate_to: str = "operator",
        by: Principal | None = None,
        name: str = "tools",
        tags: list[str] | None = None,
        messages_key: str = "messages",
    ) -> None:
        super().__init__(
            tools,
            name=name,
            tags=tags,
            handle_tool_errors=False,  # tether records a tool's failure; the agent sees it
            messages_key=messages_key,
            wrap_tool_call=_synchronous_run,
            awrap_tool_call=self._governed,
        )
        effects, verify = dict(effects or {}), dict(verify or {})
        _check_names(self.tools_by_name, effects=effects, idempotent=idempotent, verify=verify)
        governed = [
            _tether_tool(tool, effects.get(tool.name), tool.name in idempotent, verify.get(tool.name))
            for tool in self.tools_by_name.values()
        ]
        self.by = by
        self.governed = GovernedCalls(
            journal,
            governed,
            name=workflow,
            policy=policy,
            budget=budget,
            escalate_to=escalate_to,
            source=SOURCE,
        )

    async def __aenter__(self) -> GovernedToolNode:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self.governed.aclose()

    def run_id(self, config: RunnableConfig) -> str:
        """The tether run of the thread `config` names."""
        return self.governed.run_id_for(_thread_id(config))

    async def end(self, config: RunnableConfig, summary: str = "") -> CallOutcome:
        """The thread's conversation is over: its tether run completes and takes no more calls."""
        return await self.governed.end(_thread_id(config), summary)

    async def _governed(self, request: ToolCallRequest, execute: Execute) -> ToolMessage | Command[Any]:
        call = request.tool_call
        thread = _thread_id(request.runtime.config)
        call_id = call.get("id")
        if not call_id:
            raise ValueError(
                f"tool call {call['name']!r} has no id: a governed call needs the id the model "
                "gave it, so that a node re-run never repeats it"
            )
        live = _Live(request, execute)
        token = _LIVE.set(live)
        try:
            outcome = await self._present(thread, call)
            # Paused the LangGraph way. On a resume `interrupt` returns the resume value, which
            # decides nothing: the ticket does. Still undecided: pause again on the same ticket.
            while outcome.outcome == "awaiting_approval":
                interrupt(await self._approval_request(outcome, call))
                outcome = await self._present(thread, call)
        finally:
            _LIVE.reset(token)
        if outcome.executed and outcome.step_id in live.produced:
            return live.produced[outcome.step_id]
        return _message(outcome, call)

    async def _approval_request(self, outcome: CallOutcome, call: ToolCall) -> dict[str, Any]:
        """The interrupt's value: the tether ticket a person decides, and how."""
        ticket = await self.governed.journal.get_ticket(str(outcome.ticket_id))
        return {
            "tether": "approval",
            "ticket_id": ticket.ticket_id,
            "run_id": outcome.run_id,
            "step_id": outcome.step_id,
            "tool": ticket.subject,
            "args": ticket.args,
            "args_hash": ticket.args_hash,  # what an approval binds: only these arguments run
            "approver": ticket.approver,
            "expires_at": ticket.expires_at,
            "tool_call_id": call["id"],
            "reason": outcome.describe(),
            "decide": f"tether approve {ticket.ticket_id}  (or: tether deny {ticket.ticket_id})",
        }

    async def _present(self, thread: str, call: ToolCall) -> CallOutcome:
        return await self.governed.call(thread, call["name"], call["args"], call_id=call["id"], by=self.by)


def _synchronous_run(request: ToolCallRequest, execute: Callable[..., Any]) -> ToolMessage | Command[Any]:
    raise TypeError(
        "a GovernedToolNode governs tool calls in async graphs only: run the graph with "
        "ainvoke/astream (nothing was run)"
    )


def _thread_id(config: RunnableConfig | None) -> str:
    thread = ((config or {}).get("configurable") or {}).get("thread_id")
    if thread is None or str(thread) == "":
        raise ValueError(
            "a GovernedToolNode needs the thread's id (config['configurable']['thread_id']): "
            "it is the conversation tether keeps one run for; compile the graph with a checkpointer"
        )
    return str(thread)


def _check_names(
    tools: Mapping[str, BaseTool],
    *,
    effects: Mapping[str, Effect],
    idempotent: Collection[str],
    verify: Mapping[str, Verifier],
) -> None:
    for what, names in (("effects", effects), ("idempotent", idempotent), ("verify", verify)):
        unknown = sorted(set(names) - set(tools))
        if unknown:
            raise ValueError(
                f"{what} names no tool of this node: {', '.join(unknown)} "
                f"(its tools: {', '.join(sorted(tools)) or 'none'})"
            )
    wrong = {name: effect for name, effect in effects.items() if effect not in EFFECTS}
    if wrong:
        raise ValueError(f"effects must be one of {', '.join(EFFECTS)}: {wrong}")


def _tether_tool(
    tool: BaseTool, effect: Effect | None, idempotent: bool, verify: Verifier | None
) -> SchemaTool:
    """The tether tool for a LangGraph tool: declared by the schema the model is shown, run by
    the ToolNode's own execution of the call tether is taking."""

    async def run(values: dict[str, Any], ctx: ToolContext) -> Any:
        live = _LIVE.get()
        if live is None:
            raise RuntimeError(f"tool {tool.name!r} runs only inside a GovernedToolNode's call")
        call = ToolCall(name=tool.name, args=values, id=live.request.tool_call["id"], type="tool_call")
        token = _KEY.set(ctx.idempotency_key)
        try:
            result = await live.execute(live.request.override(tool_call=call, tool=tool))
        finally:
            _KEY.reset(token)
        if not isinstance(result, ToolMessage):
            raise TypeError(
                f"tool {tool.name!r} returned {type(result).__name__}, not a result: a governed "
                "call records what the tool returned, and cannot record a state update (Command)"
            )
        if result.status == "error":
            raise ToolFailed(_text(result.content))
        live.produced[ctx.step_id] = result
        return result.content

    shown = convert_to_openai_tool(tool)["function"]  # what the model is told the tool takes
    schema = shown.get("parameters") or {"type": "object", "properties": {}}
    return SchemaTool(
        run,
        name=tool.name,
        schema=schema,
        description=tool.description,
        effect=effect,
        idempotent=idempotent or None,
        verify=verify,
    )


def _message(outcome: CallOutcome, call: ToolCall) -> ToolMessage:
    """What the agent sees of a call tether took: the tool's content, or tether's refusal."""
    if outcome.executed:
        content = outcome.result
        if not isinstance(content, (str, list)):
            content = json.dumps(content)
        return ToolMessage(content=content, name=call["name"], tool_call_id=call["id"])
    return ToolMessage(
        content=f"tether: {outcome.describe()}",
        name=call["name"],
        tool_call_id=call["id"],
        status="error",
        additional_kwargs={"tether": {"outcome": outcome.outcome, "reason_code": str(outcome.reason_code)}},
    )


def _text(content: str | list[Any]) -> str:
    return content if isinstance(content, str) else json.dumps(content)
