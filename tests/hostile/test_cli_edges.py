"""The sharp edges a newcomer hit on the command line, each in a real `tether` process.

A mistyped journal path, a replay of a run that is not there, a narrow terminal, a status
that does not exist, a run whose process died: each must be refused clearly, or shown as
it is, and never silently create or hide anything.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tether import __version__

REPO = Path(__file__).resolve().parents[2]
REFUND = REPO / "examples" / "refund"
PROPOSALS = REFUND / "proposals.json"
REFUND_INPUT = json.dumps({"order_id": "A-1001", "reason": "kettle arrived broken"})


def flat(text: str) -> str:
    return " ".join(text.split())


@dataclass
class Tether:
    """`python -m tether ...` from tmp_path, with a terminal `columns` wide."""

    cwd: Path
    db: Path
    columns: int = 500

    def __call__(self, *args: str, db: Path | None = None) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k not in ("TETHER_DB", "FORCE_COLOR")}
        env |= {
            "REFUND_LEDGER": str(self.cwd / "ledger.sqlite"),
            "COLUMNS": str(self.columns),
            "NO_COLOR": "1",
        }
        return subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", str(db or self.db)],
            cwd=self.cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def json(self, *args: str) -> Any:
        result = self(*args, "--json")
        assert result.returncode == 0, result.stdout + result.stderr
        return json.loads(result.stdout)

    def paused_refund(self) -> dict[str, Any]:
        started = self.json("run", str(REFUND), "--input", REFUND_INPUT, "--model", f"script:{PROPOSALS}")
        assert started["status"] == "paused", started
        return started  # type: ignore[no-any-return]


@pytest.fixture
def tether(tmp_path: Path) -> Tether:
    return Tether(tmp_path, tmp_path / "tether.db")


# -- a mistyped journal path is never created ---------------------------------------------

READ_OR_DECIDE = [
    ("runs",),
    ("approvals",),
    ("show", "run_x"),
    ("exchanges", "run_x"),
    ("policy", "explain", "run_x", "s1"),
    ("db", "prune-exchanges", "--older-than", "30d"),
    ("approve", "tkt_x"),
    ("deny", "tkt_x", "--reason", "no"),
    ("answer", "tkt_x", "yes"),
    ("resolve", "run_x", "--done"),
    ("resume", "run_x"),
    ("migrate", "run_x", "--to", str(REFUND)),
]


@pytest.mark.parametrize("command", READ_OR_DECIDE, ids=lambda c: " ".join(c[:2]))
def test_a_command_that_only_reads_or_decides_never_creates_a_journal_at_a_mistyped_path(
    tether: Tether, command: tuple[str, ...]
) -> None:
    typo = tether.cwd / "tehter.db"

    result = tether(*command, db=typo)

    assert result.returncode == 2, result.stdout + result.stderr
    assert f"no journal at {typo}" in flat(result.stderr)
    assert not typo.exists()
    assert list(tether.cwd.iterdir()) == [], "nothing at all was created"


def test_commands_that_write_create_the_journal(tether: Tether) -> None:
    assert tether("db", "upgrade").returncode == 0
    assert tether.db.exists()


# -- replaying a run that is not there ----------------------------------------------------


def test_a_replay_of_an_unknown_run_is_refused_before_anything_is_created(tether: Tether) -> None:
    tether.paused_refund()

    for command in ("run", "submit"):
        result = tether(command, str(REFUND), "--input", REFUND_INPUT, "--model", "replay:run_nowhere")

        assert result.returncode == 2, result.stdout + result.stderr
        assert "no run run_nowhere in this journal, so no recorded model exchanges" in flat(result.stderr)
        assert len(tether.json("runs")) == 1, "no run was created"


def test_the_model_help_says_a_rerun_executes_tools_for_real(tether: Tether) -> None:
    shown = flat(tether("run", "--help").stdout)

    assert "rerun:RUN" in shown
    assert "executes its tools for real, writes included" in shown
    assert "`tether replay RUN` is the replay that never executes anything" in shown


# -- what a person reads ------------------------------------------------------------------


def test_run_and_ticket_ids_are_never_cut_on_a_narrow_terminal(tether: Tether) -> None:
    started = tether.paused_refund()
    tether.columns = 40

    listed = tether("runs").stdout
    approvals = tether("approvals").stdout
    shown = tether("show", started["run_id"]).stdout

    assert started["run_id"] in listed
    assert started["ticket_id"] in listed  # the paused run's message names its ticket
    assert started["ticket_id"] in approvals and started["run_id"] in approvals
    assert started["ticket_id"] in shown


def test_an_unknown_status_is_refused_listing_the_valid_ones(tether: Tether) -> None:
    tether.paused_refund()

    result = tether("runs", "--status", "finished")

    assert result.returncode == 2
    assert "--status 'finished' is not a run status" in result.stderr
    assert "queued, running, paused, completed, failed, escalated, handed_off, effect_in_doubt" in flat(
        result.stderr
    )


def test_version_and_flags_in_help(tether: Tether) -> None:
    version = subprocess.run(
        [sys.executable, "-m", "tether", "--version"], capture_output=True, text=True, timeout=60
    )
    assert version.stdout.strip() == f"tether {__version__}"
    for command in ("run", "worker", "resolve", "approvals"):
        shown = tether(command, "--help").stdout
        assert "<bool>" not in shown, shown
    assert "--done / --not-done" in tether("resolve", "--help").stdout


def test_every_hint_carries_the_journal_it_was_given(tether: Tether) -> None:
    started = tether("run", str(REFUND), "--input", REFUND_INPUT, "--model", f"script:{PROPOSALS}")
    run_id = next(w for w in started.stdout.split() if w.startswith("run_"))
    ticket = next(w for w in started.stdout.split() if w.startswith("tkt_"))
    where = f"--db {tether.db}"

    assert f"tether approve {ticket} {where}" in flat(started.stdout)
    assert f"tether deny {ticket} --reason TEXT {where}" in flat(started.stdout)
    assert f"tether resume {run_id} {where}" in flat(started.stdout)
    approved = tether("approve", ticket, "--by", "supervisor")
    assert f"tether resume {run_id} {where}" in flat(approved.stdout)


# -- --json for machines, errors included -------------------------------------------------


def test_deciding_and_settling_commands_answer_in_json(tether: Tether) -> None:
    started = tether.paused_refund()

    approved = tether.json("approve", started["ticket_id"], "--by", "supervisor")

    assert approved["ticket"]["ticket_id"] == started["ticket_id"]
    assert approved["ticket"]["status"] == "approved"
    assert approved["run"] == {"run_id": started["run_id"], "status": "paused"}
    again = tether("deny", started["ticket_id"], "--reason", "late", "--json")
    assert again.returncode == 2
    # Decided already: another decision won (the API answers it with 409).
    assert json.loads(again.stdout)["error"]["code"] == "conflict"
    migrated = tether.json("migrate", started["run_id"], "--to", str(REFUND))
    assert (migrated["run_id"], migrated["workflow_name"]) == (started["run_id"], "refund")
    worker = tether.json("worker", "--workflows", str(REFUND), "--until-idle")
    assert worker["claimed"] == 1 and worker["stopped"] == {"completed": 1}


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (("show", "run_nowhere"), "not_found", "no run 'run_nowhere'"),
        (("approve", "tkt_nowhere"), "ticket_error", "no ticket 'tkt_nowhere'"),
        (("resolve", "RUN", "--not-done"), "run_state", "not effect_in_doubt"),
        (("runs", "--status", "finished"), "bad_input", "is not a run status"),
        (("show",), "bad_input", "Missing argument 'RUN'"),
        (("runs", "--limit", "many"), "bad_input", "Invalid value for '--limit'"),
        (("run", "no-such-workflow"), "bad_input", "workflow not found"),
    ],
)
def test_with_json_errors_are_json_on_stdout_with_the_same_exit_code(
    tether: Tether, args: tuple[str, ...], code: str, message: str
) -> None:
    run_id = tether.paused_refund()["run_id"]

    result = tether(*(run_id if a == "RUN" else a for a in args), "--json")

    assert result.returncode == 2, result.stdout + result.stderr
    error = json.loads(result.stdout)["error"]
    assert error["code"] == code
    assert message in error["message"]
    assert result.stderr == ""


# -- a run whose process died -------------------------------------------------------------


def lease(db: Path, run_id: str, holder: str, expires_at: float) -> None:
    """Make the journal say what it says after a process that drove the run was killed."""
    with sqlite3.connect(db) as conn:
        conn.execute(
            "UPDATE runs SET status = 'running', lease_owner = ?, lease_expires_at = ? WHERE run_id = ?",
            (holder, expires_at, run_id),
        )


def test_a_running_run_shows_its_lease_holder_and_whether_it_is_alive(tether: Tether) -> None:
    run_id = tether.paused_refund()["run_id"]
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a pid of this host that no longer runs

    lease(tether.db, run_id, f"{socket.gethostname()}:{gone.pid}:abc123", time.time() + 25)
    [listed] = tether.json("runs")
    assert listed["lease"]["alive"] is False
    assert "its process has exited" in listed["lease"]["note"]
    assert f"{socket.gethostname()}:{gone.pid}:abc123" in tether("runs").stdout
    assert "its process has exited" in flat(tether("show", run_id).stdout)

    lease(tether.db, run_id, f"{socket.gethostname()}:{os.getpid()}:def456", time.time() + 25)
    assert tether.json("runs")[0]["lease"]["alive"] is True

    lease(tether.db, run_id, "elsewhere.example:4242:fed789", time.time() - 40)
    note = tether.json("runs")[0]["lease"]["note"]
    assert note.startswith("leased to elsewhere.example:4242:fed789: lease expired ")
    assert 39 <= int(note.split("expired ")[1].split(" s")[0]) <= 45
