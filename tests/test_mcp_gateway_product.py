"""The MCP gateway as teams put it in front of MCP clients, driven by the official MCP client
over streamable HTTP: callers with tether tokens, each governed by its own policy, shown only
the tools it may use, its calls free of one waiting for a person, secrets kept out of what it
gets and of the journal, and upstream tool lists followed as they change.

The gateway runs in this process (uvicorn on a free port) in front of a real MCP server made
with the official SDK (tests/gateway_upstream.py), which logs every call it receives.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from mcp import Client, ClientSession
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import CallToolResult, TextContent

from tether.identity import Principal, create_token, revoke_token
from tether.journal import Journal, open_journal
from tether.journal import bodies as b
from tether.mcp import gateway_lanes
from tether.mcp.client import McpError, McpServer, McpServerSpec
from tether.mcp.gateway import Gateway, Upstream
from tether.mcp.gateway_serve import http_app
from tether.policy import Policy
from tether.replay import Replayer
from tether.timeline import timeline

pytest_plugins = ("stores",)  # the db_target fixture: SQLite and PostgreSQL

UPSTREAM = Path(__file__).with_name("gateway_upstream.py")
SECRET = "AKIA" + "ABCDEFGHIJKLMNOP"  # the shape of an AWS access key id (not a real one)

# service:alpha may send and note (a person approves each note), never delete everything.
ALPHA = """\
version: 1
rules:
  - {id: alpha-sends, tool: send, decision: allow}
  - {id: notes-need-a-person, tool: note, decision: ask, approver: owner}
  - {id: alpha-grows, tool: grow, decision: allow}
  - {id: never-delete, tool: delete_everything, decision: deny, reason: nothing is deleted}
  - id: no-egress-after-a-secret
    tool: "*"
    when: 'has(facts.secrets_seen) && tool.effect == "external" && tool.name != "note"'
    decision: deny
    reason: a secret went by; nothing leaves after that
"""
# alpha's policy, and refunds: each asks a person, and an order is refunded once (a rule over
# `history`, which must see the calls of the session's earlier runs).
REFUNDS = (
    ALPHA
    + """\
  - {id: refunds-need-a-person, tool: refund, decision: ask, approver: owner}
  - id: one-refund-per-order
    tool: refund
    when: history.exists(h, h.tool == "refund" && h.args.order_id == args.order_id)
    decision: deny
    reason: an order is refunded once
"""
)
# Operators (service:beta among them) only read: send is denied outright, so it is hidden.
READER = """\
version: 1
rules:
  - {id: readers-do-not-send, tool: send, decision: deny, reason: readers only read}
"""


@dataclass
class Served:
    gateway: Gateway
    journal: Journal
    base: str
    calls: Path
    tokens: dict[str, str]

    def received(self) -> list[dict[str, Any]]:
        """What reached the upstream, in order."""
        if not self.calls.exists():
            return []
        return [json.loads(line) for line in self.calls.read_text().splitlines()]

    @contextlib.asynccontextmanager
    async def session(self, who: str, **options: Any) -> AsyncIterator[ClientSession]:
        """An MCP session (the handshake protocol) as the holder of `who`'s token."""
        headers = {"Authorization": f"Bearer {self.tokens[who]}"}
        async with (
            create_mcp_http_client(headers=headers) as http,
            streamable_http_client(f"{self.base}/mcp", http_client=http) as (read, write),
            ClientSession(read, write, **options) as session,
        ):
            await session.initialize()
            yield session


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.asynccontextmanager
async def served(
    tmp_path: Path, *, timeout: float = 20.0, alpha: str = ALPHA, **options: Any
) -> AsyncIterator[Served]:
    (tmp_path / "alpha.yaml").write_text(alpha)
    (tmp_path / "reader.yaml").write_text(READER)
    calls = tmp_path / "calls.jsonl"
    journal = open_journal(str(tmp_path / "tether.db"))
    tokens = {}
    for name, role, kind, scope in [
        ("alpha", "operator", "service", ()),
        ("beta", "operator", "service", ()),
        ("gamma", "viewer", "service", ()),
        ("olivia", "approver", "person", ("owner",)),
    ]:
        tokens[name], _ = await create_token(
            journal, name=name, role=role, kind=kind, approver_for=scope, expires_in=None
        )
    upstream = Upstream(McpServerSpec(name="upstream", command=[sys.executable, str(UPSTREAM), str(calls)]))
    policies = {
        "service:alpha": Policy.from_file(tmp_path / "alpha.yaml"),
        "role:operator": Policy.from_file(tmp_path / "reader.yaml"),
    }
    port = free_port()
    try:
        async with Gateway(
            [upstream], None, journal, policies=policies, approval_timeout=timeout, **options
        ) as gateway:
            web = uvicorn.Server(
                uvicorn.Config(
                    http_app(gateway, "127.0.0.1"), host="127.0.0.1", port=port, log_level="warning"
                )
            )
            serving = asyncio.create_task(web.serve())
            while not web.started:
                await asyncio.sleep(0.02)
            try:
                yield Served(gateway, journal, f"http://127.0.0.1:{port}", calls, tokens)
            finally:
                web.should_exit = True
                await serving
    finally:
        journal.close()


