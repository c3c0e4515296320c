"""The Anthropic adapter against recorded HTTP exchanges of the Messages API.

The fixtures under fixtures/anthropic/ are responses in the API's documented shapes
(status, headers such as request-id, anthropic-ratelimit-* and retry-after, and body).
respx serves them to the real `anthropic` client inside real governed runs: SQLite
journal, policy, tools, budgets. Only the server is recorded; everything else runs.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import httpx
import httpx2
import pytest
import respx
from respx.mocks import Mocker

from conftest import Shop, run
from tether import Budget, Runtime
from tether.errors import ModelSpecError
from tether.journal import Journal
from tether.models import BudgetLeft, ModelContext, resolve_model
from tether.models.anthropic import AnthropicModel
from tether.models.options import AdapterOptions
from tether.timeline import timeline

FIXTURES = Path(__file__).parent / "fixtures" / "anthropic"
API = "https://api.anthropic.com"
KEY = "sk-ant-api03-test-key-never-recorded"
MODEL = "claude-sonnet-4-6"


class _Bridge(httpx2.AsyncBaseTransport):
    """Hands a request of `httpx2` (the anthropic client's HTTP library) to respx, which
    speaks `httpx`, and its answer back; transport errors cross over as their kind."""

    def __init__(self, handler: Any) -> None:
        self.handler = handler

    async def handle_async_request(self, request: Any) -> Any:
        body = await request.aread()
        sent = httpx.Request(
            request.method, str(request.url), headers=list(request.headers.multi_items()), content=body
        )
        try:
            answer = await self.handler(sent)
        except httpx.TimeoutException as exc:
            raise httpx2.ReadTimeout(str(exc), request=request) from exc
        except httpx.TransportError as exc:
            raise httpx2.ConnectError(str(exc), request=request) from exc
        return httpx2.Response(
            answer.status_code,
            headers=list(answer.headers.multi_items()),
            content=answer.content,
            request=request,
        )


class _Httpx2Mocker(Mocker):
    """respx patches `httpx`; the anthropic client (2.x) sends through `httpx2`. This
    routes httpx2 clients to respx's routes the way respx's own httpx mocker does."""

    name = "tether-httpx2"
    targets: ClassVar[list[str]] = ["httpx2._client.AsyncClient"]
    target_methods: ClassVar[list[str]] = ["_transport_for_url"]

    @classmethod
    def mock(cls, spec: Any) -> Any:
        def _transport_for_url(self: Any, *args: Any, **kwargs: Any) -> _Bridge:
            return _Bridge(cls.async_handler)

        return _transport_for_url


def recorded(name: str) -> Any:
    doc = json.loads((FIXTURES / f"{name}.json").read_text())
    return httpx.Response(doc["status"], headers=doc["headers"], json=doc["body"])


class Waits:
    """Stands in for asyncio.sleep between attempts: records each wait, waits for none."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


@pytest.fixture
def api() -> Iterator[Any]:
    with respx.mock(using=_Httpx2Mocker.name, base_url=API, assert_all_called=False) as router:
        yield router


@pytest.fixture
def prices(tmp_path: Path) -> Path:
    path = tmp_path / "prices.yaml"
    path.write_text(f"{MODEL}: {{input: 3.0, output: 15.0}}\n")
    return path


def claude(prices: Path, waits: Waits | None = None, **options: Any) -> AnthropicModel:
    return AnthropicModel(
        MODEL,
        AdapterOptions(prices=str(prices), **options),
        environ={"ANTHROPIC_API_KEY": KEY},
        sleep=waits or Waits(),
        rng=random.Random(5),
    )


async def drive(journal: Journal, shop: Shop, model: AnthropicModel, **workflow: Any) -> Any:
    try:
        return await Runtime(journal).start(shop.workflow(**workflow), model)
    finally:
        await model.aclose()


def sent(route: Any) -> list[dict[str, Any]]:
    """The request bodies the adapter sent, as the API received them."""
    return [json.loads(call.request.content) for call in route.calls]


def steps(entries: list[Any]) -> list[tuple[Any, ...]]:
    return [(row["outcome"], row["reason_code"]) for row in timeline(entries) if row["kind"] == "step"]


def cost(input_tokens: int, output_tokens: int) -> float:
    return (input_tokens * 3.0 + output_tokens * 15.0) / 1_000_000


def test_a_governed_run_looks_an_order_up_and_exits(
    journal: Journal, shop: Shop, prices: Path, api: Any
) -> None:
    route = api.post("/v1/messages")
    route.side_effect = [recorded("lookup"), recorded("wrong_types"), recorded("exit")]

    async def scenario() -> None:
        result = await drive(journal, shop, claude(prices))
        assert (result.status, result.state) == ("completed", "done"), result.message
        assert shop.executed == ["read_order"]

        first, second, third = sent(route)
        assert first["model"] == MODEL and "Help the customer." in first["system"]
        assert [t["name"] for t in first["tools"]] == ["read_order", "refund", "take_exit", "ask_person"]
        assert first["tools"][0]["input_schema"]["properties"]["order_id"]["type"] == "string"
        assert first["tool_choice"] == {"type": "any", "disable_parallel_tool_use": True}
        assert first["max_tokens"] == 1024
        [opening] = first["messages"]
        assert opening["role"] == "user" and "Run data" in opening["content"][0]["text"]
        # The model's call comes back as a tool_use, the observation as its tool_result.
        assert second["messages"][1] == {
            "role": "assistant",
            "content": [
                {"type": "tool_use", "id": "call_0", "name": "read_order", "input": {"order_id": "A1"}}
            ],
        }
        [result_block] = second["messages"][2]["content"]
        assert (result_block["type"], result_block["tool_use_id"]) == ("tool_result", "call_0")
        assert (
            '"outcome": "executed"' in result_block["content"] and '"total": 80.0' in result_block["content"]
        )
        # A refusal reaches the model with its reason code.
        assert "invalid_arguments" in third["messages"][-1]["content"][0]["content"]
        for body in (first, second, third):
            roles = [m["role"] for m in body["messages"]]
            assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]

        entries = await journal.read_entries(result.run_id)
        assert steps(entries) == [
            ("executed", "policy_allowed"),
            ("refused", "invalid_arguments"),
            ("transition", "policy_allowed"),
        ]
        exchanges = await journal.read_exchanges(result.run_id)
        assert [x.response["id"] for x in exchanges] == [
            "msg_01XbQ8LrFz6oJ3hN2cVt9ykP",
            "msg_01Tf6Yh2Lk8Qw3Ez9Rn5Vb7D",
            "msg_01Kp4ZsW7nVd2Lq9Rf3Xe8Tc",
        ]
        assert exchanges[0].request["base_url"] == API and exchanges[0].request["tools"] == first["tools"]
        assert [len(x.attempts) for x in exchanges] == [1, 1, 1]
        # Cache reads count as input tokens (268 + 512 in the exit's usage).
        assert [(x.usage["input_tokens"], x.usage["output_tokens"]) for x in exchanges] == [
            (612, 41),
            (655, 39),
            (780, 52),
        ]
        assert exchanges[2].usage["cost"] == pytest.approx(cost(780, 52))
        totals = (await journal.get_run(result.run_id)).checkpoint["totals"]
        assert totals["tokens"] == 612 + 41 + 655 + 39 + 780 + 52
        assert totals["cost"] == pytest.approx(cost(612 + 655 + 780, 41 + 39 + 52))
        # The key went to the API and nowhere into the journal.
        assert any(KEY in value for value in route.calls[0].request.headers.values())
        assert KEY not in json.dumps([x.model_dump() for x in exchanges])

    run(scenario())


