"""Structured handoffs: a record kept apart from the transcript, read again by its receiver,
and turned back instead of acted on when a value it relied on changed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from conftest import Shop, call, run
from tether import (
    AgentState,
    FunctionModel,
    Policy,
    Runtime,
    ScriptedModel,
    Terminal,
    Workflow,
    load_workflow,
)
from tether.errors import RunStateError
from tether.journal import Journal, bodies
from tether.models.protocol import ModelContext
from tether.run import messages_for

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "skills"
ORDERS = EXAMPLE / "skills" / "refund" / "orders.json"


@pytest.fixture
def orders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The refund skill's order book and ledger, fresh for the test."""
    book = tmp_path / "orders.json"
    shutil.copyfile(ORDERS, book)
    monkeypatch.setenv("REFUND_ORDERS", str(book))
    monkeypatch.setenv("REFUND_LEDGER", str(tmp_path / "ledger.sqlite"))
    yield book


def change_order(book: Path, order_id: str, **values: Any) -> None:
    content = json.loads(book.read_text())
    content[order_id].update(values)
    book.write_text(json.dumps(content))


def refund_script(amount: float = 80.0) -> ScriptedModel:
    """Look up the disputed order A-1005 and refund it (deferred to the disputes team); once
    the handoff comes back, refund again and report it."""
    refund = call("issue_refund", order_id="A-1005", amount=amount, reason="scratched")
    return ScriptedModel(
        {
            "resolve": [
                call("lookup_order", order_id="A-1005"),
                refund,
                refund,
                {"kind": "exit", "exit": "refunded", "update": {"refunded_amount": amount}},
            ]
        }
    )


def handed_off(journal: Journal, model: ScriptedModel) -> str:
    workflow = load_workflow(EXAMPLE)
    result = run(Runtime(journal).start(workflow, model, input={"order_id": "A-1005"}))
    assert (result.status, result.owner) == ("handed_off", "disputes")
    return result.run_id


def records(journal: Journal, run_id: str, kind: type[Any]) -> list[Any]:
    return [e.body for e in run(journal.read_entries(run_id)) if isinstance(e.body, kind)]


def test_a_stale_handoff_is_turned_back_with_the_difference_when_a_resolver_value_changed_before_pickup(
    journal: Journal, orders: Path
) -> None:
    model = refund_script()
    run_id = handed_off(journal, model)
    change_order(orders, "A-1005", status="delivered")  # the dispute was settled meanwhile

    result, differences = run(
        Runtime(journal).pick_up(run_id, load_workflow(EXAMPLE), by="dana", model=model)
    )

    assert [(d.name, d.then, d.now) for d in differences] == [
        ('order_status("A-1005")', "disputed", "delivered")
    ]
    (returned,) = records(journal, run_id, bodies.HandoffReturned)
    assert returned.by == "dana" and returned.differences == differences
    # The sending state's model was told what changed, and acted on the value as it is now:
    # the refund the disputes rule held back went through, under the rule for small refunds.
    entries = run(journal.read_entries(run_id))
    told = next(messages_for(e.body, e.step_id) for e in entries if e.kind == "handoff_returned")
    assert told[-1].content["outcome"] == "handoff_returned"
    assert told[-1].content["differences"][0]["now"] == "delivered"
    executed = records(journal, run_id, bodies.Executed)
    assert [(r.tool, r.decision.rule_id) for r in executed][-1] == ("issue_refund", "refund/small")
    assert (result.status, result.state) == ("completed", "done")


def test_a_handoff_whose_values_are_unchanged_is_the_picker_s_and_no_model_is_asked(
    journal: Journal, orders: Path
) -> None:
    run_id = handed_off(journal, refund_script())

    # A model that would fail if asked: a received handoff is the person's to act on.
    silent = ScriptedModel([])
    result, differences = run(
        Runtime(journal).pick_up(run_id, load_workflow(EXAMPLE), by="dana", model=silent)
    )

    assert differences == []
    assert (result.status, result.owner) == ("handed_off", "dana")
    (received,) = records(journal, run_id, bodies.HandoffReceived)
    assert {c.name: (c.then, c.changed) for c in received.checked} == {
        "facts.order_id": ("A-1005", False),
        "facts.order_total": (240.0, False),
        'order_status("A-1005")': ("disputed", False),
    }


def test_a_fact_a_verifier_established_is_read_again_through_the_verifier_and_refreshed_when_turned_back(
    journal: Journal, orders: Path
) -> None:
    model = refund_script()
    run_id = handed_off(journal, model)
    change_order(orders, "A-1005", status="delivered", total=60.0)

    result, differences = run(
        Runtime(journal).pick_up(run_id, load_workflow(EXAMPLE), by="dana", model=model)
    )

    assert {d.name: (d.then, d.now) for d in differences} == {
        "facts.order_total": (240.0, 60.0),
        'order_status("A-1005")': ("disputed", "delivered"),
    }
    # The run's facts now hold what the verifier shows, so refunding 80 of a 60 order is denied.
    record = run(journal.get_run(run_id))
    assert record.facts["order_total"] == 60.0
    refused = records(journal, run_id, bodies.Refused)
    assert refused[0].decision.rule_id == "refund/needs-verified-order"
    assert result.status == "escalated"  # the script ran out after the denied exit


