"""Measure what provenance costs: indexing a run's observations and tracing a proposal.

A synthetic run of 1,000 observations (as the runtime records them: `executed` entries):
untrusted inbox pages (five emails of about 600 characters each, some carrying an IBAN, a
phone number, a URL or an address), untrusted transaction lists (ten transactions with
memos) and trusted records (a customer with contacts). Then:

1. Indexing: the time to index the 1,000 entries (what a resumed run pays once, and what a
   live run pays in small pieces at the decision after each observation), and the memory
   the index holds.
2. Tracing: the time to trace the security-relevant arguments of one proposal over that
   index — an IBAN re-spaced, an address lower-cased, a URL with a domain in its query, an
   email body carrying an address, a value nobody saw — median and 95th percentile.
3. A whole decision (`Policy.decide`, the run's evaluation context kept) of `send_money`
   with and without `provenance: {untrusted: ask}`, and with a rule calling
   `provenance(args.recipient)`.

The figures are recorded in docs/provenance.md.

Run: .venv/bin/python bench/provenance.py [--observations N]
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from benchkit import describe_machine  # noqa: E402

from tether.journal import Entry, bodies  # noqa: E402
from tether.journal.records import NewEntry  # noqa: E402
from tether.policy import Policy  # noqa: E402
from tether.provenance import SeenValues  # noqa: E402

WORDS = [
    "the",
    "meeting",
    "invoice",
    "please",
    "find",
    "attached",
    "report",
    "quarter",
    "budget",
    "review",
    "schedule",
    "team",
    "call",
    "project",
    "update",
    "payment",
    "account",
    "transfer",
    "customer",
    "order",
    "delivery",
    "thanks",
    "regards",
    "tomorrow",
    "friday",
    "office",
    "travel",
    "hotel",
    "booking",
    "flight",
    "reservation",
    "confirm",
    "details",
    "question",
    "summary",
]


def _iban(rng: random.Random) -> str:
    digits = "".join(rng.choice("0123456789") for _ in range(18))
    return "DE" + digits[:2] + " " + " ".join(digits[i : i + 4] for i in range(2, 18, 4)) + " " + digits[18:]


def _text(rng: random.Random, chars: int) -> str:
    words: list[str] = []
    while sum(len(w) + 1 for w in words) < chars:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def _observation(rng: random.Random, i: int) -> tuple[str, Any, bool]:
    """(tool, result, untrusted) of the i-th observation."""
    if i % 3 == 0:
        emails = []
        for j in range(5):
            body = _text(rng, 600)
            carried = rng.choice(
                [
                    f" send it to {_iban(rng)}",
                    f" call +49 30 {rng.randint(1000000, 9999999)}",
                    f" see https://site{i}-{j}.example/offer?id={i}",
                    f" write to person{i}.{j}@mail{j}.example",
                    "",
                ]
            )
            emails.append(
                {"from": f"sender{i}.{j}@corp.example", "subject": _text(rng, 40), "body": body + carried}
            )
        return "read_inbox", emails, True
    if i % 3 == 1:
        rows = [
            {"id": i * 10 + k, "amount": round(rng.uniform(1, 2000), 2), "memo": _text(rng, 60)}
            for k in range(10)
        ]
        return "get_transactions", rows, True
    contacts = [{"name": f"Contact {i}-{k}", "iban": _iban(rng)} for k in range(3)]
    return "get_customer", {"id": f"C{i}", "email": f"customer{i}@shop.example", "contacts": contacts}, False


def _entries(n: int, seed: int = 7) -> list[Entry]:
    rng = random.Random(seed)
    entries = []
    for i in range(n):
        tool, result, untrusted = _observation(rng, i)
        record = bodies.Executed(
            tool=tool,
            args={},
            decision=_allow(),
            result=result,
            untrusted=untrusted,
        )
        new = NewEntry.of(record, step_id=f"s{i + 1}", state="work")
        entries.append(
            Entry("run_bench", i + 2, new.kind, new.step_id, new.state, new.body_json, "", "", 0.0)
        )
    return entries


def _allow() -> Any:
    from tether.decision import Decision
    from tether.reasons import ReasonCode

    return Decision("allow", "default:read", ReasonCode.POLICY_ALLOWED)


def _index(entries: list[Entry]) -> tuple[SeenValues, float]:
    started = time.perf_counter()
    seen = SeenValues()
    seen.add_input({"task": "pay the electricity bill and answer Anna at anna@home.example"})
    for e in entries:
        seen.add_entry(e)
    seen.trace("settle")  # the index is built when a decision first needs it
    return seen, time.perf_counter() - started


def _held(entries: list[Entry]) -> int:
    """Bytes the index holds (measured apart: tracing allocations slows indexing down)."""
    tracemalloc.start()
    kept = _index(entries)
    held = tracemalloc.get_traced_memory()[0]
    del kept
    tracemalloc.stop()
    return held


def _timed(fn: Any, repeat: int) -> tuple[float, float]:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    times.sort()
    return statistics.median(times), times[int(len(times) * 0.95) - 1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--observations", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=300)
    options = parser.parse_args()
    print(describe_machine(Path("/tmp"), ["common-expression-language", "msgspec"]))
    entries = _entries(options.observations)
    chars = sum(len(e.body_json) for e in entries)
    seen, seconds = min((_index(entries) for _ in range(3)), key=lambda r: r[1])
    memory = _held(entries)
    print(f"\n{options.observations} observations, {chars / 1e6:.1f} MB of results as JSON")
    print(
        f"index: {seconds * 1000:.0f} ms in all, "
        f"{seconds / options.observations * 1e6:.0f} µs per observation; {memory / 1e6:.1f} MB held"
    )

    rng = random.Random(7)
    for i in range(3 * (options.observations // 6)):  # an IBAN the middle of the run carried
        _observation(rng, i)
    inbox = [e for e in entries if e.body.tool == "read_inbox"]  # type: ignore[union-attr]
    carried = next(
        m["body"].split("send it to ")[1]
        for e in inbox[len(inbox) // 2 :]
        for m in e.body.result  # type: ignore[union-attr]
        if "send it to" in m["body"]
    )
    values = {
        "an IBAN re-spaced": carried.replace(" ", ""),
        "an address lower-cased": "SENDER9.1@CORP.EXAMPLE".lower(),
        "a URL with a domain in its query": "https://search.example/?q=site30-2.example",
        "an email body carrying an address": _text(random.Random(1), 500)
        + " reply to person60.1@mail1.example",
        "a value nobody saw": "DE00 1111 2222 3333 4444 55",
        "an amount": 1234.5,
    }
    print("\ntrace one value (median / 95th percentile):")
    for label, value in values.items():
        median, p95 = _timed(lambda v=value: seen.trace(v), options.repeat)
        traced = seen.trace(value)
        verdict = (
            "trusted"
            if traced.trusted
            else "untrusted"
            if traced.untrusted
            else "derived"
            if traced.derived
            else "seen"
        )
        print(
            f"  {label:<36} {median * 1e6:7.0f} µs / {p95 * 1e6:7.0f} µs   "
            f"({verdict}, {len(traced.sources)} sources)"
        )

    tool = {
        "name": "send_money",
        "effect": "external",
        "idempotent": False,
        "effect_declared": True,
        "results": "trusted",
        "security": ["recipient", "amount"],
        "sensitive": False,
    }
    args = {"recipient": carried.replace(" ", ""), "amount": 100.0, "subject": "rent"}
    rules = [{"id": "small", "tool": "send_money", "when": "args.amount < 500.0", "decision": "allow"}]
    policies = {
        "rules only": Policy.from_dict({"rules": rules}),
        "provenance: {untrusted: ask}": Policy.from_dict(
            {"provenance": {"untrusted": "ask"}, "rules": rules}
        ),
        "a rule calling provenance()": Policy.from_dict(
            {
                "rules": [
                    *rules,
                    {
                        "id": "untrusted-recipient",
                        "tool": "send_money",
                        "when": "provenance(args.recipient).untrusted",
                        "decision": "ask",
                    },
                ]
            }
        ),
    }
    print("\none decision of send_money (median / 95th percentile):")
    for label, policy in policies.items():
        evaluation = policy.evaluation({})
        variables = {"args": args, "tool": tool, "data": {}, "facts": {}, "history": [], "run": {}}

        def decide(p: Policy = policy, ev: Any = evaluation, vs: dict[str, Any] = variables) -> Any:
            return p.decide(
                kind="tool",
                name="send_money",
                effect="external",
                variables=vs,
                evaluation=ev,
                provenance=seen.trace if p.uses_provenance else None,
            )

        median, p95 = _timed(decide, options.repeat)
        d = decide()
        print(f"  {label:<36} {median * 1e6:7.0f} µs / {p95 * 1e6:7.0f} µs   ({d.decision} by {d.rule_id})")


if __name__ == "__main__":
    main()
