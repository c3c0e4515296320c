"""Tool calls from outside tether (tether.external): the core every framework integration uses."""

from __future__ import annotations

import asyncio
import gc
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Shop, run, step_rows
from tether import Policy, Runtime
from tether.errors import EditRefused
from tether.external import CallOutcome, GovernedCalls, recorded_calls
from tether.identity import Principal
from tether.journal import Journal, open_journal
from tether.journal.records import Commit, LeaseHeld, ModelExchange

POLICY = {
    "rules": [
        {"id": "refund-ask", "tool": "refund", "when": "args.amount > 50.0", "decision": "ask"},
        {"id": "refund-ok", "tool": "refund", "decision": "allow"},
        {"id": "no-deletes", "tool": "delete_order", "decision": "deny"},
    ]
}
PERSON = Principal(principal_id="person:ana", name="ana", kind="person", role="approver")


def governed(journal: Journal, shop: Shop) -> GovernedCalls:
    tools = (shop.read_order, shop.refund, shop.delete_order)
    return GovernedCalls(
        journal, tools, name="support-bot", policy=Policy.from_dict(POLICY, "p"), source="test"
    )


def call(path: Path, shop: Shop, tool: str, args: dict[str, Any], call_id: str | None = None) -> CallOutcome:
    """One call as a fresh process would make it: its own journal connection and runtime."""

    async def go() -> CallOutcome:
        journal = open_journal(str(path))
        try:
            async with governed(journal, shop) as calls:
                return await calls.call("conv-1", tool, args, call_id=call_id)
        finally:
            await journal.aclose()

    result: CallOutcome = run(go())
    return result