def test_a_value_that_cannot_be_read_again_turns_the_handoff_back(journal: Journal, orders: Path) -> None:
    run_id = handed_off(journal, refund_script())
    orders.unlink()  # the order book is gone: neither the resolver nor the verifier can read it

    result, differences = run(Runtime(journal).pick_up(run_id, load_workflow(EXAMPLE), by="dana"))

    assert {d.name for d in differences} == {"facts.order_id", "facts.order_total", 'order_status("A-1005")'}
    assert all(d.changed and d.error and "FileNotFoundError" in d.error for d in differences)
    # Facts the verifier no longer shows are dropped; with no model given the run waits, running.
    assert result.status == "running" and run(journal.get_run(run_id)).facts == {}


def test_the_handoff_record_carries_the_work_the_owner_what_changed_what_is_open_and_what_it_relied_on(
    journal: Journal, shop: Shop
) -> None:
    handoff = {
        "kind": "handoff",
        "to": "billing",
        "note": "customer disputes the invoice",
        "risks": ["the customer may charge back"],
        "questions": ["was the discount applied?"],
    }
    rules = [
        {"id": "no-void", "tool": "refund", "when": 'status(args.order_id, 2) == "void"', "decision": "deny"},
        {"id": "ok", "tool": "refund", "decision": "allow"},
    ]
    workflow = shop.workflow(
        policy={"rules": rules},
        resolvers={"status": lambda ctx, order_id, n: shop.orders[order_id]["status"]},
    )
    script = [call("read_order", order_id="A1"), call("refund", order_id="A1", amount=10.0), handoff]
    result = run(Runtime(journal).start(workflow, ScriptedModel(script)))

    assert (result.status, result.owner) == ("handed_off", "billing")
    (record,) = records(journal, result.run_id, bodies.HandedOff)
    handed = record.handoff
    assert (handed.owner, handed.state, handed.to_state, handed.note) == (
        "billing",
        "shop",
        None,
        "customer disputes the invoice",
    )
    assert handed.facts == {"order_total": 80.0}
    assert handed.changed == [
        bodies.ChangedEffect("s2", "shop", "refund", "write", {"order_id": "A1", "amount": 10.0}, True)
    ]
    assert (handed.risks, handed.questions) == (
        ["the customer may charge back"],
        ["was the discount applied?"],
    )
    assert handed.relied_on == [
        bodies.ReliedFact("facts.order_total", "verifier", 80.0, "s1", tool="read_order"),
        bodies.ReliedFact('status("A1", 2)', "resolver", "paid", "s2", "status", ["A1", 2]),
    ]


def test_a_policy_defer_hands_over_the_deferred_proposal_with_the_resolver_values_it_decided_on(
    journal: Journal, shop: Shop
) -> None:
    policy = {
        "rules": [
            {
                "id": "void-to-finance",
                "tool": "refund",
                "when": 'status(args.order_id) != "paid"',
                "decision": "defer",
                "owner": "finance",
            },
        ]
    }
    shop.orders["A1"]["status"] = "contested"
    workflow = shop.workflow(
        policy=policy, resolvers={"status": lambda ctx, order_id: shop.orders[order_id]["status"]}
    )
    result = run(Runtime(journal).start(workflow, ScriptedModel([call("refund", order_id="A1", amount=5.0)])))

    (record,) = records(journal, result.run_id, bodies.HandedOff)
    assert record.handoff.pending_proposal == call("refund", order_id="A1", amount=5.0)
    assert record.handoff.relied_on == [
        bodies.ReliedFact('status("A1")', "resolver", "contested", None, "status", ["A1"])
    ]


def receiving_workflow(shop: Shop, seen: list[ModelContext], before_handoff: Any = None) -> Any:
    """The shop, whose agent may hand off to the `admin` agent state; both models recorded."""

    def propose(ctx: ModelContext) -> Any:
        seen.append(ctx)
        if ctx.state == "admin":
            return {"kind": "exit", "exit": "done"}
        turn = ctx.proposals_made
        if turn == 0:
            return call("read_order", order_id="A1")
        if turn == 1:
            if before_handoff is not None:
                before_handoff()
            return {
                "kind": "handoff",
                "to": "admin",
                "note": "needs an admin",
                "risks": ["order may be void"],
            }
        return {"kind": "exit", "exit": "done", "update": {"kept": True}}

    rules = [
        {"id": "no-void", "tool": "read_order", "when": 'status(args.order_id) == "void"', "decision": "deny"}
    ]
    sender = AgentState(
        "shop",
        "Help the customer.",
        (shop.read_order,),
        {"done": "done"},
        escalate_to="supervisor",
        handoff_to=("billing", "admin"),
    )
    receiver = AgentState("admin", "Admin only.", (shop.delete_order,), {"done": "done"})
    workflow = Workflow(
        "shop",
        "1",
        "shop",
        [sender, receiver, Terminal("done")],
        policy=Policy.from_dict({"rules": rules}),
        resolvers={"status": lambda ctx, order_id: shop.orders[order_id]["status"]},
    )
    return workflow, FunctionModel(propose)


