"""A real `tether serve` for the web tests: a subprocess serving the refund example over a
SQLite journal, one in-process worker, and tokens for an approver, a viewer and an admin."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from tether.identity import create_token
from tether.journal import open_journal

ROOT = Path(__file__).resolve().parent.parent
REFUND = ROOT / "examples" / "refund"
SRC = ROOT / "src"


@dataclass
class WebServer:
    url: str
    db: Path
    tokens: dict[str, str]
    env: dict[str, str]
    process: subprocess.Popen[bytes]
    log: Path

    def submit(self, order_id: str = "A-1001", proposals: Path = REFUND / "proposals.json") -> str:
        """Queue a refund run (the README's walkthrough by default): the server's worker
        drives it until it pauses on the supervisor's approval of a refund of 180."""
        out = subprocess.run(
            [
                *(sys.executable, "-m", "tether", "submit", str(REFUND), "--json", "--db", str(self.db)),
                *("--input", json.dumps({"order_id": order_id, "reason": "kettle arrived broken"})),
                *("--model", f"script:{proposals}"),
            ],
            env=self.env,
            capture_output=True,
            text=True,
            check=True,
        )
        run_id: str = json.loads(out.stdout)["run_id"]
        return run_id

    def wait_for(self, run_id: str, status: str, timeout: float = 20.0) -> None:
        """Until the run has this status (read through the API, as the admin)."""
        headers = {"Authorization": f"Bearer {self.tokens['admin']}"}
        deadline = time.monotonic() + timeout
        seen = None
        while time.monotonic() < deadline:
            seen = httpx.get(f"{self.url}/api/v1/runs/{run_id}", headers=headers).json()["run"]["status"]
            if seen == status:
                return
            time.sleep(0.1)
        raise AssertionError(f"run {run_id} is {seen}, not {status}, after {timeout}s; see {self.log}")

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _tokens(db: Path) -> dict[str, str]:
    journal = open_journal(str(db))
    try:
        made = {}
        for name, role, scope, workflows in (
            ("supervisor", "approver", ("supervisor",), ()),
            ("viewer", "viewer", (), ()),
            ("admin", "admin", (), ()),
            ("finance", "approver", ("finance",), ()),
            ("billing", "viewer", (), ("billing",)),  # sees the billing workflow only
        ):
            token, _ = await create_token(
                journal, name=name, role=role, approver_for=scope, workflows=workflows, expires_in=3600
            )
            made[name] = token
        return made
    finally:
        await journal.aclose()


def start(tmp: Path) -> WebServer:
    db = tmp / "tether.db"
    tokens = asyncio.run(_tokens(db))
    env = {
        **os.environ,
        "PYTHONPATH": str(SRC),
        "REFUND_LEDGER": str(tmp / "ledger.sqlite"),
        "TETHER_WEB_SECRET": "web-tests-" + os.urandom(8).hex(),
    }
    port = _free_port()
    log = tmp / "serve.log"
    with log.open("wb") as output:  # the child keeps its own copy of the descriptor
        process = subprocess.Popen(
            [
                *(sys.executable, "-m", "tether", "serve", "--db", str(db), "--workflows", str(REFUND)),
                *("--port", str(port), "--workers", "1"),
            ],
            env=env,
            stdout=output,
            stderr=subprocess.STDOUT,
        )
    server = WebServer(f"http://127.0.0.1:{port}", db, tokens, env, process, log)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tether serve exited: {log.read_text()}")
        try:
            httpx.get(server.url + "/login", timeout=1)
            return server
        except httpx.TransportError:
            time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"tether serve did not start in 30 s: {log.read_text()}")