def text(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent), result
    return block.text


def refused(result: CallToolResult) -> str:
    """The reason code of a refusal."""
    assert result.is_error and isinstance(result.structured_content, dict), result
    return str(result.structured_content["reason_code"])


async def steps_of(journal: Journal, run_id: str) -> list[tuple[str, str, str]]:
    """(tool, decision, outcome) of each tool call step the run recorded, as `tether show` has them."""
    rows = timeline(await journal.read_entries(run_id))
    return [
        (r["proposal"]["tool"], r["decision"], r["outcome"])
        for r in rows
        if r["kind"] == "step" and r["proposal"] and r["proposal"].get("kind") == "tool_call"
    ]


def test_each_token_gets_its_own_policy_tools_and_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            async with s.session("alpha") as alpha, s.session("beta") as beta:
                alpha_tools = {t.name for t in (await alpha.list_tools()).tools}
                beta_tools = {t.name for t in (await beta.list_tools()).tools}
                # Hidden: what the caller's policy can never allow.
                assert alpha_tools == {"echo", "read_config", "send", "note", "grow"}
                # The readers' policy denies send outright, and every other external tool by default.
                assert beta_tools == {"echo", "read_config"}
                # The idempotency key is tether's to give: the caller is not asked for it.
                send = next(t for t in (await alpha.list_tools()).tools if t.name == "send")
                assert "idempotency_key" not in send.input_schema.get("required", [])

                sent = await alpha.call_tool("send", {"to": "bob", "body": "hi"})
                assert text(sent) == "sent to bob", sent
                # A hidden tool called anyway is refused like any denied call, never run.
                assert refused(await beta.call_tool("send", {"to": "bob", "body": "hi"})) == "policy_denied"
                assert refused(await alpha.call_tool("delete_everything", {})) == "policy_denied"
                assert text(await beta.call_tool("echo", {"text": "hello"})) == "hello"
            assert [c["tool"] for c in s.received()] == ["send", "echo"]
            # tether's idempotency key went to the upstream: as the argument its schema has, and in _meta.
            key = s.received()[0]["args"]["idempotency_key"]
            assert s.received()[0]["meta"]["tether/idempotency_key"] == key
            alpha_run = s.gateway.lanes["service:alpha"].run_ids[0]
            assert key.startswith(f"{alpha_run}:")

            # Each caller's calls are in runs of its own, started by its principal.
            runs = {r: await s.journal.get_run(r) for r in s.gateway.run_ids}
            by = {run_id: run.started_by for run_id, run in runs.items()}
            assert sorted(by.values()) == ["service:alpha", "service:beta"]
            beta_run = next(r for r, who in by.items() if who == "service:beta")
            assert await steps_of(s.journal, alpha_run) == [
                ("send", "allow", "executed"),
                ("delete_everything", "deny", "refused"),
            ]
            assert await steps_of(s.journal, beta_run) == [
                ("send", "deny", "refused"),
                ("echo", "allow", "executed"),
            ]

            # No token, a wrong one, a revoked one: 401. A viewer, mapped by no policy: 403.
            async with httpx.AsyncClient() as http:

                async def status(token: str | None) -> int:
                    headers = {"Authorization": f"Bearer {token}"} if token else {}
                    body = {"jsonrpc": "2.0", "id": 1, "method": "tools/list"}
                    return (await http.post(f"{s.base}/mcp", json=body, headers=headers)).status_code

                assert await status(None) == 401
                assert await status("tth_" + "x" * 43) == 401
                assert await status(s.tokens["gamma"]) == 403
                tokens = await s.journal.list_tokens()
                beta_token = next(t for t in tokens if t.principal_id == "service:beta")
                await revoke_token(s.journal, beta_token.token_id, Principal.local())
                assert await status(s.tokens["beta"]) == 401

    asyncio.run(scenario())


