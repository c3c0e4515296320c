"""What every adapter of a vendor's HTTP API shares: configuration from the spec, the
key, one lazily opened client, the call through our retries, usage and cost, and the
exchange record. A vendor module says only how to talk to its API.

    propose: request(ctx) -> create(client, kwargs) [retried] -> output(response)
             -> usage and cost -> ModelReply with the exchange
"""

from __future__ import annotations

import asyncio
import importlib
import os
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, ClassVar, Self
from urllib.parse import urlsplit, urlunsplit

from tether.errors import ModelSpecError
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


class MalformedResponse(Exception):
    """The server's answer is not what its API returns at all (an HTML page from a proxy,
    say): a fault of the server, not a proposal of the model's."""


class VendorModel(ABC):
    """A model behind a vendor's HTTP API, through the vendor's official client.

    The client is opened on the first call and released by `aclose()`.
    """

    prefix: ClassVar[str]  # the spec prefix, e.g. "openai"
    sdk: ClassVar[str]  # the client package, also the name of its extra
    client_class: ClassVar[str]  # e.g. "AsyncOpenAI"
    key_env: ClassVar[str]
    base_url_env: ClassVar[str]
    default_base_url: ClassVar[str]

    def __init__(
        self,
        model: str,
        options: AdapterOptions | None = None,
        *,
        environ: Mapping[str, str] | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        rng: random.Random | None = None,
    ) -> None:
        try:
            self._sdk: Any = importlib.import_module(self.sdk)
        except ImportError:
            raise ModelSpecError(
                f"the {self.prefix} model adapter needs the {self.sdk} package: "
                f"pip install 'tether[{self.sdk}]'"
            ) from None
        env = os.environ if environ is None else environ
        self.model = model
        self.options = options or AdapterOptions()
        self.name = f"{self.prefix}:{model}{self.options.query()}"
        self.base_url = (self.options.base_url or env.get(self.base_url_env) or self.default_base_url).rstrip(
            "/"
        )
        self._api_key = self._key(env)
        self.prices = self.options.price_table()
        self._policy = self.options.retry_policy()
        self._sleep = sleep or asyncio.sleep
        self._rng = rng
        self._client: Any = None

    @classmethod
    def from_spec(cls, arg: str, base: Path | None = None) -> Self:
        """`MODEL?option=value&...`; a relative price table is found from `base`."""
        model, options = parse_spec(cls.prefix, arg)
        if options.prices and base is not None and not Path(options.prices).is_absolute():
            options = options.model_copy(update={"prices": str(base / options.prices)})
        return cls(model, options)

    def _key(self, env: Mapping[str, str]) -> str:
        """Checked here, so a missing key is reported before a run starts, not as a
        rejected call inside it."""
        key_env = self.options.api_key_env or self.key_env
        key = env.get(key_env)
        if key:
            return str(key)
        if self.options.api_key_env:
            raise ModelSpecError(f"model {self.name}: api_key_env={key_env} names a variable that is not set")
        return self.missing_key()

    def missing_key(self) -> str:
        """What to use when no key is set: by default, nothing (an error)."""
        raise ModelSpecError(
            f"model {self.name} needs an API key: set {self.key_env} "
            "(or name the variable holding it with api_key_env=VAR)"
        )

    async def propose(self, ctx: ModelContext) -> ModelReply:
        kwargs = self.request(ctx)
        recorded = {"base_url": _without_credentials(self.base_url), **kwargs}
        client = self._open()

        async def attempt() -> tuple[Any, Any]:
            response = await self.create(client, kwargs)
            return response, self.output(response)

        (response, output), attempts = await call_with_retries(
            attempt, self.classify, self._policy, request=recorded, sleep=self._sleep, rng=self._rng
        )
        input_tokens, output_tokens = self.tokens(response)
        usage = Usage(input_tokens=input_tokens, output_tokens=output_tokens)
        # Priced by the name asked for, else by the (often dated) name the server answered as.
        priced = self.model if self.model in self.prices.prices else str(getattr(response, "model", ""))
        return ModelReply(
            output=output,
            usage=usage.model_copy(update={"cost": self.prices.cost(priced, usage)}),
            exchange=Exchange(request=recorded, response=response.model_dump(mode="json"), attempts=attempts),
        )

    def classify(self, exc: BaseException) -> Failure:
        """The client's exceptions as failures with reason codes (both official clients
        raise the same classes by name)."""
        sdk = self._sdk
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
            message = f"HTTP {exc.status_code} from {self.base_url}: {self.error_text(exc)}"
            return status_failure(exc.status_code, message, retry_after_seconds(exc.response.headers))
        return classify_common(exc) or Failure(
            ReasonCode.MODEL_ERROR, False, f"{type(exc).__name__}: {str(exc)[:300]}"
        )

    def _open(self) -> Any:
        if self._client is None:
            self._client = getattr(self._sdk, self.client_class)(
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

    # -- what each vendor module says ------------------------------------------------

    @abstractmethod
    def request(self, ctx: ModelContext) -> dict[str, Any]:
        """The keyword arguments of the API call for this context."""

    @abstractmethod
    async def create(self, client: Any, kwargs: dict[str, Any]) -> Any:
        """Make the call."""

    @abstractmethod
    def output(self, response: Any) -> Any:
        """The reply as raw output for the kernel; MalformedResponse if it is no reply."""

    @abstractmethod
    def tokens(self, response: Any) -> tuple[int, int]:
        """(input tokens, output tokens) the response reports."""

    @abstractmethod
    def error_text(self, exc: Any) -> str:
        """The message of an API error, from its body."""


def _without_credentials(url: str) -> str:
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    return urlunsplit(parts._replace(netloc=f"{host}:{parts.port}" if parts.port else host))
