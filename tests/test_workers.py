"""Workers against a real journal: queued runs, leases, crashes, graceful drains.

The PostgreSQL tests need the server on 127.0.0.1:5432 (user postgres, database test); they
skip with a message without it, and fail instead when CI=true.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tether import Runtime, load_workflow, open_journal
from tether.journal import Journal, verify_chain

ROOT = Path(__file__).resolve().parents[1]
CHAOS = Path(__file__).resolve().parent / "fixtures" / "chaos"
SCRIPT = f"script:{CHAOS / 'proposals.json'}"
PG = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")


def run(coro: Any) -> Any:
    return asyncio.run(coro)


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A fresh schema in the test database, dropped afterwards."""
    try:
        import psycopg

        admin = psycopg.connect(PG, autocommit=True, connect_timeout=3)
    except Exception as exc:  # not installed, or no server
        if os.environ.get("CI") == "true":
            raise RuntimeError(f"PostgreSQL not reachable at {PG}: CI must run the PostgreSQL tests") from exc
        pytest.skip(f"PostgreSQL not reachable at {PG} ({exc}); set TETHER_TEST_PG to a server URL")
    schema = f"tether_workers_{uuid.uuid4().hex[:10]}"
    admin.execute(f"CREATE SCHEMA {schema}")
    try:
        yield f"{PG}?options=-csearch_path%3D{schema}"
    finally:
        admin.execute(f"DROP SCHEMA {schema} CASCADE")
        admin.close()


def effects(url: str, sql: str) -> list[tuple[Any, ...]]:
    if url.startswith("postgres"):
        import psycopg

        with psycopg.connect(url) as conn:
            return list(conn.execute(sql).fetchall())
    import sqlite3

    with sqlite3.connect(url) as conn:
        return conn.execute(sql).fetchall()


def submit(journal: Journal, count: int) -> list[str]:
    workflow = load_workflow(CHAOS)
    runtime = Runtime(journal)
    return [
        run(runtime.submit(workflow, workflow_ref=str(CHAOS), model_spec=SCRIPT)).run_id for _ in range(count)
    ]


def spawn_worker(db: str, env: dict[str, str], *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            *(sys.executable, "-m", "tether", "worker", "--db", db, "--workflows", str(CHAOS)),
            *("--lease", "2", "--concurrency", "8", *extra),
        ],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )


def statuses(journal: Journal) -> dict[str, str]:
    return {r.run_id: r.status for r in run(journal.list_runs(limit=10_000))}


def worker_env(effects_url: str) -> dict[str, str]:
    # The caller's PYTHONPATH stays first: workers run the tether under test.
    path = os.pathsep.join(p for p in (os.environ.get("PYTHONPATH"), str(CHAOS)) if p)
    return {**os.environ, "EFFECTS_URL": effects_url, "PYTHONPATH": path}


def wait_until_settled(journal: Journal, ids: list[str], seconds: float, tick: Any = None) -> dict[str, str]:
    """Until every run is settled; `tick(records)` is called with the runs twice a second."""
    deadline = time.time() + seconds
    while True:
        records = run(journal.list_runs(limit=10_000))
        now = {r.run_id: r.status for r in records}
        if all(now[i] in ("completed", "effect_in_doubt") for i in ids) or time.time() > deadline:
            return now
        if tick:
            tick(records)
        time.sleep(0.5)


def test_chaos_200_runs_4_workers_killed_at_random(pg_url: str) -> None:
    journal = open_journal(pg_url)
    ids = submit(journal, 200)
    env = worker_env(pg_url)
    workers = [spawn_worker(pg_url, env) for _ in range(4)]
    kills = 0
    seen: dict[str, str] = {}

    def kill_one(records: list[Any]) -> None:
        """Kill a worker at random, once some run moved on since the last kill: on a loaded
        machine, where a worker may take seconds to start, the workers are not all killed
        before any of them did anything."""
        nonlocal kills, seen
        now = {r.run_id: r.status for r in records}
        if now == seen:
            return
        seen = now
        victim = random.choice(workers)
        victim.kill()
        victim.wait()
        workers.remove(victim)
        workers.append(spawn_worker(pg_url, env))
        kills += 1

    try:
        final = wait_until_settled(journal, ids, 240, tick=kill_one)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=30)

    assert kills >= 5
    assert {final[i] for i in ids} <= {"completed", "effect_in_doubt"}, final
    shipped = dict(
        effects(pg_url, "SELECT run_id, count(*) FROM effects WHERE kind = 'ship' GROUP BY run_id")
    )
    charged = dict(
        effects(pg_url, "SELECT run_id, count(*) FROM effects WHERE kind = 'charge' GROUP BY run_id")
    )
    for run_id in ids:
        entries = run(journal.read_entries(run_id))
        assert verify_chain(entries) == [], run_id  # contiguous and intact
        assert charged.get(run_id, 0) <= 1, f"{run_id}: a non-idempotent charge was applied twice"
        if final[run_id] == "completed":
            assert shipped.get(run_id) == 2, f"{run_id}: each idempotent shipment exactly once"
            assert charged.get(run_id) == 1
            assert entries[-1].kind == "run_finished"
        else:
            assert entries[-1].kind == "effect_in_doubt"
            assert shipped.get(run_id, 0) <= 2
    journal.close()


