"""Skills: versioned units with a contract, used as agent states, tested by `tether check`."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from conftest import call, run
from tether import Runtime, ScriptedModel, Terminal, Workflow, load_workflow
from tether.analysis.check import Report, acknowledgements, check
from tether.errors import DefinitionError, PolicyFileError
from tether.journal import Journal
from tether.skills import load_skill
from tether.testing import Collector, load_suite, run_suite

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "skills"
SKILL = EXAMPLE / "skills" / "refund"


MODULES = ("refund_skill_tools", "refund_skill_tools_v2", "refund_intake")


@pytest.fixture
def project(tmp_path: Path) -> Iterator[Path]:
    """A copy of the example: the workflow and its refund skill, free to edit. Its modules
    are imported from the copy (the example's, imported by other tests, are put back after)."""
    copy = tmp_path / "project"
    shutil.copytree(EXAMPLE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    saved = {name: sys.modules.pop(name, None) for name in MODULES}
    yield copy
    for name, module in saved.items():
        sys.modules.pop(name, None)
        if module is not None:
            sys.modules[name] = module


@pytest.fixture
def orders(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    book = tmp_path / "orders.json"
    shutil.copyfile(SKILL / "orders.json", book)
    monkeypatch.setenv("REFUND_ORDERS", str(book))
    monkeypatch.setenv("REFUND_LEDGER", str(tmp_path / "ledger.sqlite"))
    yield book


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1))


def checked(target: Path) -> Report:
    return check(load_workflow(target), acknowledgements(target))


def open_findings(report: Report) -> list[tuple[str, str]]:
    return [(f.code, f.at) for f in report.unacknowledged]


def tether(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


# -- tether check ---------------------------------------------------------------------------------


def test_the_bundled_skill_and_the_workflow_that_uses_it_pass_tether_check(tmp_path: Path) -> None:
    for target in (EXAMPLE, SKILL):
        done = tether("check", str(target), cwd=tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert "no unacknowledged findings" in done.stdout


def test_a_skill_with_a_missing_test_case_fails_tether_check(project: Path, tmp_path: Path) -> None:
    edit(project / "skills" / "refund" / "scenarios.yaml", "    case: borderline\n", "")

    done = tether("check", str(project), cwd=tmp_path)

    assert done.returncode == 1
    assert "finding skill-untested at refund@2" in done.stdout
    assert "ships no scenario for case(s) borderline" in done.stdout


@pytest.mark.parametrize("case", ["normal", "borderline", "failure", "escalation"])
def test_each_of_the_four_cases_is_required(project: Path, case: str) -> None:
    edit(project / "skills" / "refund" / "scenarios.yaml", f"    case: {case}\n", "")

    report = checked(project)

    assert open_findings(report) == [("skill-untested", "refund@2")]
    assert f"case(s) {case} " in report.unacknowledged[0].message


def test_a_skill_without_scenarios_is_untested(project: Path) -> None:
    (project / "skills" / "refund" / "scenarios.yaml").unlink()

    (finding,) = checked(project).unacknowledged

    assert (finding.code, finding.at) == ("skill-untested", "refund@2")
    assert "has no scenarios file" in finding.message


def test_a_skill_whose_scenario_fails_is_a_finding_naming_the_scenario(project: Path) -> None:
    edit(project / "skills" / "refund" / "scenarios.yaml", "status: handed_off", "status: completed")

    (finding,) = checked(project).unacknowledged

    assert (finding.code, finding.at) == ("skill-test-failed", "refund@2")
    assert "1 of 6 scenario(s) failed" in finding.message
    assert (
        "scenario 'a refund of a disputed order is handed off to the disputes team' failed:" in finding.detail
    )


def test_scenarios_of_another_workflow_do_not_count_as_the_skill_s_cases(project: Path) -> None:
    # The escalation case, run against the workflow that uses the skill instead of the skill alone.
    scenarios = project / "skills" / "refund" / "scenarios.yaml"
    edit(scenarios, "    case: escalation\n", "    case: escalation\n    workflow: ../..\n")
    edit(scenarios, "      path: [refund]\n      status: handed_off", "      status: handed_off")

    report = checked(project)

    assert open_findings(report) == [("skill-untested", "refund@2")]
    assert "case(s) escalation " in report.unacknowledged[0].message


def test_a_missing_case_can_be_acknowledged_and_is_still_listed(project: Path) -> None:
    edit(project / "skills" / "refund" / "scenarios.yaml", "    case: escalation\n", "")
    edit(
        project / "workflow.yaml",
        "acknowledge:\n",
        "acknowledge:\n  - {finding: skill-untested, at: refund@2, reason: the escalation case is being"
        " written}\n",
    )

    report = checked(project)

    assert open_findings(report) == []
    assert [(f.code, f.acknowledged) for f in report.findings if f.code == "skill-untested"] == [
        ("skill-untested", "the escalation case is being written")
    ]


def test_a_version_kept_beside_the_current_one_is_loaded_by_its_version(project: Path) -> None:
    skills = project / "skills"
    kept = skills / "refund@2"
    shutil.copytree(skills / "refund", kept)
    # One process imports a module name from one folder: the kept version's module is renamed.
    (kept / "refund_skill_tools.py").rename(kept / "refund_skill_tools_v2.py")
    text = (kept / "skill.yaml").read_text()
    (kept / "skill.yaml").write_text(text.replace("refund_skill_tools:", "refund_skill_tools_v2:"))
    edit(skills / "refund" / "skill.yaml", "version: 2", "version: 3")

    old = load_workflow(project)
    assert old.skills() == {"refund@2": load_skill(kept).hash}
    edit(project / "workflow.yaml", "skills/refund@2", "skills/refund@3")
    assert list(load_workflow(project).skills()) == ["refund@3"]

    edit(kept / "skill.yaml", "version: 2", "version: 4")
    with pytest.raises(DefinitionError, match="the folder refund@2 holds version 4"):
        load_skill(kept)


# -- the contract at run time ---------------------------------------------------------------------


def test_exit_data_that_does_not_satisfy_the_output_contract_is_refused_as_invalid_arguments(
    journal: Journal, orders: Path
) -> None:
    script = [
        call("lookup_order", order_id="A-1002"),
        call("issue_refund", order_id="A-1002", amount=20.0, reason="late"),
        {"kind": "exit", "exit": "refunded", "update": {"refunded_amount": "twenty", "by": "me"}},
        {"kind": "exit", "exit": "refunded", "update": {"refunded_amount": 20.0}},
    ]
    result = run(
        Runtime(journal).start(load_workflow(EXAMPLE), ScriptedModel(script), input={"order_id": "A-1002"})
    )

    assert result.status == "completed"
    refused = [e.body for e in run(journal.read_entries(result.run_id)) if e.kind == "refused"]
    (record,) = refused
    assert (record.decision.rule_id, record.decision.reason_code) == ("runtime:contract", "invalid_arguments")
    assert "output contract of skill refund@2" in record.decision.reason
    assert "refunded_amount: 'twenty' is not of type 'number'" in record.decision.reason
    assert "unknown field(s) by" in record.decision.reason


def test_a_run_whose_data_is_not_the_skill_s_input_escalates_before_any_model_call(journal: Journal) -> None:
    skill = load_skill(SKILL)
    model = ScriptedModel([])  # asked, it would escalate with model_error instead

    result = run(Runtime(journal).start(skill.harness(), model, input={"order_id": 1001, "reason": ["x"]}))

    assert (result.status, result.reason_code, result.owner) == (
        "escalated",
        "invalid_arguments",
        "supervisor",
    )
    assert "order_id: 1001 is not of type 'string'" in (result.message or "")
    assert "reason: ['x'] is not of type 'string'" in (result.message or "")
    assert run(journal.read_exchanges(result.run_id)) == []


def test_an_optional_input_may_be_missing_and_a_required_one_may_not() -> None:
    skill = load_skill(SKILL)
    assert skill.input_problem({"order_id": "A-1002"}) is None
    assert "order_id: required, and the run's data has none" in (skill.input_problem({"reason": "x"}) or "")


# -- recorded with every run ------------------------------------------------------------------------


def test_every_run_records_the_skill_s_version_and_hash_and_tether_show_prints_them(
    tmp_path: Path, orders: Path
) -> None:
    skill = load_skill(SKILL)
    workflow = load_workflow(EXAMPLE)
    assert workflow.describe()["states"][1]["skill"] == {"name": "refund", "version": "2", "hash": skill.hash}
    assert workflow.skills() == {"refund@2": skill.hash}

    db = tmp_path / "journal.db"
    script = tmp_path / "script.json"  # never used: intake rejects the order id
    script.write_text("[]")
    started = tether(
        "run",
        str(EXAMPLE),
        "--input",
        '{"order_id": "Z"}',
        "--model",
        f"script:{script}",
        "--db",
        str(db),
        "--json",
        cwd=tmp_path,
    )
    run_id = json.loads(started.stdout)["run_id"]
    shown = tether("show", run_id, "--db", str(db), cwd=tmp_path)
    assert f"skills refund@2 {skill.hash[:23]}…" in shown.stdout
    entries = json.loads(tether("show", run_id, "--db", str(db), "--json", cwd=tmp_path).stdout)["entries"]
    assert entries[0]["body"]["workflow"]["skills"] == {"refund@2": skill.hash}


@pytest.mark.parametrize(
    ("file", "old", "new"),
    [
        ("policy.yaml", "refunds above 500 go through finance", "refunds above 500 go to finance"),
        ("skill.yaml", "exclusiveMinimum: 0", "minimum: 0.01"),
        ("refund_skill_tools.py", '"""Refund an amount', '"""Refund some amount'),
    ],
)
def test_a_change_to_a_skill_changes_its_hash_and_the_hash_of_the_workflow_using_it(
    project: Path, file: str, old: str, new: str
) -> None:
    before = load_workflow(project)
    edit(project / "skills" / "refund" / file, old, new)
    sys.modules.pop("refund_skill_tools")  # imported again, as a new process would

    after = load_workflow(project)

    assert after.skills()["refund@2"] != before.skills()["refund@2"]
    assert after.hash != before.hash


# -- the policy fragment -------------------------------------------------------------------------------


def test_the_skill_s_rules_are_merged_into_the_workflow_s_policy_namespaced_and_hashed(
    tmp_path: Path,
) -> None:
    workflow = load_workflow(EXAMPLE)
    assert workflow.policy is not None
    assert [r.id for r in workflow.policy.rules] == [
        "refund/over-hard-limit",
        "refund/needs-verified-order",
        "refund/disputed-orders-to-disputes",
        "refund/above-100-needs-approval",
        "refund/small",
        "refund/refund-verified",
    ]
    verified = workflow.policy.rules[-1]
    assert (verified.exit, verified.decision) == (["refunded"], "deny")
    assert verified.when == "!(has(facts.refunded) && args.update.refunded_amount == facts.refunded)"

    # A policy given at run time (--policy) is merged with the skill's rules too.
    extra = tmp_path / "policy.yaml"
    extra.write_text("rules:\n  - {id: no-big-lookups, tool: lookup_order, when: 'false', decision: deny}\n")
    overridden = load_workflow(EXAMPLE, policy=extra)
    assert overridden.policy is not None
    assert [r.id for r in overridden.policy.rules][:2] == ["no-big-lookups", "refund/over-hard-limit"]
    assert overridden.policy.hash != workflow.policy.hash


def test_a_skill_rule_for_every_tool_governs_the_skill_s_tools_only(project: Path) -> None:
    policy = project / "skills" / "refund" / "policy.yaml"
    policy.write_text(policy.read_text() + "  - {id: log-all, tool: '*', decision: allow}\n")

    workflow = load_workflow(project)

    assert workflow.policy is not None
    everything = next(r for r in workflow.policy.rules if r.id == "refund/log-all")
    assert everything.tool == ["lookup_order", "issue_refund"]


def test_a_workflow_defined_in_python_uses_a_skill_as_a_state() -> None:
    skill = load_skill(SKILL, "2")
    workflow = Workflow(
        "py",
        "1",
        "resolve",
        [skill.state("resolve", {"refunded": "end", "declined": "end"}), Terminal("end")],
    )
    assert workflow.policy is not None and "refund/small" in [r.id for r in workflow.policy.rules]
    assert "order_status" in workflow.resolvers
    assert workflow.skills() == {"refund@2": skill.hash}


# -- definitions that are refused --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("file", "old", "new", "error", "message"),
    [
        ("workflow.yaml", "skills/refund@2", "skills/refund@3", DefinitionError, "is version 2, not 3"),
        ("workflow.yaml", "skills/refund@2", "skills/refund", DefinitionError, "names no version"),
        ("workflow.yaml", "skills/refund@2", "skills/nothing@2", DefinitionError, "no skill at"),
        (
            "workflow.yaml",
            "{refunded: done, declined: rejected}",
            "{refunded: done}",
            DefinitionError,
            "map exit(s) declined",
        ),
        (
            "workflow.yaml",
            "{refunded: done, declined: rejected}",
            "{refunded: done, declined: rejected, paid: done}",
            DefinitionError,
            "it has no exit(s) paid",
        ),
        (
            "skills/refund/skill.yaml",
            "name: refund",
            "name: refunds",
            DefinitionError,
            "its folder is 'refund'",
        ),
        (
            "skills/refund/skill.yaml",
            "  declined: failure",
            "  declined: fail",
            DefinitionError,
            "exits.declined",
        ),
        (
            "skills/refund/skill.yaml",
            "exclusiveMinimum: 0",
            "exclusiveMinimum: zero",
            DefinitionError,
            "not a valid JSON Schema",
        ),
        (
            "skills/refund/skill.yaml",
            "{type: string, required: false",
            "{type: string, required: maybe",
            DefinitionError,
            "required must be true or false",
        ),
        (
            "skills/refund/skill.yaml",
            "has(facts.refunded) &&",
            "has(facts.refunded) &&&",
            PolicyFileError,
            "does not parse",
        ),
        (
            "skills/refund/policy.yaml",
            "tool: issue_refund\n    when: args.amount > 500.0",
            "tool: wire_money\n    when: args.amount > 500.0",
            PolicyFileError,
            "names unknown tool 'wire_money'",
        ),
        (
            "skills/refund/policy.yaml",
            "version: 1\n",
            "version: 1\ndefaults: {write: allow}\n",
            PolicyFileError,
            "may not set defaults",
        ),
        (
            "skills/refund/policy.yaml",
            "order_status(args.order_id)",
            "order_state(args.order_id)",
            PolicyFileError,
            "unknown function(s) order_state",
        ),
    ],
)
def test_a_broken_skill_or_use_of_one_is_refused_naming_what_is_wrong(
    project: Path, file: str, old: str, new: str, error: type[Exception], message: str
) -> None:
    edit(project / file, old, new)
    with pytest.raises(error, match=re.escape(message)):
        load_workflow(project)


def test_no_other_state_may_offer_a_skill_s_tool_or_exit(project: Path) -> None:
    workflow = project / "workflow.yaml"
    other = "  again: {kind: agent, instructions: x, exits: {declined: rejected}}\n  done: {kind: terminal}"
    edit(workflow, "  done: {kind: terminal}", other)
    edit(workflow, "next: [resolve, rejected]", "next: [resolve, rejected, again]")
    with pytest.raises(DefinitionError, match="state 'again' offers exit declined of skill refund@2"):
        load_workflow(project)


# -- the skill alone -------------------------------------------------------------------------------------


def test_the_skill_s_scenarios_run_against_the_skill_alone_and_cover_its_rules() -> None:
    async def main() -> tuple[list[Any], Collector]:
        collector = Collector()
        suite = await load_suite(SKILL / "scenarios.yaml", collector)
        return await run_suite(suite, collector), collector

    results, collector = asyncio.run(main())

    assert [r.passed for r in results] == [True] * 6
    (coverage,) = collector.report().workflows
    assert coverage.title == "skill:refund 2"
    assert coverage.total.missed == []


def test_a_run_of_the_skill_alone_pauses_and_resumes_pinned_to_the_skill(
    tmp_path: Path, orders: Path
) -> None:
    script = tmp_path / "script.json"
    refund = call("issue_refund", order_id="A-1001", amount=150.0, reason="dented")
    script.write_text(json.dumps([call("lookup_order", order_id="A-1001"), refund]))
    db = str(tmp_path / "j.db")
    started = tether(
        "run",
        str(SKILL),
        "--input",
        '{"order_id": "A-1001"}',
        "--model",
        f"script:{script}",
        "--db",
        db,
        "--json",
        cwd=tmp_path,
    )
    paused = json.loads(started.stdout)
    assert (paused["status"], paused["state"]) == ("paused", "refund")
    assert tether("approve", paused["ticket_id"], "--db", db, cwd=tmp_path).returncode == 0

    resumed = tether("resume", paused["run_id"], "--db", db, "--json", cwd=tmp_path)

    # The script ends after the approved refund: the run escalates, having refunded once.
    assert json.loads(resumed.stdout)["status"] == "escalated", resumed.stdout + resumed.stderr
    entries = json.loads(tether("show", paused["run_id"], "--db", db, "--json", cwd=tmp_path).stdout)[
        "entries"
    ]
    assert [e["body"]["tool"] for e in entries if e["kind"] == "executed"] == ["lookup_order", "issue_refund"]


def test_a_skill_s_policy_may_not_declare_definitions(project: Path) -> None:
    policy = project / "skills" / "refund" / "policy.yaml"
    policy.write_text("definitions: {big: 'args.amount > 100.0'}\n" + policy.read_text())
    with pytest.raises(PolicyFileError, match="a skill's policy may not declare definitions or subjects"):
        load_workflow(project)
