"""Asynchronous resolvers: the lookups a decision needs are awaited before it is made.

A condition may call a lookup that is `async def` (a read over the network, an MCP server's
read tool). The decision is the one a synchronous resolver giving the same values would have
made, recorded the same way; the lookups run concurrently, within the policy's time for
them; one that fails, or is late, denies with `policy_error`; and a run decided with them
replays from what it recorded, without calling them.
"""

from __future__ import annotations

import asyncio
from typing import Any

from conftest import Shop, call, run
from tether import Policy, Runtime, ScriptedModel
from tether.journal import Journal
from tether.replay import replay_run

ORDERS = {"A1": {"owner": "ann", "items": ["i1", "i2"]}, "B2": {"owner": "bob", "items": []}}
ITEMS = {"i1": {"price": 30.0}, "i2": {"price": 45.0}}
POLICY = {
    "definitions": {"the_order": "order(args.order_id)"},
    "rules": [
        {
            "id": "unknown-item",
            "tool": "refund",
            "when": "has(args.item) && item(args.item) == null",
            "decision": "deny",
        },
        {"id": "unknown-order", "tool": "refund", "when": "the_order == null", "decision": "deny"},
        {"id": "not-yours", "tool": "refund", "when": 'the_order.owner != "ann"', "decision": "deny"},
        {
            # A chain: the items' lookups need the order's value first.
            "id": "more-than-paid",
            "tool": "refund",
            "when": "args.amount > sum(the_order.items.map(i, item(i).price))",
            "decision": "deny",
        },
        {"id": "ok", "tool": "refund", "decision": "allow"},
    ],
}


class Lookups:
    """Asynchronous lookups that count how many are in flight at once."""

    def __init__(self, delay: float = 0.01, fail: str | None = None) -> None:
        self.delay, self.fail = delay, fail
        self.calls: list[str] = []
        self.in_flight = self.most = 0

    async def _wait(self, what: str) -> None:
        self.calls.append(what)
        self.in_flight += 1
        self.most = max(self.most, self.in_flight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.in_flight -= 1
        if self.fail == what:
            raise ConnectionError(f"{what}: the upstream is down")

    async def order(self, ctx: Any, order_id: str) -> dict[str, Any] | None:
        await self._wait(f"order {order_id}")
        return ORDERS.get(order_id)

    async def item(self, ctx: Any, item_id: str) -> dict[str, Any] | None:
        await self._wait(f"item {item_id}")
        return ITEMS.get(item_id)

    def resolvers(self) -> dict[str, Any]:
        return {"order": lambda oid: self.order(None, oid), "item": lambda iid: self.item(None, iid)}


def decide(policy: Policy, resolvers: dict[str, Any], **args: Any) -> Any:
    variables = {"args": args, "data": {}, "facts": {}, "history": [], "tool": {"name": "refund"}}
    return asyncio.run(
        policy.adecide(kind="tool", name="refund", effect="write", variables=variables, resolvers=resolvers)
    )


def test_the_decision_is_the_one_synchronous_lookups_of_the_same_values_make() -> None:
    policy = Policy.from_dict(POLICY)
    synchronous = {"order": ORDERS.get, "item": ITEMS.get}
    for amount in (70.0, 80.0):
        lookups = Lookups()
        awaited = decide(policy, lookups.resolvers(), order_id="A1", amount=amount, item="i2")
        variables = {"args": {"order_id": "A1", "amount": amount, "item": "i2"}, "tool": {"name": "refund"}}
        direct = policy.decide(
            kind="tool", name="refund", effect="write", variables=variables, resolvers=synchronous
        )
        assert awaited == direct
    assert (awaited.decision, awaited.rule_id) == ("deny", "more-than-paid")
    assert awaited.resolved == {
        'order("A1")': ORDERS["A1"],
        'item("i1")': ITEMS["i1"],
        'item("i2")': ITEMS["i2"],
    }
    # Lookups a round finds independently are made together: the item and the order first,
    # then the order's items (the map stops at the first one not yet known: one per round).
    assert lookups.most == 2
    assert lookups.calls[:2] == ["item i2", "order A1"] and sorted(lookups.calls) == sorted(
        set(lookups.calls)
    )


def test_a_lookup_that_fails_or_is_late_denies_with_policy_error() -> None:
    policy = Policy.from_dict(POLICY)
    failed = decide(policy, Lookups(fail="item i2").resolvers(), order_id="A1", amount=10.0)
    assert (failed.decision, failed.reason_code) == ("deny", "policy_error")
    assert 'item("i2") failed: ConnectionError: item i2: the upstream is down' in failed.reason

    slow = Policy(policy.document, resolve_seconds=0.05)
    late = decide(slow, Lookups(delay=1.0).resolvers(), order_id="A1", amount=10.0)
    assert (late.decision, late.rule_id, late.reason_code) == ("deny", "policy:lookups", "policy_error")
    assert 'waiting on order("A1")' in late.reason


def test_decide_without_awaiting_refuses_an_asynchronous_resolver() -> None:
    policy = Policy.from_dict(POLICY)
    variables = {"args": {"order_id": "A1", "amount": 10.0}, "tool": {"name": "refund"}}
    decision = policy.decide(
        kind="tool", name="refund", effect="write", variables=variables, resolvers=Lookups().resolvers()
    )
    assert (decision.decision, decision.reason_code) == ("deny", "policy_error")
    assert "resolver 'order' is asynchronous: its decisions are made with Policy.adecide" in decision.reason


def test_a_run_decided_with_asynchronous_lookups_replays_from_what_it_recorded(
    journal: Journal, shop: Shop
) -> None:
    lookups = Lookups()
    workflow = shop.workflow(policy=POLICY, resolvers={"order": lookups.order, "item": lookups.item})
    script = [call("refund", order_id="B2", amount=5.0), call("refund", order_id="A1", amount=20.0)]
    result = run(Runtime(journal).start(workflow, ScriptedModel(script)))
    assert shop.refunds == [("A1", 20.0)]  # bob's order refused, ann's refunded
    made = len(lookups.calls)
    report = run(replay_run(journal, result.run_id))
    assert report.ok and report.summary()["same"] == 2
    assert len(lookups.calls) == made  # replay called nothing
