"""MCP servers as tool sources, with real servers: mcp-server-time, mcp-server-git and
@modelcontextprotocol/server-filesystem over stdio, and a small MCP server of our own over
streamable HTTP in a subprocess. A scripted model makes the choices; everything else is real.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import step_rows
from mcp_servers import filesystem_server, git_server, time_server
from tether import (
    AgentState,
    DefinitionError,
    Runtime,
    ScriptedModel,
    Terminal,
    ToolContext,
    Workflow,
    load_workflow,
)
from tether.journal import Journal, bodies
from tether.mcp import McpClient, McpError, McpServer, McpServerSpec, McpTool, ToolOverride

# A server of our own: a ledger kept in ledger.json in its working directory. With
# LEDGER_MEMO=1 `add_entry` takes a `memo` too (a changed input schema).
LEDGER_SERVER = '''
import json, os, sys
from pathlib import Path
from mcp.server.mcpserver import MCPServer
from mcp.types import ToolAnnotations

server = MCPServer("ledger")
book = Path("ledger.json")

def entries():
    return json.loads(book.read_text()) if book.exists() else []

if os.environ.get("LEDGER_MEMO"):
    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False))
    def add_entry(account: str, amount: float, memo: str = "") -> dict[str, int]:
        """Add an entry to an account."""
        book.write_text(json.dumps(entries() + [[account, amount]]))
        return {"entries": len(entries())}
else:
    @server.tool(annotations=ToolAnnotations(readOnlyHint=False, destructiveHint=False))
    def add_entry(account: str, amount: float) -> dict[str, int]:
        """Add an entry to an account."""
        book.write_text(json.dumps(entries() + [[account, amount]]))
        return {"entries": len(entries())}

@server.tool()
def nap(seconds: float) -> str:
    """Sleep (a server that hangs)."""
    import time
    time.sleep(seconds)
    return "awake"

@server.tool(annotations=ToolAnnotations(readOnlyHint=True))
def balance(account: str) -> dict[str, float]:
    """The balance of an account."""
    return {"balance": sum(a for name, a in entries() if name == account)}

if sys.argv[1:] == ["stdio"]:
    server.run()
else:
    server.run("streamable-http", host="127.0.0.1", port=int(sys.argv[1]))
'''


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def call(tool_name: str, **args: Any) -> dict[str, Any]:
    return {"kind": "tool_call", "tool": tool_name, "args": args}


def steps(journal: Journal, run_id: str) -> list[dict[str, Any]]:
    """Each step, with the tool it called (if any) named in `tool`."""
    rows = step_rows(journal, run_id)
    for row in rows:
        record = row["record"]
        row["tool"] = record.tool if isinstance(record, bodies.ToolStep) else None
    return rows


def processes_in(folder: Path) -> list[int]:
    """Live processes whose working directory is `folder` (the stdio servers run there)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if (
                Path(os.readlink(entry / "cwd")) == folder
                and "Z" not in (entry / "stat").read_text().split()[2]
            ):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[Path]:
    """The ledger server over streamable HTTP, in a subprocess; yields its folder (url in `.url`)."""
    folder = tmp_path / "ledger"
    folder.mkdir()
    (folder / "server.py").write_text(LEDGER_SERVER)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [sys.executable, "server.py", str(port)],
        cwd=folder,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("the ledger server did not start") from None
                time.sleep(0.05)
        (folder / "url").write_text(f"http://127.0.0.1:{port}/mcp")
        yield folder
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def desk(tmp_path: Path, ledger_url: str, *, policy: str | None = None) -> Path:
    """A workflow folder whose agent state uses tools of four MCP servers."""
    folder = tmp_path / "desk"
    (folder / "sandbox" / "public").mkdir(parents=True)
    sandbox = folder / "sandbox"
    checks = f"checks_{tmp_path.name}"  # one module name per workflow folder
    (folder / f"{checks}.py").write_text(
        textwrap.dedent(f"""
        import json
        from pathlib import Path
        from tether import Evidence

        def entry_recorded(args, result, ctx):
            book = Path({str(tmp_path / "ledger" / "ledger.json")!r})
            rows = json.loads(book.read_text()) if book.exists() else []
            return Evidence(ok=[args["account"], args["amount"]] in rows, detail={{"rows": len(rows)}})
        """)
    )
    servers = {
        "time": {"command": time_server()},
        "git": {"command": git_server()},
        "files": {"command": [*filesystem_server(), "./sandbox"]},
        "ledger": {"url": ledger_url},
    }
    workflow = {
        "name": "desk",
        "version": 1,
        "start": "work",
        "mcp_servers": servers,
        "states": {
            "work": {
                "kind": "agent",
                "instructions": "Keep the books and the files.",
                "tools": [
                    "mcp:time/get_current_time",
                    "mcp:git/git_status",
                    {"ref": "mcp:files/write_file", "effect": "write"},
                    "mcp:files/read_text_file",
                    {"ref": "mcp:ledger/add_entry", "effect": "write", "verify": f"{checks}:entry_recorded"},
                ],
                "exits": {"finish": "done"},
                "budget": {"max_steps": 20, "max_tool_calls": 20},
            },
            "done": {"kind": "terminal"},
        },
    }
    (folder / "workflow.yaml").write_text(json.dumps(workflow))
    (folder / "policy.yaml").write_text(
        policy
        or textwrap.dedent(f"""
        version: 1
        rules:
          - id: writes-only-under-public
            tool: write_file
            when: '!args.path.startsWith("{sandbox}/public/") || args.path.contains("..")'
            decision: deny
            reason: files are written only under public/
          - id: reviewed-writes
            tool: write_file
            when: 'args.path.startsWith("{sandbox}/public/reviewed/")'
            decision: ask
            approver: editor
          - id: public-writes
            tool: write_file
            decision: allow
          - id: small-entries
            tool: add_entry
            when: args.amount <= 100.0
            decision: allow
        """)
    )
    return folder


