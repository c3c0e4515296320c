"""Crash safety: a process killed (SIGKILL) between a write's intent and its recorded result.

The fixture workflow (tests/fixtures/crash) has two write tools that count their effects
in their own SQLite file: `charge` (not idempotent) and `ship` (idempotent, keyed by
`ctx.idempotency_key`). When the marker file exists, the next tool call deletes it and
kills its own process, after applying its effect (or before, if the marker says so).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tether.identity import Principal

CRASH = Path(__file__).parent / "fixtures" / "crash"
TIMEOUT = 30.0
LOCAL = Principal.local().principal_id  # who a command that opens the journal acts as


def flat(text: str) -> str:
    """Output with line wrapping undone, to look for phrases a person would read."""
    return " ".join(text.split())


@dataclass
class Cli:
    """`python -m tether ...` against one journal, from tmp_path, with the crash tools' env."""

    cwd: Path
    db: Path
    effects: Path
    marker: Path

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TETHER_DB", "FORCE_COLOR")}
        env |= {
            "CRASH_EFFECTS_DB": str(self.effects),
            "CRASH_MARKER": str(self.marker),
            "COLUMNS": "500",
            "NO_COLOR": "1",
        }
        return subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", str(self.db)],
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)

    def crash_once(self, when: str = "after") -> None:
        self.marker.write_text(when)

    def rows(self, sql: str) -> list[tuple[Any, ...]]:
        if not self.effects.exists():
            return []
        with sqlite3.connect(self.effects) as db:
            return db.execute(sql).fetchall()

    def only_run(self) -> dict[str, Any]:
        runs = self.json("runs")
        assert len(runs) == 1, runs
        run: dict[str, Any] = runs[0]
        return run

    def entries(self, run_id: str) -> list[dict[str, Any]]:
        shown = self.json("show", run_id)
        assert shown["chain"] == {"intact": True, "problems": []}
        entries: list[dict[str, Any]] = shown["entries"]
        return entries

    def steps(self, run_id: str) -> list[dict[str, Any]]:
        """The timeline rows of the run's steps, with what the model was shown of each."""
        steps: list[dict[str, Any]] = [
            row for row in self.json("show", run_id)["steps"] if row["kind"] == "step"
        ]
        return steps


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path, tmp_path / "tether.db", tmp_path / "effects.sqlite", tmp_path / "crash-once")


def killed_run(cli: Cli, script: str, when: str = "after") -> str:
    """Start a run whose first tool call kills the process; return the run id."""
    cli.crash_once(when)
    result = cli("run", str(CRASH), "--model", f"script:{CRASH / script}")
    assert result.returncode == -signal.SIGKILL, (result.returncode, result.stdout, result.stderr)
    assert not cli.marker.exists(), "the tool was never called"
    run = cli.only_run()
    # Nobody recorded how the step ended: the run still looks like it is running.
    assert (run["status"], run["state"]) == ("running", "work")
    return str(run["run_id"])


def kinds(entries: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in entries]


def charges(cli: Cli) -> list[tuple[Any, ...]]:
    return cli.rows("SELECT run_id, step_id, order_id, amount FROM charges")


def in_doubt(cli: Cli, script: str, when: str = "after") -> str:
    """A non-idempotent charge killed mid-step, then resumed: the run is in doubt."""
    run_id = killed_run(cli, script, when)
    resumed = cli("resume", run_id)
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    assert "effect_in_doubt" in resumed.stdout
    return run_id


