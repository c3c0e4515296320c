"""A support agent written with the OpenAI Agents SDK, its tool calls governed by tether.

Offline: the SDK's own `ScriptedModel` plays the model (swap in `model="gpt-5"` or any SDK
model to run it for real). The shop is a JSON file next to the journal, so the refund is a
real effect that a verifier re-reads.

    python examples/integrations/openai_agents/support_agent.py start --db /tmp/shop.db
        reads order A1 (allowed), tries to delete it (refused: the model is told why), asks
        to refund 70 (the policy asks a person): the SDK run pauses; its state is saved
    tether approve TICKET --db /tmp/shop.db
    python examples/integrations/openai_agents/support_agent.py resume --db /tmp/shop.db
        a new process restores the saved state; the approved refund runs, once
    tether show RUN --db /tmp/shop.db
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from agents import Agent, RunConfig, Runner, RunState, function_tool
from agents.testing import ScriptedModel, assistant_message, function_call

from tether import Policy
from tether.integrations.openai_agents import GovernedTools, idempotency_key
from tether.journal import open_journal
from tether.tools import Evidence, ToolContext

HERE = Path(__file__).resolve().parent
CONVERSATION = {"conversation_id": "ticket-1042"}  # the SDK run's context names the conversation


class Shop:
    """The shop's orders and refunds, in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            self.save({"orders": {"A1": {"total": 80.0, "status": "paid"}}, "refunds": []})

    def load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path.read_text())
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(data, indent=2))


def governed_agent(db: str, model: ScriptedModel) -> tuple[GovernedTools, Agent[Any], Shop]:
    shop = Shop(Path(db + ".shop.json"))

    @function_tool
    def read_order(order_id: str) -> dict[str, Any]:
        """Read an order: its total and status."""
        order: dict[str, Any] = shop.load()["orders"][order_id]
        return order

    @function_tool
    def refund(order_id: str, amount: float) -> str:
        """Refund part of an order to the customer."""
        data = shop.load()
        data["refunds"].append({"order_id": order_id, "amount": amount, "key": idempotency_key()})
        shop.save(data)
        return f"refunded {amount:.2f} on {order_id}"

    @function_tool
    def delete_order(order_id: str) -> str:
        """Delete an order."""
        data = shop.load()
        del data["orders"][order_id]
        shop.save(data)
        return f"deleted {order_id}"

    def refunded(args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
        """Re-read the shop: the refund is there, under this step's idempotency key."""
        mine = [r for r in shop.load()["refunds"] if r["key"] == ctx.idempotency_key]
        return Evidence(ok=len(mine) == 1 and mine[0]["amount"] == args["amount"], detail={"refunds": mine})

    journal = open_journal(db)
    governed = GovernedTools(
        journal,
        [read_order, refund, delete_order],
        name="support-agent",
        policy=Policy.from_file(HERE / "policy.yaml"),
        effects={"read_order": "read", "refund": "write", "delete_order": "write"},
        verify={"refund": refunded},
    )
    agent = Agent(name="support", instructions="Help with orders.", tools=governed.tools, model=model)
    return governed, agent, shop


RUN_CONFIG = RunConfig(tracing_disabled=True)  # offline: no traces sent anywhere


async def start(db: str) -> str:
    """The conversation until it pauses; returns the ticket a person decides."""
    model = ScriptedModel(
        [
            [function_call("read_order", {"order_id": "A1"}, call_id="call_1")],
            [function_call("delete_order", {"order_id": "A1"}, call_id="call_2")],
            [function_call("refund", {"order_id": "A1", "amount": 70.0}, call_id="call_3")],
        ]
    )
    governed, agent, _ = governed_agent(db, model)
    async with governed:
        result = await Runner.run(agent, "Refund 70 on order A1", context=CONVERSATION, run_config=RUN_CONFIG)
        for item in result.new_items:
            if item.type == "tool_call_output_item":
                print(f"  tool output: {item.output}")
        (waiting,) = await governed.pending(result)
        Path(db + ".state.json").write_text(json.dumps(result.to_state().to_json()))
    await governed.journal.aclose()
    print(f"paused: {waiting.tool} waits on ticket {waiting.ticket_id} ({waiting.ticket.approver} decides)")
    print(f"  approve: tether approve {waiting.ticket_id} --db {db}")
    print(f"  then:    python {sys.argv[0]} resume --db {db}")
    return waiting.ticket_id


async def resume(db: str) -> str | None:
    """Another process: restore the saved run, carry out the person's decision, finish."""
    model = ScriptedModel([[assistant_message("I refunded 70.00 on order A1.")]])
    governed, agent, shop = governed_agent(db, model)
    async with governed:
        state = await RunState.from_json(agent, json.loads(Path(db + ".state.json").read_text()))
        waiting = await governed.apply_decisions(state)
        if waiting:
            ticket = waiting[0].ticket_id
            print(f"still waiting on ticket {ticket}: tether approve {ticket} --db {db}")
            await governed.journal.aclose()
            return None
        result = await Runner.run(agent, state, run_config=RUN_CONFIG)
        conversation = CONVERSATION["conversation_id"]
        await governed.end(conversation, str(result.final_output))  # the tether run completes
        run_id = governed.run_id(conversation)
    await governed.journal.aclose()
    print(f"agent: {result.final_output}")
    print(f"refunds in the shop: {[(r['order_id'], r['amount']) for r in shop.load()['refunds']]}")
    print(f"  timeline: tether show {run_id} --db {db}")
    return str(result.final_output)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("step", choices=["start", "resume"])
    parser.add_argument("--db", default="support-agent.db", help="the tether journal (SQLite file)")
    args = parser.parse_args()
    asyncio.run(start(args.db) if args.step == "start" else resume(args.db))


if __name__ == "__main__":
    main()
