"""Who may run code on a worker: only the operator, through the roots it was started with.

Whoever can submit runs or write the journal chooses a run's `workflow_ref` and model spec.
Each test points them at a folder whose module writes a marker file when it is imported;
a worker started with `--workflows GOOD_ROOT` must never import it.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = """\
from tether import Next


def hello(data):
    return Next("done", facts={"greeted": True})
"""
EVIL = """\
from pathlib import Path

Path({marker!r}).write_text("imported")
from tether import Next


def hello(data):
    return Next("done")
"""
WORKFLOW = """\
name: greet
version: 1
start: hello
states:
  hello: {{kind: step, run: "{module}:hello", next: [done]}}
  done: {{kind: terminal}}
"""


def folder(path: Path, module: str, code: str) -> Path:
    path.mkdir(parents=True)
    (path / "workflow.yaml").write_text(WORKFLOW.format(module=module))
    (path / f"{module}.py").write_text(code)
    return path


@pytest.fixture
def setup(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(the operator's root, a folder of hostile code, the marker its import writes)."""
    marker = tmp_path / "imported.marker"
    good = folder(tmp_path / "roots" / "greet", "greet_steps", STEPS)
    evil = folder(tmp_path / "elsewhere" / "evil", "evil_steps", EVIL.format(marker=str(marker)))
    return good.parent, evil, marker


def tether(db: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if k not in ("TETHER_DB", "TETHER_WORKFLOWS")},
    )


def submit(db: Path, root: Path) -> str:
    submitted = tether(db, "submit", str(root / "greet"), "--json", cwd=root)
    assert submitted.returncode == 0, submitted.stderr
    run_id: str = json.loads(submitted.stdout)["run_id"]
    return run_id


def rewrite(db: Path, run_id: str, **columns: str) -> None:
    """What anyone who can write the journal can do."""
    with sqlite3.connect(db) as conn:
        for column, value in columns.items():
            conn.execute(f"UPDATE runs SET {column} = ? WHERE run_id = ?", (value, run_id))


def test_a_run_pointing_at_a_folder_of_code_never_makes_a_worker_import_it(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    root, evil, marker = setup
    db = tmp_path / "journal.db"
    # Pinned to the operator's workflow, but naming the hostile folder as where it lives.
    renamed = submit(db, root)
    rewrite(db, renamed, workflow_ref=str(evil))
    # Pinned to a workflow the roots do not hold, and naming the hostile folder.
    foreign = submit(db, root)
    rewrite(db, foreign, workflow_ref=str(evil), workflow_hash="sha256:" + "e" * 64)

    worker = tether(db, "worker", "--workflows", str(root), "--until-idle", cwd=evil)

    assert worker.returncode == 0, worker.stderr
    assert not marker.exists(), "the worker imported code a run named"
    runs = {r["run_id"]: r for r in json.loads(tether(db, "runs", "--json", cwd=tmp_path).stdout)}
    assert runs[renamed]["status"] == "completed"  # driven with the registry's own copy
    assert runs[foreign]["status"] == "queued"  # untouched, for a person
    assert runs[foreign]["message"].startswith("not driven by worker")
    assert "is not among the 1 workflow version(s) under this worker's roots" in runs[foreign]["message"]
    listed = tether(db, "runs", cwd=tmp_path).stdout
    assert "not driven by worker" in listed, listed


def test_a_function_model_named_by_a_run_is_imported_only_from_the_roots(
    tmp_path: Path, setup: tuple[Path, Path, Path]
) -> None:
    root, evil, marker = setup
    db = tmp_path / "journal.db"
    run_id = submit(db, root)
    # `function:` models import a module: from the worker's folder, before roots existed.
    rewrite(db, run_id, model_spec="function:evil_steps:hello")

    worker = tether(db, "worker", "--workflows", str(root), "--until-idle", cwd=evil)

    assert worker.returncode == 0, worker.stderr
    assert not marker.exists(), "the worker imported a model module a run named"
    [run] = json.loads(tether(db, "runs", "--json", cwd=tmp_path).stdout)
    assert run["status"] == "queued"
    assert "module 'evil_steps' is not under this worker's roots" in run["message"]


def test_a_worker_without_roots_refuses_to_start(tmp_path: Path) -> None:
    worker = tether(tmp_path / "journal.db", "worker", "--until-idle", cwd=tmp_path)

    assert worker.returncode == 2
    assert "--workflows DIR" in worker.stderr
    assert not (tmp_path / "journal.db").exists()
