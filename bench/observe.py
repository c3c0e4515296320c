"""What sensitive fields and OpenTelemetry spans add to a governed step.

One agent state whose model (a `FunctionModel`) proposes a `read` tool N times (the argument
changes every step), then exits, on a real SQLite file in a temporary directory. Four
configurations, each run in turn within every repetition:

* plain:      no sensitive field, no observer (the default);
* sensitive:  the tool's `card` parameter and `result.token` declared sensitive (an HMAC per
              field, a placeholder in the entry, the exchange scrubbed);
* otel:       `OtelObserver` over an SDK TracerProvider with a SimpleSpanProcessor into an
              InMemorySpanExporter (4 spans per step: step, chat, execute_tool, + the run's);
* both.

Prints the median µs per step over the repetitions (lowest and highest in brackets) and the
difference to plain. No timing is asserted: this is a report.

Run:  PYTHONPATH=src .venv/bin/python bench/observe.py [--steps 300] [--repeat 5]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from tether import (
    AgentState,
    Budget,
    FunctionModel,
    ModelContext,
    ModelReply,
    Policy,
    Runtime,
    Sensitive,
    Terminal,
    Workflow,
    tool,
)
from tether.journal import open_journal
from tether.models import Exchange
from tether.otel import OtelObserver

os.environ.setdefault("TETHER_FINGERPRINT_KEY", "bench-key-" + "x" * 32)


def workflow(sensitive: bool, steps: int) -> Workflow:
    if sensitive:

        @tool(effect="read", name="pay")
        def pay_s(card: Annotated[str, Sensitive], i: int) -> dict[str, Any]:
            return {"token": f"tok_{i:08d}_abcdef", "i": i}

        pay_s.declare_sensitive(["result.token"])
        t = pay_s
    else:

        @tool(effect="read", name="pay")
        def pay(card: str, i: int) -> dict[str, Any]:
            return {"token": f"tok_{i:08d}_abcdef", "i": i}

        t = pay
    budget = Budget(max_steps=steps + 5, max_tool_calls=steps + 5, max_seconds=3600.0)
    state = AgentState("s", "Pay.", (t,), {"done": "done"}, budget=budget)
    policy = Policy.from_dict({"rules": [{"id": "ok", "tool": "pay", "decision": "allow"}]}, "p")
    return Workflow("bench", "1", "s", [state, Terminal("done")], policy=policy)


def model(steps: int) -> FunctionModel:
    def propose(ctx: ModelContext) -> ModelReply:
        n = ctx.proposals_made
        output: Any = (
            {"kind": "tool_call", "tool": "pay", "args": {"card": "4111111111111111", "i": n}}
            if n < steps
            else {"kind": "exit", "exit": "done"}
        )
        return ModelReply(output=output, exchange=Exchange(request={"turn": n}, response={"out": output}))

    return FunctionModel(propose, name="bench")


def once(config: str, steps: int, root: Path) -> float:
    sensitive = config in ("sensitive", "both")
    observer = None
    if config in ("otel", "both"):
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(InMemorySpanExporter()))
        observer = OtelObserver(provider)
    journal = open_journal(str(root / f"{config}-{time.monotonic_ns()}.db"))
    wf = workflow(sensitive, steps)
    started = time.perf_counter()
    result = asyncio.run(Runtime(journal, observer=observer).start(wf, model(steps)))
    elapsed = time.perf_counter() - started
    journal.close()
    assert result.status == "completed", result
    return elapsed / steps * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    configs = ("plain", "sensitive", "otel", "both")
    times: dict[str, list[float]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        once("plain", 20, Path(tmp))  # warm up imports and caches
        for _ in range(args.repeat):
            for c in configs:
                times[c].append(once(c, args.steps, Path(tmp)))
    base = statistics.median(times["plain"])
    print(f"{args.steps} read steps per run, {args.repeat} repetitions; µs/step median [min–max]")
    print(f"{'configuration':<12} {'µs/step':>20} {'vs plain':>10}")
    for c in configs:
        m = statistics.median(times[c])
        print(f"{c:<12} {m:>8.0f} [{min(times[c]):.0f}–{max(times[c]):.0f}]{'':>3} {m - base:>+9.0f}")


if __name__ == "__main__":
    main()
