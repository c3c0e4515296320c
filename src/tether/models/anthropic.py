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

import asyncio
import json
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from tether.errors import ModelSpecError
from tether.models.chat import Turn, functions, proposal_from_calls, system_prompt, turns
from tether.models.options import AdapterOptions, parse_spec
from tether.models.protocol import Exchange, ModelContext, ModelReply, Usage
from tether.models.retry import (
    Failure,
    call_with_retries,
    classify_common,
    retry_after_seconds,
    status_failure,
)
from tether.reasons import ReasonCode

ANTHROPIC_URL = "https://api.anthropic.com"
KEY_ENV = "ANTHROPIC_API_KEY"
# Exactly one tool call per reply: the kernel takes one step at a time.
TOOL_CHOICE = {"type": "any", "disable_parallel_tool_use": True}


def _sdk() -> ModuleType:
    try:
        import anthropic
    except ImportError:
        raise ModelSpecError(
            "the anthropic model adapter needs the anthropic package: pip install 'tether[anthropic]'"
        ) from None
    return anthropic


class AnthropicModel:
    """A model behind Anthropic's Messages API.

    The HTTP client is opened on the first call and released by `aclose()`.
    """

    def __init__(
        self,
        model: str,
        options: AdapterOptions | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self._anthropic = _sdk()
        env = os.environ if environ is None else environ
        self.model = model
        self.options = options or AdapterOptions()
        self.name = f"anthropic:{model}{self.options.query()}"
        self.base_url = (self.options.base_url or env.get("ANTHROPIC_BASE_URL") or ANTHROPIC_URL).rstrip("/")
        self._api_key = self._key(env)
        self.prices = self.options.price_table()
        self._policy = self.options.retry_policy()
        self._sleep = sleep or asyncio.sleep
        self._rng = rng
        self._client: Any = None

    @classmethod
    def from_spec(cls, arg: str, base: Path | None = None) -> AnthropicModel:
        """`MODEL?option=value&...`; a relative price table is found from `base`."""
        model, options = parse_spec("anthropic", arg)
        if options.prices and base is not None and not Path(options.prices).is_absolute():
            options = options.model_copy(update={"prices": str(base / options.prices)})
        return cls(model, options)

    def _key(self, env: Mapping[str, str]) -> str:
        """Checked here, so a missing key is reported before a run starts, not as a
        rejected call inside it."""
        key_env = self.options.api_key_env or KEY_ENV
        key = env.get(key_env)
        if key:
            return key
        if self.options.api_key_env:
            raise ModelSpecError(f"model {self.name}: api_key_env={key_env} names a variable that is not set")
        raise ModelSpecError(
            f"model {self.name} needs an API key: set {KEY_ENV} "
            "(or name the variable holding it with api_key_env=VAR)"
        )

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

    async def propose(self, ctx: ModelContext) -> ModelReply:
        kwargs = self.request(ctx)
        recorded = {"base_url": _without_credentials(self.base_url), **kwargs}
        client = self._open()

        async def attempt() -> tuple[Any, Any]:
            message = await client.messages.create(**kwargs)
            return message, _output(message)

        (message, output), attempts = await call_with_retries(
            attempt, self.classify, self._policy, request=recorded, sleep=self._sleep, rng=self._rng
        )
        return ModelReply(
            output=output,
            usage=self._usage(message),
            exchange=Exchange(request=recorded, response=message.model_dump(mode="json"), attempts=attempts),
        )

    def classify(self, exc: BaseException) -> Failure:
        """The anthropic client's exceptions as failures with reason codes."""
        sdk = self._anthropic
        if isinstance(exc, MalformedResponse):
            return Failure(ReasonCode.MODEL_ERROR, False, str(exc))
        if isinstance(exc, sdk.APITimeoutError):
            return Failure(ReasonCode.MODEL_TIMEOUT, True, f"no answer from {self.base_url} in time")
        if isinstance(exc, sdk.APIConnectionError):
            cause = exc.__cause__ or exc
            return Failure(
                ReasonCode.MODEL_UNAVAILABLE, True, f"cannot reach {self.base_url}: {type(cause).__name__}"
            )
        if isinstance(exc, sdk.APIStatusError):
            kind, text = _error(exc)
            request_id = exc.response.headers.get("request-id")
            message = f"HTTP {exc.status_code} {kind} from {self.base_url}: {text}" + (
                f" (request-id {request_id})" if request_id else ""
            )
            # 529 overloaded_error is a 5xx: unavailable, retried like any server error.
            return status_failure(exc.status_code, message, retry_after_seconds(exc.response.headers))
        return classify_common(exc) or Failure(
            ReasonCode.MODEL_ERROR, False, f"{type(exc).__name__}: {str(exc)[:300]}"
        )

    def _usage(self, message: Any) -> Usage:
        reported = message.usage
        # Tokens read from or written to the prompt cache are input tokens too.
        cached = (getattr(reported, "cache_creation_input_tokens", None) or 0) + (
            getattr(reported, "cache_read_input_tokens", None) or 0
        )
        usage = Usage(input_tokens=reported.input_tokens + cached, output_tokens=reported.output_tokens)
        # Priced by the name asked for, else by the dated name the API answered as.
        priced = self.model if self.model in self.prices.prices else str(getattr(message, "model", ""))
        return usage.model_copy(update={"cost": self.prices.cost(priced, usage)})

    def _open(self) -> Any:
        if self._client is None:
            self._client = self._anthropic.AsyncAnthropic(
                api_key=self._api_key,
                base_url=self.base_url,
                timeout=self.options.timeout,
                # One place decides about retries (call_with_retries), and records each attempt.
                max_retries=0,
            )
        return self._client

    async def aclose(self) -> None:
        """Release the HTTP connections; a later call opens a new client."""
        client, self._client = self._client, None
        if client is not None:
            await client.close()


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


class MalformedResponse(Exception):
    """The API's answer is not a message at all (an HTML page from a proxy, say): a fault
    of the server, not a proposal of the model's."""


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


def _error(exc: Any) -> tuple[str, str]:
    """The error type and message of an API error body (`{"type": "error", "error": ...}`)."""
    body = exc.body
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        return str(error.get("type") or "error"), str(error.get("message") or "")[:300]
    return "error", str(exc.message)[:300]


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))
