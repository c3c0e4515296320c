"""Real `tether serve` processes for the API tests and bench/serve.py: a free port, the
refund example's workflows, a scripted model, the journal given, ready when it answers."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
REFUND = REPO / "examples" / "refund"
PROPOSALS = REFUND / "proposals.json"
REFUND_INPUT = {"order_id": "A-1001", "reason": "kettle arrived broken"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def env_for(workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("TETHER_DB", "TETHER_TOKEN", "TETHER_SERVER")}
    return env | {
        "PYTHONPATH": str(REPO / "src"),
        "REFUND_LEDGER": str(workdir / "ledger.sqlite"),
        "COLUMNS": "500",
        "NO_COLOR": "1",
    }


@dataclass
class Served:
    """One `tether serve` process."""

    url: str
    process: subprocess.Popen[str]
    log: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def serve(
    db: str, workdir: Path, *, workers: int = 1, workflows: Path = REFUND, timeout: float = 30.0
) -> Served:
    """Start `tether serve` over `db` and wait until it answers."""
    port = free_port()
    log = workdir / f"serve-{port}.log"
    argv = [
        sys.executable,
        "-m",
        "tether",
        "serve",
        "--db",
        db,
        "--port",
        str(port),
        "--workflows",
        str(workflows),
        "--workers",
        str(workers),
        "--model",
        f"script:{PROPOSALS}",
    ]
    with log.open("w") as sink:
        process = subprocess.Popen(
            argv, cwd=workdir, env=env_for(workdir), stdout=sink, stderr=subprocess.STDOUT, text=True
        )
    served = Served(f"http://127.0.0.1:{port}", process, log)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"tether serve exited {process.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(served.url + "/openapi.json", timeout=1.0).status_code == 200:
                return served
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    served.stop()
    raise RuntimeError(f"tether serve did not answer within {timeout} s:\n{log.read_text()}")