def test_a_handoff_routed_to_an_agent_state_opens_its_visit_with_the_handoff_not_the_transcript(
    journal: Journal, shop: Shop
) -> None:
    seen: list[ModelContext] = []
    workflow, model = receiving_workflow(shop, seen)

    result = run(Runtime(journal).start(workflow, model))

    assert result.status == "completed"
    admin = next(ctx for ctx in seen if ctx.state == "admin")
    (first,) = admin.transcript  # nothing of the shop's visit, only what was handed over
    assert first.content["outcome"] == "handoff_received"
    assert first.content["handoff"]["note"] == "needs an admin"
    assert first.content["handoff"]["risks"] == ["order may be void"]
    assert first.content["handoff"]["state"] == "shop"
    entries = run(journal.read_entries(result.run_id))
    assert [(e.kind, e.state) for e in entries if e.kind.startswith("handoff")] == [
        ("handoff", "shop"),
        ("handoff_received", "admin"),
    ]
    received = next(e.body for e in entries if e.kind == "handoff_received")
    assert received.by == "state:admin" and [c.name for c in received.checked] == [
        "facts.order_total",
        'status("A1")',
    ]


def test_a_routed_handoff_is_turned_back_when_a_resolver_value_changed_since_the_decision_that_read_it(
    journal: Journal, shop: Shop
) -> None:
    seen: list[ModelContext] = []

    def void() -> None:
        shop.orders["A1"]["status"] = "void"

    workflow, model = receiving_workflow(shop, seen, before_handoff=void)
    result = run(Runtime(journal).start(workflow, model))

    assert (result.status, result.data.get("kept")) == ("completed", True)
    assert all(ctx.state == "shop" for ctx in seen)  # the admin state never acted
    last = seen[-1].transcript[-1].content
    assert last["outcome"] == "handoff_returned" and last["by"] == "state:admin"
    assert last["differences"] == [{"name": 'status("A1")', "then": "paid", "now": "void", "changed": True}]


def test_picking_up_a_run_that_is_not_handed_off_is_refused_and_changes_nothing(
    journal: Journal, shop: Shop
) -> None:
    result = run(Runtime(journal).start(shop.workflow(), ScriptedModel([{"kind": "exit", "exit": "done"}])))
    before = run(journal.read_entries(result.run_id))

    with pytest.raises(RunStateError, match="is completed, not handed off"):
        run(Runtime(journal).pick_up(result.run_id, shop.workflow(), by="dana"))
    assert run(journal.read_entries(result.run_id)) == before


def test_resuming_a_handed_off_run_is_refused_with_the_command_that_picks_it_up(
    journal: Journal, orders: Path
) -> None:
    run_id = handed_off(journal, refund_script())
    with pytest.raises(RunStateError, match=f"tether pickup {run_id}"):
        run(Runtime(journal).resume(run_id, load_workflow(EXAMPLE), refund_script()))


def test_a_handoff_recorded_before_the_structured_fields_still_reads() -> None:
    old = (
        '{"args_hash":"h","decision":{"decision":"defer","reason_code":"deferred","rule_id":"runtime:handoff",'
        '"owner":"billing"},"handoff":{"at_seq":3,"data":{"a":1},"note":"n","owner":"billing",'
        '"pending_proposal":{"kind":"handoff","note":"n","to":"billing"},"state":"shop"},'
        '"proposal":{"kind":"handoff","note":"n","to":"billing"}}'
    )
    record = bodies.decode("handoff", old)
    assert isinstance(record, bodies.HandedOff)
    assert (record.handoff.owner, record.handoff.data, record.handoff.relied_on) == ("billing", {"a": 1}, [])
    assert msgspec.json.decode(msgspec.json.encode(record.handoff)) == json.loads(old)["handoff"]


def tether(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


def test_tether_pickup_gives_the_handoff_to_the_person_or_turns_it_back_saying_what_changed(
    tmp_path: Path, orders: Path
) -> None:
    script = tmp_path / "script.json"
    script.write_text(json.dumps({"proposals": refund_script().script}))
    started = tether(
        "run",
        str(EXAMPLE),
        "--input",
        '{"order_id": "A-1005"}',
        "--model",
        f"script:{script}",
        "--json",
        cwd=tmp_path,
    )
    run_id = json.loads(started.stdout)["run_id"]

    received = tether("pickup", run_id, "--by", "dana", cwd=tmp_path)
    assert received.returncode == 0, received.stderr
    assert "the handoff is yours, dana" in received.stdout
    assert "3 value(s) read again, unchanged" in received.stdout

    change_order(orders, "A-1005", status="delivered")
    returned = tether("pickup", run_id, "--by", "dana", "--json", cwd=tmp_path)
    assert returned.returncode == 0, returned.stderr
    shown = json.loads(returned.stdout)
    assert shown["received"] is False
    assert shown["differences"] == [
        {"name": 'order_status("A-1005")', "then": "disputed", "now": "delivered", "changed": True}
    ]
    assert shown["handoff"]["owner"] == "disputes" and shown["run"]["status"] == "completed"