def test_an_agent_state_uses_tools_of_four_real_servers_governed_and_journaled(
    tmp_path: Path, journal: Journal, ledger: Path
) -> None:
    folder = desk(tmp_path, (ledger / "url").read_text())
    repo = tmp_path / "repo"
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    sandbox = folder / "sandbox"
    wf = load_workflow(folder)
    tools = {t.name: t for t in wf.states["work"].tools}  # type: ignore[union-attr]
    # Effects: read-only hints make reads; what the author declared wins.
    assert [(n, t.effect) for n, t in tools.items()] == [
        ("get_current_time", "read"),
        ("git_status", "read"),
        ("write_file", "write"),
        ("read_text_file", "read"),
        ("add_entry", "write"),
    ]
    script = ScriptedModel(
        [
            call("get_current_time", timezone="Europe/Paris"),
            call("git_status", repo_path=str(repo)),
            call("write_file", path=f"{sandbox}/public/notes.txt", content="hello"),
            call("read_text_file", path=f"{sandbox}/public/notes.txt"),
            call("add_entry", account="cash", amount=42.5),
            call("git_status", repo_path=str(tmp_path)),  # not a repository: the server errs
            {"kind": "finish"},
        ]
    )
    result = run(Runtime(journal).start(wf, script))

    assert result.status == "completed"
    assert (sandbox / "public" / "notes.txt").read_text() == "hello"
    assert json.loads((ledger / "ledger.json").read_text()) == [["cash", 42.5]]
    recorded = [s for s in steps(journal, result.run_id) if s.get("tool")]
    by_tool = {(s["tool"], s["outcome"]): s for s in recorded}
    assert by_tool[("get_current_time", "executed")]["result"]["timezone"] == "Europe/Paris"
    assert "On branch" in by_tool[("git_status", "executed")]["result"][0]["text"]
    assert by_tool[("read_text_file", "executed")]["result"] == {"content": "hello"}
    entry = by_tool[("add_entry", "executed")]
    assert entry["result"] == {"entries": 1} and entry["verification"]["ok"] is True
    assert entry["decision"]["rule_id"] == "small-entries"
    failed = by_tool[("git_status", "tool_error")]
    assert failed["reason_code"] == "tool_error" and "git_status" in failed["error"]
    # The stdio servers ran in the workflow's folder, and are gone now the run's loop ended.
    assert processes_in(folder) == []