def test_allowed_denied_and_recorded_as_one_run(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "j.db"
    read = call(db, shop, "read_order", {"order_id": "A1"}, "c1")
    assert read.executed and read.result == {"total": 80.0, "status": "paid"}
    denied = call(db, shop, "delete_order", {"order_id": "A1"}, "c2")
    assert (denied.outcome, denied.reason_code) == ("refused", "policy_denied")
    assert "delete_order" not in shop.executed
    unknown = call(db, shop, "drop_tables", {}, "c3")
    assert (unknown.outcome, unknown.reason_code) == ("refused", "unknown_tool")
    assert read.run_id == denied.run_id == unknown.run_id
    journal = open_journal(str(db))
    rows = step_rows(journal, read.run_id)
    assert [r["observation"]["outcome"] for r in rows] == ["executed", "refused", "refused"]
    # Each call's id is in its step's entry, under the hash chain; nothing is kept beside it.
    entries = run(journal.read_entries(read.run_id))
    assert [(e.body.call_id, e.kind) for e in entries if e.step_id] == [
        ("c1", "executed"),
        ("c2", "refused"),
        ("c3", "refused"),
    ]
    assert run(journal.read_exchanges(read.run_id)) == []
    journal.close()


def test_call_ids_survive_pruning_exchanges_and_those_kept_by_earlier_versions_still_count(
    tmp_path: Path, shop: Shop
) -> None:
    db = tmp_path / "j.db"
    first = call(db, shop, "refund", {"order_id": "A1", "amount": 20.0}, "c1")
    journal = open_journal(str(db))
    assert run(journal.prune_exchanges(before=time.time() + 3600)) == 0
    # A run recorded by an earlier version kept a call's id as the step's exchange only.
    old_style = ModelExchange(
        run_id=first.run_id,
        seq=1,
        step_id="s-earlier",
        state="agent",
        model="test",
        created_at=time.time(),
        request={"call_id": "c0"},
    )
    assert run(recorded_calls(journal, first.run_id)) == {"c1": first.step_id}
    run(
        journal.commit(
            Commit(
                run_id=first.run_id,
                expected_seq=run(journal.get_run(first.run_id)).last_seq,
                expected_hash=run(journal.get_run(first.run_id)).last_hash,
                exchanges=[old_style],
            )
        )
    )
    assert run(recorded_calls(journal, first.run_id)) == {"c0": "s-earlier", "c1": first.step_id}
    journal.close()
    again = call(db, shop, "refund", {"order_id": "A1", "amount": 20.0}, "c1")
    assert again.executed and again.step_id == first.step_id and shop.refunds == [("A1", 20.0)]


def test_a_call_id_seen_before_is_never_run_again(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "j.db"
    first = call(db, shop, "refund", {"order_id": "A1", "amount": 20.0}, "c1")
    again = call(db, shop, "refund", {"order_id": "A1", "amount": 20.0}, "c1")
    assert first.executed and again.executed and first.step_id == again.step_id
    assert shop.refunds == [("A1", 20.0)]
    other = call(db, shop, "refund", {"order_id": "A1", "amount": 20.0}, "c2")
    assert other.executed and other.step_id != first.step_id
    assert len(shop.refunds) == 2


def test_ask_pauses_then_the_approved_arguments_run_once_in_another_process(
    tmp_path: Path, shop: Shop
) -> None:
    db = tmp_path / "j.db"
    asked = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")
    assert (asked.outcome, asked.reason_code) == (
        "awaiting_approval",
        "approval_required",
    ) and asked.ticket_id
    # Still undecided: presenting it again waits; another call is refused, naming the ticket.
    assert call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1").outcome == "awaiting_approval"
    other = call(db, shop, "read_order", {"order_id": "A1"}, "c2")
    assert (other.outcome, other.reason_code) == ("refused", "approval_pending")
    assert asked.ticket_id in (other.reason or "")
    assert shop.executed == []

    journal = open_journal(str(db))
    run(journal.decide_ticket(asked.ticket_id, approve=True, by=PERSON, reason="ok"))
    journal.close()

    tampered = call(db, shop, "refund", {"order_id": "A1", "amount": 700.0}, "c1")
    assert (tampered.outcome, tampered.reason_code) == ("refused", "approval_mismatch")
    assert shop.refunds == []
    done = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")
    assert done.executed and done.step_id == asked.step_id
    assert call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1").executed
    assert shop.refunds == [("A1", 70.0)]
    # The conversation goes on after the approval.
    assert call(db, shop, "read_order", {"order_id": "A1"}, "c3").executed


def test_a_denial_is_recorded_and_the_conversation_goes_on(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "j.db"
    asked = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")
    journal = open_journal(str(db))
    run(journal.decide_ticket(asked.ticket_id or "", approve=False, by=PERSON, reason="too much"))
    journal.close()
    denied = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")
    assert (denied.outcome, denied.reason_code) == ("refused", "approval_denied")
    assert "too much" in (denied.reason or "")
    assert call(db, shop, "refund", {"order_id": "A1", "amount": 10.0}, "c2").executed
    assert shop.refunds == [("A1", 10.0)]


def test_ending_the_conversation_completes_its_run(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "j.db"
    assert call(db, shop, "read_order", {"order_id": "A1"}).executed

    async def end() -> CallOutcome:
        journal = open_journal(str(db))
        async with governed(journal, shop) as calls:
            ended = await calls.end("conv-1", "resolved")
            after = await calls.call("conv-1", "read_order", {"order_id": "A1"})
        await journal.aclose()
        assert after.outcome == "stopped" and "completed" in (after.reason or "")
        return ended

    ended = run(end())
    assert ended.outcome == "completed"


def test_closing_the_journal_after_letting_go_leaves_no_lease_renewal_behind(
    tmp_path: Path, shop: Shop
) -> None:
    failures: list[dict[str, Any]] = []

    async def go() -> None:
        asyncio.get_running_loop().set_exception_handler(lambda loop, context: failures.append(context))
        journal = open_journal(str(tmp_path / "j.db"))
        runtime = Runtime(journal, lease_seconds=0.15)  # renewals every 0.05 s
        async with GovernedCalls(journal, [shop.read_order], name="bot", runtime=runtime) as calls:
            assert (await calls.call("conv-1", "read_order", {"order_id": "A1"})).executed
            await asyncio.sleep(0.01)  # the renewal task is waiting for its next renewal
        await journal.aclose()
        await asyncio.sleep(0.2)  # the renewal task wakes after the journal closed

    asyncio.run(go())
    gc.collect()  # a task that failed unobserved reports it when it is collected
    assert failures == []


def test_a_released_conversation_is_taken_by_another_process_at_once(tmp_path: Path, shop: Shop) -> None:
    async def go() -> CallOutcome:
        journal = open_journal(str(tmp_path / "j.db"))
        try:
            async with governed(journal, shop) as first, governed(journal, shop) as second:
                assert (await first.call("conv-1", "read_order", {"order_id": "A1"})).executed
                with pytest.raises(LeaseHeld):  # held between calls by the first
                    await second.call("conv-1", "read_order", {"order_id": "A1"})
                await first.release("conv-1")
                return await second.call("conv-1", "read_order", {"order_id": "A1"})
        finally:
            await journal.aclose()

    assert run(go()).executed
    assert shop.executed == ["read_order", "read_order"]


def test_editing_the_arguments_of_an_agents_call_is_refused_clearly_and_changes_nothing(
    tmp_path: Path, shop: Shop
) -> None:
    db = tmp_path / "j.db"
    asked = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")
    assert asked.outcome == "awaiting_approval" and asked.ticket_id
    edited = json.dumps({"order_id": "A1", "amount": 40.0})
    # From the command line (another process, which cannot load the agent's tools):
    cli = subprocess.run(
        [sys.executable, "-m", "tether", "approve", asked.ticket_id, "--args", edited, "--db", str(db)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert cli.returncode == 2, cli.stdout + cli.stderr
    said = " ".join((cli.stdout + cli.stderr).split())
    assert "cannot be edited here" in said and "deny it with a reason" in said
    # And in the kernel, for the API and the web inbox: refused, with its reason code.
    journal = open_journal(str(db))
    admin = Principal(principal_id="local:admin", name="admin", kind="person", role="admin")
    with pytest.raises(EditRefused) as refused:
        run(
            Runtime(journal).decide(
                asked.ticket_id, approve=True, by=admin, edited_args={"order_id": "A1", "amount": 40.0}
            )
        )
    assert refused.value.reason_code == "not_drivable"
    ticket = run(journal.get_ticket(asked.ticket_id))
    assert (ticket.status, ticket.args, ticket.original_args_hash) == (
        "pending",
        {"order_id": "A1", "amount": 70.0},
        None,
    )
    journal.close()
    assert shop.refunds == []
