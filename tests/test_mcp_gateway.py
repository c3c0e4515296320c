"""The governed MCP gateway (`tether mcp-gateway`), driven by the official MCP client.

The gateway runs as a real subprocess in front of real servers: the npm
@modelcontextprotocol/server-filesystem (allowed the whole test folder, so that only tether
stands between a client and a write outside the sandbox) and mcp-server-time from PyPI.
Approvals are given as a person gives them: `tether approvals` / `approve` / `deny` in
other processes, or the HTTP approval endpoint.
"""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

import pytest
from mcp import Client, ClientSession, MCPError, StdioServerParameters
from mcp.client.stdio import stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp.types import CallToolResult, TextContent

from mcp_servers import filesystem_server, time_server
from tether.identity import Principal
from tether.journal import open_journal
from tether.mcp.client import McpServerSpec
from tether.mcp.gateway import Gateway, Upstream, parse_upstreams
from tether.policy import Policy

APPROVAL_TIMEOUT = 12.0  # room for `tether approve` processes on a loaded machine
POLICY = """\
version: 1
rules:
  - id: writes-stay-in-the-sandbox
    tool: write_file
    when: '!realpath(args.path).startsWith("{sandbox}/")'
    decision: deny
    reason: files are written only inside the sandbox
  - id: writes-need-a-person
    tool: write_file
    decision: ask
    approver: owner
"""


@dataclass
class Setup:
    folder: Path
    sandbox: Path
    policy: Path
    db: Path

    @property
    def fs(self) -> str:
        """The filesystem server, allowed the whole test folder (the sandbox and beyond)."""
        return shlex.join([*filesystem_server(), str(self.folder)])

    @property
    def time(self) -> str:
        return shlex.join(time_server())

    def gateway(self, *upstreams: str, extra: tuple[str, ...] = ()) -> list[str]:
        args = ["-m", "tether", "mcp-gateway"]
        for upstream in upstreams:
            args += ["--upstream", upstream]
        return [*args, "--policy", str(self.policy), "--db", str(self.db), *extra]

    def params(self, *upstreams: str) -> StdioServerParameters:
        args = self.gateway(*upstreams, extra=("--approval-timeout", str(APPROVAL_TIMEOUT)))
        # The SDK starts a server with a minimal environment: keep the sources under test first.
        env = {"PYTHONPATH": os.environ["PYTHONPATH"]} if os.environ.get("PYTHONPATH") else None
        return StdioServerParameters(command=sys.executable, args=args, cwd=str(self.folder), env=env)

    async def tether(self, *args: str) -> str:
        """A `tether` command in another process, as a person runs it; its stdout."""
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tether",
            *args,
            "--db",
            str(self.db),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(process.communicate(), timeout=30)
        assert process.returncode == 0, err.decode()
        return out.decode()


@pytest.fixture
def setup(tmp_path: Path) -> Setup:
    sandbox = tmp_path.resolve() / "sandbox"
    sandbox.mkdir()
    (sandbox / "hello.txt").write_text("hello from the sandbox\n")
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(sandbox=sandbox))
    return Setup(tmp_path, sandbox, policy, tmp_path / "tether.db")


def text(result: CallToolResult) -> str:
    block = result.content[0]
    assert isinstance(block, TextContent), result
    return block.text


def structured(result: CallToolResult) -> dict[str, Any]:
    assert isinstance(result.structured_content, dict), result
    return result.structured_content


def refusal(result: CallToolResult) -> dict[str, Any]:
    assert result.is_error, result
    return structured(result)


async def write_decided_by(
    setup: Setup, session: ClientSession, path: Path, *decision: str
) -> CallToolResult:
    """Call write_file (the policy asks); once the gateway says it waits, find the ticket with
    `tether approvals --json` and decide it with `tether approve|deny`; return the call's result."""
    asked = asyncio.Event()

    async def progress(value: float, total: float | None, message: str | None) -> None:
        asked.set()

    call = asyncio.create_task(
        session.call_tool(
            "write_file", {"path": str(path), "content": "written\n"}, progress_callback=progress
        )
    )
    await asyncio.wait_for(asked.wait(), timeout=20)
    pending = json.loads(await setup.tether("approvals", "--json"))
    ticket = next(t for t in pending if t["args"].get("path") == str(path))
    assert ticket["subject"] == "write_file" and ticket["approver"] == "owner"
    assert not call.done()  # the call waits for the person
    said = await setup.tether(decision[0], ticket["ticket_id"], *decision[1:])
    assert "the process driving it (<mcp-gateway>) continues it" in said  # not `tether resume`
    return await asyncio.wait_for(call, timeout=20)


