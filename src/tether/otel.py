"""OpenTelemetry spans for the runs a Runtime drives (extra `tether[otel]`).

    from opentelemetry.sdk.trace import TracerProvider
    from tether.otel import OtelObserver

    runtime = Runtime(journal, observer=OtelObserver(provider))

Spans, following the GenAI semantic conventions where they apply:

- `invoke_workflow {workflow}` per drive of a run (a start, each resume): `tether.run_id`,
  `tether.workflow`, `tether.policy_hash`, and at the end `tether.status`, `tether.reason_code`;
- `governed_step {state}` per governed step: `tether.step_id`, `tether.step` (turn,
  resume_ticket, recover) and, once recorded, `tether.decision`, `tether.rule_id`,
  `tether.reason_code`, `tether.entry`, with `tether.policy_hash`;
- `chat {model}` per model call (kind CLIENT): `gen_ai.operation.name=chat`,
  `gen_ai.request.model`, `gen_ai.provider.name`, `gen_ai.usage.input_tokens`/`output_tokens`;
- `execute_tool {tool}` per tool call: `gen_ai.operation.name=execute_tool`, `gen_ai.tool.name`,
  `gen_ai.tool.call.id` (`RUN:STEP`, the idempotency key), `gen_ai.tool.type`; the tool receives
  its trace context in `ToolContext.trace` (W3C `traceparent`) to pass on.

No argument, result or prompt is ever an attribute. Nothing leaves the process unless the
tracer provider given (or the global one) has an exporter configured: this module configures none.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tether import __version__
from tether.observe import Attributes, ObservedSpan
from tether.observe import SpanKind as TetherSpanKind

_KINDS = {
    "run": SpanKind.INTERNAL,
    "step": SpanKind.INTERNAL,
    "model": SpanKind.CLIENT,
    "tool": SpanKind.INTERNAL,
}
_propagator = TraceContextTextMapPropagator()


class _Span:
    def __init__(self, span: Span) -> None:
        self._span = span

    def set(self, attributes: Attributes) -> None:
        self._span.set_attributes({k: v for k, v in attributes.items() if v is not None})

    def carrier(self) -> dict[str, str]:
        carrier: dict[str, str] = {}
        _propagator.inject(carrier, context=trace.set_span_in_context(self._span))
        return carrier


class OtelObserver:
    """A tether observer (tether.observe) that makes OpenTelemetry spans with `provider`'s
    tracer (the global provider when None)."""

    def __init__(self, provider: Any = None) -> None:
        self.tracer = trace.get_tracer("tether", __version__, tracer_provider=provider)

    @contextlib.contextmanager
    def span(self, kind: TetherSpanKind, name: str, attributes: Attributes) -> Iterator[ObservedSpan]:
        attrs = {k: v for k, v in attributes.items() if v is not None}
        with self.tracer.start_as_current_span(
            name, kind=_KINDS[kind], attributes=attrs, record_exception=True, set_status_on_exception=True
        ) as span:
            yield _Span(span)
