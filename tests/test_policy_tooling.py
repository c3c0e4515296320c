"""Resolvers, history, and the tools a policy author uses: check, test, explain."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Shop, call, run
from tether import PolicyFileError, Runtime, ScriptedModel, ToolContext
from tether.journal import Journal
from tether.policy import Policy
from tether.policy_tooling import explain, lint

ROOT = Path(__file__).resolve().parents[1]


def tether(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "PYTHONPATH": str(ROOT / "src")},
    )


def rules(*items: dict[str, Any]) -> Policy:
    return Policy.from_dict({"rules": list(items)})


def test_lint_finds_rules_that_never_match_or_never_decide() -> None:
    policy = rules(
        {"id": "never", "tool": "refund", "when": "1 > 2", "decision": "deny"},
        {"id": "blanket-deny", "tool": "*", "decision": "deny"},
        {"id": "small-refunds", "tool": "refund", "when": "args.amount < 10.0", "decision": "allow"},
        {"id": "reads-ok", "tool": "read_order", "decision": "allow"},
    )
    found = {f.rule_id: f.problem for f in lint(policy, Shop().workflow(policy={"rules": []}))}
    assert "always false" in found["never"]
    assert "shadowed by rule 'blanket-deny'" in found["small-refunds"]
    assert "reads-ok" in found and "blanket-deny" not in found


def test_lint_is_quiet_on_the_shipped_policies() -> None:
    for example in ("refund", "retail"):
        out = tether("policy", "check", f"examples/{example}/policy.yaml", "--json")
        assert out.returncode == 0, out.stdout + out.stderr
        assert json.loads(out.stdout)["findings"] == []


def test_check_exits_1_with_findings_and_2_on_a_broken_file(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text("rules: [{id: a, tool: x, when: 'false', decision: deny}]\n")
    out = tether("policy", "check", str(tmp_path / "p.yaml"))
    assert out.returncode == 1 and "always false" in out.stdout
    (tmp_path / "p.yaml").write_text("rules: [{id: a, tool: x, decision: perhaps}]\n")
    out = tether("policy", "check", str(tmp_path / "p.yaml"))
    assert out.returncode == 2 and "rule 'a', field decision" in out.stderr


def test_policy_test_cases_pass_and_a_wrong_expectation_fails(tmp_path: Path) -> None:
    ok = tether("policy", "test", "examples/retail/policy_tests.yaml", "--json")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    report = json.loads(ok.stdout)
    assert report["failed"] == 0 and report["passed"] >= 12

    for name in (
        "policy.yaml",
        "workflow.yaml",
        "db.json",
        "retail_tools.py",
        "retail_db.py",
        "retail_resolvers.py",
        "retail_steps.py",
    ):
        (tmp_path / name).write_text((ROOT / "examples" / "retail" / name).read_text())
    (tmp_path / "cases.yaml").write_text(
        "policy: policy.yaml\nworkflow: workflow.yaml\ndata: {db: db.json}\ncases:\n"
        "  - name: wrongly expected to be allowed\n    tool: cancel_pending_order\n"
        "    args: {order_id: '#W2093847', reason: ordered by mistake}\n"
        "    facts: {user_id: lucas_brennan_8820}\n    expect: {decision: allow}\n"
    )
    bad = tether("policy", "test", str(tmp_path / "cases.yaml"))
    assert bad.returncode == 1
    assert "expected allow (policy_allowed), got deny by cancel-only-pending (policy_denied)" in bad.stdout


def test_a_condition_calling_an_unknown_resolver_is_refused_at_load() -> None:
    shop = Shop()
    with pytest.raises(PolicyFileError, match=r"calls unknown function\(s\) owner_of"):
        shop.workflow(
            policy={
                "rules": [
                    {
                        "id": "x",
                        "tool": "refund",
                        "when": "owner_of(args.order_id) == 'me'",
                        "decision": "allow",
                    }
                ]
            }
        )


def test_resolvers_are_called_with_the_run_context_and_their_values_recorded(journal: Journal) -> None:
    shop = Shop()
    seen: list[tuple[str, str]] = []

    def order_status(ctx: ToolContext, order_id: str) -> str | None:
        seen.append((ctx.run_id, order_id))
        return shop.orders.get(order_id, {}).get("status")

    wf = shop.workflow(
        policy={
            "rules": [
                {
                    "id": "only-paid",
                    "tool": "refund",
                    "when": "order_status(args.order_id) != 'paid'",
                    "decision": "deny",
                },
                {"id": "ok", "tool": "refund", "decision": "allow"},
            ]
        },
        resolvers={"order_status": order_status},
    )
    shop.orders["A2"] = {"total": 10.0, "status": "refunded"}
    result = run(
        Runtime(journal).start(
            wf,
            ScriptedModel(
                [
                    call("refund", order_id="A2", amount=1.0),
                    call("refund", order_id="A1", amount=1.0),
                    {"kind": "finish"},
                ]
            ),
        )
    )

    assert shop.refunds == [("A1", 1.0)]
    assert {order for _, order in seen} == {"A1", "A2"} and seen[0][0] == result.run_id
    entries = run(journal.read_entries(result.run_id))
    first = explain(entries, "s1", wf.policy)
    assert first.decision.rule_id == "only-paid"
    assert first.decision.resolved == {'order_status("A2")': "refunded"}
    assert [(r["rule"], r["result"], r["winner"]) for r in first.rules] == [
        ("only-paid", True, True),
        ("ok", True, False),
    ]


def test_history_survives_a_pause_and_a_new_process(journal: Journal) -> None:
    shop = Shop()
    wf = shop.workflow(
        policy={
            "rules": [
                {
                    "id": "one-refund-per-order",
                    "tool": "refund",
                    "decision": "deny",
                    "when": "history.exists(h, h.tool == 'refund' && h.args.order_id == args.order_id)",
                },
                {"id": "confirm", "tool": "refund", "decision": "ask"},
            ]
        }
    )
    script = ScriptedModel(
        [
            call("refund", order_id="A1", amount=5.0),
            call("refund", order_id="A1", amount=6.0),
            {"kind": "finish"},
        ]
    )
    paused = run(Runtime(journal).start(wf, script))
    run(journal.decide_ticket(paused.ticket_id, approve=True, by="sam", now=time.time()))
    done = run(
        Runtime(journal).resume(paused.run_id, wf, script)
    )  # a fresh runtime: history from the journal

    assert done.status == "completed" and shop.refunds == [("A1", 5.0)]
    second = explain(run(journal.read_entries(done.run_id)), "s2", wf.policy)
    assert second.decision.rule_id == "one-refund-per-order"


def test_explain_from_the_command_line(tmp_path: Path) -> None:
    db = tmp_path / "db.json"
    db.write_text((ROOT / "examples" / "retail" / "db.json").read_text())
    started = tether(
        "run",
        "examples/retail",
        "--input",
        json.dumps({"db": str(db)}),
        "--model",
        "script:examples/retail/proposals.json",
        "--answer",
        "approve-all",
        "--json",
        "--db",
        str(tmp_path / "j.db"),
    )
    assert started.returncode == 0, started.stderr
    run_id = json.loads(started.stdout)["run_id"]
    out = tether("policy", "explain", run_id, "s5", "--db", str(tmp_path / "j.db"), "--json")
    assert out.returncode == 0, out.stderr
    explained = json.loads(out.stdout)
    assert explained["decision"]["rule_id"] == "own-orders-only"
    assert 'order("#W5561902")' in explained["decision"]["resolved"]
    assert explained["facts_at_the_time"] == {"user_id": "maya_okafor_3147"}
    missing = tether("policy", "explain", run_id, "s99", "--db", str(tmp_path / "j.db"))
    assert missing.returncode == 2 and "no decided step 's99'" in missing.stderr