def test_a_token_budget_caps_each_call_and_stops_the_run(
    journal: Journal, shop: Shop, prices: Path, api: Any
) -> None:
    route = api.post("/v1/messages")
    route.side_effect = [recorded("lookup"), recorded("lookup"), recorded("exit")]

    async def scenario() -> None:
        budget = Budget(max_steps=10, max_tool_calls=5, max_tokens=1000)
        result = await drive(journal, shop, claude(prices), budget=budget)
        assert (result.status, result.reason_code) == ("escalated", "budget_exhausted")
        assert "token budget of 1000" in (result.message or "")
        # Output asked for never exceeds what is left: 1000, then 1000 - (612 + 41).
        assert [body["max_tokens"] for body in sent(route)] == [1000, 347]
        assert route.call_count == 2 and shop.executed == ["read_order", "read_order"]

    run(scenario())


@pytest.mark.parametrize(
    ("failure", "reason_code"),
    [("rate_limited", "model_rate_limited"), ("overloaded", "model_unavailable")],
)
def test_transient_failures_are_retried_and_every_attempt_is_recorded(
    journal: Journal, shop: Shop, prices: Path, api: Any, failure: str, reason_code: str
) -> None:
    route = api.post("/v1/messages")
    route.side_effect = [recorded(failure), recorded(failure), recorded("lookup"), recorded("exit")]
    waits = Waits()

    async def scenario() -> None:
        result = await drive(journal, shop, claude(prices, waits))
        assert result.status == "completed"
        first = (await journal.read_exchanges(result.run_id))[0]
        assert [a["reason_code"] for a in first.attempts] == [reason_code, reason_code, None]
        request_id = recorded(failure).headers["request-id"]
        assert f"(request-id {request_id})" in first.attempts[0]["error"]
        assert [a["retry_in"] for a in first.attempts[:2]] == [
            pytest.approx(w, abs=1e-3) for w in waits.seconds
        ]
        if failure == "rate_limited":
            assert waits.seconds == [3.0, 3.0]  # the server's retry-after
        else:
            assert all(0 <= w <= 1.0 for w in waits.seconds)  # our backoff with jitter
        assert route.call_count == 4

    run(scenario())


