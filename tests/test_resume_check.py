"""What a resume checks before acting, on a run in its second visit: the entries from the
visit's opening on (rehashed, linked to the row's head) and the rows against the facts and
pins the opening entry carries; entries before the visit are left to `tether audit verify`
(docs/security.md, "The hash chain"). On SQLite and PostgreSQL, tampering by direct SQL.

The run: state `check` reads order A1 (its total, 200, becomes a fact) and takes the exit
`next` to state `pay`, whose refund of 180 asks the supervisor. Seq by seq:

    1 run_started  2 executed read_order  3 transition (carries the facts)
    4 awaiting_approval  5 ticket_decided
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from conftest import Shop, call, run
from test_journal_contract import Store, postgres_url, store  # noqa: F401 (fixtures)
from tether import AgentState, Policy, Runtime, Terminal, Workflow
from tether.audit import verify_journal
from tether.errors import JournalTampered
from tether.journal.records import GENESIS_HASH, entry_hash
from tether.models import ScriptedModel


class TwoVisits:
    def __init__(self, store: Store) -> None:  # noqa: F811 (the imported fixture)
        self.store = store
        self.shop = Shop()
        self.shop.orders["A1"]["total"] = 200.0
        check = AgentState("check", "Read the order.", (self.shop.read_order,), {"next": "pay"})
        pay = AgentState("pay", "Refund.", (self.shop.refund,), {"done": "done"}, escalate_to="supervisor")
        rules = {
            "rules": [
                {"id": "reads", "tool": "read_order", "decision": "allow"},
                {"id": "on", "exit": "next", "decision": "allow"},
                {"id": "refund-ask", "tool": "refund", "decision": "ask", "approver": "supervisor"},
            ]
        }
        self.workflow = Workflow(
            "two-visits", "1", "check", [check, pay, Terminal("done")], policy=Policy.from_dict(rules, "t")
        )
        self.model = ScriptedModel(
            {
                "check": [call("read_order", order_id="A1"), {"kind": "exit", "exit": "next"}],
                "pay": [call("refund", order_id="A1", amount=180.0), {"kind": "exit", "exit": "done"}],
            }
        )
        journal = store.open()
        result = run(Runtime(journal).start(self.workflow, self.model, workflow_ref="tests"))
        assert result.status == "paused", result
        self.run_id = result.run_id
        run(journal.decide_ticket(str(result.ticket_id), approve=True, by="alice"))
        kinds = [e.kind for e in run(journal.read_entries(self.run_id))]
        assert kinds == ["run_started", "executed", "transition", "awaiting_approval", "ticket_decided"]

    def sql(self, statement: str, *params: Any) -> list[tuple[Any, ...]]:
        return self.store.execute(statement.replace("?", self.store.ph), params)

    def unguarded(self, change: Callable[[], None]) -> None:
        """Lift the append-only triggers, change the entries, put the triggers back."""
        if self.store.kind == "sqlite":
            self.sql("DROP TRIGGER entries_no_update")
            change()
            self.sql(
                "CREATE TRIGGER entries_no_update BEFORE UPDATE ON entries "
                "BEGIN SELECT RAISE(ABORT, 'journal entries are append-only'); END"
            )
        else:
            self.sql("ALTER TABLE entries DISABLE TRIGGER USER")
            change()
            self.sql("ALTER TABLE entries ENABLE TRIGGER USER")

    def edit(self, seq: int, old: str, new: str) -> None:
        self.unguarded(
            lambda: self.sql(
                "UPDATE entries SET body = replace(body, ?, ?) WHERE run_id = ? AND seq = ?",
                old,
                new,
                self.run_id,
                seq,
            )
        )

    def rehash_from(self, seq: int) -> None:
        """Recompute every hash from `seq` on and fix the row's head: a consistent rewrite."""
        rows = self.sql(
            "SELECT seq, kind, step_id, state, body, hash, created_at FROM entries "
            "WHERE run_id = ? AND seq >= ? ORDER BY seq",
            self.run_id,
            seq - 1,
        )

        def change() -> None:
            # The link of the first entry rewritten: the hash of the entry before it.
            prev = bytes(rows[0][5]).hex() if rows[0][0] == seq - 1 else GENESIS_HASH
            for s, kind, step_id, state, body, _, created_at in rows:
                if s < seq:
                    continue
                h = entry_hash(self.run_id, s, kind, step_id, state, body, prev, created_at)
                self.sql(
                    "UPDATE entries SET hash = ? WHERE run_id = ? AND seq = ?",
                    bytes.fromhex(h),
                    self.run_id,
                    s,
                )
                prev = h
            self.sql("UPDATE runs SET last_hash = ? WHERE run_id = ?", prev, self.run_id)

        self.unguarded(change)

    def set_facts(self, text: str) -> None:
        self.sql("UPDATE run_values SET value = ? WHERE run_id = ? AND name = 'facts'", text, self.run_id)

    def resume(self) -> Any:
        return run(Runtime(self.store.open()).resume(self.run_id, self.workflow, self.model))

    def refused(self) -> JournalTampered:
        with pytest.raises(JournalTampered) as refused:
            self.resume()
        assert self.shop.refunds == []
        return refused.value

    def verify(self) -> Any:
        return run(verify_journal(self.store.open(), [self.run_id], key=None))


@pytest.fixture
def two(store: Store, tmp_path: Path) -> TwoVisits:  # noqa: F811 (the imported fixture)
    return TwoVisits(store)


def test_an_untouched_run_in_its_second_visit_resumes_and_verifies(two: TwoVisits) -> None:
    assert two.resume().status == "completed"
    assert two.shop.refunds == [("A1", 180.0)]
    assert two.verify().ok


def test_facts_edited_in_the_row_are_refused_against_what_the_visit_opening_carries(two: TwoVisits) -> None:
    two.sql(
        "UPDATE run_values SET value = ? WHERE run_id = ? AND name = 'facts'",
        '{"order_total":1.0}',
        two.run_id,
    )
    assert "facts differ from the chain's (order_total)" in str(two.refused())


def test_an_entry_of_the_current_visit_edited_is_refused(two: TwoVisits) -> None:
    two.edit(4, "180.0", "18.0")
    found = two.refused().findings[0]
    assert (found.kind, found.seq) == ("edited", 4)


def test_carried_facts_rewritten_consistently_are_found_by_verify(two: TwoVisits) -> None:
    # The transition's carried total and the row's facts made to agree, every hash after
    # recomputed: nothing in the current visit can tell (a consistent rewrite) ...
    two.edit(3, '"order_total":200.0', '"order_total":1.0')
    two.rehash_from(3)
    two.sql(
        "UPDATE run_values SET value = ? WHERE run_id = ? AND name = 'facts'",
        '{"order_total":1.0}',
        two.run_id,
    )
    # ... but the entries before it say 200: `tether audit verify` names the entry.
    found = [f for f in two.verify().findings if f.seq == 3]
    assert found and found[0].kind == "edited" and "facts it carries" in found[0].message


def test_an_entry_before_the_current_visit_is_left_to_audit_verify(two: TwoVisits) -> None:
    # The read before the exit, edited without its hash: the resume acts on the visit from
    # the transition on (which carries the total), so it goes on; `verify` finds the edit.
    two.edit(2, '"total":200.0', '"total":20.0')
    assert two.resume().status == "completed"
    found = two.verify().findings[0]
    assert (found.kind, found.seq) == ("edited", 2)