def test_every_call_is_governed_and_journaled(setup: Setup) -> None:
    sandbox, outside = setup.sandbox, setup.folder / "outside.txt"

    async def session_of_a_client(errlog: TextIO) -> None:
        async with (
            stdio_client(setup.params(setup.fs, setup.time), errlog=errlog) as (read, write),
            ClientSession(read, write) as session,
        ):
            await session.initialize()
            offered = {t.name: t for t in (await session.list_tools()).tools}
            assert {"read_text_file", "write_file", "list_directory", "get_current_time"} <= set(offered)
            assert offered["write_file"].input_schema["required"] == ["path", "content"]

            read = await session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")})
            assert not read.is_error
            assert text(read) == "hello from the sandbox\n"
            now = await session.call_tool("get_current_time", {"timezone": "UTC"})
            assert not now.is_error and structured(now)["timezone"] == "UTC"

            # The upstream would write there (it may touch the whole folder); tether refuses.
            denied = await session.call_tool("write_file", {"path": str(outside), "content": "escaped"})
            assert refusal(denied)["reason_code"] == "policy_denied"
            assert "policy_denied" in text(denied)
            assert "files are written only inside the sandbox" in text(denied)

            approved = await write_decided_by(setup, session, sandbox / "approved.txt", "approve")
            assert not approved.is_error, approved
            assert (sandbox / "approved.txt").read_text() == "written\n"

            refused = await write_decided_by(
                setup, session, sandbox / "refused.txt", "deny", "--reason", "not this one"
            )
            assert refusal(refused)["reason_code"] == "approval_denied"
            assert "not this one" in text(refused)

            started = time.monotonic()
            late = await session.call_tool("write_file", {"path": str(sandbox / "late.txt"), "content": "x"})
            assert time.monotonic() - started >= APPROVAL_TIMEOUT - 0.5
            assert refusal(late)["reason_code"] == "approval_expired"

            # A client that gives up on a call waiting for a person cancels it: its ticket is
            # denied at once, so no late approval can carry it out, and the next call goes on.
            with pytest.raises(MCPError, match="timed out"):
                await session.call_tool(
                    "write_file",
                    {"path": str(sandbox / "gave-up.txt"), "content": "x"},
                    read_timeout_seconds=1.0,
                )
            started = time.monotonic()
            hello, again = await asyncio.gather(  # concurrent calls: served one at a time, each its answer
                session.call_tool("read_text_file", {"path": str(sandbox / "hello.txt")}),
                session.call_tool("read_text_file", {"path": str(sandbox / "approved.txt")}),
            )
            assert time.monotonic() - started < APPROVAL_TIMEOUT - 1
            assert text(hello) == "hello from the sandbox\n"
            assert text(again) == "written\n"
            # Arguments the upstream's schema refuses never reach it.
            bad = await session.call_tool("read_text_file", {"file": "hello.txt"})
            assert refusal(bad)["reason_code"] == "invalid_arguments"

    with (setup.folder / "gateway.log").open("w") as errlog:
        asyncio.run(session_of_a_client(errlog))
    assert not outside.exists()
    assert sorted(p.name for p in sandbox.iterdir()) == ["approved.txt", "hello.txt"]
    log = (setup.folder / "gateway.log").read_text()
    assert "waits for a person" in log and "tether approve tkt_" in log

    # A call that waits for a person keeps its run; the caller's next calls go to a fresh one.
    runs = sorted(json.loads(asyncio.run(setup.tether("runs", "--json"))), key=lambda r: r["created_at"])
    assert [(r["workflow_name"], r["status"]) for r in runs] == [("mcp-gateway", "completed")] * 5
    person = Principal.local().principal_id  # the stdio caller: the local user, who started them all
    assert {r["started_by"] for r in runs} == {person}
    shown_runs = [json.loads(asyncio.run(setup.tether("show", r["run_id"], "--json"))) for r in runs]
    assert all(shown["chain"]["intact"] for shown in shown_runs)
    shown = {
        "steps": [s for shown in shown_runs for s in shown["steps"]],
        "entries": [e for shown in shown_runs for e in shown["entries"]],
    }
    steps = [
        (
            s["proposal"]["tool"],
            s["proposal"]["args"].get("path", "").rpartition("/")[2],
            s["decision"],
            s["outcome"],
        )
        for s in shown["steps"]
        if s["kind"] == "step" and s["proposal"] and s["proposal"].get("kind") == "tool_call"
    ]
    assert steps == [
        ("read_text_file", "hello.txt", "allow", "executed"),
        ("get_current_time", "", "allow", "executed"),
        ("write_file", "outside.txt", "deny", "refused"),
        ("write_file", "approved.txt", "ask", "awaiting_approval"),
        ("write_file", "approved.txt", "ask", "executed"),
        ("write_file", "refused.txt", "ask", "awaiting_approval"),
        ("write_file", "refused.txt", "deny", "refused"),
        ("write_file", "late.txt", "ask", "awaiting_approval"),
        ("write_file", "late.txt", "deny", "refused"),
        ("write_file", "gave-up.txt", "ask", "awaiting_approval"),
        ("write_file", "gave-up.txt", "deny", "refused"),
        ("read_text_file", "hello.txt", "allow", "executed"),
        ("read_text_file", "approved.txt", "allow", "executed"),
        ("read_text_file", "", "deny", "refused"),
    ]
    refused = [(s["reason_code"], s["reason"]) for s in shown["steps"] if s["outcome"] == "refused"]
    assert [code for code, _ in refused] == [
        "policy_denied",
        "approval_denied",
        "approval_expired",
        "approval_denied",
        "invalid_arguments",
    ]
    assert "the client cancelled the call" in refused[3][1]
    rules = {s["rule_id"] for s in shown["steps"] if s["decision"] in ("deny", "ask")}
    assert {"writes-stay-in-the-sandbox", "writes-need-a-person"} <= rules
    # The audit trail explains a decision with the rule's text, from the policy file.
    outside_step = next(s["step_id"] for s in shown["steps"] if s["reason_code"] == "policy_denied")
    explained = json.loads(
        asyncio.run(setup.tether("policy", "explain", runs[0]["run_id"], outside_step, "--json"))
    )
    winner = next(r for r in explained["rules"] if r["winner"])
    assert winner["rule"] == "writes-stay-in-the-sandbox" and "startsWith" in winner["when"]
    # ... and with the resolved path it was decided on.
    assert explained["decision"]["resolved"] == {f'realpath("{outside}")': str(outside)}
    decided = [
        (e["body"]["status"], e["body"]["by"]["principal_id"])
        for e in shown["entries"]
        if e["kind"] == "ticket_decided"
    ]
    # `tether approve` records the local admin
    assert decided == [("approved", person), ("denied", person), ("denied", "local:mcp-gateway")]


