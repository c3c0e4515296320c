"""The command line's side of people in the loop, in real processes: `tether token`,
edit-and-approve (`approve --args`), questions described as questions, and next-step hints
that carry the `--db` used."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tether.cli.common import Output, with_db
from tether.identity import Principal

REFUND = Path(__file__).resolve().parents[1] / "examples" / "refund"
INPUT = json.dumps({"order_id": "A-1001", "reason": "kettle arrived broken"})
LOOKUP = {"kind": "tool_call", "tool": "lookup_order", "args": {"order_id": "A-1001"}}
REFUND_180 = {
    "kind": "tool_call",
    "tool": "issue_refund",
    "args": {"order_id": "A-1001", "amount": 180.0, "reason": "kettle arrived broken"},
}
FINISH = {"kind": "exit", "exit": "refunded", "update": {"refunded": 90.0}, "summary": "refunded part"}


class Cli:
    def __init__(self, tmp_path: Path) -> None:
        self.tmp, self.db = tmp_path, tmp_path / "journals" / "people.db"
        self.db.parent.mkdir()
        env = {k: v for k, v in os.environ.items() if k not in ("TETHER_DB", "FORCE_COLOR")}
        self.env = env | {"REFUND_LEDGER": str(tmp_path / "ledger.sqlite"), "COLUMNS": "500", "NO_COLOR": "1"}

    def __call__(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "tether", *args, "--db", str(self.db)],
            cwd=self.tmp,
            env=self.env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
        )

    def json(self, *args: str) -> Any:
        done = self(*args, "--json")
        assert done.returncode == 0, done.stdout + done.stderr
        return json.loads(done.stdout)

    def script(self, *proposals: dict[str, Any]) -> str:
        path = self.tmp / "script.json"
        path.write_text(json.dumps({"proposals": list(proposals)}))
        return f"script:{path}"


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    return Cli(tmp_path)


def test_approve_with_edited_arguments_executes_exactly_those(cli: Cli) -> None:
    paused = cli(
        "run", str(REFUND), "--input", INPUT, "--model", cli.script(LOOKUP, REFUND_180, FINISH), "-q"
    )
    assert paused.returncode == 0, paused.stderr
    ticket = cli.json("approvals")[0]
    tkt = ticket["ticket_id"]
    # Over the hard limit: policy denies the edit, the ticket stays as it was.
    refused = cli("approve", tkt, "--args", json.dumps(REFUND_180["args"] | {"amount": 600.0}), "--json")
    assert refused.returncode == 2
    error = json.loads(refused.stdout)["error"]
    assert error["code"] == "edit_refused" and "refund-over-hard-limit" in error["message"]
    assert cli.json("approvals")[0]["status"] == "pending"
    bad = cli("approve", tkt, "--args", "[1, 2]")
    assert bad.returncode == 2 and "--args must be a JSON object" in flat(bad.stderr)

    edited = cli(
        "approve", tkt, "--args", json.dumps(REFUND_180["args"] | {"amount": 90.0}), "--reason", "half"
    )
    assert edited.returncode == 0, edited.stderr
    assert "approved with edited arguments" in flat(edited.stdout)
    assert f"tether resume {ticket['run_id']} --db {cli.db}" in flat(edited.stdout)
    done = cli("resume", ticket["run_id"], "-q")
    assert done.returncode == 0 and "completed" in done.stdout, done.stdout + done.stderr
    shown = cli.json("show", ticket["run_id"])
    executed = [
        e["body"] for e in shown["entries"] if e["kind"] == "executed" and e["body"]["tool"] == "issue_refund"
    ]
    assert [e["args"]["amount"] for e in executed] == [90.0]  # exactly the edited call, once
    decided = next(e["body"] for e in shown["entries"] if e["kind"] == "ticket_decided")
    assert decided["by"]["principal_id"] == Principal.local().principal_id
    assert decided["original_args_hash"] == ticket["args_hash"] != decided["args_hash"]
    assert decided["edited_args"]["amount"] == 90.0


def test_a_question_is_described_as_a_question_with_the_db_in_every_hint(cli: Cli) -> None:
    question = {"kind": "question", "question": "Was the kettle used?"}
    paused = cli("run", str(REFUND), "--input", INPUT, "--model", cli.script(LOOKUP, question), "-q")
    assert paused.returncode == 0, paused.stderr
    out = flat(paused.stdout)
    tkt = cli.json("approvals")[0]["ticket_id"]
    assert f"waiting on question {tkt}" in out
    assert f"tether answer {tkt} TEXT --db {cli.db}" in out and "tether approve" not in out
    listed = flat(cli("approvals").stdout)
    assert f"question: Was the kettle used? (tether answer {tkt} TEXT --db {cli.db})" in listed
    refused = cli("approve", tkt)
    assert refused.returncode == 2
    message = flat(refused.stderr)
    assert "is a question" in message and f"tether answer {tkt} TEXT --db {cli.db}" in message
    answered = cli("answer", tkt, "no, still in its box")
    assert answered.returncode == 0 and "answered" in answered.stdout


def test_an_approval_is_not_answered(cli: Cli) -> None:
    cli("run", str(REFUND), "--input", INPUT, "--model", cli.script(LOOKUP, REFUND_180), "-q")
    ticket = cli.json("approvals")[0]
    assert ticket["kind"] == "approval"
    refused = cli("answer", ticket["ticket_id"], "yes")
    assert refused.returncode == 2 and "is an approval, not a question" in flat(refused.stderr)
    assert f"tether approve {ticket['ticket_id']} --db {cli.db}" in flat(refused.stderr)


def test_tokens_are_created_listed_and_revoked_and_never_shown_twice(cli: Cli) -> None:
    created = cli(
        "token", "create", "alice", "--role", "approver", "--approver-for", "supervisor",
        "--workflow", "refund", "--expires", "30d", "--json",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    info = json.loads(created.stdout)
    assert info["token"].startswith("tth_") and info["principal_id"] == "person:alice"
    assert (info["role"], info["approver_for"], info["workflows"]) == ("approver", ["supervisor"], ["refund"])
    assert 29.9 * 86400 < info["expires_at"] - info["created_at"] <= 30 * 86400 + 1
    listed = cli("token", "list", "--json")
    assert info["token"] not in listed.stdout and json.loads(listed.stdout)[0]["token_id"] == info["token_id"]
    revoked = cli("token", "revoke", info["token_id"])
    assert revoked.returncode == 0 and "revoked" in revoked.stdout
    assert (
        json.loads(cli("token", "list", "--json").stdout)[0]["revoked_by"] == Principal.local().principal_id
    )
    for bad, message in [
        (("--role", "approver"), "--approver-for"),
        (("--role", "boss"), "role 'boss'"),
        (("--role", "viewer", "--expires", "soon"), "--expires must be"),
    ]:
        refused = cli("token", "create", "carol", *bad)
        assert refused.returncode == 2 and message in flat(refused.stderr), refused.stderr
    assert len(json.loads(cli("token", "list", "--json").stdout)) == 1


def test_an_error_naming_a_next_step_gets_the_db_of_the_command() -> None:
    Output.db_hint = " --db /tmp/j.db"
    try:
        message = (
            "run run_1 has an effect in doubt; a person must say: tether resolve run_1 --done | --not-done"
        )
        assert with_db(message).endswith("tether resolve run_1 --db /tmp/j.db --done | --not-done")
        assert with_db("see tether show run_1 --db /tmp/j.db") == "see tether show run_1 --db /tmp/j.db"
    finally:
        Output.db_hint = ""
    assert with_db(message) == message
