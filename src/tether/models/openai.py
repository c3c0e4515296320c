"""OpenAI-compatible models: OpenAI, vLLM, Ollama, LM Studio, llama.cpp servers.

`openai:MODEL?base_url=...&api_key_env=...&timeout=...&max_attempts=...&max_tokens=...`
speaks Chat Completions with tool calling through the official `openai` client. The
envelope is offered as functions (chat.py); whatever comes back — one call, several, text,
arguments that are not JSON — is handed to the kernel as raw output, which refuses it by
name. This adapter only decides how to talk to the server: retries (ours, not the
client's, so every attempt is recorded with its reason code), the output-token cap the
budget allows, and the usage and cost the reply reports.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlsplit

from tether.errors import ModelSpecError
from tether.models.chat import Turn, functions, proposal_from_calls, system_prompt, turns
from tether.models.protocol import ModelContext
from tether.models.vendor import MalformedResponse, VendorModel

OPENAI_HOST = "api.openai.com"
# Local servers take no key, but the client insists on one.
NO_KEY = "not-needed"


class OpenAIModel(VendorModel):
    """A model behind an OpenAI-compatible Chat Completions endpoint."""

    prefix = "openai"
    sdk = "openai"
    client_class = "AsyncOpenAI"
    key_env = "OPENAI_API_KEY"
    base_url_env = "OPENAI_BASE_URL"
    default_base_url = f"https://{OPENAI_HOST}/v1"

    def missing_key(self) -> str:
        """A placeholder for a server that needs none; OpenAI itself does."""
        if urlsplit(self.base_url).hostname == OPENAI_HOST:
            raise ModelSpecError(
                f"model {self.name} talks to {OPENAI_HOST} and needs a key: set {self.key_env} "
                "(or name another variable with api_key_env=VAR), or give base_url=... for a local server"
            )
        return NO_KEY

    @property
    def _output_limit_field(self) -> str:
        # OpenAI's own reasoning models refuse `max_tokens`; most compatible servers
        # (llama.cpp, older vLLM, Ollama) know only `max_tokens`.
        return "max_completion_tokens" if urlsplit(self.base_url).hostname == OPENAI_HOST else "max_tokens"

    def request(self, ctx: ModelContext) -> dict[str, Any]:
        """The keyword arguments of the Chat Completions call for this context."""
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": [{"role": "system", "content": system_prompt(ctx)}, *map(_message, turns(ctx))],
            "tools": [
                {
                    "type": "function",
                    "function": {"name": f.name, "description": f.description, "parameters": f.parameters},
                }
                for f in functions(ctx)
            ],
            # Explicit: llama.cpp's function-calling format offers no tools without it.
            "tool_choice": "auto",
            # One step at a time; the kernel refuses several calls anyway, so ask for one.
            "parallel_tool_calls": False,
            # The budget is reserved before the call: never ask for more output than is left.
            self._output_limit_field: self.options.output_tokens(ctx.budget_left.tokens),
        }
        if self.options.temperature is not None:
            kwargs["temperature"] = self.options.temperature
        return kwargs

    async def create(self, client: Any, kwargs: dict[str, Any]) -> Any:
        return await client.chat.completions.create(**kwargs)

    def output(self, response: Any) -> Any:
        return _output(response)

    def tokens(self, response: Any) -> tuple[int, int]:
        reported = getattr(response, "usage", None)  # optional for some servers
        return (reported.prompt_tokens, reported.completion_tokens) if reported else (0, 0)

    def error_text(self, exc: Any) -> str:
        body = exc.body
        if isinstance(body, dict):
            error = body.get("error", body)
            text = error.get("message") if isinstance(error, dict) else error
            if text:
                return str(text)[:300]
        return str(exc.message)[:300]


def _message(turn: Turn) -> dict[str, Any]:
    if turn.kind == "call":
        arguments = turn.arguments if isinstance(turn.arguments, str) else json.dumps(turn.arguments)
        return {
            "role": "assistant",
            # "" rather than null: llama.cpp's server refuses a null content.
            "content": "",
            "tool_calls": [
                {
                    "id": turn.call_id,
                    "type": "function",
                    "function": {"name": turn.name, "arguments": arguments},
                }
            ],
        }
    if turn.kind == "result":
        return {"role": "tool", "tool_call_id": turn.call_id, "content": turn.text}
    if turn.kind == "assistant_text":
        return {"role": "assistant", "content": turn.text}
    return {"role": "user", "content": turn.text}


def _output(completion: Any) -> Any:
    """The reply as raw output: the called functions, or the text. What the model said is
    not checked here (the kernel does that); only that the server sent a chat completion."""
    try:
        choices = completion.choices
        message = choices[0].message if choices else None
        if message is None:
            return ""
        tool_calls, legacy, text = (
            message.tool_calls,
            message.function_call,
            message.content or message.refusal,
        )
    except (AttributeError, TypeError, IndexError) as exc:
        raise MalformedResponse(
            f"the server did not answer with a chat completion: {str(completion)[:200]!r}"
        ) from exc
    calls: list[tuple[str, Any]] = []
    for call in tool_calls or []:
        function = getattr(call, "function", None)
        if function is not None:
            calls.append((function.name, function.arguments))
        else:  # a kind of call tether never offers: the kernel refuses it by its name
            calls.append((f"<{call.type} call>", call.model_dump(mode="json")))
    if not calls and legacy is not None:  # the legacy single-function form
        calls.append((legacy.name, legacy.arguments))
    return proposal_from_calls(calls, text)
