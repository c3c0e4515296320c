"""Retries for model calls: timeouts, exponential backoff with full jitter, Retry-After.

Vendor adapters turn their client's exceptions into a `Failure` (reason code, whether a
retry may help, the server's Retry-After); `call_with_retries` does the rest and keeps
every attempt, so the journal shows each failure with its reason code, not only the last.
Vendor clients' own retries are switched off by the adapters: one place decides.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from tether.models.protocol import Attempt, ModelCallError
from tether.reasons import ReasonCode

T = TypeVar("T")


class RetryPolicy(BaseModel):
    """How long one attempt may take, and how often and how patiently to try again."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_attempts: int = Field(4, ge=1, description="including the first")
    timeout: float = Field(60.0, gt=0, description="seconds per attempt")
    initial_backoff: float = Field(0.5, ge=0)
    max_backoff: float = Field(20.0, ge=0)
    # A server asking for a longer wait than this is treated as a failure, not waited out.
    max_retry_after: float = Field(60.0, ge=0)

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(max, initial * 2**retry)]."""
        return rng.uniform(0, min(self.max_backoff, self.initial_backoff * 2**retry))


@dataclass(frozen=True)
class Failure:
    """A classified exception: its reason code, whether retrying may help, and any
    delay the server asked for."""

    reason_code: ReasonCode
    transient: bool
    message: str
    retry_after: float | None = None


Classifier = Callable[[BaseException], Failure]


def classify_common(exc: BaseException) -> Failure | None:
    """Failures every adapter classifies alike; None for vendor-specific ones."""
    if isinstance(exc, TimeoutError):
        return Failure(ReasonCode.MODEL_TIMEOUT, True, "the model did not answer in time")
    if isinstance(exc, ConnectionError | OSError):
        return Failure(ReasonCode.MODEL_UNAVAILABLE, True, f"{type(exc).__name__}: {exc}")
    return None


def status_failure(status: int, message: str, retry_after: float | None = None) -> Failure:
    """Classify an HTTP status the way every model API uses it."""
    if status == 429:
        return Failure(ReasonCode.MODEL_RATE_LIMITED, True, message, retry_after)
    if status == 408:
        return Failure(ReasonCode.MODEL_TIMEOUT, True, message, retry_after)
    if status >= 500:
        # Anthropic's 529 "overloaded" is a 5xx too.
        return Failure(ReasonCode.MODEL_UNAVAILABLE, True, message, retry_after)
    return Failure(ReasonCode.MODEL_REJECTED, False, message)


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds from a `retry-after-ms` or `retry-after` header (delta-seconds form)."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            return max(0.0, float(value) * scale)
        except ValueError:
            continue  # an HTTP date: rare for model APIs; fall back to our own backoff
    return None


async def call_with_retries(
    call: Callable[[], Awaitable[T]],
    classify: Classifier,
    policy: RetryPolicy,
    *,
    request: Any = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> tuple[T, list[Attempt]]:
    """Call until it succeeds, a failure is permanent, or attempts run out.

    Returns the result and every attempt; raises `ModelCallError` carrying the last
    failure's reason code and all attempts otherwise.
    """
    rng = rng or random.Random()
    attempts: list[Attempt] = []
    for number in range(1, policy.max_attempts + 1):
        started = time.monotonic()
        try:
            async with asyncio.timeout(policy.timeout):
                result = await call()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failure = classify(exc)
            seconds = time.monotonic() - started
            last = number == policy.max_attempts
            wait = _wait(failure, policy, number, rng)
            attempts.append(
                Attempt(
                    number=number,
                    seconds=round(seconds, 4),
                    error=failure.message,
                    reason_code=failure.reason_code,
                    retry_in=None if last or wait is None else round(wait, 3),
                )
            )
            if last or wait is None:
                raise ModelCallError(
                    failure.reason_code,
                    f"{failure.message} (attempt {number} of {policy.max_attempts})",
                    request=request,
                    attempts=attempts,
                ) from exc
            await sleep(wait)
            continue
        attempts.append(Attempt(number=number, seconds=round(time.monotonic() - started, 4)))
        return result, attempts
    raise AssertionError("unreachable: the loop returns or raises")


def _wait(failure: Failure, policy: RetryPolicy, number: int, rng: random.Random) -> float | None:
    """Seconds to wait before the next attempt, or None when retrying cannot help."""
    if not failure.transient:
        return None
    if failure.retry_after is not None:
        return None if failure.retry_after > policy.max_retry_after else failure.retry_after
    return policy.backoff(number - 1, rng)
