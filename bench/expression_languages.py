"""Measure the candidate policy expression languages on a typical policy condition.

Prints mean microseconds per evaluation of one compiled condition over a refund call's
arguments and run data, for CEL (Rust, `common-expression-language`), CEL (pure Python,
`cel-python`) and Cedar (`cedarpy`). The choice is recorded in docs/decisions.md.

Run: .venv/bin/python bench/expression_languages.py
"""

from __future__ import annotations

import time
from collections.abc import Callable

CONDITION = "args.amount > 100.0 && args.amount <= 500.0 && data.customer_tier != 'blocked'"
ARGS = {"amount": 250.0, "order_id": "A-1001"}
DATA = {"customer_tier": "gold", "order_total": 900.0}
ROUNDS = 2000


def _time(fn: Callable[[], object], rounds: int = ROUNDS) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(rounds):
        fn()
    return (time.perf_counter() - start) / rounds * 1e6


def cel_rust() -> float:
    import cel

    program = cel.compile(CONDITION)
    assert program.execute({"args": ARGS, "data": DATA}) is True
    return _time(lambda: program.execute({"args": ARGS, "data": DATA}))


def cel_python() -> float:
    import celpy

    env = celpy.Environment()
    program = env.program(env.compile(CONDITION))

    def run() -> object:
        return program.evaluate({"args": celpy.json_to_cel(ARGS), "data": celpy.json_to_cel(DATA)})

    assert bool(run()) is True
    return _time(run, rounds=ROUNDS // 10)


def cedar() -> float:
    import cedarpy

    policies = """
    permit(principal, action == Action::"refund", resource)
    when { context.amount > 100 && context.amount <= 500 && context.customer_tier != "blocked" };
    """
    request = {
        "principal": 'User::"agent"',
        "action": 'Action::"refund"',
        "resource": 'Order::"A-1001"',
        # Cedar has no floats; amounts must be passed as integers (cents, say).
        "context": {"amount": 250, "customer_tier": "gold"},
    }

    def run() -> object:
        return cedarpy.is_authorized(request, policies, [])

    assert run().allowed
    return _time(run, rounds=ROUNDS // 4)


def main() -> None:
    rows = [
        ("CEL, common-expression-language (Rust)", cel_rust()),
        ("CEL, cel-python (pure Python)", cel_python()),
        ("Cedar, cedarpy (Rust, per request)", cedar()),
    ]
    print(f"{'candidate':<42} {'µs per evaluation':>18}")
    for name, micros in rows:
        print(f"{name:<42} {micros:>18.1f}")


if __name__ == "__main__":
    main()
