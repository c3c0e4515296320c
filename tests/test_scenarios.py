"""`tether test`: scenario files run as a user runs them (subprocess CLI), the bundled suites
with their coverage, and the README's testing examples."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tether.testing import Collector, load_suite, run_suite

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
REFUND = ROOT / "examples" / "refund"
RETAIL = ROOT / "examples" / "retail"
SUITES = ["examples/refund/scenarios.yaml", "examples/retail/scenarios.yaml"]


@pytest.fixture(autouse=True)
def examples_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """Another test's refund workflow (tests/fixtures/format1) has a module named like the
    example's, which the loader refuses to mistake for it: the example's is imported here."""
    monkeypatch.delitem(sys.modules, "refund_tools", raising=False)


def tether(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], cwd=cwd, capture_output=True, text=True, timeout=300
    )


def scenario_file(tmp_path: Path, text: str, name: str = "scenarios.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text.replace("@REFUND", str(REFUND)).replace("@RETAIL", str(RETAIL)))
    return path


SMALL_REFUND = """
    input: {order_id: A-1002}
    proposals:
      - {kind: tool_call, tool: lookup_order, args: {order_id: A-1002}}
      - {kind: tool_call, tool: issue_refund, args: {order_id: A-1002, amount: 20.0, reason: late}}
      - {kind: exit, exit: refunded}
"""


# -- the bundled suites ------------------------------------------------------------------------------


def test_the_bundled_suites_pass_and_cover_every_rule_both_ways() -> None:
    out = tether("test", *SUITES, "--json", "--fail-under", "100")
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads(out.stdout)
    assert (report["passed"], report["failed"]) == (14, 0)
    coverage = {w["workflow"]: w for w in report["coverage"]["workflows"]}
    assert set(coverage) == {"refund 1", "retail 1"}
    for workflow in coverage.values():
        for kind in ("states", "exits", "rules", "branches", "decisions"):
            assert workflow[kind]["missed"] == [], (workflow["workflow"], kind)
        assert workflow["excluded"] == {}
    assert coverage["retail 1"]["rules"]["items"] == 24
    assert coverage["retail 1"]["no_false_branch"] == ["confirm-every-change", "transfer-to-a-human"]
    assert coverage["refund 1"]["no_false_branch"] == ["refund-small", "void-refund-on-rollback"]


def test_the_readme_shows_the_suites_and_their_coverage_as_tether_test_prints_them() -> None:
    readme = (ROOT / "README.md").read_text()
    command = "tether test examples/refund/scenarios.yaml examples/retail/scenarios.yaml --coverage"
    shown = re.search(rf"\$ {re.escape(command)}\n(.*?)```", readme, re.S)
    assert shown is not None, "the README has no console block running the bundled suites"
    out = tether(*command.split()[1:])
    assert out.returncode == 0, out.stderr
    assert out.stdout == shown.group(1)


def test_the_readme_pytest_example_passes_as_written(pytester: pytest.Pytester) -> None:
    readme = (ROOT / "README.md").read_text()
    block = next(b for b in re.findall(r"```python\n(.*?)```", readme, re.S) if "tether_journal" in b)
    pytester.makepyfile(test_readme_example=block.replace('"examples/refund"', repr(str(REFUND))))
    result = pytester.runpytest("-p", "tether.testing")
    result.assert_outcomes(passed=1)


def test_the_examples_data_is_untouched_and_each_scenario_gets_fresh_copies(tmp_path: Path) -> None:
    # Both scenarios cancel the same order: on a shared database the second would be refused.
    cancel = """
    input: {db: "{tmp}/db.json"}
    proposals:
      authenticate:
        - {kind: tool_call, tool: find_user_id_by_email, args: {email: maya.okafor@example.com}}
        - {kind: exit, exit: authenticated}
      assist:
        - {kind: tool_call, tool: cancel_pending_order,
           args: {order_id: "#W4829103", reason: no longer needed}}
        - {kind: exit, exit: done}
    expect:
      decisions: [allow, allow, {decision: ask, outcome: executed}, allow]
