"""An approval is good until its deadline by the journal's clock: not a second longer."""

from __future__ import annotations

from pathlib import Path

from conftest import Shop, call, run, step_rows
from tether import Runtime, ScriptedModel
from tether.journal.sqlite import SQLiteJournal


class Clock:
    """The store's clock, moved by the test (the journal decides expiry, not the caller)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


def test_an_approval_used_after_its_deadline_is_recorded_as_expired_and_nothing_runs(
    tmp_path: Path, shop: Shop
) -> None:
    clock = Clock()
    journal = SQLiteJournal(tmp_path / "j.db", clock=clock)
    policy = {"rules": [{"id": "ask", "tool": "refund", "decision": "ask", "expires_in": 60}]}
    wf = shop.workflow(policy=policy)
    script = [call("refund", order_id="A1", amount=70.0), {"kind": "finish"}]
    try:
        paused = run(Runtime(journal).start(wf, ScriptedModel(script)))
        assert paused.status == "paused" and paused.ticket_id
        clock.now += 30
        run(journal.decide_ticket(paused.ticket_id, approve=True, by="sam"))  # in time
        clock.now += 60  # the resume comes after the deadline
        done = run(Runtime(journal).resume(paused.run_id, wf, ScriptedModel(script)))
        rows = step_rows(journal, paused.run_id)
        ticket = run(journal.get_ticket(paused.ticket_id))
    finally:
        journal.close()
    assert done.status == "completed"
    assert shop.refunds == [] and shop.executed == []
    expired = [r for r in rows if r["reason_code"] == "approval_expired"]
    assert len(expired) == 1 and expired[0]["observation"]["outcome"] == "refused"
    assert ticket.status == "expired"