def test_server_errors_that_outlast_the_attempts_escalate_the_run(
    journal: Journal, shop: Shop, prices: Path, api: Any
) -> None:
    route = api.post("/v1/messages")
    gateway = httpx.Response(502, headers={"content-type": "text/html"}, text="<html>Bad Gateway</html>")
    route.side_effect = [gateway, recorded("api_error"), recorded("api_error")]

    async def scenario() -> None:
        result = await drive(journal, shop, claude(prices, max_attempts=3))
        assert (result.status, result.reason_code, result.owner) == (
            "escalated",
            "model_unavailable",
            "supervisor",
        )
        assert result.message == (
            f"HTTP 500 from {API}: api_error: Internal server error "
            "(request-id req_011CVd27Rk3Nx8Lq5Ws2Mt7V) (attempt 3 of 3)"
        )
        [exchange] = await journal.read_exchanges(result.run_id)
        assert [a["reason_code"] for a in exchange.attempts] == ["model_unavailable"] * 3
        assert exchange.attempts[0]["error"] == f"HTTP 502 from {API}: <html>Bad Gateway</html>"
        assert exchange.request["model"] == MODEL and exchange.response is None
        assert route.call_count == 3 and shop.executed == []

    run(scenario())


def test_a_rejected_key_is_not_retried(journal: Journal, shop: Shop, prices: Path, api: Any) -> None:
    route = api.post("/v1/messages")
    route.side_effect = [recorded("authentication_error"), recorded("lookup")]

    async def scenario() -> None:
        result = await drive(journal, shop, claude(prices))
        assert (result.status, result.reason_code) == ("escalated", "model_rejected")
        assert "HTTP 401 from https://api.anthropic.com: authentication_error" in (result.message or "")
        assert route.call_count == 1

    run(scenario())


def test_timeouts_are_retried_then_escalated(journal: Journal, shop: Shop, prices: Path, api: Any) -> None:
    route = api.post("/v1/messages")

    async def never_answers(request: Any) -> Any:
        await asyncio.sleep(5)

    async def scenario() -> None:
        # The client's own timeout (a read timeout on the wire) ...
        route.side_effect = httpx.ReadTimeout("timed out")
        result = await drive(journal, shop, claude(prices, max_attempts=2))
        assert (result.status, result.reason_code) == ("escalated", "model_timeout")
        [exchange] = await journal.read_exchanges(result.run_id)
        assert [a["reason_code"] for a in exchange.attempts] == ["model_timeout", "model_timeout"]
        # ... and ours, per attempt, for a server that accepts the request and never answers.
        route.side_effect = never_answers
        result = await drive(journal, shop, claude(prices, max_attempts=1, timeout=0.05))
        assert (result.status, result.reason_code) == ("escalated", "model_timeout")
        assert result.message == "the model did not answer in time (attempt 1 of 1)"

    run(scenario())


