"""What the governed MCP gateway costs per call: the official `mcp` client calling the read
tool `get_current_time` of the real server `mcp-server-time` directly, and through
`tether mcp-gateway` in front of it.

Direct: client -> mcp-server-time over stdio. Through the gateway: client -> `python -m tether
mcp-gateway --upstream mcp-server-time --policy P --db TMP/tether.db` over stdio ->
mcp-server-time over stdio, with the simplest policy (`rules: []`: reads are allowed by
default) and a fresh SQLite journal at tether's default durability (`synchronous=NORMAL`).
Each call through the gateway is a governed step of the session's run (scope, policy,
the upstream call, the step and its exchange recorded and committed; every 200 calls the run
takes its `rotate` exit, as in any long session), so the difference is what the gateway
adds: the second stdio hop and the governed step.

Each process is started once; both sessions are initialized and warmed up (--warmup calls
each), then measured in interleaved batches of --calls calls (direct, gateway, direct,
gateway ...) for --repeat repetitions. The difference of a repetition is gateway − direct
per call; the table shows medians with the lowest and highest in brackets. The CPU time of
the processes (utime + stime from /proc/PID/stat, read before and after each batch; Linux
only, resolution one clock tick) is shown per call: the gateway itself and mcp-server-time
on both paths. Journal bytes per call: how much the journal grew (its logical size, the WAL's
pages included) over the measured calls. No timing is asserted anywhere: this is a report.

Needs `mcp-server-time` (PyPI; `make test` installs it into .venv, `make bench` into
.venv-bench): it is looked for next to this Python, in .venv/bin, then on PATH. The gateway
runs from this checkout's src/.

Run: .venv/bin/python bench/gateway.py [--calls 300] [--repeat 7] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sqlite3
import sys
import tempfile
import time
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path

from benchkit import ROOT, Spread, describe_machine, goal_line, load_average
from mcp import ClientSession, StdioServerParameters
from mcp.client.stdio import stdio_client

TOOL = "get_current_time"
ARGS = {"timezone": "UTC"}
GOAL_MS = 1.0  # issue 15's goal for governing a tool call (the framework integrations)
TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def time_server() -> str:
    """The `mcp-server-time` executable, as tests/mcp_servers.py finds it."""
    for folder in (Path(sys.executable).parent, ROOT / ".venv" / "bin"):
        if (folder / "mcp-server-time").is_file():
            return str(folder / "mcp-server-time")
    found = shutil.which("mcp-server-time")
    if found is None:
        sys.exit("mcp-server-time is not installed: pip install mcp-server-time==2026.10.19 (or make test)")
    return found


# -- processes ----------------------------------------------------------------------------


def children(pid: int) -> list[tuple[int, str]]:
    """The (pid, command line) of each live child of `pid` (Linux /proc; [] elsewhere)."""
    found: list[tuple[int, str]] = []
    for entry in Path("/proc").glob("[0-9]*"):
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(
                    (int(entry.name), (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode())
                )
        except (OSError, ValueError, IndexError):
            continue
    return found


def child_running(pid: int, word: str) -> int | None:
    return next((child for child, cmdline in children(pid) if word in cmdline), None)


def cpu_seconds(pid: int | None) -> float | None:
    """utime + stime of `pid` so far, in seconds; None when it cannot be read."""
    if pid is None:
        return None
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / TICK  # fields 14 and 15 of stat(5)


@dataclass
class Route:
    """One way to the server: its session, the processes whose CPU is read, the figures."""

    session: ClientSession
    pids: dict[str, int | None]
    seconds: list[float] = field(default_factory=list)
    cpu: dict[str, list[float]] = field(default_factory=dict)
    stored: float = 0.0  # journal bytes per measured call

    async def batch(self, calls: int) -> None:
        before = {name: cpu_seconds(pid) for name, pid in self.pids.items()}
        start = time.perf_counter()
        for _ in range(calls):
            result = await self.session.call_tool(TOOL, ARGS)
            assert not result.is_error, result
        self.seconds.append((time.perf_counter() - start) / calls)
        for name, pid in self.pids.items():
            after, earlier = cpu_seconds(pid), before[name]
            if after is not None and earlier is not None:
                self.cpu.setdefault(name, []).append((after - earlier) / calls)


async def session(stack: AsyncExitStack, params: StdioServerParameters, errlog: Path) -> ClientSession:
    log = stack.enter_context(errlog.open("w"))
    read, write = await stack.enter_async_context(stdio_client(params, errlog=log))
    started = await stack.enter_async_context(ClientSession(read, write))
    await started.initialize()
    return started


def journal_bytes(db: Path) -> int:
    """The journal's logical size now (its pages, the WAL's included), read beside the gateway."""
    connection = sqlite3.connect(db)
    try:
        pages = connection.execute("PRAGMA page_count").fetchone()[0]
        size = connection.execute("PRAGMA page_size").fetchone()[0]
        return int(pages * size)
    finally:
        connection.close()


async def measure(tmp: Path, server: str, calls: int, repeat: int, warmup: int) -> tuple[Route, Route]:
    policy = tmp / "policy.yaml"
    policy.write_text("version: 1\nrules: []\n")  # reads are allowed by default
    gateway_args = ["-m", "tether", "mcp-gateway", "--upstream", server, "--policy", str(policy)]
    source = str(ROOT / "src")
    path = os.pathsep.join(p for p in (source, os.environ.get("PYTHONPATH", "")) if p)
    async with AsyncExitStack() as stack:
        direct_session = await session(
            stack, StdioServerParameters(command=server, cwd=str(tmp)), tmp / "direct.log"
        )
        direct = Route(
            direct_session, {"mcp-server-time (direct)": child_running(os.getpid(), "mcp-server-time")}
        )
        params = StdioServerParameters(
            command=sys.executable,
            args=[*gateway_args, "--db", str(tmp / "tether.db")],
            cwd=str(tmp),
            env={"PYTHONPATH": path},  # the SDK starts a server with a minimal environment
        )
        gateway = Route(await session(stack, params, tmp / "gateway.log"), {})
        gateway_pid = child_running(os.getpid(), "mcp-gateway")
        upstream_pid = None if gateway_pid is None else child_running(gateway_pid, "mcp-server-time")
        gateway.pids = {
            "tether mcp-gateway": gateway_pid,
            "mcp-server-time (behind the gateway)": upstream_pid,
        }
        for way in (direct, gateway):
            names = [tool.name for tool in (await way.session.list_tools()).tools]
            assert TOOL in names, names
            for _ in range(warmup):
                result = await way.session.call_tool(TOOL, ARGS)
                assert not result.is_error, result
        before = journal_bytes(tmp / "tether.db")
        for _ in range(repeat):
            await direct.batch(calls)
            await gateway.batch(calls)
        gateway.stored = (journal_bytes(tmp / "tether.db") - before) / (calls * repeat)
    return direct, gateway


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=300, help="calls per batch")
    parser.add_argument("--repeat", type=int, default=7, help="interleaved repetitions")
    parser.add_argument("--warmup", type=int, default=20, help="calls on each path before measuring")
    parser.add_argument("--quick", action="store_true", help="100 calls x 3 repetitions")
    args = parser.parse_args()
    if args.quick:
        args.calls, args.repeat = 100, 3
    server = time_server()
    with tempfile.TemporaryDirectory() as folder:
        tmp = Path(folder)
        print(describe_machine(tmp, ["mcp", "mcp-server-time"]))
        print(f"mcp-server-time: {server}")
        try:
            direct, gateway = asyncio.run(measure(tmp, server, args.calls, args.repeat, args.warmup))
        except BaseException:
            for log in sorted(tmp.glob("*.log")):  # the servers' stderr, gone with the folder
                print(f"--- {log.name}\n{log.read_text()[-2000:]}", file=sys.stderr)
            raise
    difference = Spread.of([(g - d) * 1e3 for d, g in zip(direct.seconds, gateway.seconds, strict=True)])
    print(
        f"\nget_current_time over stdio, {args.calls} calls x {args.repeat} interleaved repetitions "
        f"(after {args.warmup} warm-up calls each)\n"
    )
    print("| path | ms per call |\n|---|---|")
    print(
        f"| direct (client -> mcp-server-time) | {Spread.of([d * 1e3 for d in direct.seconds]).show('.2f')} |"
    )
    through = Spread.of([g * 1e3 for g in gateway.seconds]).show(".2f")
    print(f"| through tether mcp-gateway (SQLite journal) | {through} |")
    print(f"| difference per call (gateway − direct) | {difference.show('.2f')} |")
    print("\n| process | CPU ms per call |\n|---|---|")
    for way in (direct, gateway):
        for name in way.pids:
            figure = (
                Spread.of([c * 1e3 for c in way.cpu[name]]).show(".2f") if way.cpu.get(name) else "not read"
            )
            print(f"| {name} | {figure} |")
    print(f"\njournal: {gateway.stored:,.0f} bytes per measured call (results and exchanges kept)")
    print(f"load average after: {load_average()}")
    print("\n| goal | figure | met? |\n|---|---|---|")
    figure = f"{difference.median:.2f} ms per read call"
    print(
        goal_line(
            "governing a tool call under 1 ms (issue 15's goal for the integrations)",
            figure,
            difference.median < GOAL_MS,
        )
    )


if __name__ == "__main__":
    main()
