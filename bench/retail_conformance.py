"""How well the retail policy matches tau2-bench's ground truth, and what deciding costs.

Replays each task's ground-truth actions through the governed retail workflow (every
confirmation approved), then runs the labelled policy violations of
tests/test_retail_violations.py, and prints one table: tasks replayed, ground-truth actions
allowed, false denials (a ground-truth action denied although tau2's own tool accepts it),
violations caught, and the mean and p99 time of one policy decision.

Run: .venv/bin/python bench/retail_conformance.py   (tau2's data is vendored in examples/retail/tau2/)
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
TAU2 = ROOT / "examples" / "retail" / "tau2"
sys.path.insert(0, str(ROOT / "examples" / "retail"))

import replay  # noqa: E402
import retail_tools  # noqa: E402

from tether import load_workflow, open_journal  # noqa: E402


def accepted_directly(db: dict[str, Any], actions: list[dict[str, Any]]) -> list[bool]:
    """For each action, whether tau2's semantics accept it when applied in order without the runtime."""
    state = copy.deepcopy(db)
    return [not isinstance(r, retail_tools.ActionFailed) for r in retail_tools.apply_actions(state, actions)]


async def ground_truth(limit: int | None) -> dict[str, Any]:
    tasks = json.loads((TAU2 / "tasks.json").read_text())[:limit]
    db = json.loads((TAU2 / "db.json").read_text())
    workflow = load_workflow(ROOT / "examples" / "retail")
    totals = {
        "tasks": 0,
        "actions": 0,
        "allowed": 0,
        "denied": 0,
        "false_denials": 0,
        "db_equal": 0,
        "decisions": [],
        "lookups": 0.0,
        "seconds": 0.0,
    }
    with tempfile.TemporaryDirectory() as tmp:
        journal = open_journal(str(Path(tmp) / "journal.db"))
        start = time.perf_counter()
        for task in tasks:
            actions = task["evaluation_criteria"]["actions"] or []
            result = await replay.replay(task["id"], actions, db, Path(tmp), journal, workflow)
            accepted = accepted_directly(db, actions)
            totals["tasks"] += 1
            totals["db_equal"] += result.db_matches
            totals["decisions"].extend(result.decision_seconds)
            totals["lookups"] += sum(result.lookup_seconds)
            steps = iter(result.steps)
            for action, ok in zip(actions, accepted, strict=True):
                step = next(s for s in steps if (s.tool, s.args) == (action["name"], action["arguments"]))
                totals["actions"] += 1
                if step.decision == "deny":
                    totals["denied"] += 1
                    totals["false_denials"] += ok
                else:
                    totals["allowed"] += 1
        totals["seconds"] = time.perf_counter() - start
        journal.close()
    return totals


def violations() -> tuple[int, int]:
    """Run the labelled violation suite; return (caught, total)."""
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            str(ROOT / "tests" / "test_retail_violations.py"),
            "-k",
            "test_violation_is_caught",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=False,
    )
    last = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    passed = int(last.split(" passed")[0].split()[-1]) if " passed" in last else 0
    failed = int(last.split(" failed")[0].split()[-1]) if " failed" in last else 0
    return passed, passed + failed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=None, help="replay only the first N tasks")
    args = parser.parse_args()
    totals = asyncio.run(ground_truth(args.tasks))
    caught, cases = violations()
    decisions = sorted(totals["decisions"])
    p99 = decisions[min(len(decisions) - 1, int(len(decisions) * 0.99))] if decisions else 0.0
    rows = [
        ("tasks replayed", f"{totals['tasks']}"),
        ("databases equal to direct application", f"{totals['db_equal']} / {totals['tasks']}"),
        (
            "ground-truth actions allowed (incl. asked, deferred)",
            f"{totals['allowed']} / {totals['actions']}",
        ),
        ("ground-truth actions denied", f"{totals['denied']}"),
        ("false denials (tau2's own tool accepts the call)", f"{totals['false_denials']}"),
        ("violations caught", f"{caught} / {cases}"),
        ("policy decisions timed", f"{len(decisions)}"),
        ("mean policy decision time", f"{statistics.fmean(decisions) * 1e6:.0f} µs" if decisions else "-"),
        ("p99 policy decision time", f"{p99 * 1e6:.0f} µs"),
        (
            "  of which resolver lookups (mean per decision)",
            f"{totals['lookups'] / max(len(decisions), 1) * 1e6:.0f} µs",
        ),
        (
            "  engine alone (mean per decision)",
            f"{(sum(decisions) - totals['lookups']) / max(len(decisions), 1) * 1e6:.0f} µs",
        ),
        ("replay wall time", f"{totals['seconds']:.1f} s"),
    ]
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value}")


if __name__ == "__main__":
    main()
