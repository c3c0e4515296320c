"""Retries of model calls: which failures are retried, how long it waits, what is kept."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from tether.models import ModelCallError
from tether.models.retry import (
    Failure,
    RetryPolicy,
    call_with_retries,
    classify_common,
    retry_after_seconds,
    status_failure,
)
from tether.reasons import ReasonCode


class HTTPFailure(Exception):
    def __init__(self, status: int, retry_after: float | None = None) -> None:
        super().__init__(f"HTTP {status}")
        self.status, self.retry_after = status, retry_after


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, HTTPFailure):
        return status_failure(exc.status, str(exc), exc.retry_after)
    return classify_common(exc) or Failure(ReasonCode.MODEL_ERROR, False, repr(exc))


def flaky(*failures: BaseException | None, hang: float = 0.0) -> tuple[Any, list[int]]:
    """A call failing with each given exception in turn, then answering "ok"."""
    calls: list[int] = []

    async def call() -> str:
        calls.append(1)
        failure = failures[len(calls) - 1] if len(calls) <= len(failures) else None
        if failure is not None:
            raise failure
        await asyncio.sleep(hang)
        return "ok"

    return call, calls


def retry(call: Any, policy: RetryPolicy) -> tuple[Any, list[float]]:
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    result = asyncio.run(call_with_retries(call, classify, policy, sleep=sleep, rng=random.Random(4)))
    return result, slept


def test_transient_failures_are_retried_with_jittered_exponential_backoff() -> None:
    call, calls = flaky(HTTPFailure(500), HTTPFailure(503), ConnectionResetError("reset"))
    policy = RetryPolicy(max_attempts=4, initial_backoff=1.0, max_backoff=3.0)
    (result, attempts), slept = retry(call, policy)
    assert result == "ok" and len(calls) == 4
    assert [a.reason_code for a in attempts] == ["model_unavailable"] * 3 + [None]
    assert 0 <= slept[0] <= 1.0 and 0 <= slept[1] <= 2.0 and 0 <= slept[2] <= 3.0
    assert [a.retry_in for a in attempts[:3]] == [round(s, 3) for s in slept]
    assert len(set(slept)) == 3  # jittered, not a fixed schedule


def test_retry_after_is_honoured_and_a_too_long_one_is_not_waited_out() -> None:
    call, _ = flaky(HTTPFailure(429, retry_after=7.0))
    (_, attempts), slept = retry(call, RetryPolicy())
    assert slept == [7.0] and attempts[0].reason_code == "model_rate_limited"

    call, calls = flaky(HTTPFailure(429, retry_after=3600.0))
    with pytest.raises(ModelCallError) as caught:
        retry(call, RetryPolicy(max_retry_after=60))
    assert caught.value.reason_code == "model_rate_limited" and len(calls) == 1


def test_a_permanent_failure_is_not_retried() -> None:
    call, calls = flaky(HTTPFailure(401))
    with pytest.raises(ModelCallError) as caught:
        retry(call, RetryPolicy(max_attempts=5))
    assert len(calls) == 1
    assert caught.value.reason_code == "model_rejected"
    assert str(caught.value) == "HTTP 401 (attempt 1 of 5)"
    assert [a.retry_in for a in caught.value.attempts] == [None]


def test_an_attempt_past_its_timeout_is_cut_and_every_attempt_is_kept() -> None:
    call, calls = flaky(hang=5.0)
    with pytest.raises(ModelCallError) as caught:
        retry(call, RetryPolicy(max_attempts=2, timeout=0.05, initial_backoff=0))
    assert len(calls) == 2
    assert caught.value.reason_code == "model_timeout"
    assert [a.reason_code for a in caught.value.attempts] == ["model_timeout", "model_timeout"]
    assert all(a.seconds < 1.0 for a in caught.value.attempts)


def test_http_statuses_and_headers_are_classified_as_every_model_api_uses_them() -> None:
    assert [status_failure(s, "").reason_code for s in (400, 401, 404, 408, 429, 500, 529)] == [
        "model_rejected",
        "model_rejected",
        "model_rejected",
        "model_timeout",
        "model_rate_limited",
        "model_unavailable",
        "model_unavailable",
    ]
    assert retry_after_seconds({"retry-after-ms": "1500"}) == 1.5
    assert retry_after_seconds({"retry-after": "20"}) == 20.0
    assert retry_after_seconds({"retry-after": "Wed, 21 Oct 2026 07:28:00 GMT"}) is None
    assert retry_after_seconds(None) is None
