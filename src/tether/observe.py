"""What the kernel tells an observer while it drives a run: a tiny protocol, no vendor code.

`Runtime(journal, observer=...)` takes any object with `span(kind, name, attributes)`,
a context manager around a unit of work that yields an `ObservedSpan`. The kernel opens:

- `run`   once per drive of a run (a start, each resume), around every step it takes;
- `step`  one governed step (a model's turn, a continued ticket, a recovered intent), with
          the decision, rule, reason code and policy hash as attributes once recorded;
- `model` one model call (`gen_ai.*` attributes: operation, model, usage);
- `tool`  one tool call (`gen_ai.tool.name`, `gen_ai.tool.call.id`); the tool gets the span's
          trace context in `ToolContext.trace`, to pass on to what it calls.

Spans nest by the caller's context (the OpenTelemetry observer uses the current span), so an
observer holds no state per run. Attributes are identifiers, names, counts and decisions: never
a tool's arguments or results (sensitive values included), nor prompts. The OpenTelemetry
implementation is `tether.otel` (extra `tether[otel]`); the default observer does nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Literal, Protocol

AttrValue = str | bool | int | float
Attributes = Mapping[str, AttrValue | None]
SpanKind = Literal["run", "step", "model", "tool"]


class ObservedSpan(Protocol):
    def set(self, attributes: Attributes) -> None:
        """Add attributes (None values are left out)."""

    def carrier(self) -> dict[str, str]:
        """This span's trace context as headers (W3C `traceparent`), for a tool to pass on."""


class Observer(Protocol):
    def span(
        self, kind: SpanKind, name: str, attributes: Attributes
    ) -> contextlib.AbstractContextManager[ObservedSpan]:
        """A span around a unit of work; an exception raised inside marks it failed."""


class _NoSpan:
    def set(self, attributes: Attributes) -> None:
        return None

    def carrier(self) -> dict[str, str]:
        return {}


NO_SPAN = _NoSpan()


class NoObserver:
    """The default: observes nothing, costs a context manager per span."""

    @contextlib.contextmanager
    def span(self, kind: SpanKind, name: str, attributes: Attributes) -> Iterator[ObservedSpan]:
        yield NO_SPAN


NO_OBSERVER = NoObserver()
