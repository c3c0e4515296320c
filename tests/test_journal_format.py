"""Journals written before kernel v2 (entry body format 1) are read, verified and resumed."""

from __future__ import annotations

import shutil
import sqlite3
import sys
from pathlib import Path

import pytest

from conftest import run
from tether import Runtime, ScriptedModel, load_workflow, open_journal
from tether.audit import verify_journal
from tether.decision import REASON_OF, Decision, runtime_refusal
from tether.hashing import encode_json
from tether.journal import bodies, integrity, verify_chain
from tether.reasons import ReasonCode
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


def test_the_schema_9_upgrade_keeps_every_hash_and_link_byte_for_byte(old_journal: Path) -> None:
    """The fixture is at an older schema, with hex hashes and a prev_hash column: after the
    upgrade every entry reads back with the same hash and link, every chain verifies."""
    db = sqlite3.connect(old_journal)
    before = db.execute("SELECT run_id, seq, prev_hash, hash FROM entries ORDER BY run_id, seq").fetchall()
    triggers = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'entries' AND type = 'trigger'"
    )
    triggers_before = sorted(triggers.fetchall())
    db.close()
    assert len(before) == 40 and all(len(h) == 64 for *_, h in before)
    journal = open_journal(str(old_journal))
    try:
        after = []
        for record in run(journal.list_runs()):
            entries = run(journal.read_entries(record.run_id))
            assert verify_chain(entries) == [], record.run_id
            assert integrity.chain_findings(record.run_id, entries) == []
            after += [(e.run_id, e.seq, e.prev_hash, e.hash) for e in entries]
        report = run(verify_journal(journal, None, key=None))
        assert report.findings == []
    finally:
        journal.close()
    assert sorted(after) == before
    db = sqlite3.connect(old_journal)
    stored = db.execute("SELECT hash FROM entries ORDER BY run_id, seq").fetchall()
    triggers = db.execute(
        "SELECT name, sql FROM sqlite_master WHERE tbl_name = 'entries' AND type = 'trigger'"
    )
    assert sorted(triggers.fetchall()) == triggers_before  # re-created from their very text
    db.close()
    assert [h for (h,) in stored] == [bytes.fromhex(h) for *_, h in before]


def test_a_decision_leaves_out_only_the_reason_code_its_kind_implies_and_old_bodies_read_the_same() -> None:
    for kind, code in REASON_OF.items():
        implied = Decision(kind, "rule-1", code, matched=["rule-1"]).stored()  # type: ignore[arg-type]
        assert '"reason_code"' not in encode_json(implied)
        back = bodies.decode("refused", encode_json(bodies.Refused(decision=implied, raw="x")))
        assert isinstance(back, bodies.Refused) and back.decision.reason_code is code
        other = Decision(kind, "rule-1", ReasonCode.NOT_DRIVABLE).stored()  # type: ignore[arg-type]
        assert '"reason_code":"not_drivable"' in encode_json(other)
    refusal = runtime_refusal("parse", ReasonCode.MALFORMED_OUTPUT, "not JSON").stored()
    assert '"reason_code":"malformed_output"' in encode_json(refusal)
    # Bodies written before: every one stores its reason code, and reads it as stored, the
    # implied ones included, and a code that is not its kind's (a deny by the runtime).
    old = (
        '{"args":{"i":0},"decision":{"decision":"allow","matched":["probe-9"],"reason_code":"policy_allowed",'
        '"rule_id":"probe-9"},"result":{"ok":true},"tool":"probe"}'
    )
    executed = bodies.decode("executed", old)
    assert isinstance(executed, bodies.Executed)
    assert executed.decision.reason_code is ReasonCode.POLICY_ALLOWED
    refused = bodies.decode(
        "refused",
        '{"decision":{"decision":"deny","reason":"r","reason_code":"budget_exhausted","rule_id":"runtime:budget"},'
        '"raw":"x"}',
    )
    assert isinstance(refused, bodies.Refused) and refused.decision.reason_code is ReasonCode.BUDGET_EXHAUSTED
    # Re-encoded as stored now, the old body's decision reads back the same.
    again = bodies.decode("executed", encode_json(executed))
    assert isinstance(again, bodies.Executed) and again.decision.as_dict() == executed.decision.as_dict()
