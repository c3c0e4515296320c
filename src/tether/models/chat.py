"""What every function-calling adapter shares: the conversation and the functions
offered, in a vendor-neutral shape, and the mapping of a called function back to a
proposal.

The envelope is offered as functions: each allowed tool under its own name, plus
`take_exit` (the allowed exits as an enum) and `ask_person`. The transcript becomes
calls and results with synthetic ids. Whatever the model sends back, garbage included,
is handed to the kernel as raw output: the kernel's parser, not the adapter, refuses it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Literal

from tether.models.protocol import ModelContext

EXIT_FUNCTION = "take_exit"
ASK_FUNCTION = "ask_person"
RESERVED = (EXIT_FUNCTION, ASK_FUNCTION)


@dataclass(frozen=True)
class Function:
    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(frozen=True)
class Turn:
    """One conversation turn: the model calling a function (or writing text), a
    function's result, or a user message."""

    kind: Literal["call", "result", "assistant_text", "user"]
    text: str = ""
    call_id: str = ""
    name: str = ""
    arguments: dict[str, Any] | None = None


def system_prompt(ctx: ModelContext) -> str:
    exits = ", ".join(f"{e.name} (to {e.target})" for e in ctx.exits) or "none"
    return (
        f"{ctx.instructions.strip()}\n\n"
        f"You are in workflow state {ctx.state!r}. Act by calling exactly one function per "
        "turn. Every call is checked against policy before it runs; a refusal comes back "
        "with a reason code, so read it and choose differently. "
        f"When the work of this state is done, call {EXIT_FUNCTION} with one of the allowed "
        f"exits: {exits}. Call {ASK_FUNCTION} only when a person must decide."
    )


def opening_message(ctx: ModelContext) -> str:
    budget = ctx.budget_left
    return (
        f"Run data: {json.dumps(ctx.data, sort_keys=True, default=str)}\n"
        f"Budget left in this state: {budget.steps} proposals, {budget.tool_calls} tool calls."
    )


def functions(ctx: ModelContext) -> list[Function]:
    """The envelope as functions. A tool named like a reserved function is refused."""
    clash = [t.name for t in ctx.tools if t.name in RESERVED]
    if clash:
        raise ValueError(f"tool name(s) {clash} clash with the functions tether offers: {RESERVED}")
    offered = [
        Function(t.name, f"{t.description} (effect: {t.effect})".strip(), t.parameters) for t in ctx.tools
    ]
    if ctx.exits:
        offered.append(
            Function(
                EXIT_FUNCTION,
                "Leave this state through an allowed exit, optionally setting run data.",
                {
                    "type": "object",
                    "properties": {
                        "exit": {"type": "string", "enum": [e.name for e in ctx.exits]},
                        "update": {"type": "object", "description": "run data to set"},
                        "summary": {"type": "string"},
                    },
                    "required": ["exit"],
                },
            )
        )
    ask: dict[str, Any] = {
        "type": "object",
        "properties": {"question": {"type": "string"}},
        "required": ["question"],
    }
    if ctx.facts_from_answers:
        listing = "; ".join(f"{n}: {d}" for n, d in sorted(ctx.facts_from_answers.items()))
        ask["properties"]["fact"] = {
            "type": "string",
            "enum": sorted(ctx.facts_from_answers),
            "description": f"the fact the answer establishes ({listing})",
        }
    offered.append(
        Function(
            ASK_FUNCTION, "Pause and ask a person a question; their answer comes back as a message.", ask
        )
    )
    return offered


def turns(ctx: ModelContext) -> list[Turn]:
    """The transcript of this state visit as calls, results and user messages."""
    out = [Turn("user", text=opening_message(ctx))]
    open_call: str | None = None
    for number, message in enumerate(ctx.transcript):
        if message.role == "proposal":
            call = _as_call(message.content)
            if call is None:
                out.append(Turn("assistant_text", text=_text(message.content)))
                open_call = None
            else:
                open_call = f"call_{number}"
                out.append(Turn("call", call_id=open_call, name=call[0], arguments=call[1]))
        elif message.role == "observation" and open_call is not None:
            out.append(Turn("result", call_id=open_call, text=_text(message.content)))
            open_call = None
        else:
            prefix = "A person answered: " if message.role == "person" else "The runtime observed: "
            out.append(Turn("user", text=prefix + _text(message.content)))
    return out


def proposal_from_call(name: str, arguments: Any) -> dict[str, Any]:
    """A called function as a proposal. Arguments that are not an object (unparsable
    JSON text, say) are passed on as they came, for the kernel to refuse."""
    args = _decode(arguments)
    kind = {EXIT_FUNCTION: "exit", ASK_FUNCTION: "question"}.get(name)
    if kind is None:
        return {"kind": "tool_call", "tool": name, "args": args}
    if not isinstance(args, dict):
        # Not an object: the kernel refuses it as malformed, naming the arguments.
        return {"kind": kind, "arguments": args}
    if kind == "question":
        asked = {"kind": "question", "question": args.get("question")}
        return asked | ({"fact": args["fact"]} if "fact" in args else {})
    proposal: dict[str, Any] = {"kind": "exit", "exit": args.get("exit")}
    for key in ("update", "summary"):
        if key in args:
            proposal[key] = args[key]
    return proposal


def proposal_from_calls(calls: list[tuple[str, Any]], text: str | None) -> Any:
    """The raw output of a reply: one call's proposal; several calls as a list (which the
    kernel refuses: one step at a time); no call, the text as it came."""
    if len(calls) == 1:
        return proposal_from_call(*calls[0])
    if calls:
        return [proposal_from_call(name, args) for name, args in calls]
    return text or ""


def _as_call(content: Any) -> tuple[str, dict[str, Any]] | None:
    if not isinstance(content, dict):
        return None
    kind = content.get("kind")
    if kind == "tool_call":
        return str(content.get("tool")), content.get("args") or {}
    if kind in ("exit", "finish"):
        args = {"exit": content.get("exit", "finish")}
        for key in ("update", "summary"):
            if content.get(key):
                args[key] = content[key]
        return EXIT_FUNCTION, args
    if kind == "question":
        asked = {"question": content.get("question")}
        return ASK_FUNCTION, asked | ({"fact": content["fact"]} if content.get("fact") else {})
    return None


def _decode(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            return arguments
    return arguments


def _text(content: Any) -> str:
    return content if isinstance(content, str) else json.dumps(content, sort_keys=True, default=str)
