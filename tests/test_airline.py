"""The airline example: a second domain's written policy, expressed with facts from answers, a
call's subject, `now`, list helpers and definitions (examples/airline)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from conftest import run, step_rows
from tether import Runtime, ScriptedModel, load_workflow
from tether.analysis.check import check
from tether.analysis.diff import redecide
from tether.journal import Journal, bodies
from tether.policy_tooling import run_cases

AIRLINE = Path(__file__).resolve().parent.parent / "examples" / "airline"
CASES = run_cases(AIRLINE / "policy_tests.yaml")


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_policy_case(case: Any) -> None:
    assert case.passed, case.summary


def test_the_example_checks_clean_and_every_rule_is_exercised() -> None:
    workflow = load_workflow(AIRLINE / "workflow.yaml")
    assert check(workflow).findings == []
    decided = {c.decision.rule_id for c in CASES}
    rules = {r.id for r in workflow.policy.rules}
    assert rules - decided == set()  # every rule decides at least one case


def future_db(tmp_path: Path) -> Path:
    """The example's database with reservation ECO777's flight ten days from today."""
    db = json.loads((AIRLINE / "db.json").read_text())
    day = (datetime.now(UTC) + timedelta(days=10)).strftime("%Y-%m-%d")
    db["flights"]["HAT003"]["dates"] = {day: {"status": "available"}}
    db["reservations"]["ECO777"]["flights"][0]["date"] = day
    path = tmp_path / "db.json"
    path.write_text(json.dumps(db))
    return path


SCRIPT = [
    {"kind": "question", "question": "What is your user id?", "fact": "user_id"},
    {"kind": "tool_call", "tool": "get_reservation_details", "args": {"reservation_id": "ECO777"}},
    {"kind": "question", "question": "Why do you want to cancel?", "fact": "cancel_reason"},
    {"kind": "tool_call", "tool": "cancel_reservation", "args": {"reservation_id": "ECO777"}},
    {"kind": "exit", "exit": "done"},
]


def converse(journal: Journal, db: Path, answers: list[str]) -> str:
    """Run the script, the customer answering each question in turn and confirming changes."""
    workflow = load_workflow(AIRLINE / "workflow.yaml")
    model = ScriptedModel({"serve": SCRIPT})
    result = run(Runtime(journal).start(workflow, model, input={"db": str(db)}))
    said = iter(answers)
    while result.status == "paused":
        ticket = run(journal.get_ticket(result.ticket_id))
        if ticket.kind == "question":
            run(journal.decide_ticket(ticket.ticket_id, approve=True, by="customer", answer=next(said)))
        else:
            run(journal.decide_ticket(ticket.ticket_id, approve=True, by="customer"))
        result = run(Runtime(journal).resume(result.run_id, workflow, model))
    assert result.status == "completed"
    return result.run_id


def test_what_the_customer_said_decides_the_cancellation_on_the_journal_clock(
    journal: Journal, tmp_path: Path
) -> None:
    db = future_db(tmp_path)
    run_id = converse(journal, db, ["omar_davis_3817", "health"])

    record = run(journal.get_run(run_id))
    assert record.facts == {"user_id": "omar_davis_3817", "cancel_reason": "health"}
    entries = run(journal.read_entries(run_id))
    answered = [e.body for e in entries if isinstance(e.body, bodies.Answered)]
    assert [(a.fact, a.answer, a.by) for a in answered] == [
        ("user_id", "omar_davis_3817", "local:customer"),
        ("cancel_reason", "health", "local:customer"),
    ]
    rows = step_rows(journal, run_id)
    asked = next(r for r in rows if type(r["record"]) is bodies.AwaitingApproval)
    assert asked["decision"]["rule_id"] == "confirm-every-change"
    resolved = asked["decision"]["resolved"]
    assert 'reservation("ECO777")' in resolved and abs(
        datetime.fromisoformat(resolved["now"]) - datetime.now(UTC)
    ) < timedelta(minutes=5)
    assert json.loads(db.read_text())["reservations"]["ECO777"]["status"] == "cancelled"
    # Decided again from the record (resolver values and time as recorded): the same.
    workflow = load_workflow(AIRLINE / "workflow.yaml")
    assert {r.status for r in redecide(run_id, entries, workflow)} == {"same"}


def test_a_reason_insurance_does_not_cover_is_refused(journal: Journal, tmp_path: Path) -> None:
    db = future_db(tmp_path)
    run_id = converse(journal, db, ["omar_davis_3817", "change of plan"])
    refused = [r for r in step_rows(journal, run_id) if isinstance(r["record"], bodies.Refused)]
    assert [r["decision"]["rule_id"] for r in refused] == ["cancel-only-when-eligible"]
    assert "status" not in json.loads(db.read_text())["reservations"]["ECO777"]
