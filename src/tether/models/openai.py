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

OPENAI_HOST = "api.openai.com"
KEY_ENV = "OPENAI_API_KEY"
# Local servers take no key, but the client insists on one.
NO_KEY = "not-needed"


def _sdk() -> ModuleType:
    try:
        import openai
    except ImportError:
        raise ModelSpecError(
            "the openai model adapter needs the openai package: pip install 'tether[openai]'"
        ) from None
    return openai


class OpenAIModel:
    """A model behind an OpenAI-compatible Chat Completions endpoint.

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
        self._openai = _sdk()
        env = os.environ if environ is None else environ
        self.model = model
        self.options = options or AdapterOptions()
        self.name = f"openai:{model}{self.options.query()}"
        self.base_url = (
            self.options.base_url or env.get("OPENAI_BASE_URL") or f"https://{OPENAI_HOST}/v1"
        ).rstrip("/")
        self._api_key = self._key(env)
        self.prices = self.options.price_table()
        self._policy = self.options.retry_policy()
        self._sleep = sleep or asyncio.sleep
        self._rng = rng
        self._client: Any = None

    @classmethod
    def from_spec(cls, arg: str, base: Path | None = None) -> OpenAIModel:
        """`MODEL?option=value&...`; a relative price table is found from `base`."""
        model, options = parse_spec("openai", arg)
        if options.prices and base is not None and not Path(options.prices).is_absolute():
            options = options.model_copy(update={"prices": str(base / options.prices)})
        return cls(model, options)

    def _key(self, env: Any) -> str:
        """The API key, or a placeholder for a server that needs none. Checked here, so a
        missing key is reported before a run starts, not as a failed call inside it."""
        key_env = self.options.api_key_env or KEY_ENV
        key = env.get(key_env)
        if key:
            return str(key)
        if self.options.api_key_env:
            raise ModelSpecError(f"model {self.name}: api_key_env={key_env} names a variable that is not set")
        if urlsplit(self.base_url).hostname == OPENAI_HOST:
            raise ModelSpecError(
                f"model {self.name} talks to {OPENAI_HOST} and needs a key: set {KEY_ENV} "
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

    async def propose(self, ctx: ModelContext) -> ModelReply:
        kwargs = self.request(ctx)
        recorded = {"base_url": _without_credentials(self.base_url), **kwargs}
        client = self._open()

        async def attempt() -> tuple[Any, Any]:
            completion = await client.chat.completions.create(**kwargs)
            return completion, _output(completion)

        (completion, output), attempts = await call_with_retries(
            attempt, self.classify, self._policy, request=recorded, sleep=self._sleep, rng=self._rng
        )
        return ModelReply(
            output=output,
            usage=self._usage(completion),
            exchange=Exchange(
                request=recorded, response=completion.model_dump(mode="json"), attempts=attempts
            ),
        )

    def classify(self, exc: BaseException) -> Failure:
        """The openai client's exceptions as failures with reason codes."""
        sdk = self._openai
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
            return status_failure(
                exc.status_code,
                f"HTTP {exc.status_code} from {self.base_url}: {_error_text(exc)}",
                retry_after_seconds(exc.response.headers),
            )
        return classify_common(exc) or Failure(
            ReasonCode.MODEL_ERROR, False, f"{type(exc).__name__}: {str(exc)[:300]}"
        )

    def _usage(self, completion: Any) -> Usage:
        reported = getattr(completion, "usage", None)  # optional for some servers
        usage = Usage(
            input_tokens=reported.prompt_tokens if reported else 0,
            output_tokens=reported.completion_tokens if reported else 0,
        )
        # Priced by the name asked for, else by the (often dated) name the server answered as.
        priced = self.model if self.model in self.prices.prices else getattr(completion, "model", "")
        return usage.model_copy(update={"cost": self.prices.cost(priced, usage)})

    def _open(self) -> Any:
        if self._client is None:
            self._client = self._openai.AsyncOpenAI(
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


class MalformedResponse(Exception):
    """The server's answer is not a chat completion at all (an HTML page, say): a fault of
    the server, not a proposal of the model's."""


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


def _error_text(exc: Any) -> str:
    body = exc.body
    if isinstance(body, dict):
        error = body.get("error", body)
        text = error.get("message") if isinstance(error, dict) else error
        if text:
            return str(text)[:300]
    return str(exc.message)[:300]


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))