def test_malformed_replies_are_refused_by_the_kernel_and_the_run_goes_on(
    journal: Journal, shop: Shop, prices: Path, api: Any
) -> None:
    route = api.post("/v1/messages")
    route.side_effect = [
        recorded(name) for name in ("text_only", "truncated", "parallel", "unknown_tool", "refusal", "exit")
    ]

    async def scenario() -> None:
        result = await drive(journal, shop, claude(prices, max_tokens=100))
        assert (result.status, result.state) == ("completed", "done")
        entries = await journal.read_entries(result.run_id)
        assert steps(entries) == [
            ("refused", "malformed_output"),  # text instead of a call
            ("refused", "malformed_output"),  # a refund cut off at max_tokens never runs
            ("refused", "malformed_output"),  # two calls in one reply
            ("refused", "unknown_tool"),
            ("refused", "malformed_output"),  # a refusal with no content at all
            ("transition", "policy_allowed"),
        ]
        assert shop.executed == [] and shop.refunds == []
        last = sent(route)[-1]["messages"]
        # What the model said is shown back to it as said, each followed by the refusal.
        said = [m["content"][0]["text"] for m in last if m["role"] == "assistant"]
        assert said[0] == "I have refunded the order in full."
        assert said[1].startswith("reply cut off at max_tokens before its tool call was complete")
        assert said[3] == "cancel_everything({})"  # a tool never offered cannot be a tool_use
        assert said[4] == "(nothing)"  # the API refuses empty text blocks
        refusals = [m["content"][0]["text"] for m in last[2::2]]
        assert [("unknown_tool" in r, "malformed_output" in r) for r in refusals] == [
            (False, True),
            (False, True),
            (False, True),
            (True, False),
            (False, True),
        ]

    run(scenario())


def test_the_spec_configures_the_adapter_and_a_missing_key_is_named(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, prices: Path
) -> None:
    monkeypatch.delenv("ANTHROPIC_API_KEY", raising=False)
    monkeypatch.delenv("ANTHROPIC_BASE_URL", raising=False)
    with pytest.raises(ModelSpecError, match="needs an API key: set ANTHROPIC_API_KEY"):
        resolve_model(f"anthropic:{MODEL}")
    with pytest.raises(ModelSpecError, match="api_key_env=TEAM_KEY names a variable that is not set"):
        resolve_model(f"anthropic:{MODEL}?api_key_env=TEAM_KEY")
    with pytest.raises(ModelSpecError, match="max_attempts: Input should be greater than or equal to 1"):
        resolve_model(f"anthropic:{MODEL}?max_attempts=0")

    monkeypatch.setenv("TEAM_KEY", KEY)
    spec = f"anthropic:{MODEL}?api_key_env=TEAM_KEY&base_url=http://127.0.0.1:9/&timeout=5&prices=prices.yaml"
    model = resolve_model(spec, tmp_path)
    assert isinstance(model, AnthropicModel)
    assert (model.base_url, model.options.timeout, model.prices.prices[MODEL].output) == (
        "http://127.0.0.1:9",
        5.0,
        15.0,
    )
    # The name pins the model and its options (never the key) for a resumed run.
    assert model.name.startswith(f"anthropic:{MODEL}?") and KEY not in model.name
    assert resolve_model(model.name, tmp_path).name == model.name

    monkeypatch.setenv("ANTHROPIC_BASE_URL", "https://gateway.example/anthropic/")
    tuned = resolve_model(f"anthropic:{MODEL}?api_key_env=TEAM_KEY&max_tokens=200&temperature=0.2")
    assert isinstance(tuned, AnthropicModel) and tuned.base_url == "https://gateway.example/anthropic"
    ctx = ModelContext(
        run_id="r1",
        state="shop",
        instructions="Help.",
        budget_left=BudgetLeft(steps=5, tool_calls=5, seconds=60, tokens=150),
    )
    request = tuned.request(ctx)
    assert (request["max_tokens"], request["temperature"]) == (150, 0.2)  # the budget caps the option
    assert [t["name"] for t in request["tools"]] == ["ask_person"]  # no tools, no exits: only a question


def test_an_answer_that_is_not_a_message_is_a_model_error(
    journal: Journal, shop: Shop, prices: Path, api: Any
) -> None:
    route = api.post("/v1/messages")
    route.side_effect = [
        httpx.Response(200, headers={"content-type": "text/html"}, text="<html>Sign in</html>")
    ]

    async def scenario() -> None:
        result = await drive(journal, shop, claude(prices))
        assert (result.status, result.reason_code) == ("escalated", "model_error")
        assert "the API did not answer with a message: '<html>Sign in</html>'" in (result.message or "")
        assert route.call_count == 1

    run(scenario())


def test_an_unreachable_server_is_unavailable(journal: Journal, shop: Shop, prices: Path, api: Any) -> None:
    route = api.post("/v1/messages")
    route.side_effect = httpx.ConnectError("connection refused")

    async def scenario() -> None:
        result = await drive(journal, shop, claude(prices, max_attempts=2))
        assert (result.status, result.reason_code) == ("escalated", "model_unavailable")
        assert result.message == f"cannot reach {API}: ConnectError (attempt 2 of 2)"

    run(scenario())
