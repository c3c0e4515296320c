"""Runs stay on the version they started on; older versions stay loadable; moving is explicit."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tether import DefinitionError, RunStateError, Runtime, load_workflow, open_journal
from tether.journal import bodies

ROOT = Path(__file__).resolve().parents[1]
REFUND = ROOT / "examples" / "refund"


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the refund example whose workflow will change under a paused run."""
    monkeypatch.delitem(sys.modules, "refund_tools", raising=False)  # each test has its own copy
    target = tmp_path / "refund"
    shutil.copytree(REFUND, target, ignore=shutil.ignore_patterns("__pycache__"))
    return target


def tether(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "COLUMNS": "200",
            "REFUND_LEDGER": str(cwd / "ledger.sqlite"),
            # The code under test, when it is not the installed one (a worktree's sources).
            **({"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}),
        },
    )


def start_paused(folder: Path) -> str:
    out = tether(
        "run",
        str(folder),
        "--input",
        '{"order_id": "A-1001"}',
        "--model",
        f"script:{folder / 'proposals.json'}",
        "--db",
        "j.db",
        "--json",
        cwd=folder.parent,
    )
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["status"] == "paused"
    return str(result["run_id"])


def release_version_2(folder: Path, keep_v1: bool) -> None:
    text = (folder / "workflow.yaml").read_text()
    if keep_v1:
        (folder / "workflow.v1.yaml").write_text(text)
    (folder / "workflow.yaml").write_text(
        text.replace("version: 1", "version: 2").replace("max_steps: 8", "max_steps: 9")
    )


def test_a_paused_run_resumes_on_its_own_version_while_new_runs_use_the_newest(folder: Path) -> None:
    run_id = start_paused(folder)
    release_version_2(folder, keep_v1=True)
    assert load_workflow(folder).version == "2"

    journal = open_journal(str(folder.parent / "j.db"))
    ticket = run(journal.list_tickets())[0].ticket_id
    assert tether("approve", ticket, "--db", "j.db", cwd=folder.parent).returncode == 0
    resumed = tether("resume", run_id, "--db", "j.db", "--json", cwd=folder.parent)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads(resumed.stdout)["status"] == "completed"
    assert run(journal.get_run(run_id)).workflow_version == "1"
    journal.close()


def test_a_run_whose_version_is_gone_gets_a_clear_error_and_can_be_migrated(folder: Path) -> None:
    run_id = start_paused(folder)
    release_version_2(folder, keep_v1=False)

    refused = tether("resume", run_id, "--db", "j.db", cwd=folder.parent)
    assert refused.returncode == 2
    assert "no workflow in" in refused.stderr and "tether migrate" in refused.stderr

    moved = tether("migrate", run_id, "--to", str(folder), "--by", "ops", "--db", "j.db", cwd=folder.parent)
    assert moved.returncode == 0, moved.stderr
    journal = open_journal(str(folder.parent / "j.db"))
    record = run(journal.get_run(run_id))
    assert (record.workflow_version, record.status) == ("2", "paused")
    migrated = [e for e in run(journal.read_entries(run_id)) if e.kind == "migrated"]
    moved = migrated[0].body
    assert isinstance(moved, bodies.Migrated) and (moved.from_.version, moved.by) == ("1", "ops")
    ticket = run(journal.list_tickets())[0].ticket_id
    assert tether("approve", ticket, "--db", "j.db", cwd=folder.parent).returncode == 0
    done = tether("resume", run_id, "--db", "j.db", "--json", cwd=folder.parent)
    assert json.loads(done.stdout)["status"] == "completed"
    journal.close()


def test_migrating_to_a_version_without_the_current_state_is_refused(folder: Path) -> None:
    run_id = start_paused(folder)
    text = (folder / "workflow.yaml").read_text()
    (folder / "workflow.yaml").write_text(
        text.replace("version: 1", "version: 3").replace("resolve", "settle")
    )
    with pytest.raises(RunStateError, match="is in state 'resolve', which version 3 does not have"):
        journal = open_journal(str(folder.parent / "j.db"))
        run(Runtime(journal).migrate(run_id, load_workflow(folder), by="ops", workflow_ref=str(folder)))
    with pytest.raises(DefinitionError, match="no workflow in"):
        load_workflow(folder, pinned="sha256:nothing")