"""
    path = scenario_file(
        tmp_path,
        "workflow: @RETAIL\nfiles: {db.json: @RETAIL/db.json}\nperson: [{approve: true}]\nscenarios:\n"
        f"  - name: first\n{cancel}  - name: second\n{cancel}",
    )
    before = hashlib.sha256((RETAIL / "db.json").read_bytes()).hexdigest()
    out = tether("test", str(path), cwd=tmp_path)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "2 passed, 0 failed" in out.stdout
    assert hashlib.sha256((RETAIL / "db.json").read_bytes()).hexdigest() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenarios.yaml"]  # no journal, no ledger left here


def test_a_scenarios_environment_is_set_for_its_run_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REFUND_LEDGER", "/nonexistent/outside.sqlite")
    path = scenario_file(
        tmp_path,
        "workflow: @REFUND\nenv: {REFUND_LEDGER: '{tmp}/ledger.sqlite'}\nscenarios:\n  - name: small\n"
        f"{SMALL_REFUND}    expect: {{status: completed}}\n",
    )

    async def run() -> list[str]:
        collector = Collector()
        suite = await load_suite(path, collector)
        return [p for r in await run_suite(suite, collector) for p in r.problems]

    assert asyncio.run(run()) == []
    assert os.environ["REFUND_LEDGER"] == "/nonexistent/outside.sqlite"


# -- failures and bad input ---------------------------------------------------------------------------


def test_a_failing_scenario_exits_1_showing_what_was_expected_and_what_the_run_did(tmp_path: Path) -> None:
    path = scenario_file(
        tmp_path,
        "workflow: @REFUND\nenv: {REFUND_LEDGER: '{tmp}/l.sqlite'}\nscenarios:\n  - name: small refund\n"
        f"{SMALL_REFUND}    expect:\n"
        "      decisions: [allow, {decision: ask, rule: refund-above-100-needs-approval}, allow]\n"
        "      path: [intake, resolve, rejected]\n"
        "      status: failed\n",
    )
    out = tether("test", str(path))
    assert out.returncode == 1, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    assert lines[1] == "  FAIL  small refund"
    assert (
        lines[2]
        .strip()
        .startswith("decisions differ from those expected at step 2 (3 expected, 3 in the run")
    )
    marked = next(line for line in lines if line.lstrip().startswith("✗"))
    assert "ask by refund-above-100-needs-approval" in marked
    assert "allow by refund-small (policy_allowed) → executed" in marked
    went = "states visited: expected intake → resolve → rejected; the run went intake → resolve → done"
    assert went in [line.strip() for line in lines]
    assert any(
        line.strip().startswith("status: expected failed; the run is completed in state done")
        for line in lines
    )
    assert lines[-1] == "0 passed, 1 failed"


def test_a_ticket_the_scripted_person_cannot_decide_fails_the_scenario_naming_it(tmp_path: Path) -> None:
    path = scenario_file(
        tmp_path,
        "workflow: @REFUND\nenv: {REFUND_LEDGER: '{tmp}/l.sqlite'}\n"
        "person: [{tool: issue_refund, when: 'args.amount < 100.0', approve: true}]\nscenarios:\n"
        "  - name: big refund\n    input: {order_id: A-1001}\n    proposals:\n"
        "      - {kind: tool_call, tool: lookup_order, args: {order_id: A-1001}}\n"
        "      - {kind: tool_call, tool: issue_refund, args: {order_id: A-1001, amount: 150.0, reason: x}}\n"
        "    expect: {status: completed}\n",
    )
    out = tether("test", str(path), "--json")
    assert out.returncode == 1
    result = json.loads(out.stdout)["files"][0]["scenarios"][0]
    assert result["problems"][0].startswith(
        "the run could not be driven to its end: the scripted person has no rule for ticket tkt_"
    )
    assert "approval of issue_refund(" in result["problems"][0]
    assert result["problems"][1].startswith("status: expected completed; the run is paused in state resolve")
    assert result["run"]["steps"][-1]["outcome"] == "awaiting_approval"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (
            "workflow: @REFUND\nscenarios:\n  - name: one\n    expect: {status: completed, stauts: failed}\n",
            "scenario 'one' (#1), field expect.stauts: Extra inputs are not permitted",
        ),
        (
            "workflow: @REFUND\nscenarios:\n  - name: one\n    expect: {status: done}\n",
            "scenario 'one' (#1), field expect.status: Input should be 'queued', 'running'",
        ),
        (
            "workflow: @REFUND\nscenarios:\n  - name: one\n"
            "    expect: {decisions: [{decision: allow, rule: refund-smal}]}\n",
            "scenario 'one' (#1), field expect.decisions.0.rule: the policy has no rule 'refund-smal'",
        ),
        (
            "workflow: @REFUND\nscenarios:\n  - name: one\n    expect: {path: [intake, nowhere]}\n",
            "scenario 'one' (#1), field expect.path: no state 'nowhere' in refund",
        ),
        (
            "workflow: @REFUND\nscenarios:\n  - name: one\n    expect: {decisions: [{tool: refund_all}]}\n",
            "scenario 'one' (#1), field expect.decisions.0.tool: refund has no tool 'refund_all'",
        ),
        (
            "scenarios:\n  - name: one\n    expect: {status: completed}\n",
            "scenario 'one' (#1): no workflow (give 'workflow' in the scenario or the file)",
        ),
        (
            "workflow: @REFUND\nscenarios:\n  - name: one\n    input: {}\n    input: {}\n"
            "    expect: {status: failed}\n",
            "not valid YAML: duplicate key 'input'",
        ),
        (
            "workflow: @REFUND\nscenarios:\n  - {name: one, expect: {status: failed}}\n"
            "  - {name: one, expect: {status: failed}}\n",
            "scenario names must be unique (repeated: 'one')",
        ),
        (
            "workflow: @REFUND\nfiles: {data.json: missing.json}\n"
            "scenarios:\n  - {name: one, expect: {status: failed}}\n",
            "field files.data.json: no file",
        ),
        (
            "workflow: @REFUND\nunreachable: {'branch:refund-small=false': why}\n"
            "scenarios:\n  - {name: one, expect: {status: failed}}\n",
            "rule 'refund-small' has no condition, so no false branch to cover",
        ),
        (
            "workflow: @REFUND\nscenarios:\n  - {name: one, expect: {}}\n",
            "scenario 'one' (#1), field expect: expect at least one of decisions, path or status",
        ),
        (
            "workflow: @REFUND\nperson: [{tool: issue_refund, approve: true, deny: 'no'}]\n"
            "scenarios:\n  - {name: one, expect: {status: failed}}\n",
            "field person.0: give exactly one action",
        ),
    ],
)
def test_a_scenario_file_that_cannot_run_as_written_exits_2_naming_the_scenario_and_field(
    tmp_path: Path, content: str, message: str
) -> None:
    path = scenario_file(tmp_path, content)
    out = tether("test", str(path), "--json", cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    error = json.loads(out.stdout)["error"]
    assert error["code"] == "bad_input"
    assert error["message"].startswith(str(path))
    assert message in error["message"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["scenarios.yaml"]  # nothing ran


def test_every_file_is_checked_before_any_scenario_runs(tmp_path: Path) -> None:
    good = scenario_file(
        tmp_path,
        "workflow: @REFUND\nenv: {REFUND_LEDGER: '" + str(tmp_path / "ledger.sqlite") + "'}\n"
        f"scenarios:\n  - name: small\n{SMALL_REFUND}    expect: {{status: completed}}\n",
        "good.yaml",
    )
    bad = scenario_file(tmp_path, "workflow: @REFUND\nscenarios: []\n", "bad.yaml")
    out = tether("test", str(good), str(bad))
    assert out.returncode == 2
    assert "bad.yaml: field scenarios: List should have at least 1 item" in out.stderr
    assert not (tmp_path / "ledger.sqlite").exists()


# -- coverage ----------------------------------------------------------------------------------------


def test_fail_under_exits_1_when_branches_were_missed_and_lists_them(tmp_path: Path) -> None:
    path = scenario_file(
        tmp_path,
        "workflow: @REFUND\nenv: {REFUND_LEDGER: '{tmp}/l.sqlite'}\nscenarios:\n  - name: small\n"
        f"{SMALL_REFUND}    expect: {{status: completed}}\n",
    )
    out = tether("test", str(path), "--fail-under", "90")
    assert out.returncode == 1
    assert "1 passed, 0 failed" in out.stdout
    assert "  decisions      3        1       2    33%  ask, deny" in out.stdout
    assert out.stdout.rstrip().endswith("governance coverage 44% is below --fail-under 90%")
    assert tether("test", str(path), "--fail-under", "44").returncode == 0


def test_unreachable_items_are_listed_with_their_reason_and_not_counted(tmp_path: Path) -> None:
    path = scenario_file(
        tmp_path,
        "workflow: @REFUND\nenv: {REFUND_LEDGER: '{tmp}/l.sqlite'}\n"
        "unreachable:\n  'decision:ask': this suite never asks\n  'state:done': claimed, but reached\n"
        f"scenarios:\n  - name: small\n{SMALL_REFUND}    expect: {{status: completed}}\n",
    )
    out = tether("test", str(path), "--coverage", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    workflow = json.loads(out.stdout)["coverage"]["workflows"][0]
    assert workflow["decisions"]["items"] == 2 and workflow["decisions"]["missed"] == ["decision:deny"]
    assert workflow["states"]["items"] == 3
    assert workflow["excluded"] == {
        "decision:ask": "this suite never asks",
        "state:done": "claimed, but reached",
    }
    assert workflow["excluded_but_covered"] == ["state:done"]
    text = tether("test", str(path), "--coverage").stdout
    assert "  excluded: decision:ask — this suite never asks" in text
    assert "  warning: state:done is excluded but a run covered it" in text


def test_coverage_json_names_missed_items_by_their_ids(tmp_path: Path) -> None:
    path = scenario_file(
        tmp_path,
        "workflow: @REFUND\nscenarios:\n  - name: unknown order\n    input: {order_id: nope}\n"
        "    expect: {path: [intake, rejected], status: failed}\n",
    )
    out = tether("test", str(path), "--coverage", "--json")
    assert out.returncode == 0, out.stdout + out.stderr
    document: dict[str, Any] = json.loads(out.stdout)
    workflow = document["coverage"]["workflows"][0]
    assert workflow["states"]["missed"] == ["state:resolve", "state:done"]
    assert workflow["exits"]["missed"] == [
        "exit:intake.resolve",
        "exit:resolve.refunded",
        "exit:resolve.declined",
    ]
    assert document["coverage"]["fail_under"] is None
    assert document["files"][0]["scenarios"][0]["run"]["path"] == ["intake", "rejected"]
