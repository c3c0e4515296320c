"""Journals written before kernel v2 (entry body format 1) are read, verified and resumed."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from conftest import run
from tether import Runtime, ScriptedModel, load_workflow, open_journal
from tether.journal import bodies, verify_chain
from tether.timeline import timeline

FIXTURE = Path(__file__).parent / "fixtures" / "format1"
PAUSED, TICKET = "run_90f98d1a0ff9", "tkt_399f214258de"


@pytest.fixture
def old_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A copy of the format 1 journal (opening it upgrades its schema in place)."""
    monkeypatch.setenv("REFUND_LEDGER", str(tmp_path / "ledger.sqlite"))
    # Its refund_tools is the fixture's, not the example's another test of this process imported.
    monkeypatch.delitem(sys.modules, "refund_tools", raising=False)
    copy = tmp_path / "format1.db"
    shutil.copy(FIXTURE / "format1.db", copy)
    return copy


def test_every_format_1_entry_is_read_as_its_typed_record_and_every_chain_verifies(old_journal: Path) -> None:
    journal = open_journal(str(old_journal))
    try:
        records = run(journal.list_runs())
        assert len(records) == 5
        outcomes = set()
        for record in records:
            entries = run(journal.read_entries(record.run_id))
            assert verify_chain(entries) == [], record.run_id
            for e in entries:
                assert not isinstance(e.body, bodies.UnknownBody), (e.kind, e.body_json)
            outcomes |= {row["outcome"] for row in timeline(entries)}
    finally:
        journal.close()
    assert {
        "started",
        "refused",
        "tool_error",
        "executed",
        "verification_failed",
        "awaiting_answer",
        "answered",
        "awaiting_approval",
        "intent recorded, effect starting",
        "effect_in_doubt",
        "handoff",
        "transition",
        "completed",
    } <= outcomes


def test_what_a_format_1_step_recorded_survives_the_reading(old_journal: Path) -> None:
    journal = open_journal(str(old_journal))
    try:
        shop = [r for r in timeline(run(journal.read_entries("run_d8befe9f8c78"))) if r["kind"] == "step"]
    finally:
        journal.close()
    refusals = [(r["reason_code"], r["rule_id"]) for r in shop if r["outcome"] == "refused"]
    assert refusals == [
        ("malformed_output", "runtime:parse"),
        ("unknown_tool", "runtime:scope"),
        ("policy_denied", "no-big-refunds"),
        ("invalid_arguments", "runtime:arguments"),
    ]
    assert next(r for r in shop if r["outcome"] == "refused")["proposal"] == "not json at all"  # as it came
    executed = next(r for r in shop if r["outcome"] == "executed")
    assert executed["result"] == {"order_id": "A1", "total": 80.0}
    answered = next(r for r in shop if r["outcome"] == "answered")
    assert answered["source"] == {"kind": "person", "by": "customer"}


def test_a_run_paused_before_kernel_v2_resumes_and_appends_format_2_entries(old_journal: Path) -> None:
    workflow = load_workflow(FIXTURE / "refund")
    journal = open_journal(str(old_journal))
    try:
        record = run(journal.get_run(PAUSED))
        assert (record.status, workflow.hash) == ("paused", record.workflow_hash)
        run(journal.decide_ticket(TICKET, approve=True, by="supervisor", now=record.updated_at + 1))
        script = ScriptedModel.from_file(FIXTURE / "refund" / "proposals.json")
        result = run(Runtime(journal).resume(PAUSED, workflow, script))
        entries = run(journal.read_entries(PAUSED))
    finally:
        journal.close()
    assert result.status == "completed", result
    assert verify_chain(entries) == []
    kinds = [e.kind for e in entries]
    decided = kinds.index("ticket_decided")
    assert set(kinds[:decided]) == {"run_started", "step"}  # what was there is kept as it was
    assert kinds[decided:] == ["ticket_decided", "intent", "executed", "transition", "run_finished"]
    executed = next(e.body for e in entries if e.kind == "executed")
    assert isinstance(executed, bodies.Executed) and executed.ticket_id == TICKET
    assert executed.args == {"order_id": "A-1001", "amount": 180.0, "reason": "kettle arrived broken"}


def test_step_done_reads_as_before_without_carried_history_and_with_it_round_trips() -> None:
    """`step_done`'s `history` (calls carried into the run's `history`, the MCP gateway's
    `carry` step) is an added field: an entry without it reads as before and encodes to the
    same text (the text its hash covers); one with it, and `upstream_restarted`, round-trip."""
    from tether.hashing import encode_json

    before = (
        '{"carried":{"facts":{"a":1},"policy_hash":"p","workflow_hash":"w"},"facts":{"a":1},"next":"gateway"}'
    )
    record = bodies.decode("step_done", before)
    assert isinstance(record, bodies.StepDone) and record.history is None
    assert encode_json(record) == before
    call = {"args": {"order_id": "A-1"}, "outcome": "executed", "result": None, "state": "gateway"}
    carried = bodies.StepDone(
        next="gateway",
        history=bodies.CarriedHistory([call | {"step_id": "s1", "tool": "refund"}], ["run_1"], 2),
    )
    text = encode_json(carried)
    assert '"history":{"calls":[' in text and '"cut":2' in text and '"runs":["run_1"]' in text
    assert bodies.decode("step_done", text) == carried
    restarted = bodies.UpstreamRestarted(upstream="retail", restart=1, at=1.5)
    assert bodies.decode("upstream_restarted", encode_json(restarted)) == restarted
    assert bodies.KIND_OF[bodies.UpstreamRestarted] == "upstream_restarted"
