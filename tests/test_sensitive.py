"""Sensitive fields: used in memory, never recorded (tether.sensitive)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import pytest

from conftest import call, run
from tether import (
    AgentState,
    FunctionModel,
    ModelContext,
    ModelReply,
    Policy,
    Runtime,
    Sensitive,
    SensitiveKeyMissing,
    Terminal,
    Workflow,
    tool,
)
from tether.journal import open_journal
from tether.models import Exchange
from tether.sensitive import KEY_ENV, redact_for_export
from tether.webhooks import standard_body

REPO = Path(__file__).resolve().parents[1]
CARD = "4111111111111111"
TOKEN = "tok_live_9f8e7d6c5b4a"
KEY = "k" * 40


class Payments:
    def __init__(self) -> None:
        self.charged: list[tuple[str, float]] = []

        @tool(effect="write", idempotent=False)
        def charge(card_number: Annotated[str, Sensitive], amount: float) -> dict[str, Any]:
            """Charge a card."""
            self.charged.append((card_number, amount))
            return {"ok": True, "token": TOKEN, "last4": card_number[-4:]}

        charge.declare_sensitive(["result.token"])
        self.charge = charge

    def workflow(self) -> Workflow:
        pay = AgentState("pay", "Take the payment.", (self.charge,), {"done": "done"}, escalate_to="finance")
        policy = {
            "rules": [
                # Policy tests the real value, at decision time.
                {
                    "id": "test-cards",
                    "tool": "charge",
                    "when": "args.card_number.startsWith('0000')",
                    "decision": "deny",
                },
                {
                    "id": "big",
                    "tool": "charge",
                    "when": "args.amount > 100.0",
                    "decision": "ask",
                    "approver": "finance",
                },
                {"id": "charge-ok", "tool": "charge", "decision": "allow"},
            ]
        }
        return Workflow("pay", "1", "pay", [pay, Terminal("done")], policy=Policy.from_dict(policy, "p"))


def model(script: list[Any]) -> FunctionModel:
    """Proposes the script's steps in turn and reports the exchange a vendor adapter would:
    the request quotes the transcript, the response the output."""

    def propose(ctx: ModelContext) -> ModelReply:
        output = script[min(ctx.proposals_made, len(script) - 1)]
        transcript = [m.model_dump(mode="json") for m in ctx.transcript]
        return ModelReply(
            output=output,
            exchange=Exchange(request={"messages": transcript}, response={"content": json.dumps(output)}),
        )

    return FunctionModel(propose, name="payer")


@pytest.fixture
def key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(KEY_ENV, KEY)


def leaked(path: Path) -> list[str]:
    data = path.read_bytes()
    for extra in ("-wal", "-journal"):
        if Path(str(path) + extra).exists():
            data += Path(str(path) + extra).read_bytes()
    return [s for s in (CARD, TOKEN) if s.encode() in data]


def test_a_sensitive_argument_and_result_are_used_but_never_recorded(tmp_path: Path, key: None) -> None:
    db = tmp_path / "j.db"
    journal = open_journal(str(db))
    payments = Payments()
    script = [call("charge", card_number=CARD, amount=20.0), {"kind": "exit", "exit": "done"}]
    result = run(Runtime(journal).start(payments.workflow(), model(script)))

    assert result.status == "completed"
    assert payments.charged == [(CARD, 20.0)]  # the tool got the real value
    entries = run(journal.read_entries(result.run_id))
    executed = next(e.body for e in entries if e.kind == "executed")
    fp = executed.args["card_number"]["$sensitive"]
    assert fp.startswith("hmac-sha256:") and len(fp) == len("hmac-sha256:") + 64
    assert executed.result["token"]["$sensitive"].startswith("hmac-sha256:")
    assert executed.result["last4"] == "1111"  # what is not sensitive stays as it was
    exchanges = run(journal.read_exchanges(result.run_id))
    assert len(exchanges) == 2
    # The second request quotes the transcript: the model is shown fingerprints, never the token.
    assert TOKEN not in json.dumps([x.model_dump() for x in exchanges])
    assert CARD not in json.dumps([x.model_dump() for x in exchanges])
    journal.close()
    assert leaked(db) == []

    # `tether show --json` (a separate process, as a user runs it) prints no secret either.
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    shown = subprocess.run(
        [sys.executable, "-m", "tether", "show", result.run_id, "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert fp in shown and CARD not in shown and TOKEN not in shown

    # The auditor's export bundle (`tether audit export`) holds the fingerprints, not the values.
    bundle = subprocess.run(
        [sys.executable, "-m", "tether", "audit", "export", result.run_id, "--db", str(db)],
        capture_output=True,
        text=True,
        env=env,
        check=True,
    ).stdout
    assert fp in bundle and CARD not in bundle and TOKEN not in bundle


def test_policy_tests_the_real_value_and_an_approval_binds_it(tmp_path: Path, key: None) -> None:
    db = tmp_path / "j.db"
    journal = open_journal(str(db))
    payments, wf = Payments(), Payments().workflow()
    wf = payments.workflow()
    denied = run(
        Runtime(journal).start(wf, model([call("charge", card_number="0000222233334444", amount=5.0)]))
    )
    refused = [e.body for e in run(journal.read_entries(denied.run_id)) if e.kind == "refused"]
    assert refused and refused[0].decision.rule_id == "test-cards"
    assert payments.charged == []

    runtime = Runtime(journal)
    script = model([call("charge", card_number=CARD, amount=500.0), {"kind": "exit", "exit": "done"}])
    paused = run(runtime.start(wf, script))
    assert paused.status == "paused"
    ticket = run(journal.get_ticket(paused.ticket_id))
    assert ticket.args["card_number"]["$sensitive"].startswith("hmac-sha256:")
    assert leaked(db) == []
    # A webhook body is built from the stored ticket: no arguments, no secret.
    assert CARD not in json.dumps(standard_body_for(ticket))

    run(journal.decide_ticket(ticket.ticket_id, approve=True, by="fin", now=time.time()))
    done = run(runtime.resume(paused.run_id, wf, script))
    # The approved call ran with the real value (held in this process's memory), once; its
    # hash (over the real value) matched the ticket's.
    assert done.status == "completed" and payments.charged == [(CARD, 500.0)]
    assert run(journal.get_ticket(ticket.ticket_id)).status == "consumed"
    journal.close()
    assert leaked(db) == []


def standard_body_for(ticket: Any) -> dict[str, Any]:
    from tether.journal.outbox import Delivery, DueDelivery

    fields = {f: None for f in Delivery.__dataclass_fields__}  # type: ignore[attr-defined]
    fields |= {
        "event": "ticket.opened",
        "run_id": ticket.run_id,
        "format": "standard",
        "base_url": "http://x",
        "ticket_status": "pending",
        "created_at": 0.0,
    }
    return standard_body(DueDelivery(Delivery(**fields), ticket, "pay", "1", "pay"))


def test_resumed_elsewhere_an_approved_sensitive_call_is_refused_not_run(tmp_path: Path, key: None) -> None:
    db = tmp_path / "j.db"
    journal = open_journal(str(db))
    payments = Payments()
    wf = payments.workflow()
    script = model([call("charge", card_number=CARD, amount=500.0), {"kind": "exit", "exit": "done"}])
    paused = run(Runtime(journal).start(wf, script))
    run(journal.decide_ticket(paused.ticket_id, approve=True, by="fin", now=time.time()))
    from tether import sensitive

    sensitive._vault.clear()  # what a restart (or another process) holds: nothing
    done = run(Runtime(journal).resume(paused.run_id, wf, script))
    refused = [e.body for e in run(journal.read_entries(paused.run_id)) if e.kind == "refused"]
    assert refused[-1].decision.reason_code == "sensitive_value_unavailable"
    assert payments.charged == [] and done.status == "completed"
    journal.close()


def test_declared_sensitive_fields_without_a_key_are_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    monkeypatch.delenv("TETHER_FINGERPRINT_KEY_FILE", raising=False)
    journal = open_journal(str(tmp_path / "j.db"))
    with pytest.raises(SensitiveKeyMissing, match=r"charge: card_number, result\.token"):
        run(Runtime(journal).start(Payments().workflow(), model([{"kind": "exit", "exit": "done"}])))
    assert run(journal.list_runs()) == []  # nothing was recorded
    monkeypatch.setenv(KEY_ENV, "short")
    with pytest.raises(SensitiveKeyMissing, match="at least 32"):
        run(Runtime(journal).start(Payments().workflow(), model([{"kind": "exit", "exit": "done"}])))
    journal.close()


def test_a_workflow_file_declares_sensitive_fields(tmp_path: Path) -> None:
    from tether.loader import load_workflow

    (tmp_path / "tools.py").write_text(
        "from tether import tool\n"
        "@tool(effect='write')\n"
        "def send(to: str, password: str) -> dict:\n    return {'session': 'x'}\n"
    )
    doc = (
        "name: s\nversion: '1'\nstart: a\nstates:\n  a:\n    kind: agent\n    instructions: x\n"
        "    tools:\n      - ref: tools:send\n        sensitive_fields: [password, result.session]\n"
        "    exits: {done: end}\n  end:\n    kind: terminal\n"
    )
    (tmp_path / "workflow.yaml").write_text(doc)
    wf = load_workflow(tmp_path / "workflow.yaml")
    assert wf.tools()["send"].sensitive_fields == {"password", "result.session"}
    (tmp_path / "workflow.yaml").write_text(doc.replace("password, result", "pasword, result"))
    with pytest.raises(Exception, match="'pasword' is neither a parameter"):
        load_workflow(tmp_path / "workflow.yaml")


def test_redact_for_export_removes_given_values_wherever_they_are() -> None:
    body = {"args": {"card": CARD, "n": 4111222233334444}, "text": f"paid with {CARD}", "ok": True}
    out = redact_for_export(body, [CARD, 4111222233334444])
    assert out == {
        "args": {"card": "[sensitive]", "n": "[sensitive]"},
        "text": "paid with [sensitive]",
        "ok": True,
    }


def test_an_idempotent_sensitive_call_cut_off_by_a_crash_is_in_doubt_not_rerun(
    tmp_path: Path, key: None
) -> None:
    """The value is not in the journal: the call cannot be repeated from it, idempotent or not."""
    calls: list[str] = []

    @tool(effect="write", idempotent=True)
    def store_secret(name: str, value: Annotated[str, Sensitive]) -> str:
        calls.append(value)
        if len(calls) == 1:
            raise KeyboardInterrupt  # the process dies after the intent is on disk
        return "stored"

    state = AgentState("s", "x", (store_secret,), {"done": "done"}, escalate_to="ops")
    policy = Policy.from_dict({"rules": [{"id": "ok", "tool": "store_secret", "decision": "allow"}]}, "p")
    wf = Workflow("w", "1", "s", [state, Terminal("done")], policy=policy)
    db = tmp_path / "j.db"
    journal = open_journal(str(db))
    script = model([call("store_secret", name="db", value=CARD), {"kind": "exit", "exit": "done"}])
    with pytest.raises(KeyboardInterrupt):
        run(Runtime(journal).start(wf, script))
    run_id = run(journal.list_runs())[0].run_id
    from tether import sensitive

    sensitive._vault.clear()  # the process that held the value is gone
    result = run(Runtime(journal).resume(run_id, wf, script))
    assert result.status == "effect_in_doubt" and calls == [CARD]
    assert "sensitive arguments are not recorded" in (result.message or "")
    journal.close()
    assert leaked(db) == []


def test_edit_and_approve_keeps_the_sensitive_value_out_of_the_record(tmp_path: Path, key: None) -> None:
    from tether.identity import Principal

    db = tmp_path / "j.db"
    journal = open_journal(str(db))
    payments = Payments()
    wf = payments.workflow()
    runtime = Runtime(journal)
    script = model([call("charge", card_number=CARD, amount=500.0), {"kind": "exit", "exit": "done"}])
    paused = run(runtime.start(wf, script))
    shown = run(journal.get_ticket(paused.ticket_id)).args  # what an approver sees: the fingerprint
    fin = Principal(
        principal_id="person:fin", name="fin", kind="person", role="approver", approver_for=("finance",)
    )
    edited = run(
        runtime.decide(
            paused.ticket_id, approve=True, by=fin, edited_args={**shown, "amount": 150.0}, workflow=wf
        )
    )
    assert edited.args["card_number"] == shown["card_number"]
    done = run(runtime.resume(paused.run_id, wf, script))
    assert done.status == "completed" and payments.charged == [(CARD, 150.0)]
    journal.close()
    assert leaked(db) == []
