"""What the benchmark scripts share: the machine description, the SQLite commit floor,
medians with their spread, goal lines, and running one measurement in a child process.

Imported by the scripts in this folder (`python bench/NAME.py` puts it on the path).
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULT = "RESULT "  # a child process prints its result as one JSON line after this prefix


# -- the machine --------------------------------------------------------------------------


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for row in f:
                if row.startswith("model name"):
                    return row.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "?"


def _filesystem(path: Path) -> str:
    """The type and device of the mount holding `path` (Linux /proc/mounts), e.g. 'ext4 on /dev/vda'."""
    best = ("", "?", "?")
    try:
        with open("/proc/mounts") as f:
            for row in f:
                device, mount, kind = row.split()[:3]
                if str(path.resolve()).startswith(mount) and len(mount) > len(best[0]):
                    best = (mount, kind, device)
    except OSError:
        return "?"
    return f"{best[1]} on {best[2]}"


def load_average() -> str:
    return "n/a" if not hasattr(os, "getloadavg") else ", ".join(f"{x:.2f}" for x in os.getloadavg())


def describe_machine(tmp: Path, packages: Sequence[str]) -> str:
    """Date, commit, versions, CPU, disk and load: what a table needs to be compared with another."""
    try:
        rev = subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=10,
            check=False,
        ).stdout.strip()
    except OSError:
        rev = ""
    versions = [f"Python {platform.python_version()}", f"SQLite {sqlite3.sqlite_version}"]
    for package in packages:
        try:
            versions.append(f"{package} {version(package)}")
        except PackageNotFoundError:
            versions.append(f"{package} not installed")
    memory = ""
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        memory = f", {os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE') / 2**30:.0f} GiB RAM"
    return (
        f"{datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}; tether {rev or '?'}; "
        f"{'; '.join(versions)}\n"
        f"{os.cpu_count()} x {_cpu_model()}{memory}; temp files on {_filesystem(tmp)}; "
        f"load average {load_average()}"
    )


# -- the commit floor ---------------------------------------------------------------------


def sqlite_commit_seconds(path: Path, synchronous: str, commits: int) -> float:
    """Seconds per commit of one ~100-byte INSERT per transaction into a fresh WAL-mode file, one
    writer: the least a durable step can cost on this disk at this `synchronous` level."""
    db = sqlite3.connect(path, isolation_level=None)
    try:
        db.execute("PRAGMA journal_mode=WAL")
        db.execute(f"PRAGMA synchronous={synchronous}")
        db.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")
        body = "x" * 100
        start = time.perf_counter()
        for _ in range(commits):
            db.execute("BEGIN IMMEDIATE")
            db.execute("INSERT INTO t (body) VALUES (?)", (body,))
            db.execute("COMMIT")
        return (time.perf_counter() - start) / commits
    finally:
        db.close()
        for suffix in ("", "-wal", "-shm"):
            Path(f"{path}{suffix}").unlink(missing_ok=True)


# -- figures ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Spread:
    """The median of repeated measurements with the lowest and highest."""

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def show(self, fmt: str = ",.0f", suffix: str = "") -> str:
        """'1,234 (1,100–1,300)': the median, then the range when there is more than one value."""
        text = f"{self.median:{fmt}}{suffix}"
        return text if self.count == 1 else f"{text} ({self.low:{fmt}}–{self.high:{fmt}})"


def goal_line(goal: str, figure: str, met: bool | None) -> str:
    """One row of a goals table; `met` None when the figure could not be measured."""
    verdict = "not measured" if met is None else ("met" if met else "NOT met")
    return f"| {goal} | {figure} | {verdict} |"


GOALS_HEADER = "| goal (issue 9) | figure | met? |\n|---|---|---|"


# -- child processes ----------------------------------------------------------------------


def run_child(script: Path, kind: str, arg: dict[str, Any], timeout: float = 900) -> dict[str, Any]:
    """Run `script --child KIND JSON` for one measurement; return the JSON it printed after RESULT.

    A child that printed its result but then did not exit within the timeout is killed and
    its result kept, with `hung_on_exit` set.
    """
    # faulthandler: a child that crashes in C code (a driver) says where, in the error shown
    cmd = [sys.executable, "-X", "faulthandler", str(script), "--child", kind, json.dumps(arg)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
    hung = False
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        hung = True
    for row in reversed(stdout.splitlines()):
        if row.startswith(RESULT):
            result: dict[str, Any] = json.loads(row.removeprefix(RESULT))
            if hung:
                result["hung_on_exit"] = True
            return result
    state = f"timed out after {timeout:.0f}s" if hung else f"exited {proc.returncode}"
    raise RuntimeError(f"child {kind} {state}: {(stderr or stdout)[-800:]}")


def print_result(result: dict[str, Any]) -> None:
    """What a child prints for `run_child` to read."""
    print(RESULT + json.dumps(result), flush=True)