def test_arguments_are_checked_against_the_servers_schema_before_the_server_is_called(
    tmp_path: Path, journal: Journal, ledger: Path
) -> None:
    folder = desk(tmp_path, (ledger / "url").read_text())
    target = folder / "sandbox" / "public" / "x.txt"
    script = ScriptedModel(
        [
            call("get_current_time", timezone=12),
            call("write_file", path=str(target), content=5),
            call("write_file", path=str(target)),
            call("add_entry", account="cash", amount="12"),  # no "12" for a number
            call("add_entry", account="cash", amount=1.0, memo="x"),  # not in the schema
            call("delete_file", path=str(target)),
            {"kind": "finish"},
        ]
    )
    result = run(Runtime(journal).start(load_workflow(folder), script))

    assert result.status == "completed"
    refusals = [(s["reason_code"], s["decision"]["reason"]) for s in steps(journal, result.run_id)][:-1]
    assert [code for code, _ in refusals] == ["invalid_arguments"] * 5 + ["unknown_tool"]
    assert "timezone: 12 is not of type 'string'" in refusals[0][1]
    assert "content: 5 is not of type 'string'" in refusals[1][1]
    assert "content: Field required" in refusals[2][1]
    assert "amount: '12' is not of type 'number'" in refusals[3][1]
    assert "unknown field(s) memo" in refusals[4][1]
    assert "no tool named 'delete_file'" in refusals[5][1]
    assert not target.exists() and not (ledger / "ledger.json").exists()


def test_policy_denies_a_write_outside_the_allowed_path_and_asks_before_a_reviewed_one(
    tmp_path: Path, journal: Journal, ledger: Path
) -> None:
    folder = desk(tmp_path, (ledger / "url").read_text())
    sandbox = folder / "sandbox"
    reviewed = sandbox / "public" / "reviewed"
    reviewed.mkdir()
    script = ScriptedModel(
        [
            # Both inside the server's own root: it is tether's policy that refuses them.
            call("write_file", path=f"{sandbox}/secret.txt", content="x"),
            call("write_file", path=f"{sandbox}/public/../secret.txt", content="x"),
            call("add_entry", account="cash", amount=500.0),  # no rule allows it: default deny
            call("write_file", path=f"{reviewed}/report.txt", content="final"),
            {"kind": "finish"},
        ]
    )
    runtime = Runtime(journal)
    paused = run(runtime.start(load_workflow(folder), script))

    assert paused.status == "paused" and paused.owner == "editor" and paused.ticket_id
    decided = [(s["decision"]["rule_id"], s["outcome"]) for s in steps(journal, paused.run_id)]
    assert decided == [
        ("writes-only-under-public", "refused"),
        ("writes-only-under-public", "refused"),
        ("default:write", "refused"),
        ("reviewed-writes", "awaiting_approval"),
    ]
    assert not (sandbox / "secret.txt").exists() and not (reviewed / "report.txt").exists()
    assert not (ledger / "ledger.json").exists()
    ticket = run(journal.get_ticket(paused.ticket_id))
    assert ticket.args == {"path": f"{reviewed}/report.txt", "content": "final"}

    run(journal.decide_ticket(paused.ticket_id, approve=True, by="ed", now=time.time()))
    # A new process would load the workflow again: the tools connect anew in its loop.
    done = run(runtime.resume(paused.run_id, load_workflow(folder), script))

    assert done.status == "completed"
    assert (reviewed / "report.txt").read_text() == "final"
    assert processes_in(folder) == []


