"""OpenTelemetry spans (tether.otel), captured with the SDK's in-memory exporter."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode

from conftest import call, run
from tether import (
    AgentState,
    FunctionModel,
    ModelContext,
    ModelReply,
    Policy,
    Runtime,
    Terminal,
    ToolContext,
    Usage,
    Workflow,
    tool,
)
from tether.journal import Journal
from tether.otel import OtelObserver

REPO = Path(__file__).resolve().parents[1]


def traced() -> tuple[OtelObserver, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return OtelObserver(provider), exporter


class Desk:
    def __init__(self) -> None:
        self.traces: list[dict[str, str]] = []

        @tool(effect="read")
        def lookup(order_id: str, ctx: ToolContext) -> dict[str, Any]:
            """Look an order up."""
            self.traces.append(dict(ctx.trace))
            return {"total": 80.0}

        @tool(effect="write")
        def refund(order_id: str, amount: float) -> dict[str, Any]:
            """Refund."""
            return {"ok": True}

        @tool(effect="read")
        def flaky(order_id: str) -> None:
            """Fails."""
            raise RuntimeError("backend down")

        state = AgentState("desk", "Help.", (lookup, refund, flaky), {"done": "done"}, escalate_to="boss")
        policy = {
            "rules": [
                {
                    "id": "big",
                    "tool": "refund",
                    "when": "args.amount > 50.0",
                    "decision": "ask",
                    "approver": "boss",
                },
                {"id": "never-zero", "tool": "refund", "when": "args.amount == 0.0", "decision": "deny"},
                {"id": "refund-ok", "tool": "refund", "decision": "allow"},
            ]
        }
        self.workflow = Workflow(
            "desk", "1", "desk", [state, Terminal("done")], policy=Policy.from_dict(policy, "p")
        )


def model(script: list[Any]) -> FunctionModel:
    def propose(ctx: ModelContext) -> ModelReply:
        turn = ctx.proposals_made
        return ModelReply(output=script[turn], usage=Usage(input_tokens=100 + turn, output_tokens=7))

    return FunctionModel(propose, name="acme:desk-model-1")


def by_name(spans: tuple[ReadableSpan, ...] | list[ReadableSpan], prefix: str) -> list[ReadableSpan]:
    return [s for s in spans if s.name.startswith(prefix)]


def test_spans_for_a_run_its_steps_model_and_tool_calls(journal: Journal) -> None:
    observer, exporter = traced()
    desk = Desk()
    script = model(
        [
            call("lookup", order_id="A1"),
            call("refund", order_id="A1", amount=0.0),
            call("flaky", order_id="A1"),
            call("refund", order_id="A1", amount=70.0),
            {"kind": "exit", "exit": "done"},
        ]
    )
    runtime = Runtime(journal, observer=observer)
    paused = run(runtime.start(desk.workflow, script))
    assert paused.status == "paused"
    spans = exporter.get_finished_spans()

    (root,) = by_name(spans, "invoke_workflow")
    assert root.name == "invoke_workflow desk" and root.parent is None
    assert root.attributes is not None
    assert root.attributes["gen_ai.operation.name"] == "invoke_workflow"
    assert root.attributes["tether.run_id"] == paused.run_id
    assert root.attributes["tether.status"] == "paused"
    policy_hash = desk.workflow.policy.hash  # type: ignore[union-attr]
    assert root.attributes["tether.policy_hash"] == policy_hash

    steps = by_name(spans, "governed_step")
    assert len(steps) == 4 and all(
        s.parent is not None and s.parent.span_id == root.context.span_id for s in steps
    )
    decisions = [
        (s.attributes["tether.step_id"], s.attributes["tether.decision"], s.attributes["tether.rule_id"])
        for s in steps
        if s.attributes
    ]
    assert decisions[1:] == [
        ("s2", "deny", "never-zero"),
        ("s3", "allow", decisions[2][2]),
        ("s4", "ask", "big"),
    ]
    asked = steps[3].attributes or {}
    assert asked["tether.reason_code"] == "approval_required" and asked["tether.policy_hash"] == policy_hash

    chats = by_name(spans, "chat")
    assert len(chats) == 4 and chats[0].kind is SpanKind.CLIENT
    first = chats[0].attributes or {}
    assert first["gen_ai.operation.name"] == "chat"
    assert (first["gen_ai.provider.name"], first["gen_ai.request.model"]) == ("acme", "desk-model-1")
    assert (first["gen_ai.usage.input_tokens"], first["gen_ai.usage.output_tokens"]) == (100, 7)
    assert chats[0].parent is not None and chats[0].parent.span_id == steps[0].context.span_id

    tools = by_name(spans, "execute_tool")
    assert [t.name for t in tools] == ["execute_tool lookup", "execute_tool flaky"]
    lookup = tools[0].attributes or {}
    assert lookup["gen_ai.operation.name"] == "execute_tool" and lookup["gen_ai.tool.name"] == "lookup"
    assert lookup["gen_ai.tool.call.id"] == f"{paused.run_id}:s1"
    assert tools[1].status.status_code is StatusCode.ERROR  # the tool raised: recorded on its span
    # The tool was handed its span's trace context, to pass on (W3C traceparent).
    ctx = tools[0].context
    assert desk.traces == [
        {"traceparent": f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{ctx.trace_flags:02x}"}
    ]

    # The approved refund, resumed: a second run span, its step continuing the ticket.
    exporter.clear()
    run(journal.decide_ticket(paused.ticket_id or "", approve=True, by="boss", now=time.time()))
    done = run(runtime.resume(paused.run_id, desk.workflow, script))
    assert done.status == "completed"
    spans = exporter.get_finished_spans()
    (root,) = by_name(spans, "invoke_workflow")
    assert (root.attributes or {})["tether.drive"] == "resume"
    resumed = by_name(spans, "governed_step")[0].attributes or {}
    assert (resumed["tether.step"], resumed["tether.step_id"], resumed["tether.entry"]) == (
        "resume_ticket",
        "s4",
        "executed",
    )


def test_the_kernel_never_imports_opentelemetry(tmp_path: Path) -> None:
    code = (
        "import sys, tether, tether.runtime, tether.step, tether.observe, tether.cli\n"
        "assert not [m for m in sys.modules if m.startswith('opentelemetry')], 'imported'\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    subprocess.run([sys.executable, "-c", code], env=env, check=True)


def test_no_argument_or_result_reaches_a_span(journal: Journal, monkeypatch: Any) -> None:
    from test_sensitive import CARD, KEY, TOKEN, Payments
    from test_sensitive import model as pay_model

    monkeypatch.setenv("TETHER_FINGERPRINT_KEY", KEY)
    observer, exporter = traced()
    script = pay_model([call("charge", card_number=CARD, amount=20.0), {"kind": "exit", "exit": "done"}])
    assert run(Runtime(journal, observer=observer).start(Payments().workflow(), script)).status == "completed"
    spans = exporter.get_finished_spans()
    assert by_name(spans, "execute_tool charge")
    text = repr([(s.name, dict(s.attributes or {}), [e.attributes for e in s.events]) for s in spans])
    assert CARD not in text and TOKEN not in text
