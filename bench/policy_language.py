"""What the policy language's additions cost per decision.

1. Named definitions against the same rules written out: the retail policy (which names the
   order, the customer and the payment method once each) and a copy with every definition
   expanded in place, deciding each case of examples/retail/policy_tests.yaml.
2. Reading `now`: the journal's clock (`Journal.now()`, one query) on SQLite, which a
   decision pays only when its policy reads `now`.
3. The list helpers: `pairs` over a list argument of 10, 100 and 1,000 items.

The figures are recorded in docs/decisions.md.

Run: .venv/bin/python bench/policy_language.py
"""

from __future__ import annotations

import asyncio
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from tether.journal import open_journal  # noqa: E402
from tether.policy import Policy  # noqa: E402
from tether.policy_tooling import run_cases  # noqa: E402
from tether.strict_yaml import load_yaml  # noqa: E402

RETAIL = ROOT / "examples" / "retail"
REPEATS = 200


def expanded(content: dict[str, Any]) -> dict[str, Any]:
    """The policy with each definition written out where it is read (names are whole words)."""
    definitions: dict[str, str] = content.pop("definitions")

    def expand(text: str) -> str:
        for name, body in definitions.items():
            text = re.sub(rf"(?<![\w.]){name}\b", f"({body})", text)
        return text

    for _ in definitions:  # definitions reading definitions: written out first
        definitions = {name: expand(body) for name, body in definitions.items()}
    for rule in content["rules"]:
        if rule.get("when"):
            rule["when"] = expand(rule["when"])
    return content


def per_decision(policy: Policy) -> float:
    """Median µs of `Policy.decide` over the retail cases (their resolvers included)."""
    cases_file = RETAIL / "policy_tests.yaml"
    import tether.policy_tooling as tooling

    spent: list[float] = []
    decide = policy.decide

    def timed(**kw: Any) -> Any:
        started = time.perf_counter()
        try:
            return decide(**kw)
        finally:
            spent.append(time.perf_counter() - started)

    policy.decide = timed  # type: ignore[method-assign]
    real = tooling.Policy.from_file
    tooling.Policy.from_file = lambda path, **kw: policy  # type: ignore[method-assign]
    try:
        run_cases(cases_file)  # warm the resolvers' database cache
        spent.clear()
        for _ in range(REPEATS // 20):
            results = run_cases(cases_file)
    finally:
        tooling.Policy.from_file = real  # type: ignore[method-assign]
    assert all(r.passed for r in results), [r.summary for r in results if not r.passed]
    return statistics.median(spent) * 1e6


def definitions_table() -> None:
    text = (RETAIL / "policy.yaml").read_text()
    named = Policy.from_yaml(text, str(RETAIL / "policy.yaml"))
    inline = Policy.from_dict(expanded(load_yaml(text)), "inline")
    print("## Retail policy: definitions vs written out (one decision, the cases of policy_tests.yaml)")
    print("| policy | µs per decision (median) | characters of conditions and definitions |")
    print("|---|---:|---:|")
    inline_chars = sum(len(r.when or "") for r in inline.rules)
    named_chars = sum(len(r.when or "") for r in named.rules) + sum(
        len(t) for t in named.document.definitions.values()
    )
    print(f"| written out | {per_decision(inline):.0f} | {inline_chars} |")
    print(f"| with definitions | {per_decision(named):.0f} | {named_chars} |")


def now_table() -> None:
    async def measure() -> list[float]:
        with tempfile.TemporaryDirectory() as folder:
            async with open_journal(str(Path(folder) / "j.db")) as journal:
                await journal.now()
                timings = []
                for _ in range(2000):
                    started = time.perf_counter()
                    await journal.now()
                    timings.append(time.perf_counter() - started)
                return timings

    timings = asyncio.run(measure())
    print("\n## Reading `now` from the journal (SQLite)")
    print("| | µs |")
    print("|---|---:|")
    print(f"| median | {statistics.median(timings) * 1e6:.1f} |")
    print(f"| p99 | {sorted(timings)[int(len(timings) * 0.99)] * 1e6:.1f} |")


def helpers_table() -> None:
    policy = Policy.from_dict(
        {
            "rules": [
                {"id": "r", "tool": "t", "when": "pairs(args.xs).all(p, p[0] <= p[1])", "decision": "deny"}
            ]
        }
    )
    print("\n## `pairs(args.xs).all(p, p[0] <= p[1])` per decision")
    print("| items | µs (median) |")
    print("|---:|---:|")
    for size in (10, 100, 1000):
        variables = {"args": {"xs": list(range(size))}}
        timings = []
        for _ in range(REPEATS):
            started = time.perf_counter()
            policy.decide(kind="tool", name="t", effect="write", variables=variables)
            timings.append(time.perf_counter() - started)
        print(f"| {size} | {statistics.median(timings) * 1e6:.0f} |")


if __name__ == "__main__":
    definitions_table()
    now_table()
    helpers_table()
