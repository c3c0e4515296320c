"""The expiry sweeper and rollback, measured: how fast tickets nobody decided are expired
(and their runs escalated), and what a rollback costs per compensation.

1. Sweep: N runs each paused on an approval ticket that expires 0.2 s after it was opened
   (half of the rules say `on_expiry: {escalate: finance}`, half the default `deny`). Once
   all are due, one `sweep_expired(store, limit=N)` is timed: each ticket is expired in a
   transaction of its own, with its run's `ticket_expired` entry (and, for `escalate`, the
   escalation). Reported: tickets per second, and ms per ticket.
2. Rollback: a run that made K charges, each compensated by a refund, is cancelled with
   rollback (`Operations.cancel(..., rollback=True)`): the plan, then per charge a policy
   decision, a synced intent, the call and its record, then the outcome. Reported: the
   whole cancel, and ms per compensation.

SQLite (default durability) in a temporary folder, and PostgreSQL at $TETHER_TEST_PG (in a
schema of its own) when it is reachable. No timing is asserted anywhere.

Run:  .venv/bin/python bench/escalations.py [--runs 500] [--effects 50] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(HERE))

from benchkit import describe_machine  # noqa: E402

from tether import AgentState, Budget, Policy, Runtime, ScriptedModel, Terminal, ToolContext, Workflow, tool  # noqa: E402
from tether.identity import Principal  # noqa: E402
from tether.journal import Journal, open_journal  # noqa: E402
from tether.operations import Operations  # noqa: E402
from tether.sweeper import sweep_expired  # noqa: E402

PG_URL = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def workflow(escalate: bool, effects: int = 1) -> Workflow:
    @tool(effect="write", idempotent=True)
    def refund_charge(charge_id: str, ctx: ToolContext) -> dict[str, Any]:
        """Refund a charge."""
        return {"refunded": charge_id}

    @tool(effect="write", idempotent=True)
    def charge(card: str, amount: float, ctx: ToolContext) -> dict[str, Any]:
        """Charge a card."""
        return {"charge_id": f"ch_{ctx.step_id}"}

    charge.compensate_with(refund_charge, {"charge_id": "result.charge_id"})
    ask: dict[str, Any] = {
        "id": "big",
        "tool": "charge",
        "when": "args.amount > 100.0",
        "decision": "ask",
        "approver": "boss",
        "expires_in": 0.2,
    }
    if escalate:
        ask["on_expiry"] = {"escalate": "finance"}
    rules = [ask, {"id": "charge-ok", "tool": "charge", "decision": "allow"}]
    rules.append({"id": "refund-ok", "tool": "refund_charge", "decision": "allow"})
    budget = Budget(max_steps=effects + 5, max_tool_calls=effects + 1)
    pay = AgentState("pay", "Charge.", (charge,), {"done": "done"}, budget=budget, escalate_to="ops")
    policy = Policy.from_dict({"rules": rules}, "bench-policy")
    return Workflow("bench", "1", "pay", [pay, Terminal("done")], policy=policy)


def call(amount: float) -> dict[str, Any]:
    return {"kind": "tool_call", "tool": "charge", "args": {"card": "4242", "amount": amount}}


async def sweep(journal: Journal, runs: int) -> dict[str, float]:
    flows = {True: workflow(True), False: workflow(False)}
    runtime = Runtime(journal)
    for i in range(runs):
        result = await runtime.start(
            flows[i % 2 == 0], ScriptedModel([call(500.0)]), workflow_ref="bench/wf.yaml"
        )
        assert result.status == "paused"
    await asyncio.sleep(0.5)
    started = time.perf_counter()
    expired = await sweep_expired(journal, limit=runs)
    seconds = time.perf_counter() - started
    assert expired == runs, expired
    escalated = len(await journal.list_runs("escalated", limit=runs))
    assert escalated == runs // 2 + runs % 2, escalated
    return {
        "tickets": expired,
        "seconds": seconds,
        "per_second": expired / seconds,
        "ms_each": 1000 * seconds / expired,
    }


async def rollback(journal: Journal, effects: int) -> dict[str, float]:
    wf = workflow(False, effects)
    script = [call(10.0 + i) for i in range(effects)]
    result = await Runtime(journal).start(wf, ScriptedModel(script))  # escalates when the script ends
    assert result.status == "escalated", result

    async def load(record: Any) -> Workflow:
        return wf

    by = Principal(principal_id="bench", name="bench", kind="service", role="operator")
    started = time.perf_counter()
    outcome = await Operations(journal, load=load).cancel(result.run_id, by, "bench", rollback=True)
    seconds = time.perf_counter() - started
    assert outcome.rollback is not None and len(outcome.rollback.compensated) == effects
    return {"effects": effects, "seconds": seconds, "ms_each": 1000 * seconds / effects}


def stores(tmp: Path) -> list[tuple[str, str, Any]]:
    found: list[tuple[str, str, Any]] = [("SQLite", str(tmp / "journal.db"), None)]
    try:
        import psycopg

        psycopg.connect(PG_URL, connect_timeout=3).close()
    except Exception as exc:
        print(f"(PostgreSQL not measured: {exc})")
        return found
    schema = "tether_bench_" + secrets.token_hex(4)
    with psycopg.connect(PG_URL, autocommit=True) as conn:
        conn.execute(f"CREATE SCHEMA {schema}")
    url = f"{PG_URL}{'&' if '?' in PG_URL else '?'}options=-csearch_path%3D{schema}"
    found.append(("PostgreSQL", url, schema))
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--effects", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="100 runs, 10 effects")
    args = parser.parse_args()
    runs, effects = (100, 10) if args.quick else (args.runs, args.effects)
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        print(describe_machine(tmp, ["msgspec", "psycopg"]))
        print()
        head = f"| store | sweep {runs} due tickets | tickets/s | ms per ticket "
        print(head + f"| rollback of {effects} effects | ms per compensation |")
        print("|---|---|---|---|---|---|")
        for name, target, schema in stores(tmp):
            journal = open_journal(target)
            try:
                swept = asyncio.run(sweep(journal, runs))
                rolled = asyncio.run(rollback(journal, effects))
            finally:
                journal.close()
                if schema is not None:
                    import psycopg

                    with psycopg.connect(PG_URL, autocommit=True) as conn:
                        conn.execute(f"DROP SCHEMA {schema} CASCADE")
            print(
                f"| {name} | {swept['seconds']:.3f} s | {swept['per_second']:,.0f} | {swept['ms_each']:.2f} "
                f"| {rolled['seconds']:.3f} s | {rolled['ms_each']:.2f} |"
            )


if __name__ == "__main__":
    main()
