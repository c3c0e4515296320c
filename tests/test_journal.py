"""The journal keeps what was recorded: append-only, hash-chained, one writer per run."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conftest import Shop, call, run
from tether import (
    Budget,
    ConcurrentWriteError,
    JournalError,
    Next,
    RunStateError,
    Runtime,
    ScriptedModel,
    Step,
    Terminal,
    Workflow,
)
from tether.hashing import encode_json
from tether.journal import Commit, Journal, NewEntry, RunRecord, RunUpdate, open_journal, verify_chain
from tether.journal.sqlite import SQLiteJournal


def completed_run(journal: Journal, shop: Shop) -> str:
    script = [
        call("read_order", order_id="A1"),
        call("refund", order_id="A1", amount=10.0),
        {"kind": "finish"},
    ]
    result = run(Runtime(journal).start(shop.workflow(), ScriptedModel(script)))
    assert result.status == "completed"
    return str(result.run_id)


def test_the_hash_chain_detects_an_edited_entry(tmp_path: Path, journal: Journal, shop: Shop) -> None:
    run_id = completed_run(journal, shop)
    entries = run(journal.read_entries(run_id))
    assert verify_chain(entries) == []
    assert [e.seq for e in entries] == list(range(1, len(entries) + 1))

    forged = msgspec.structs.replace(entries[3], body_json=entries[3].body_json[:-1] + ',"forged":true}')
    problems = verify_chain([*entries[:3], forged, *entries[4:]])
    assert problems == [f"seq {forged.seq}: content does not match its hash"]
    assert verify_chain([*entries[:2], *entries[3:]])[0].startswith("seq 3 missing")


def test_entries_cannot_be_rewritten_or_deleted_even_with_sql(
    tmp_path: Path, journal: Journal, shop: Shop
) -> None:
    run_id = completed_run(journal, shop)
    db = sqlite3.connect(tmp_path / "journal.db")
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("UPDATE entries SET body = '{}' WHERE run_id = ?", (run_id,))
    with pytest.raises(sqlite3.IntegrityError, match="append-only"):
        db.execute("DELETE FROM entries WHERE run_id = ?", (run_id,))


def test_a_second_writer_is_refused_and_changes_nothing(journal: Journal, shop: Shop) -> None:
    run_id = completed_run(journal, shop)
    record = run(journal.get_run(run_id))
    stale = Commit(
        run_id=run_id,
        expected_seq=record.last_seq - 1,
        expected_hash=record.last_hash,
        entries=[NewEntry("note", encode_json({"x": 1}))],
        update=RunUpdate(status="failed"),
    )
    with pytest.raises(ConcurrentWriteError, match="another process is working on it"):
        run(journal.commit(stale))
    after = run(journal.get_run(run_id))
    assert (after.status, after.last_seq) == ("completed", record.last_seq)
    assert len(run(journal.read_entries(run_id))) == record.last_seq


def test_a_journal_from_a_newer_tether_is_refused(tmp_path: Path) -> None:
    open_journal(str(tmp_path / "j.db")).close()
    with sqlite3.connect(tmp_path / "j.db") as db:
        db.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    with pytest.raises(JournalError, match="schema version 99, newer than this tether"):
        open_journal(str(tmp_path / "j.db"))


@pytest.mark.parametrize("form", ["sqlite:///{}", "{}"])
def test_journal_locations(tmp_path: Path, form: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    open_journal(form.format("here.db")).close()
    assert (tmp_path / "here.db").exists()
    with pytest.raises(JournalError, match="unsupported journal URL scheme 'mysql'"):
        open_journal("mysql://localhost/x")


def test_storage_per_step_stays_flat_as_a_run_grows(journal: Journal, shop: Shop) -> None:
    def bytes_per_step(steps: int) -> float:
        script = [call("read_order", order_id="A1") for _ in range(steps)]
        wf = shop.workflow(budget=Budget(max_steps=steps + 2, max_tool_calls=steps, max_repeats=steps))
        result = run(Runtime(journal).start(wf, ScriptedModel([*script, {"kind": "finish"}])))
        entries = run(journal.read_entries(result.run_id))
        return sum(len(msgspec.json.encode(e)) for e in entries) / steps

    small, large = bytes_per_step(20), bytes_per_step(400)
    assert large <= small * 1.1, (small, large)


def test_resume_refuses_a_different_workflow_definition(journal: Journal, shop: Shop) -> None:
    paused = run(
        Runtime(journal).start(shop.workflow(), ScriptedModel([call("refund", order_id="A1", amount=70.0)]))
    )
    changed = shop.workflow(budget=Budget(max_steps=11))
    with pytest.raises(RunStateError, match="is pinned to shop 1"):
        run(Runtime(journal).resume(paused.run_id, changed, ScriptedModel([])))


def test_a_finished_run_cannot_be_resumed(journal: Journal, shop: Shop) -> None:
    run_id = completed_run(journal, shop)
    with pytest.raises(RunStateError, match="is completed; there is nothing to resume"):
        run(Runtime(journal).resume(run_id, shop.workflow()))


def test_non_checkpoint_steps_are_written_with_the_next_checkpoint(journal: Journal) -> None:
    calls: list[str] = []

    def first(data: dict[str, Any]) -> Next:
        calls.append("first")
        return Next("second", update={"a": 1})

    def second(data: dict[str, Any]) -> Next:
        calls.append("second")
        return Next("end", update={"b": data["a"] + 1})

    wf = Workflow(
        "steps",
        "1",
        "first",
        [
            Step("first", first, ("second",), checkpoint=False),
            Step("second", second, ("end",)),
            Terminal("end"),
        ],
    )
    result = run(Runtime(journal).start(wf))
    assert (result.status, result.data) == ("completed", {"a": 1, "b": 2})
    entries = run(journal.read_entries(result.run_id))
    # Both step entries committed together: same timestamp, consecutive sequence numbers.
    steps = [e for e in entries if e.kind == "step_done"]
    assert [s.body.next for s in steps] == ["second", "end"]  # type: ignore[union-attr]
    assert steps[0].created_at == steps[1].created_at
    assert verify_chain(entries) == []


def test_a_failing_deterministic_step_fails_the_run_with_its_error(journal: Journal) -> None:
    def broken(data: dict[str, Any]) -> Next:
        raise ValueError("no customer id in input")

    wf = Workflow("b", "1", "intake", [Step("intake", broken, ("end",)), Terminal("end")])
    result = run(Runtime(journal).start(wf))
    assert (result.status, result.reason_code) == ("failed", "step_failed")
    assert result.message == "ValueError: no customer id in input"

    def strays(data: dict[str, Any]) -> Next:
        return Next("elsewhere")

    wf = Workflow("b", "1", "intake", [Step("intake", strays, ("end",)), Terminal("end")])
    result = run(Runtime(journal).start(wf))
    assert "declared next states: end" in str(result.message)


def test_the_time_budget_counts_working_time(journal: Journal, shop: Shop) -> None:
    slow = shop.workflow(budget=Budget(max_seconds=0.05))
    original = slow.states["shop"].tools[0].fn
    slow.states["shop"].tools[0].fn = lambda order_id: time.sleep(0.06) or original(order_id)
    result = run(Runtime(journal).start(slow, ScriptedModel([call("read_order", order_id="A1")] * 2)))
    assert (result.status, result.reason_code) == ("escalated", "budget_exhausted")
    assert "time budget" in str(result.message)


def test_token_budget_uses_reported_usage(journal: Journal, shop: Shop) -> None:
    usage = {"input_tokens": 600, "output_tokens": 100}
    script = [call("read_order", order_id="A1") | {"usage": usage}] * 3
    result = run(Runtime(journal).start(shop.workflow(budget=Budget(max_tokens=1000)), ScriptedModel(script)))
    assert (result.status, result.reason_code) == ("escalated", "budget_exhausted")
    assert "token budget of 1000" in str(result.message)


def test_resume_refuses_a_different_policy(journal: Journal, shop: Shop) -> None:
    paused = run(
        Runtime(journal).start(shop.workflow(), ScriptedModel([call("refund", order_id="A1", amount=70.0)]))
    )
    looser = shop.workflow(policy={"rules": [{"id": "anything-goes", "tool": "refund", "decision": "allow"}]})
    with pytest.raises(RunStateError, match="is pinned to policy"):
        run(Runtime(journal).resume(paused.run_id, looser, ScriptedModel([])))


def test_an_agent_workflow_without_a_model_is_refused_before_a_run_exists(
    journal: Journal, shop: Shop
) -> None:
    with pytest.raises(RunStateError, match="give a model to propose their steps"):
        run(Runtime(journal).start(shop.workflow()))
    assert run(journal.list_runs()) == []


def test_a_durable_commit_is_synced_with_the_whole_batch_it_shares(tmp_path: Path) -> None:
    journal = SQLiteJournal(tmp_path / "j.db")  # durability "normal": only intents are synced
    statements: list[str] = []
    journal._d._writer.set_trace_callback(statements.append)  # the SQL the writer really ran

    async def commit(run_id: str, *, durable: bool) -> None:
        r = await journal.get_run(run_id)
        entry = NewEntry("step", encode_json({"durable": durable}))
        await journal.commit(Commit(run_id, r.last_seq, r.last_hash, entries=[entry], durable=durable))

    async def scenario() -> None:
        for run_id in ("a", "b"):
            record = RunRecord(
                run_id=run_id,
                workflow_name="w",
                workflow_version="1",
                workflow_hash="h",
                workflow_ref="r",
                policy_hash="p",
                state="s",
                created_at=time.time(),
                updated_at=time.time(),
            )
            await journal.create_run(record, [])
        statements.clear()
        await commit("a", durable=False)
        assert "PRAGMA synchronous=FULL" not in statements and "COMMIT" in statements
        statements.clear()
        # a, queued behind b's intent, shares b's transaction and its sync.
        await asyncio.gather(commit("b", durable=True), commit("a", durable=False))
        batch = statements[statements.index("PRAGMA synchronous=FULL") :]
        assert [s.split()[0] for s in batch if not s.startswith("INSERT")] == [
            "PRAGMA",
            "BEGIN",
            "UPDATE",  # b's gate
            "UPDATE",  # a's gate
            "COMMIT",
            "PRAGMA",
        ]
        assert batch[-1] == "PRAGMA synchronous=NORMAL"

    asyncio.run(scenario())
    journal.close()