def test_a_call_waiting_for_a_person_does_not_hold_up_the_callers_other_calls(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s, s.session("alpha") as alpha:
            noted = asyncio.create_task(alpha.call_tool("note", {"text": "remember"}))
            while not s.gateway.lanes.get("service:alpha") or not s.gateway.lanes["service:alpha"].run_ids:
                await asyncio.sleep(0.02)
            async with httpx.AsyncClient() as http:
                approver = {"Authorization": f"Bearer {s.tokens['olivia']}"}
                tickets = await waiting_tickets(s, http, approver)
                # While the note waits for a person, the same caller's reads go through.
                echoed = await alpha.call_tool("echo", {"text": "meanwhile"})
                assert text(echoed) == "meanwhile"
                assert not noted.done()
                # The caller cannot approve its own call: deciding needs an approver for `owner`.
                alpha_says = {"Authorization": f"Bearer {s.tokens['alpha']}"}
                ticket = tickets[0]["ticket_id"]
                mine = await http.post(f"{s.base}/approvals/{ticket}/approve", headers=alpha_says, json={})
                assert mine.status_code == 403
                decided = await http.post(f"{s.base}/approvals/{ticket}/approve", headers=approver, json={})
                assert decided.status_code == 200 and decided.json()["decided_by"] == "person:olivia"
            assert text(await asyncio.wait_for(noted, timeout=10)) == "noted"
            assert [c["tool"] for c in s.received()] == ["echo", "note"]
            first, second = s.gateway.lanes["service:alpha"].run_ids
            assert await steps_of(s.journal, first) == [
                ("note", "ask", "awaiting_approval"),
                ("note", "ask", "executed"),
            ]
            assert await steps_of(s.journal, second) == [("echo", "allow", "executed")]
            for run_id in (first, second):
                assert (await s.journal.get_run(run_id)).started_by == "service:alpha"

    asyncio.run(scenario())


async def waiting_tickets(
    s: Served, http: httpx.AsyncClient, approver: dict[str, str]
) -> list[dict[str, Any]]:
    """The tickets waiting for `approver`, once there is one (polled over the approval route)."""
    tickets: list[dict[str, Any]] = []
    while not tickets:
        await asyncio.sleep(0.05)
        tickets = (await http.get(f"{s.base}/approvals", headers=approver)).json()["tickets"]
    return tickets


async def approved(s: Served, alpha: ClientSession, tool: str, args: dict[str, Any]) -> CallToolResult:
    """A call the policy asks a person about, approved by olivia (as over the approval route)."""
    call = asyncio.create_task(alpha.call_tool(tool, args))
    async with httpx.AsyncClient() as http:
        approver = {"Authorization": f"Bearer {s.tokens['olivia']}"}
        tickets = await waiting_tickets(s, http, approver)
        (ticket,) = tickets
        assert ticket["subject"] == tool and ticket["args"] == args
        url = f"{s.base}/approvals/{ticket['ticket_id']}/approve"
        assert (await http.post(url, headers=approver, json={})).status_code == 200
    return await asyncio.wait_for(call, timeout=10)


def test_history_holds_the_calls_of_the_sessions_earlier_runs(tmp_path: Path) -> None:
    """A call that waits for a person leaves the session to a fresh run: that run's `history`
    starts with the session's earlier calls, recorded by its `carry` step, so "one refund per
    order" holds across the wait (before, the fresh run's history was empty and the second
    refund of the order was asked about again, and done once approved)."""

    async def scenario() -> None:
        async with served(tmp_path, alpha=REFUNDS) as s, s.session("alpha") as alpha:
            first = await approved(s, alpha, "refund", {"order_id": "A-1", "amount": 30})
            assert text(first) == "refunded 30 on A-1"
            again = await alpha.call_tool("refund", {"order_id": "A-1", "amount": 30})
            assert refused(again) == "policy_denied" and "an order is refunded once" in text(again)
            # Another order's refund is asked about (and done), in that second run; after it,
            # a third run carries both refunds, of two runs.
            other = await approved(s, alpha, "refund", {"order_id": "B-2", "amount": 5})
            assert text(other) == "refunded 5 on B-2"
            late = await alpha.call_tool("refund", {"order_id": "B-2", "amount": 5})
            assert refused(late) == "policy_denied"
            assert text(await alpha.call_tool("echo", {"text": "still here"})) == "still here"
            refunds = [c["args"]["order_id"] for c in s.received() if c["tool"] == "refund"]
            assert refunds == ["A-1", "B-2"]  # the refused ones never reached the upstream

            runs = s.gateway.lanes["service:alpha"].run_ids
            assert len(runs) == 3
            # The carried calls are on each fresh run's own record (its `carry` step's entry).
            carried = []
            for run_id in runs[1:]:
                entries = await s.journal.read_entries(run_id)
                (carry,) = [e.body for e in entries if isinstance(e.body, b.StepDone)]
                assert carry.history is not None and carry.history.cut == 0
                carried.append([(c["tool"], c["args"]["order_id"]) for c in carry.history.calls])
                assert carry.history.runs == runs[: len(carry.history.runs)]
                refusal = next(e.body for e in entries if isinstance(e.body, b.Refused))
                assert refusal.decision.rule_id == "one-refund-per-order"
                assert (await s.journal.get_run(run_id)).input["carried_from"] == runs[: runs.index(run_id)]
            assert carried == [[("refund", "A-1")], [("refund", "A-1"), ("refund", "B-2")]]
            rows = timeline(await s.journal.read_entries(runs[2]))
            assert rows[1]["detail"]["history_carried"] == {"calls": 2, "from_runs": sorted(runs[:2])}

            # Replay re-decides every decision from each run's own entries: no divergence.
            replayer = Replayer(s.journal)
            reports = [await replayer.replay(run_id) for run_id in runs]
            for report in reports:
                assert report.ok, [(d.status, d.note) for d in report.decisions]
            refusals = [
                d for r in reports for d in r.decisions if d.recorded.rule_id == "one-refund-per-order"
            ]
            assert [d.status for d in refusals] == ["same", "same"]

    asyncio.run(scenario())


def test_a_carried_history_cut_at_its_bound_refuses_what_rules_over_history_govern(tmp_path: Path) -> None:
    """Past the bound (here one call) the fresh run's history lacks calls, and says how many:
    a call a rule over `history` governs is refused (`history_incomplete`), not decided on a
    history that could be missing what changes it; other calls go on."""

    async def scenario() -> None:
        async with served(tmp_path, alpha=REFUNDS, carry_calls=1) as s, s.session("alpha") as alpha:
            assert text(await alpha.call_tool("echo", {"text": "first"})) == "first"
            await approved(s, alpha, "refund", {"order_id": "A-1", "amount": 30})
            cut = await alpha.call_tool("refund", {"order_id": "B-2", "amount": 5})
            assert refused(cut) == "history_incomplete"
            assert "lacks 1 earlier call(s)" in text(cut) and "one-refund-per-order" in text(cut)
            assert text(await alpha.call_tool("echo", {"text": "reads go on"})) == "reads go on"
            first, second = s.gateway.lanes["service:alpha"].run_ids
            assert (await s.journal.get_run(second)).input["carried_from"] == [first]
            entries = await s.journal.read_entries(second)
            (carry,) = [e.body for e in entries if isinstance(e.body, b.StepDone)]
            assert carry.history is not None and carry.history.cut == 1
            assert [c["tool"] for c in carry.history.calls] == ["refund"]
            report = await Replayer(s.journal).replay(second)
            assert report.ok and [d.status for d in report.decisions] == ["same", "same"]

    asyncio.run(scenario())


def test_a_secret_in_a_result_is_redacted_and_policy_acts_on_it_in_later_runs(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s, s.session("alpha") as alpha:
            config = await alpha.call_tool("read_config", {})
            redacted = "aws_access_key_id = [secret redacted by tether: aws_access_key]"
            assert redacted in text(config) and SECRET not in str(config)
            assert config.meta is not None and config.meta["tether/secrets"] == [
                {"kind": "aws_access_key", "where": "content[0].text"},
                {"kind": "aws_access_key", "where": "structuredContent.result"},
            ]
            # The call that now waits for a person keeps its run; the next call goes to a fresh
            # run, which carries the session's facts: no egress after the secret.
            noted = asyncio.create_task(alpha.call_tool("note", {"text": "remember"}))
            lane = s.gateway.lanes["service:alpha"]
            while lane.current is not None and lane.current.queue.run_id.done() and len(lane.run_ids) < 2:
                await asyncio.sleep(0.02)
            blocked = await alpha.call_tool("send", {"to": "eve", "body": "the key"})
            assert refused(blocked) == "policy_denied" and "a secret went by" in text(blocked)
            noted.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await noted
            assert [c["tool"] for c in s.received()] == ["read_config"]
            first, second = lane.run_ids[:2]
            later = await s.journal.get_run(second)
            assert later.input["carried_facts"] == {"secrets_seen": ["aws_access_key"]}
            assert later.input["carried_from"] == [first]
            assert later.facts["secrets_seen"] == ["aws_access_key"]
        # The secret is nowhere in the journal.
        database = (tmp_path / "tether.db").read_bytes()
        for wal in tmp_path.glob("tether.db-wal"):
            database += wal.read_bytes()
        assert SECRET.encode() not in database

    asyncio.run(scenario())


def test_an_upstream_tool_list_change_reaches_the_gateways_clients(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with served(tmp_path) as s:
            told = asyncio.Event()

            async def on_message(message: Any) -> None:
                if type(message).__name__ == "ToolListChangedNotification":
                    told.set()

            # A client of the handshake era: told by notifications/tools/list_changed.
            async with s.session("alpha", message_handler=on_message) as alpha:
                assert "fresh" not in {t.name for t in (await alpha.list_tools()).tools}
                # A client of the 2026 protocol, listening on subscriptions/listen.
                headers = {"Authorization": f"Bearer {s.tokens['beta']}"}
                async with (
                    create_mcp_http_client(headers=headers) as http,
                    Client(streamable_http_client(f"{s.base}/mcp", http_client=http)) as modern,
                    modern.listen(tools_list_changed=True) as events,
                ):
                    assert await alpha.call_tool("grow", {"name": "fresh"})
                    await asyncio.wait_for(told.wait(), timeout=10)
                    await asyncio.wait_for(anext(aiter(events)), timeout=10)
                    listed = {t.name for t in (await alpha.list_tools()).tools}
                    assert "fresh" in listed
                    assert text(await alpha.call_tool("fresh", {})) == "I am fresh"
                    assert "fresh" in {t.name for t in (await modern.list_tools()).tools}
            assert [c["tool"] for c in s.received()] == ["grow"]  # the grown tool records nothing

    asyncio.run(scenario())


def test_a_decision_made_by_another_process_wakes_the_waiting_call(
    db_target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL the decision's NOTIFY wakes the call; on SQLite, the bounded poll of the
    journal (0.2 s). The only other wake-up, the progress tick, is put out of the test's reach:
    a call that were not woken would wait for the approval timeout, past the test's."""
    monkeypatch.setattr(gateway_lanes, "PROGRESS_EVERY", 3600.0)
    monkeypatch.setattr(gateway_lanes, "WATCH_SECONDS", 3600.0)
    (tmp_path / "alpha.yaml").write_text(ALPHA)
    upstream = Upstream(McpServerSpec(name="upstream", command=[sys.executable, str(UPSTREAM)]))

    async def scenario() -> None:
        async with open_journal(db_target) as journal, open_journal(db_target) as elsewhere:
            policy = Policy.from_file(tmp_path / "alpha.yaml")
            async with (
                Gateway([upstream], policy, journal, approval_timeout=3600) as gateway,
                Client(gateway.server()) as client,
            ):
                noted = asyncio.create_task(client.call_tool("note", {"text": "remember"}))
                pending: list[Any] = []
                while not pending:
                    await asyncio.sleep(0.05)
                    pending = await elsewhere.list_tickets("pending")
                await elsewhere.decide_ticket(pending[0].ticket_id, approve=True, by=Principal.local())
                assert text(await asyncio.wait_for(noted, timeout=30)) == "noted"

    asyncio.run(scenario())


def test_an_upstream_env_names_variables_of_tethers_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    spec = McpServerSpec(
        name="gh", command=["gh-server"], env={"TOKEN": "${GH_TOKEN}", "LITERAL": "$${GH_TOKEN}"}
    )
    monkeypatch.setenv("GH_TOKEN", "s3cret")
    assert spec.environment() == {"TOKEN": "s3cret", "LITERAL": "${GH_TOKEN}"}
    monkeypatch.delenv("GH_TOKEN")
    with pytest.raises(McpError, match=r"env TOKEN names \$\{GH_TOKEN\}, which is not set"):
        spec.environment()

    async def connect() -> None:
        await McpServer(spec).client().start()

    with pytest.raises(McpError, match="GH_TOKEN"):  # refused before the server is started
        asyncio.run(connect())
