"""Anthropic models through the Messages API with tool use.

`anthropic:MODEL?base_url=...&api_key_env=...&timeout=...&max_attempts=...&max_tokens=...`
speaks to Anthropic through the official `anthropic` client. The envelope is offered as
tools (chat.py) with `tool_choice` "any" and parallel tool use off: one call per turn.
Whatever comes back — text, several calls, a tool it may not use, arguments of the wrong
type — is handed to the kernel as raw output, which refuses it by name. This adapter only
decides how to talk to the API: retries (ours, not the client's, so every attempt is
recorded with its reason code), the output-token cap the budget allows, and the usage and
cost the reply reports.
"""

from __future__ import annotations

import json
from typing import Any

from tether.models.chat import Turn, functions, proposal_from_calls, system_prompt, turns
from tether.models.protocol import ModelContext
from tether.models.vendor import MalformedResponse, VendorModel

# Exactly one tool call per reply: the kernel takes one step at a time.
TOOL_CHOICE = {"type": "any", "disable_parallel_tool_use": True}


class AnthropicModel(VendorModel):
    """A model behind Anthropic's Messages API."""

    prefix = "anthropic"
    sdk = "anthropic"
    client_class = "AsyncAnthropic"
    key_env = "ANTHROPIC_API_KEY"
    base_url_env = "ANTHROPIC_BASE_URL"
    default_base_url = "https://api.anthropic.com"

    def request(self, ctx: ModelContext) -> dict[str, Any]:
        """The keyword arguments of the Messages API call for this context."""
        offered = functions(ctx)
        kwargs: dict[str, Any] = {
            "model": self.model,
            "system": system_prompt(ctx),
            "messages": messages(turns(ctx), {f.name for f in offered}),
            "tools": [
                {"name": f.name, "description": f.description, "input_schema": f.parameters} for f in offered
            ],
            "tool_choice": TOOL_CHOICE,
            # The budget is reserved before the call: never ask for more output than is left.
            "max_tokens": self.options.output_tokens(ctx.budget_left.tokens),
        }
        if self.options.temperature is not None:
            kwargs["temperature"] = self.options.temperature
        return kwargs

    async def create(self, client: Any, kwargs: dict[str, Any]) -> Any:
        return await client.messages.create(**kwargs)

    def output(self, response: Any) -> Any:
        return _output(response)

    def tokens(self, response: Any) -> tuple[int, int]:
        reported = response.usage
        # Tokens read from or written to the prompt cache are input tokens too.
        cached = (getattr(reported, "cache_creation_input_tokens", None) or 0) + (
            getattr(reported, "cache_read_input_tokens", None) or 0
        )
        return reported.input_tokens + cached, reported.output_tokens

    def error_text(self, exc: Any) -> str:
        """`{"type": "error", "error": {"type": ..., "message": ...}}`, with the request id."""
        body = exc.body
        error = body.get("error") if isinstance(body, dict) else None
        if isinstance(error, dict):
            text = f"{error.get('type') or 'error'}: {str(error.get('message') or '')[:300]}"
        else:
            text = str(exc.message)[:300]
        request_id = exc.response.headers.get("request-id")
        return text + (f" (request-id {request_id})" if request_id else "")


def messages(conversation: list[Turn], offered: set[str]) -> list[dict[str, Any]]:
    """Turns as Messages API messages. Roles alternate, as the API requires: consecutive
    blocks of one role share a message (a tool_result first, as `turns` puts it right
    after its call). A call the API would refuse to see in the history — a tool not
    offered now, or arguments that are not an object (another model's, say) — is shown
    as text, and its result as a message."""
    out: list[dict[str, Any]] = []

    def add(role: str, block: dict[str, Any]) -> None:
        if out and out[-1]["role"] == role:
            out[-1]["content"].append(block)
        else:
            out.append({"role": role, "content": [block]})

    calls: set[str] = set()
    for turn in conversation:
        if turn.kind == "call" and turn.name in offered and isinstance(turn.arguments, dict):
            calls.add(turn.call_id)
            add(
                "assistant",
                {"type": "tool_use", "id": turn.call_id, "name": turn.name, "input": turn.arguments},
            )
        elif turn.kind == "call":
            add("assistant", _text_block(f"{turn.name}({json.dumps(turn.arguments, default=str)})"))
        elif turn.kind == "result":
            add(
                "user",
                _tool_result(turn.call_id, turn.text)
                if turn.call_id in calls
                else _text_block("The runtime observed: " + turn.text),
            )
        elif turn.kind == "assistant_text":
            add("assistant", _text_block(turn.text))
        else:
            add("user", _text_block(turn.text))
    return out


def _tool_result(call_id: str, text: str) -> dict[str, Any]:
    return {"type": "tool_result", "tool_use_id": call_id, "content": text}


def _text_block(text: str) -> dict[str, Any]:
    # The API refuses empty or blank text blocks.
    return {"type": "text", "text": text if text.strip() else "(nothing)"}


def _output(message: Any) -> Any:
    """The reply as raw output: the called tools, or the text. What the model said is not
    checked here (the kernel does that); only that the API sent a message."""
    try:
        blocks, stop_reason = list(message.content), message.stop_reason
    except (AttributeError, TypeError) as exc:
        raise MalformedResponse(f"the API did not answer with a message: {str(message)[:200]!r}") from exc
    calls = [(b.name, b.input) for b in blocks if getattr(b, "type", None) == "tool_use"]
    text = "\n".join(b.text for b in blocks if getattr(b, "type", None) == "text")
    if stop_reason == "max_tokens" and blocks and getattr(blocks[-1], "type", None) == "tool_use":
        # The last call was cut off: its input may be partial. Handed on as text (not a call,
        # so it can never run) for the kernel to refuse as malformed; the model reads why.
        cut = json.dumps([{"tool": name, "input": args} for name, args in calls], default=str)
        return f"reply cut off at max_tokens before its tool call was complete: {cut}"
    return proposal_from_calls(calls, text or None)