def test_a_non_idempotent_write_cut_off_by_a_crash_waits_for_a_person_and_is_never_rerun(cli: Cli) -> None:
    run_id = killed_run(cli, "charge.json")
    assert charges(cli) == [(run_id, "s1", "A-1", 25.0)]  # the charge happened before the kill

    resumed = cli("resume", run_id)
    assert resumed.returncode == 1, resumed.stdout + resumed.stderr
    assert "effect_in_doubt" in resumed.stdout
    assert "not idempotent" in flat(resumed.stdout)
    assert len(charges(cli)) == 1, "resume must not charge again"
    run = cli.only_run()
    assert (run["status"], run["reason_code"], run["owner"]) == ("effect_in_doubt", "effect_in_doubt", "ops")

    entries = cli.entries(run_id)
    assert kinds(entries) == ["run_started", "intent", "effect_in_doubt"]
    intent, doubt = entries[1], entries[2]
    assert intent["step_id"] == doubt["step_id"] == "s1"
    assert doubt["body"]["tool"] == "charge"
    assert doubt["body"]["args"] == {"order_id": "A-1", "amount": 25.0}

    again = cli("resume", run_id)
    assert again.returncode == 2
    assert "tether resolve" in flat(again.stderr)
    assert "Traceback" not in again.stderr
    assert len(charges(cli)) == 1
    assert kinds(cli.entries(run_id)) == ["run_started", "intent", "effect_in_doubt"]

    resolved = cli("resolve", run_id, "--done", "--by", "ops", "--note", "charge is on the statement")
    assert resolved.returncode == 0, resolved.stderr
    assert "running" in resolved.stdout

    finished = cli("resume", run_id, "--json")
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["status"] == "completed"
    assert len(charges(cli)) == 1, "a write settled as done is not repeated"

    entries = cli.entries(run_id)
    assert kinds(entries) == [
        "run_started",
        "intent",
        "effect_in_doubt",
        "effect_settled",
        "transition",
        "run_finished",
    ]
    settled = entries[3]["body"]
    assert entries[3]["step_id"] == "s1"
    # Recorded as the local admin who ran the command; `--by ops` is a display name only.
    assert (settled["done"], settled["by"], settled["note"]) == (True, LOCAL, "charge is on the statement")
    [told] = [row["observation"] for row in cli.steps(run_id) if row["outcome"] == "executed"]
    assert told["outcome"] == "executed"
    assert entries[4]["body"]["exit"] == "done"


def test_a_run_settled_by_a_person_and_completed_no_longer_reports_the_doubt(cli: Cli) -> None:
    run_id = in_doubt(cli, "charge.json")
    assert cli("resolve", run_id, "--done", "--by", "ops").returncode == 0
    finished = cli("resume", run_id, "--json")
    assert finished.returncode == 0, finished.stderr

    result = json.loads(finished.stdout)
    run = cli.only_run()
    assert run["status"] == "completed"
    # A completed run listed with reason `effect_in_doubt` and owner `ops` reads as still
    # needing ops; a run completed after an approval clears both.
    assert (run["reason_code"], run["owner"]) == (None, None)
    assert (result["reason_code"], result["owner"]) == (None, None)


def test_an_idempotent_write_cut_off_by_a_crash_is_redone_with_the_same_key(cli: Cli) -> None:
    run_id = killed_run(cli, "ship.json")
    assert len(cli.rows("SELECT * FROM ship_calls")) == 1

    resumed = cli("resume", run_id, "--json")
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"

    calls = cli.rows("SELECT idempotency_key FROM ship_calls ORDER BY id")
    assert len(calls) == 2, "the tool ran again on resume"
    assert calls[0] == calls[1], "with the same idempotency key"
    assert cli.rows("SELECT idempotency_key, order_id FROM shipments") == [(calls[0][0], "A-1")]

    entries = cli.entries(run_id)
    assert "effect_in_doubt" not in kinds(entries)
    intents = [e for e in entries if e["kind"] == "intent"]
    assert len(intents) == 1, "the redo is not a new step"
    assert intents[0]["step_id"] == "s1"
    assert calls[0][0] == f"{run_id}:s1"  # the step's idempotency key, both times
    done = [e for e in entries if e["kind"] == "executed" and e["step_id"] == "s1"]
    assert len(done) == 1
    assert done[0]["body"]["recovered"] is True
    assert done[0]["body"]["result"] == {"shipped": "A-1"}
    assert cli.only_run()["status"] == "completed"


def test_an_effect_settled_as_not_done_is_reported_to_the_model_which_may_try_again(cli: Cli) -> None:
    # This time the process dies before the charge reaches the card.
    run_id = in_doubt(cli, "charge_retry.json", when="before")
    assert charges(cli) == []

    resolved = cli("resolve", run_id, "--not-done", "--by", "ops", "--note", "no charge at the bank")
    assert resolved.returncode == 0, resolved.stderr
    assert charges(cli) == [], "settling a doubt runs nothing"

    finished = cli("resume", run_id, "--json")
    assert finished.returncode == 0, finished.stderr
    assert json.loads(finished.stdout)["status"] == "completed"

    entries = cli.entries(run_id)
    settled = [e for e in entries if e["kind"] == "effect_settled" and e["step_id"] == "s1"]
    assert len(settled) == 1
    assert settled[0]["body"]["done"] is False
    [row] = [row for row in cli.steps(run_id) if row["outcome"] == "not_executed"]
    assert row["observation"] == {
        "step_id": "s1",
        "outcome": "not_executed",
        "resolved_by": LOCAL,
        "note": "no charge at the bank",
    }
    # The runtime did not redo s1 by itself; the model's next proposal, a new step, charged.
    assert charges(cli) == [(run_id, "s2", "A-1", 25.0)]
    assert [e["step_id"] for e in entries if e["kind"] == "intent"] == ["s1", "s2"]