def gateway_process(
    setup: Setup, *upstreams: str, extra: tuple[str, ...] = ()
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *setup.gateway(*upstreams, extra=extra)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
        cwd=setup.folder,
    )


def test_bad_upstreams_and_policies_are_refused_at_startup(setup: Setup) -> None:
    clash = gateway_process(setup, setup.time, setup.time)
    assert clash.returncode == 2 and clash.stdout == ""
    assert "both offer a tool named 'get_current_time'" in clash.stderr
    assert "--upstream mcp-server-time=CMD" in clash.stderr

    setup.policy.write_text("rules:\n  - {id: no-such, tool: delete_everything, decision: deny}\n")
    unknown = gateway_process(setup, setup.time)
    assert unknown.returncode == 2
    assert "rule 'no-such' names unknown tool 'delete_everything'" in unknown.stderr

    setup.policy.write_text("rules:\n  - {id: stay, exit: end, decision: deny}\n")
    exits = gateway_process(setup, setup.time)
    assert exits.returncode == 2 and "a gateway's policy governs tools only" in exits.stderr

    setup.policy.write_text("rules: []\n")
    missing = gateway_process(setup, "/nonexistent/mcp-server")
    assert missing.returncode == 2 and "/nonexistent/mcp-server" in missing.stderr
    assert json.loads(asyncio.run(setup.tether("runs", "--json"))) == []  # no run was started


