"""An agent paused on a tether ticket survives a real restart: the examples' first half, the
person's approval and the resume each run in a process of their own (the framework tests do
the same with fresh objects in one process, to test more cases quickly)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "integrations"


def process(*args: str | Path, cwd: Path) -> str:
    """A new Python process (with this one's environment: the sources under test), its stdout."""
    done = subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def refunds(shop: Path) -> list[tuple[str, float]]:
    return [(r["order_id"], r["amount"]) for r in json.loads(shop.read_text())["refunds"]]


@pytest.mark.parametrize(
    ("framework", "start", "resume"),
    [
        ("openai_agents", ["start"], ["resume"]),
        ("pydantic_ai", ["refund 70 on order A1"], ["--resume"]),
    ],
)
def test_a_paused_agent_is_approved_from_another_process_and_resumed_in_a_third(
    tmp_path: Path, framework: str, start: list[str], resume: list[str]
) -> None:
    script, db = EXAMPLES / framework / "support_agent.py", tmp_path / "tether.db"
    paused = process(script, *start, "--db", db, cwd=tmp_path)
    (ticket,) = set(re.findall(r"tkt_[0-9a-f]+", paused))
    shop = tmp_path / "tether.db.shop.json"
    assert refunds(shop) == []  # asked, not run

    process("-m", "tether", "approve", ticket, "--db", db, cwd=tmp_path)
    process(script, *resume, "--db", db, cwd=tmp_path)
    assert refunds(shop) == [("A1", 70.0)]

    (run_id,) = set(re.findall(r"run_[0-9a-f]+", paused))
    shown = process("-m", "tether", "show", run_id, "--db", db, cwd=tmp_path)
    assert "journal intact" in shown
    assert re.search(rf"ask by \S+.*\n.*awaiting_approval \(ticket {ticket}\)", shown)
    assert re.search(r"refund\(amount=70\.0, order_id=\"A1\"\)[\s\S]*→ executed", shown)