def test_tool_results_and_the_workflow_hash_follow_the_server_and_the_declarations(tmp_path: Path) -> None:
    folder = tmp_path / "books"
    folder.mkdir()
    (folder / "server.py").write_text(LEDGER_SERVER)

    def write(effect: str, memo: bool) -> None:
        server: dict[str, Any] = {"command": [sys.executable, "server.py", "stdio"]}
        if memo:
            server["env"] = {"LEDGER_MEMO": "1"}
        doc = {
            "name": "books",
            "version": 1,
            "start": "s",
            "mcp_servers": {"ledger": server},
            "states": {
                "s": {
                    "kind": "agent",
                    "instructions": "i",
                    "tools": ["mcp:ledger/balance", {"ref": "mcp:ledger/add_entry", "effect": effect}],
                    "exits": {"finish": "t"},
                },
                "t": {"kind": "terminal"},
            },
        }
        (folder / "workflow.yaml").write_text(json.dumps(doc))

    write("write", memo=False)
    first = load_workflow(folder)
    assert load_workflow(folder).hash == first.hash  # listing twice changes nothing
    write("external", memo=False)
    assert load_workflow(folder).hash != first.hash
    write("write", memo=True)
    changed = load_workflow(folder)
    assert changed.hash != first.hash
    add_entry = changed.tools()["add_entry"]
    assert "memo" in add_entry.json_schema()["properties"]
    # Defaults from the server's schema are filled in, as a native tool's are.
    assert add_entry.validate({"account": "a", "amount": 1}).values == {
        "account": "a",
        "amount": 1,
        "memo": "",
    }
    # Nothing stays running after a load: listing used its own short connection.
    assert processes_in(folder) == []


def test_a_client_serves_calls_from_any_task_and_its_server_process_ends_on_close(tmp_path: Path) -> None:
    folder = tmp_path / "t"
    folder.mkdir()

    async def scenario() -> None:
        async with McpClient(McpServerSpec(name="time", command=time_server(), cwd=str(folder))) as client:
            tools = client.tools(await client.list_tools())
            assert {t.name: t.effect for t in tools} == {"get_current_time": "read", "convert_time": "read"}
            get = next(t for t in tools if t.name == "get_current_time")
            assert isinstance(get, McpTool) and get.idempotent
            results = await asyncio.gather(
                *(
                    asyncio.create_task(client.call_tool("get_current_time", {"timezone": tz}))
                    for tz in ("Europe/Paris", "Asia/Tokyo", "America/Lima")
                )
            )
            assert [r.structured_content["timezone"] for r in results] == [  # type: ignore[index]
                "Europe/Paris",
                "Asia/Tokyo",
                "America/Lima",
            ]
            assert len(processes_in(folder)) == 1
        assert processes_in(folder) == []
        with pytest.raises(Exception, match="connection is closed"):
            await client.call_tool("get_current_time", {"timezone": "Europe/Paris"})

    run(scenario())


@pytest.mark.parametrize(
    ("servers", "tools", "message"),
    [
        (
            {"time": {"command": "mcp-server-time"}},
            [],
            r"mcp_servers\.time: command: Input should be a valid list",
        ),
        (
            {"time": {"command": ["x"], "url": "http://127.0.0.1:1/mcp"}},
            [],
            r"mcp_servers\.time: \(server\): give exactly one of 'command'",
        ),
        ({"time": {"url": "ftp://x"}}, [], r"mcp_servers\.time: .*http:// or https://"),
        ({"time": {"command": ["x"], "port": 1}}, [], r"mcp_servers\.time: port: Extra inputs"),
        ({"a/b": {"command": ["x"]}}, [], r"mcp_servers\.a/b: a server name cannot contain '/'"),
        ({"time": ["mcp-server-time"]}, [], r"mcp_servers\.time: expected a mapping"),
        ({}, ["mcp:time/get_current_time"], r"state 'work', tool 1: .*declares no mcp_servers"),
        (
            "time",
            ["mcp:clock/get_current_time"],
            r"state 'work', tool 1: .*server 'clock'.*\(declared: time\)",
        ),
        ("time", ["mcp:time"], r"state 'work', tool 1: 'mcp:time' is not an MCP tool reference"),
        (
            "time",
            ["mcp:time/get_current_time", "mcp:time/get_time"],
            r"state 'work', tool 2: MCP server 'time' has no tool 'get_time' "
            r"\(it offers: convert_time, get_current_time\)",
        ),
        (
            "files-of-a-missing-folder",
            [],
            r"(?s)mcp_servers\.fs: cannot list its tools: .*Cannot access directory",
        ),
    ],
)
def test_malformed_servers_and_unknown_servers_or_tools_are_definition_errors(
    tmp_path: Path, servers: Any, tools: list[str], message: str
) -> None:
    if servers == "time":
        servers = {"time": {"command": time_server()}}
    elif servers == "files-of-a-missing-folder":
        servers = {"fs": {"command": [*filesystem_server(), str(tmp_path / "missing")]}}
    doc: dict[str, Any] = {
        "name": "w",
        "version": 1,
        "start": "work",
        "states": {
            "work": {"kind": "agent", "instructions": "i", "tools": tools, "exits": {"finish": "t"}},
            "t": {"kind": "terminal"},
        },
    }
    if servers:
        doc["mcp_servers"] = servers
    (tmp_path / "workflow.yaml").write_text(json.dumps(doc))
    with pytest.raises(DefinitionError, match=message):
        load_workflow(tmp_path)