def test_named_upstreams_prefix_their_tools(setup: Setup) -> None:
    setup.policy.write_text("rules: []\n")  # reads are allowed by default

    async def session_of_a_client() -> None:
        params = setup.params(f"utc={setup.time}", f"local={setup.time}")
        with (setup.folder / "gateway.log").open("w") as errlog:
            async with (
                stdio_client(params, errlog=errlog) as (read, write),
                ClientSession(read, write) as session,
            ):
                await session.initialize()
                names = sorted(t.name for t in (await session.list_tools()).tools)
                assert names == [
                    "local_convert_time",
                    "local_get_current_time",
                    "utc_convert_time",
                    "utc_get_current_time",
                ]
                now = await session.call_tool("utc_get_current_time", {"timezone": "UTC"})
                assert not now.is_error and structured(now)["timezone"] == "UTC"
                unprefixed = await session.call_tool("get_current_time", {"timezone": "UTC"})
                assert refusal(unprefixed)["reason_code"] == "unknown_tool"

    asyncio.run(session_of_a_client())


def test_sigterm_ends_a_stdio_session_and_completes_its_run(setup: Setup) -> None:
    """Even while the client keeps stdin open (a supervisor stopping the gateway)."""
    setup.policy.write_text("rules: []\n")
    log = setup.folder / "gateway.log"
    with log.open("w") as errlog:
        gateway = subprocess.Popen(
            [sys.executable, *setup.gateway(setup.time)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=errlog,
            cwd=setup.folder,
        )
        try:
            deadline = time.monotonic() + 30
            while "governs" not in log.read_text():
                assert gateway.poll() is None and time.monotonic() < deadline, log.read_text()
                time.sleep(0.1)
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=20)  # stdin still open: communicate() would close it
        finally:
            if gateway.poll() is None:
                gateway.kill()
            out, _ = gateway.communicate()
    assert gateway.returncode == 0 and out == b""
    runs = json.loads(asyncio.run(setup.tether("runs", "--json")))
    assert [(r["status"], r["state"]) for r in runs] == [("completed", "ended")]


