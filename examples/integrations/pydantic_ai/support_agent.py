"""A support agent written with pydantic-ai, every tool call governed by tether.

Offline: the model is pydantic-ai's FunctionModel with a scripted `support_model` (it reads
commands such as "refund 70 on order A1" from the prompt); swap in any real model. The shop
is a JSON file next to the journal, so its effects are visible across processes.

    python examples/integrations/pydantic_ai/support_agent.py --db demo.db "refund 70 on order A1"
    #  paused: ticket tkt_... waits for a supervisor; conversation saved to demo.db.conversation.json
    tether approve tkt_... --db demo.db
    python examples/integrations/pydantic_ai/support_agent.py --db demo.db --resume
    tether show run_... --db demo.db

"delete order A1" is refused by policy (the model reads why); "refund 20 on order A1" runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
from pathlib import Path
from typing import Any

from pydantic_ai import Agent
from pydantic_ai.conversation import Conversation, ConversationTypeAdapter
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.tools import DeferredToolRequests
from pydantic_ai.toolsets import FunctionToolset

from tether import Evidence, Policy, ToolContext
from tether.integrations.pydantic_ai import Governance, resume_results, tool_context
from tether.journal import Journal, open_journal

HERE = Path(__file__).resolve().parent
POLICY = HERE / "policy.yaml"
ORDERS = {"A1": {"total": 80.0, "status": "paid"}, "B2": {"total": 15.0, "status": "paid"}}


class Shop:
    """The system the agent acts on: orders and refunds in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        if not path.exists():
            self.save({"orders": ORDERS, "refunds": [], "deleted": []})

    def load(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads(self.path.read_text())
        return data

    def save(self, data: dict[str, Any]) -> None:
        self.path.write_text(json.dumps(data, indent=1))

    def toolset(self) -> FunctionToolset[None]:
        def read_order(order_id: str) -> dict[str, Any]:
            """Read an order: its total and status."""
            order: dict[str, Any] = self.load()["orders"][order_id]
            return order

        def refund(order_id: str, amount: float) -> dict[str, Any]:
            """Refund part of an order."""
            context = tool_context()  # tether's: the idempotency key goes with the refund
            data = self.load()
            key = context.idempotency_key if context else None
            data["refunds"].append({"order_id": order_id, "amount": amount, "key": key})
            self.save(data)
            return {"refunded": amount}

        def delete_order(order_id: str) -> dict[str, Any]:
            """Delete an order."""
            data = self.load()
            data["deleted"].append(order_id)
            self.save(data)
            return {"deleted": order_id}

        return FunctionToolset([read_order, refund, delete_order])

    def order_read(self, args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
        """read_order's verifier: what the policy may rely on afterwards (facts)."""
        order = self.load()["orders"][args["order_id"]]
        return Evidence(facts={"order_id": args["order_id"], "order_total": order["total"]})

    def refund_landed(self, args: dict[str, Any], result: Any, ctx: ToolContext) -> Evidence:
        """refund's verifier: the refund is in the ledger, under this call's idempotency key."""
        refunds = self.load()["refunds"]
        ok = {"order_id": args["order_id"], "amount": args["amount"], "key": ctx.idempotency_key} in refunds
        return Evidence(ok=ok, detail={"refunds": len(refunds)})


def governance(journal: Journal, shop: Shop) -> Governance:
    return Governance(
        journal,
        name="support-agent",
        policy=Policy.from_file(POLICY),
        effects={"read_order": "read", "refund": "write", "delete_order": "write"},
        verify={"read_order": shop.order_read, "refund": shop.refund_landed},
    )


def build_agent(governed: Governance, shop: Shop) -> Agent[None, str | DeferredToolRequests]:
    return Agent(
        FunctionModel(support_model),
        toolsets=[governed.wrap(shop.toolset())],
        output_type=[str, DeferredToolRequests],
        instructions="Help the customer with their orders.",
    )


COMMAND = re.compile(r"(read|delete) order (\w+)|refund ([\d.]+) on order (\w+)")


def support_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """A scripted model: for each command of the latest prompt, the next tool call it needs
    (a refund reads the order first); when every command has its answer, a summary."""
    prompt_at = max(
        i
        for i, m in enumerate(messages)
        if isinstance(m, ModelRequest) and any(isinstance(p, UserPromptPart) for p in m.parts)
    )
    prompt = next(str(p.content) for p in messages[prompt_at].parts if isinstance(p, UserPromptPart))
    returned = [
        p
        for m in messages[prompt_at:]
        if isinstance(m, ModelRequest)
        for p in m.parts
        if isinstance(p, ToolReturnPart)
    ]
    # Each tool once per order: whatever came back (a result, a denial) is the answer to report.
    done = {(p.tool_name, _args(messages, p.tool_call_id).get("order_id")) for p in returned}
    calls: list[ToolCallPart] = []
    for match in COMMAND.finditer(prompt):
        verb, order, amount, refund_order = match.groups()
        wanted = (
            [
                ("read_order", {"order_id": refund_order}),
                ("refund", {"order_id": refund_order, "amount": float(amount)}),
            ]
            if amount
            else [(f"{verb}_order", {"order_id": order})]
        )
        todo = [(tool, args) for tool, args in wanted if (tool, args["order_id"]) not in done]
        if todo:
            calls.append(ToolCallPart(todo[0][0], todo[0][1]))
    if calls:
        return ModelResponse(parts=calls)
    lines = [f"{p.tool_name}: {p.outcome}: {p.model_response_str()}" for p in returned]
    return ModelResponse(parts=[TextPart("\n".join(lines) or "nothing to do")])


def _args(messages: list[ModelMessage], call_id: str) -> dict[str, Any]:
    for m in messages:
        if isinstance(m, ModelResponse):
            for p in m.parts:
                if isinstance(p, ToolCallPart) and p.tool_call_id == call_id:
                    return p.args_as_dict()
    return {}


async def main(db: str, prompt: str | None) -> str:
    saved = Path(f"{db}.conversation.json")
    shop = Shop(Path(f"{db}.shop.json"))
    journal = open_journal(db)
    try:
        async with governance(journal, shop) as governed:
            agent = build_agent(governed, shop)
            if prompt is None:  # resume the paused conversation: tether carries out the decision
                conversation = ConversationTypeAdapter.validate_json(saved.read_bytes())
                assert conversation.deferred_tool_requests is not None, "nothing to resume"
                results = resume_results(conversation.deferred_tool_requests)
                result = await agent.run(conversation=conversation, deferred_tool_results=results)
            else:
                result = await agent.run(prompt)
            saved.write_bytes(ConversationTypeAdapter.dump_json(result.conversation))
            return describe(result.output, result.conversation, governed)
    finally:
        await journal.aclose()


def describe(output: str | DeferredToolRequests, conversation: Conversation, governed: Governance) -> str:
    run = governed.run_id_for(conversation.conversation_id)
    if isinstance(output, str):
        return f"{output}\n(tether run {run})"
    tickets = [m["tether"]["ticket_id"] for m in output.metadata.values() if "tether" in m]
    return (
        f"paused: waiting on ticket(s) {', '.join(tickets)}; a person decides (tether approve TICKET "
        f"or tether deny TICKET), then run this again with --resume\n(tether run {run})"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("prompt", nargs="?", help='e.g. "refund 70 on order A1"')
    parser.add_argument("--db", default="tether.db", help="the tether journal (SQLite path)")
    parser.add_argument("--resume", action="store_true", help="resume the saved, paused conversation")
    options = parser.parse_args()
    if (options.prompt is None) != options.resume:
        parser.error("give a prompt, or --resume")
    print(asyncio.run(main(options.db, options.prompt)))
