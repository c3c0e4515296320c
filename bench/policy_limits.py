"""Measure what the policy and YAML limits guard against, and what they cost.

1. Where the CEL engine crashes: the number of terms of `1 + 1 + …` at which compiling or
   evaluating kills the process (each probe in a child process), on the main thread's
   stack and on a 1 MB thread stack.
2. Whether the engine releases the GIL while it evaluates (if not, a thread cannot keep an
   event loop responsive during one decision).
3. A quadratic condition over a list argument at the default bound and at ten times it.
4. The retail rule `items-belong-to-the-order` at the retail tools' bound and beyond, in
   its worst case (every id distinct and in an order as long as the list).
5. The strict YAML loader on hostile files.

The figures are recorded in docs/decisions.md and docs/policy.md.

Run: .venv/bin/python bench/policy_limits.py
"""

from __future__ import annotations

import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cel

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tether.policy import Policy  # noqa: E402
from tether.strict_yaml import load_yaml  # noqa: E402
from tether.tools import MAX_ITEMS  # noqa: E402

PROBE = """
import cel, sys, threading
terms, mode, stack = int(sys.argv[1]), sys.argv[2], int(sys.argv[3])
def go():
    program = cel.compile(" + ".join(["1"] * terms))
    if mode == "run":
        program.execute({})
if stack:
    threading.stack_size(stack)
    t = threading.Thread(target=go); t.start(); t.join()
else:
    go()
"""


def _survives(terms: int, mode: str, stack: int) -> bool:
    probe = [sys.executable, "-c", PROBE, str(terms), mode, str(stack)]
    return subprocess.run(probe, capture_output=True, timeout=120).returncode == 0


def crash_threshold(mode: str, stack: int = 0) -> tuple[int, int]:
    """(largest size that survived, smallest that crashed), to within 2%."""
    good, bad = 1, 2
    while _survives(bad, mode, stack):
        good, bad = bad, bad * 2
    while bad - good > max(1, good // 50):
        middle = (good + bad) // 2
        good, bad = (middle, bad) if _survives(middle, mode, stack) else (good, middle)
    return good, bad


def gil_held() -> tuple[float, int]:
    """Seconds one evaluation took, and how often a 1 ms ticker thread ran meanwhile."""
    ids = [str(i) for i in range(2_000)]
    program = cel.compile("ids.all(i, size(ids.filter(x, x == i)) <= 1)")
    ticks, done = [0], [False]

    def tick() -> None:
        while not done[0]:
            ticks[0] += 1
            time.sleep(0.001)

    ticker = threading.Thread(target=tick)
    ticker.start()
    start = time.perf_counter()
    program.execute({"ids": ids})
    elapsed = time.perf_counter() - start
    done[0] = True
    ticker.join()
    return elapsed, ticks[0]


def _median_ms(fn: Callable[[], Any], rounds: int) -> float:
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def quadratic(items: int) -> float:
    policy = Policy.from_dict(
        {
            "rules": [
                {
                    "id": "no-repeats",
                    "tool": "t",
                    "when": "!args.ids.all(i, size(args.ids.filter(x, x == i)) <= 1)",
                    "decision": "deny",
                }
            ]
        },
        evaluation_budget=1e9,
    )
    variables = {"args": {"ids": [str(i) for i in range(items)]}}
    return _median_ms(lambda: policy.decide(kind="tool", name="t", effect="write", variables=variables), 5)


def retail_rule(items: int) -> float:
    retail = Policy.from_file(ROOT / "examples" / "retail" / "policy.yaml")
    rule = next(r for r in retail.rules if r.id == "items-belong-to-the-order")
    policy = Policy.from_dict({"rules": [rule.model_dump(exclude_none=True)]}, evaluation_budget=1e9)
    ids = [f"{i:010d}" for i in range(items)]
    order = {"items": [{"item_id": i} for i in ids]}
    variables = {"args": {"order_id": "#W1", "item_ids": ids, "payment_method_id": "gift_card_1"}}

    def decide() -> None:
        decision = policy.decide(
            kind="tool",
            name="return_delivered_order_items",
            effect="write",
            variables=variables,
            resolvers={"order": lambda order_id: order},
        )
        assert decision.evaluated == {"items-belong-to-the-order": False}

    return _median_ms(decide, 5 if items <= 100 else 1)


def hostile_yaml() -> list[tuple[str, float, str]]:
    laughs = ["l0: &l0 [" + ", ".join(["lol"] * 10) + "]"]
    laughs += [f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * 10) + "]" for n in range(1, 10)]
    files = {
        "nested 20,000 deep": "[" * 20_000 + "]" * 20_000,
        "billion laughs (10 anchors of 10)": "\n".join(laughs),
    }
    rows = []
    for name, text in files.items():
        start = time.perf_counter()
        try:
            load_yaml(text)
            outcome = "loaded"
        except Exception as exc:
            outcome = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        rows.append((name, (time.perf_counter() - start) * 1000, outcome))
    return rows


def main() -> None:
    print("CEL engine, `1 + 1 + …`: largest size that survived / smallest that crashed")
    for mode in ("compile", "run"):
        print(f"  {mode:<8} main thread (8 MB stack): {crash_threshold(mode)}")
    print(f"  run      1 MB thread stack:        {crash_threshold('run', 1 << 20)}")
    elapsed, ticks = gil_held()
    print(f"GIL: one {elapsed:.2f} s evaluation let a 1 ms ticker thread run {ticks} times")
    for items in (MAX_ITEMS, 10 * MAX_ITEMS):
        print(f"quadratic condition over {items} items: {quadratic(items):.1f} ms per decision")
    for items in (5, 50, 100, 200):
        print(f"items-belong-to-the-order, {items} ids of a {items}-item order: {retail_rule(items):.1f} ms")
    for name, ms, outcome in hostile_yaml():
        print(f"strict YAML, {name}: {ms:.0f} ms, {outcome}")


if __name__ == "__main__":
    main()