def test_a_long_session_starts_a_fresh_visit_every_so_many_calls(setup: Setup) -> None:
    """The runtime keeps a visit's transcript in memory: the gateway bounds it by taking its
    `rotate` exit every `rotate_every` calls; the session goes on as before."""
    setup.policy.write_text("rules: []\n")

    async def session_of_a_client() -> str:
        journal = open_journal(str(setup.db))
        try:
            policy = Policy.from_file(setup.policy)
            async with Gateway(parse_upstreams([setup.time]), policy, journal, rotate_every=3) as gateway:
                async with Client(gateway.server()) as client:
                    for _ in range(7):
                        now = await client.call_tool("get_current_time", {"timezone": "UTC"})
                        assert not now.is_error
                (run_id,) = gateway.run_ids  # the in-process client is the local user: one run
                return run_id
        finally:
            journal.close()

    run_id = asyncio.run(session_of_a_client())
    shown = json.loads(asyncio.run(setup.tether("show", run_id, "--json")))
    taken = [
        s["proposal"].get("tool") or s["proposal"]["exit"] for s in shown["steps"] if s["kind"] == "step"
    ]
    call = "get_current_time"
    assert taken == [call] * 3 + ["rotate"] + [call] * 3 + ["rotate", call, "end"]
    assert shown["run"]["status"] == "completed"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def http(method: str, url: str, token: str, body: dict[str, Any] | None = None) -> tuple[int, Any]:
    request = urllib.request.Request(
        url,
        method=method,
        data=json.dumps(body).encode() if body is not None else None,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, json.loads(exc.read())


def test_over_http_callers_and_approvers_present_tether_tokens(setup: Setup) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"

    def token(name: str, *options: str) -> str:
        made = json.loads(asyncio.run(setup.tether("token", "create", name, *options, "--json")))
        return str(made["token"])

    caller = token("ide", "--service", "--role", "operator")
    approver = token("olivia", "--role", "approver", "--approver-for", "owner")
    with (setup.folder / "gateway.log").open("w") as errlog:
        gateway = subprocess.Popen(
            [sys.executable, *setup.gateway(setup.fs, extra=("--transport", "http", "--port", str(port)))],
            stdin=subprocess.DEVNULL,
            stdout=errlog,
            stderr=errlog,
            cwd=setup.folder,
        )
        try:
            deadline = time.monotonic() + 30
            while not _listening(port):
                assert gateway.poll() is None and time.monotonic() < deadline, "the gateway did not start"
                time.sleep(0.2)

            async def session_of_a_client() -> CallToolResult:
                async with (
                    create_mcp_http_client(headers={"Authorization": f"Bearer {caller}"}) as client,
                    streamable_http_client(f"{base}/mcp", http_client=client) as (read, write),
                    ClientSession(read, write) as session,
                ):
                    await session.initialize()
                    path = str(setup.sandbox / "over-http.txt")
                    call = asyncio.create_task(
                        session.call_tool("write_file", {"path": path, "content": "via http\n"})
                    )
                    tickets: list[dict[str, Any]] = []
                    while not tickets:
                        await asyncio.sleep(0.2)
                        status, listed = await asyncio.to_thread(http, "GET", f"{base}/approvals", approver)
                        tickets = listed["tickets"]
                    assert (await asyncio.to_thread(http, "GET", f"{base}/approvals", "wrong"))[0] == 401
                    ticket = tickets[0]["ticket_id"]
                    # The caller's own token may call tools, not decide them.
                    mine = await asyncio.to_thread(
                        http, "POST", f"{base}/approvals/{ticket}/approve", caller, {}
                    )
                    assert mine[0] == 403
                    status, decided = await asyncio.to_thread(
                        http, "POST", f"{base}/approvals/{ticket}/approve", approver, {"reason": "ok"}
                    )
                    assert status == 200 and decided["status"] == "approved"
                    assert decided["decided_by"] == "person:olivia"  # the principal, from the token
                    again = await asyncio.to_thread(
                        http, "POST", f"{base}/approvals/{ticket}/deny", approver, {}
                    )
                    assert again[0] == 409  # single use: already decided
                    return await asyncio.wait_for(call, timeout=20)

            result = asyncio.run(session_of_a_client())
            assert not result.is_error, result
            assert (setup.sandbox / "over-http.txt").read_text() == "via http\n"

            async def through_a_second_gateway() -> CallToolResult:
                # An upstream given by URL, with its token from the environment: here, this
                # gateway behind another one (in this process, as the local user).
                headers = {"Authorization": "Bearer ${UPSTREAM_TOKEN}"}
                upstream = Upstream(McpServerSpec(name="first", url=f"{base}/mcp", headers=headers))
                os.environ["UPSTREAM_TOKEN"] = caller
                journal = open_journal(str(setup.folder / "second.db"))
                try:
                    policy = Policy.from_file(setup.policy)
                    async with (
                        Gateway([upstream], policy, journal) as second,
                        Client(second.server()) as client,
                    ):
                        path = str(setup.sandbox / "over-http.txt")
                        return await client.call_tool("read_text_file", {"path": path})
                finally:
                    del os.environ["UPSTREAM_TOKEN"]
                    journal.close()

            chained = asyncio.run(through_a_second_gateway())
            assert text(chained) == "via http\n"
        finally:
            gateway.send_signal(signal.SIGTERM)
            gateway.wait(timeout=30)
    assert gateway.returncode == 0, (setup.folder / "gateway.log").read_text()
    runs = json.loads(asyncio.run(setup.tether("runs", "--json")))
    # The caller's two runs (its write waited for a person; the chained read went to a fresh one).
    assert [(r["status"], r["started_by"]) for r in runs] == [("completed", "service:ide")] * 2


def _listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