def test_a_python_workflow_takes_a_servers_tools_and_connects_in_each_loop_that_runs_them(
    tmp_path: Path, journal: Journal
) -> None:
    folder = tmp_path / "py"
    folder.mkdir()
    server = McpServer(McpServerSpec(name="time", command=time_server(), cwd=str(folder)))
    (convert,) = server.tools("convert_time", overrides={"convert_time": ToolOverride(name="convert")})
    assert (convert.name, convert.effect) == ("convert", "read") and processes_in(folder) == []
    wf = Workflow(
        "clock",
        "1",
        "ask",
        [AgentState("ask", "Convert times.", (convert,), {"finish": "done"}), Terminal("done")],
    )
    args = {"source_timezone": "Europe/Paris", "time": "12:00", "target_timezone": "Asia/Tokyo"}
    script = ScriptedModel([call("convert", **args), {"kind": "finish"}])
    # Two runs, two event loops (as two CLI commands would have): each connects on first use.
    for _ in range(2):
        result = run(Runtime(journal).start(wf, script))
        (step,) = [s for s in steps(journal, result.run_id) if s.get("tool")]
        assert step["outcome"] == "executed" and step["result"]["target"]["timezone"] == "Asia/Tokyo"
        assert processes_in(folder) == []
    with pytest.raises(McpError, match=r"has no tool get_time \(it offers: convert_time, get_current_time\)"):
        server.tools("get_time")


def test_a_server_that_does_not_answer_in_time_fails_the_call_naming_it(tmp_path: Path) -> None:
    (tmp_path / "server.py").write_text(LEDGER_SERVER)
    spec = McpServerSpec(
        name="ledger", command=[sys.executable, "server.py", "stdio"], cwd=str(tmp_path), timeout=0.5
    )
    server = McpServer(spec)
    nap = next(t for t in server.tools() if t.name == "nap")
    ctx = ToolContext(run_id="r", step_id="s", idempotency_key="k")

    async def scenario() -> None:
        with pytest.raises(McpError, match=r"^ledger/nap: Request 'tools/call' timed out"):
            await nap.call({"seconds": 60}, ctx)
        await server.aclose()

    started = time.monotonic()
    run(scenario())
    assert time.monotonic() - started < 30 and processes_in(tmp_path) == []  # killed, not awaited


def test_a_server_that_went_away_fails_one_call_and_is_started_again_for_the_next(tmp_path: Path) -> None:
    server = McpServer(McpServerSpec(name="time", command=time_server(), cwd=str(tmp_path)))
    (get,) = server.tools("get_current_time")
    ctx = ToolContext(run_id="r", step_id="s", idempotency_key="k")
    paris = {"timezone": "Europe/Paris"}

    async def scenario() -> None:
        assert (await get.call(paris, ctx))["timezone"] == "Europe/Paris"
        (pid,) = processes_in(tmp_path)
        os.kill(pid, signal.SIGKILL)
        with pytest.raises(McpError, match="time/get_current_time: Connection closed"):
            await get.call(paris, ctx)
        assert (await get.call(paris, ctx))["timezone"] == "Europe/Paris"
        (restarted,) = processes_in(tmp_path)
        assert restarted != pid

    run(scenario())
    assert processes_in(tmp_path) == []
