"""Shared fixtures: a real SQLite journal per test and a small shop workflow to govern."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether import AgentState, Budget, Evidence, Policy, RunBudget, Terminal, ToolContext, Workflow, tool
from tether.journal import Journal, open_journal
from tether.run import messages_for
from tether.timeline import timeline

# The test files that take longest (docs/testing.md), collected first: `make test` hands each
# file whole to one process (pytest-xdist, --dist loadfile) in collection order, and a long
# file handed out last would leave the other processes idle at the end.
SLOW_FIRST = (
    "test_retail_conformance.py",
    "hostile/test_cli_edges.py",
    "test_workers.py",
    "test_mcp_gateway.py",
    "test_model_local.py",
    "test_cli_e2e.py",
    "test_serve_schema.py",
    "test_webhooks.py",
    "test_mcp_tools.py",
    "test_scenarios.py",
    "test_audit.py",
    "test_model_openai.py",  # apart from test_model_local: each keeps the cores busy
    "test_crash.py",
    "test_people_cli.py",
    "test_serve_race.py",
    "test_serve_api.py",
    "test_escalations.py",
    "test_gateway_retail.py",
    "test_mcp_gateway_product.py",
    "test_integration_restarts.py",
    "test_integration_langgraph.py",
    "test_integration_pydantic_ai.py",
    "test_integration_openai_agents.py",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    here = Path(__file__).parent
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}

    def file_rank(item: pytest.Item) -> int:
        name = item.path.relative_to(here).as_posix() if item.path.is_relative_to(here) else ""
        return rank.get(name, len(rank))

    items.sort(key=file_rank)  # stable: within a file, and among the others, the order is kept


@pytest.fixture
def journal(tmp_path: Path) -> Iterator[Journal]:
    j = open_journal(str(tmp_path / "journal.db"))
    yield j
    try:
        if os.environ.get("TETHER_REPLAY_EVERY_RUN") == "1":
            replay_every_run(j)
    finally:
        j.close()


def replay_every_run(journal: Journal) -> None:
    """Replay every run a test left in its journal (`TETHER_REPLAY_EVERY_RUN=1`): each must
    reproduce its recorded decisions without acting (tether.replay)."""
    from tether.replay import replay_run

    async def every() -> list[dict[str, Any]]:
        reports = [await replay_run(journal, r.run_id) for r in await journal.list_runs(limit=1_000_000)]
        return [r.as_dict() for r in reports if not r.ok]

    assert asyncio.run(every()) == []


class Shop:
    """Tools over an in-memory order book that record every real execution."""

    def __init__(self) -> None:
        self.orders: dict[str, dict[str, Any]] = {"A1": {"total": 80.0, "status": "paid"}}
        self.refunds: list[tuple[str, float]] = []
        self.executed: list[str] = []
        self.keys: list[str] = []  # the idempotency key of each refund

        def refunded(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
            ok = (args["order_id"], args["amount"]) in self.refunds
            return Evidence(ok=ok, detail={"refunds": len(self.refunds)})

        def order_read(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
            return Evidence(facts={"order_total": self.orders[args["order_id"]]["total"]})

        @tool(effect="read", verify=order_read)
        def read_order(order_id: str) -> dict[str, Any]:
            """Read an order."""
            self.executed.append("read_order")
            return self.orders[order_id]

        @tool(effect="write", verify=refunded)
        def refund(order_id: str, amount: float, ctx: ToolContext) -> dict[str, Any]:
            """Refund part of an order."""
            self.keys.append(ctx.idempotency_key)
            self.executed.append("refund")
            self.refunds.append((order_id, amount))
            return {"ok": True}

        @tool(effect="write")
        def delete_order(order_id: str) -> None:
            """Never allowed in the shop state."""
            self.executed.append("delete_order")

        self.read_order, self.refund, self.delete_order = read_order, refund, delete_order

    def workflow(
        self,
        policy: dict[str, Any] | None = None,
        budget: Budget | None = None,
        resolvers: dict[str, Any] | None = None,
        run_budget: RunBudget | None = None,
        **agent: Any,
    ) -> Workflow:
        shop = AgentState(
            "shop",
            "Help the customer.",
            (self.read_order, self.refund),
            {"done": "done", "finish": "done", "to_admin": "admin"},
            budget=budget or Budget(max_steps=10, max_tool_calls=5),
            escalate_to="supervisor",
            handoff_to=("billing",),
            **agent,
        )
        admin = AgentState("admin", "Admin only.", (self.delete_order,), {"done": "done"})
        rules = (
            policy
            if policy is not None
            else {
                "rules": [
                    {
                        "id": "refund-ask",
                        "tool": "refund",
                        "when": "args.amount > 50.0",
                        "decision": "ask",
                        "approver": "supervisor",
                    },
                    {"id": "refund-ok", "tool": "refund", "decision": "allow"},
                ]
            }
        )
        return Workflow(
            "shop",
            "1",
            "shop",
            [shop, admin, Terminal("done")],
            policy=Policy.from_dict(rules, "test-policy"),
            resolvers=resolvers,
            budget=run_budget,
        )


@pytest.fixture
def shop() -> Shop:
    return Shop()


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def call(tool_name: str, **args: Any) -> dict[str, Any]:
    return {"kind": "tool_call", "tool": tool_name, "args": args}


def step_rows(journal: Journal, run_id: str) -> list[dict[str, Any]]:
    """A run's governed and deterministic steps as `tether show --json` lists them, with the
    decision in full and what the model was shown of each (`observation`)."""
    entries = run(journal.read_entries(run_id))
    rows = []
    for entry, row in zip(entries, timeline(entries), strict=True):
        if row["kind"] != "step":
            continue
        record = entry.body
        decision = getattr(record, "decision", None)
        seen = messages_for(record, entry.step_id)
        rows.append(
            row
            | {
                "decision": decision.as_dict() if decision is not None else None,
                "observation": seen[-1].content if seen else None,
                "record": record,
            }
        )
    return rows