def test_two_workers_never_execute_the_same_step(pg_url: str) -> None:
    journal = open_journal(pg_url)
    ids = submit(journal, 60)
    env = worker_env(pg_url)
    workers = [spawn_worker(pg_url, env) for _ in range(2)]
    try:
        final = wait_until_settled(journal, ids, 120)
    finally:
        for w in workers:
            w.send_signal(signal.SIGTERM)
        for w in workers:
            w.wait(timeout=30)
    assert all(final[i] == "completed" for i in ids)
    per_step = effects(
        pg_url, "SELECT run_id, step_id, count(*), count(DISTINCT pid) FROM attempts GROUP BY run_id, step_id"
    )
    assert len(per_step) == 60 * 3
    assert all(count == 1 for _, _, count, _ in per_step), "a step was executed twice"
    pids = {row[0] for row in effects(pg_url, "SELECT DISTINCT pid FROM attempts")}
    assert len(pids) == 2, "both workers took part"
    journal.close()


def test_sigterm_drains_and_another_worker_finishes(tmp_path: Path) -> None:
    db = str(tmp_path / "journal.db")
    effects_db = str(tmp_path / "effects.db")
    journal = open_journal(db)
    ids = submit(journal, 30)
    env = worker_env(effects_db)
    first = spawn_worker(db, env, "--concurrency", "2")
    deadline = time.time() + 30
    while not any(s != "queued" for s in statuses(journal).values()) and time.time() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGTERM)
    assert first.wait(timeout=30) == 0
    records = run(journal.list_runs(limit=100))
    assert all(r.lease_owner is None for r in records), "a drained worker leaves no lease behind"

    second = subprocess.run(
        [sys.executable, "-m", "tether", "worker", "--db", db, "--workflows", str(CHAOS), "--until-idle"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )
    assert second.returncode == 0, second.stderr
    final = statuses(journal)
    assert all(final[i] == "completed" for i in ids)
    per_step = effects(effects_db, "SELECT run_id, step_id, count(*) FROM attempts GROUP BY run_id, step_id")
    assert all(count == 1 for _, _, count in per_step)
    journal.close()


def test_submit_from_the_command_line_then_a_worker_runs_it(tmp_path: Path) -> None:
    db = str(tmp_path / "journal.db")
    env = worker_env(str(tmp_path / "effects.db"))

    def tether(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", db],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    submitted = tether("submit", str(CHAOS), "--model", SCRIPT, "--json")
    assert submitted.returncode == 0, submitted.stderr
    import json

    run_id = json.loads(submitted.stdout)["run_id"]
    journal = open_journal(db)
    assert statuses(journal)[run_id] == "queued"
    # An older run of a version whose folder is gone: the worker cannot drive it, leaves it
    # untouched, and must not let it stand in front of the runs it can drive.
    gone = tmp_path / "gone"
    shutil.copytree(CHAOS, gone)
    definition = gone / "workflow.yaml"
    definition.write_text(definition.read_text().replace("version: 1", "version: 0"))
    older = tether("submit", str(gone), "--model", SCRIPT, "--json")
    stuck = json.loads(older.stdout)["run_id"]
    journal.close()
    with sqlite3.connect(db) as conn:
        conn.execute("UPDATE runs SET updated_at = updated_at - 60 WHERE run_id = ?", (stuck,))
    shutil.rmtree(gone)
    worker = tether("worker", "--workflows", str(CHAOS), "--until-idle")
    assert worker.returncode == 0, worker.stderr
    journal = open_journal(db)
    assert statuses(journal)[run_id] == "completed"
    assert statuses(journal)[stuck] == "queued" and f"run {stuck} set aside, not driven" in worker.stderr
    # One line per claimed and per settled run, and a summary on exit.
    assert f"claimed run {run_id}" in worker.stderr and f"run {run_id} completed" in worker.stderr
    assert "claimed 2; runs stopped: 1 completed; set aside 1; errors 0" in worker.stdout
    journal.close()


def test_an_approval_from_another_process_makes_a_paused_run_runnable_again(tmp_path: Path) -> None:
    db = str(tmp_path / "journal.db")
    refund = ROOT / "examples" / "refund"
    env = {**os.environ, "REFUND_LEDGER": str(tmp_path / "ledger.sqlite")}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", db],
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=ROOT,
        )

    submitted = cli(
        "submit",
        str(refund),
        "--input",
        '{"order_id": "A-1001"}',
        "--model",
        f"script:{refund / 'proposals.json'}",
        "--json",
    )
    assert submitted.returncode == 0, submitted.stderr
    import json

    run_id = json.loads(submitted.stdout)["run_id"]
    assert cli("worker", "--workflows", str(refund), "--until-idle").returncode == 0
    journal = open_journal(db)
    assert statuses(journal)[run_id] == "paused"
    ticket = run(journal.list_tickets())[0].ticket_id
    assert cli("approve", ticket, "--by", "supervisor").returncode == 0
    assert cli("worker", "--workflows", str(refund), "--until-idle").returncode == 0
    assert statuses(journal)[run_id] == "completed"
    journal.close()


def test_a_worker_drives_the_versions_and_policies_under_its_roots_and_sets_the_rest_aside(
    tmp_path: Path,
) -> None:
    db = str(tmp_path / "journal.db")
    folder = tmp_path / "roots" / "greet"
    folder.mkdir(parents=True)
    (folder / "greet_steps.py").write_text(
        "from tether import Next\n\n\ndef hello(data):\n    return Next('done')\n"
    )
    workflow = (
        "name: greet\nversion: {v}\nstart: hello\nstates:\n"
        "  hello: {{kind: step, run: 'greet_steps:hello', next: [done]}}\n  done: {{kind: terminal}}\n"
    )
    (folder / "workflow.yaml").write_text(workflow.format(v=1))
    strict = folder / "strict.yaml"
    strict.write_text("version: 1\nrules: [{id: any-tool, tool: '*', decision: allow}]\n")
    elsewhere = tmp_path / "elsewhere.yaml"  # not under the roots
    elsewhere.write_text("version: 1\nrules: [{id: no-tool, tool: '*', decision: deny}]\n")

    def tether(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", db],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )

    def submit(*extra: str) -> str:
        submitted = tether("submit", str(folder), "--json", *extra)
        assert submitted.returncode == 0, submitted.stderr
        run_id: str = json.loads(submitted.stdout)["run_id"]
        return run_id

    plain, strict_run = submit(), submit("--policy", str(strict))
    foreign, other = submit("--policy", str(elsewhere)), submit("--policy", str(elsewhere))
    # A new version replaces workflow.yaml; the one the runs are pinned to is kept beside it.
    (folder / "workflow.yaml").rename(folder / "workflow.v1.yaml")
    (folder / "workflow.yaml").write_text(workflow.format(v=2))

    worker = tether("worker", "--workflows", str(tmp_path / "roots"), "--until-idle")

    assert worker.returncode == 0, worker.stderr
    assert "2 workflow version(s): greet 1, greet 2" in worker.stderr
    runs = {r["run_id"]: r for r in json.loads(tether("runs", "--json").stdout)}
    assert runs[plain]["status"] == runs[strict_run]["status"] == "completed"
    assert runs[foreign]["status"] == runs[other]["status"] == "queued"
    assert f"the run's policy file {elsewhere} is not under this worker's roots" in runs[foreign]["message"]
    # A person who trusts it drives one, a worker whose roots hold the policy the other;
    # the note that they were set aside goes with them.
    assert tether("resume", foreign).returncode == 0
    wider = tether("worker", "--workflows", str(tmp_path), "--until-idle")
    assert wider.returncode == 0, wider.stderr
    runs = {r["run_id"]: r for r in json.loads(tether("runs", "--json").stdout)}
    assert [(runs[r]["status"], runs[r]["message"]) for r in (foreign, other)] == [("completed", None)] * 2
