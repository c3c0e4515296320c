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

import msgspec
import pytest

from conftest import Shop, run, step_rows
from tether import Policy, Runtime
from tether.analysis.diff import redecide
from tether.audit import verify_journal
from tether.errors import EditRefused
from tether.external import CallOutcome, GovernedCalls, recorded_calls
from tether.identity import Principal
from tether.journal import Journal, integrity, open_journal
from tether.journal import bodies as b
from tether.journal.records import Commit, LeaseHeld, ModelExchange
from tether.proposals import Exit, ToolCall
from tether.replay import replay_run
from tether.tools import Tool

POLICY = {
    "rules": [
        {"id": "refund-ask", "tool": "refund", "when": "args.amount > 50.0", "decision": "ask"},
        {"id": "refund-ok", "tool": "refund", "decision": "allow"},
        {"id": "no-deletes", "tool": "delete_order", "decision": "deny"},
    ]
}
PERSON = Principal(principal_id="person:ana", name="ana", kind="person", role="approver")


def governed(journal: Journal, shop: Shop, **options: Any) -> GovernedCalls:
    tools = (shop.read_order, shop.refund, shop.delete_order)
    return GovernedCalls(
        journal, tools, name="support-bot", policy=Policy.from_dict(POLICY, "p"), source="test", **options
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
            # Two processes (two runtimes, two worker ids); the first never lets go when idle.
            async with (
                governed(journal, shop, idle_release=None) as first,
                governed(journal, shop, hold_wait=0.3) as second,
            ):
                assert (await first.call("conv-1", "read_order", {"order_id": "A1"})).executed
                with pytest.raises(LeaseHeld, match=r"held by another process .* not let go within 0\.3 s"):
                    await second.call("conv-1", "read_order", {"order_id": "A1"})
                await first.release("conv-1")
                return await second.call("conv-1", "read_order", {"order_id": "A1"})
        finally:
            await journal.aclose()

    assert run(go()).executed
    assert shop.executed == ["read_order", "read_order"]


def test_processes_share_a_conversation_each_waiting_for_the_other_to_let_it_go(
    tmp_path: Path, shop: Shop
) -> None:
    """A web app with several processes: each lets a conversation go when it has been idle a
    moment; a call that arrives meanwhile in another process waits for it, then goes on."""

    async def go() -> tuple[list[CallOutcome], float]:
        journal = open_journal(str(tmp_path / "j.db"))
        try:
            async with governed(journal, shop, idle_release=0.2) as first, governed(journal, shop) as second:
                one = await first.call("conv-1", "read_order", {"order_id": "A1"}, call_id="c1")
                started = time.monotonic()
                two = await second.call("conv-1", "refund", {"order_id": "A1", "amount": 20.0}, call_id="c2")
                waited = time.monotonic() - started
                three = await first.call("conv-1", "read_order", {"order_id": "A1"}, call_id="c3")
                return [one, two, three], waited
        finally:
            await journal.aclose()

    outcomes, waited = run(go())
    assert [o.outcome for o in outcomes] == ["executed"] * 3
    assert len({o.run_id for o in outcomes}) == 1  # one conversation, one run
    assert waited >= 0.15  # the second waited for the first to let the run go
    assert shop.refunds == [("A1", 20.0)] and shop.executed == ["read_order", "refund", "read_order"]
    journal = open_journal(str(tmp_path / "j.db"))
    entries = run(journal.read_entries(outcomes[0].run_id))
    assert [e.body.call_id for e in entries if e.step_id and e.kind == "executed"] == ["c1", "c2", "c3"]
    journal.close()


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


# -- calls refused while the run waits on a ticket: on the record, the run still waiting ---------


def _refusals(journal: Journal, run_id: str) -> list[tuple[str | None, b.Refused]]:
    found = []
    for entry in run(journal.read_entries(run_id)):
        body = entry.body
        if isinstance(body, b.Refused) and not body.continuation:
            found.append((entry.step_id, body))
    return found


def test_calls_refused_while_the_run_waits_are_recorded_and_the_run_keeps_waiting(
    tmp_path: Path, shop: Shop
) -> None:
    db = tmp_path / "j.db"
    asked = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")
    run_id, ticket_id = asked.run_id, asked.ticket_id or ""
    journal = open_journal(str(db))
    before, ticket_before = run(journal.get_run(run_id)), run(journal.get_ticket(ticket_id))
    journal.close()

    # Another call of the conversation while it waits: refused, naming the ticket, as before...
    other = call(db, shop, "read_order", {"order_id": "A1"}, "c2")
    assert (other.outcome, other.reason_code, other.ticket_id) == ("refused", "approval_pending", ticket_id)
    assert other.reason == (
        f"cannot take read_order: the conversation waits on ticket {ticket_id} (refund); a person "
        "decides it (tether approve / tether deny), then present that call again"
    )
    assert other.step_id == "s2"  # ...and now a step of its own on the record

    journal = open_journal(str(db))
    run(journal.decide_ticket(ticket_id, approve=True, by=PERSON, reason="ok"))
    journal.close()
    # The waiting call presented with other arguments (a tampered resume): refused, on the record.
    tampered = call(db, shop, "refund", {"order_id": "A1", "amount": 700.0}, "c1")
    assert (tampered.outcome, tampered.reason_code, tampered.step_id) == (
        "refused",
        "approval_mismatch",
        "s3",
    )
    assert shop.executed == []

    journal = open_journal(str(db))
    after, ticket_after = run(journal.get_run(run_id)), run(journal.get_ticket(ticket_id))
    # Still paused on the same ticket and step, the ticket approved and unused.
    assert (after.status, after.owner, after.reason_code, after.message) == (
        before.status,
        before.owner,
        before.reason_code,
        before.message,
    )
    assert after.status == "paused"
    assert after.checkpoint["pending"] == before.checkpoint["pending"]
    assert after.checkpoint["pending"]["step_id"] == asked.step_id
    assert (ticket_after.status, ticket_after.consumed_at) == ("approved", None)
    assert (ticket_after.args, ticket_after.args_hash) == (ticket_before.args, ticket_before.args_hash)
    # Each refusal: the presented call and the fingerprint of its arguments, denied by the
    # ticket, the presented call id in its reason and never in `call_id`.
    refusals = _refusals(journal, run_id)
    forged = {"order_id": "A1", "amount": 700.0}
    assert [(step, r.proposal, r.decision.reason_code, r.args_hash) for step, r in refusals] == [
        ("s2", ToolCall("read_order", {"order_id": "A1"}), "approval_pending", _hash(shop.read_order, "A1")),
        ("s3", ToolCall("refund", forged), "approval_mismatch", _hash(shop.refund, "A1", 700.0)),
    ]
    for (_, refusal), call_id in zip(refusals, ("c2", "c1"), strict=True):
        assert (refusal.decision.decision, refusal.decision.rule_id) == ("deny", f"approval:{ticket_id}")
        assert refusal.call_id is None
        assert refusal.decision.reason.endswith(f'(presented as call id "{call_id}")')
    assert run(recorded_calls(journal, run_id)) == {"c1": asked.step_id}
    journal.close()

    # The call as it was approved: the approved arguments run, once, in the step that asked.
    done = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")
    assert done.executed and done.step_id == asked.step_id
    assert call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1").executed
    assert shop.refunds == [("A1", 70.0)] and shop.keys == [f"{run_id}:{asked.step_id}"]
    # The call refused while the run waited, presented again now: taken, not its old refusal.
    read = call(db, shop, "read_order", {"order_id": "A1"}, "c2")
    assert read.executed and read.step_id == "s4"
    assert shop.executed == ["refund", "read_order"]

    journal = open_journal(str(db))
    rows = step_rows(journal, run_id)
    assert [(r["step_id"], r["outcome"], r["reason_code"], r["rule_id"]) for r in rows] == [
        ("s1", "awaiting_approval", "approval_required", "refund-ask"),
        ("s2", "refused", "approval_pending", f"approval:{ticket_id}"),
        ("s3", "refused", "approval_mismatch", f"approval:{ticket_id}"),
        ("s1", "executed", "approval_required", "refund-ask"),
        ("s4", "executed", "policy_allowed", "default:read"),
    ]
    assert rows[2]["proposal"] == {
        "kind": "tool_call",
        "tool": "refund",
        "args": {"order_id": "A1", "amount": 700.0},
    }
    # The journal is intact, rows and tickets agree with the chain, replay finds no divergence.
    assert run(verify_journal(journal, [run_id])).findings == []
    report = run(replay_run(journal, run_id))
    assert report.ok, report.as_dict()
    assert [(d.step_id, d.status) for d in report.decisions] == [
        ("s1", "same"),
        ("s2", "not re-evaluated"),
        ("s3", "not re-evaluated"),
        ("s4", "same"),
    ]
    # `tether diff --runs` does not decide them again either: no policy made them.
    redecided = redecide(run_id, run(journal.read_entries(run_id)), governed(journal, shop).workflow)
    assert [(d.step_id, d.status) for d in redecided if d.recorded.rule_id.startswith("approval:")] == [
        ("s2", "not re-decided"),
        ("s3", "not re-decided"),
    ]
    journal.close()


def test_ending_a_waiting_conversation_is_refused_on_the_record(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "j.db"
    asked = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")

    async def end() -> CallOutcome:
        journal = open_journal(str(db))
        try:
            async with governed(journal, shop) as calls:
                return await calls.end("conv-1", "all done")
        finally:
            await journal.aclose()

    ended = run(end())
    assert (ended.outcome, ended.reason_code, ended.ticket_id) == (
        "refused",
        "approval_pending",
        asked.ticket_id,
    )
    assert (ended.reason or "").startswith(
        f"cannot end the conversation: the conversation waits on ticket {asked.ticket_id}"
    )
    journal = open_journal(str(db))
    [(step, refusal)] = _refusals(journal, asked.run_id)
    assert (step, refusal.proposal, refusal.decision.rule_id) == (
        ended.step_id,
        Exit("end", summary="all done"),
        f"approval:{asked.ticket_id}",
    )
    assert run(journal.get_run(asked.run_id)).status == "paused"
    assert run(verify_journal(journal, [asked.run_id])).findings == []
    assert run(replay_run(journal, asked.run_id)).ok
    journal.close()


def test_a_call_presented_again_with_nothing_recorded_since_its_refusal_is_one_attempt(
    tmp_path: Path, shop: Shop
) -> None:
    """A framework that presents a call twice (the Agents SDK: `needs_approval`, then the
    tool), or re-runs a node before the ticket is decided, adds no second refusal; a
    presentation after anything else was recorded is another attempt."""
    db = tmp_path / "j.db"

    async def go() -> list[CallOutcome]:
        journal = open_journal(str(db))
        try:
            async with governed(journal, shop) as calls:
                said = [
                    await calls.call("conv-1", "refund", {"order_id": "A1", "amount": 70.0}, call_id="c1")
                ]
                for tool, args, call_id in (
                    ("read_order", {"order_id": "A1"}, "c2"),
                    ("read_order", {"order_id": "A1"}, "c2"),  # the same presentation again
                    ("read_order", {"order_id": "A1"}, "c3"),  # another call
                    ("read_order", {"order_id": "A1"}, "c2"),  # c2 again, after c3's refusal
                    ("read_order", {"order_id": "A1"}, None),  # no call id: never taken as a repeat
                    ("read_order", {"order_id": "A1"}, None),
                ):
                    said.append(await calls.call("conv-1", tool, args, call_id=call_id))
                return said
        finally:
            await journal.aclose()

    asked, *refused = run(go())
    assert [(r.outcome, r.reason_code, r.step_id) for r in refused] == [
        ("refused", "approval_pending", "s2"),
        ("refused", "approval_pending", "s2"),
        ("refused", "approval_pending", "s3"),
        ("refused", "approval_pending", "s4"),
        ("refused", "approval_pending", "s5"),
        ("refused", "approval_pending", "s6"),
    ]
    assert refused[0] == refused[1]
    journal = open_journal(str(db))
    assert [step for step, _ in _refusals(journal, asked.run_id)] == ["s2", "s3", "s4", "s5", "s6"]
    assert shop.executed == []
    journal.close()


def test_a_refusal_leaves_the_run_waiting_only_when_it_names_the_ticket_it_waits_on(
    tmp_path: Path, shop: Shop
) -> None:
    """What the chain says of the run after such a refusal (tether.journal.integrity): still
    paused on its ticket; a refusal naming another ticket, or continuing the paused step (a
    denial), moves it on, as before."""
    db = tmp_path / "j.db"
    asked = call(db, shop, "refund", {"order_id": "A1", "amount": 70.0}, "c1")
    call(db, shop, "read_order", {"order_id": "A1"}, "c2")
    journal = open_journal(str(db))
    entries = run(journal.read_entries(asked.run_id))
    journal.close()
    view = integrity.derive(entries)
    assert (view.status, view.last_awaiting, view.owner) == ("paused", asked.ticket_id, "approver")

    refused = entries[-1]
    assert refused.kind == "refused"
    other = refused.body_json.replace(f"approval:{asked.ticket_id}", "approval:tkt_000000000000")
    assert other != refused.body_json
    view = integrity.derive([*entries[:-1], msgspec.structs.replace(refused, body_json=other)])
    assert (view.status, view.last_awaiting) == ("running", None)
    continued = refused.body_json.replace('"decision":{', '"continuation":true,"decision":{')
    view = integrity.derive([*entries[:-1], msgspec.structs.replace(refused, body_json=continued)])
    assert (view.status, view.last_awaiting) == ("running", None)


def _hash(tool: Tool, order_id: str, amount: float | None = None) -> str:
    args: dict[str, Any] = {"order_id": order_id} | ({"amount": amount} if amount is not None else {})
    return tool.validate(args).hash
