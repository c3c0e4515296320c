"""`tether check`: each deliberately broken workflow has its one finding and nothing else;
the bundled examples have none but acknowledged ones; the analysis of conditions agrees
with the CEL engine wherever it claims to know a value."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import cel
import pytest

from tether.analysis.conditions import UNKNOWN, Condition, Space, tool_subject
from tether.loader import load_workflow
from tether.policy import Rule

REPO = Path(__file__).resolve().parents[1]
BROKEN = Path(__file__).parent / "fixtures" / "broken_workflows"
EXPECTED = {
    "unguarded_effect": ("unguarded-effect", "archive_invoice"),
    "unbounded_agent_state": ("unbounded-agent-state", "research"),
    "unbounded_cycle": ("unbounded-cycle", "draft"),
    "unreachable_terminal": ("unreachable-terminal", "archived"),
    "no_way_out": ("no-way-out", "ping"),
    "unknown_name": ("unknown-name", "no-huge-quotes"),
    "unverified_write": ("unverified-write", "send_letter"),
    "undeclared_effect": ("undeclared-effect", "count_words"),
}


def tether(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
        env={"PATH": "/usr/bin:/bin", "COLUMNS": "400", "NO_COLOR": "1", "PYTHONPATH": str(REPO / "src")},
    )


def check_json(target: Path | str) -> tuple[int, dict[str, Any]]:
    done = tether("check", str(target), "--json")
    assert done.returncode in (0, 1), done.stderr
    return done.returncode, json.loads(done.stdout)


@pytest.mark.parametrize("folder", sorted(EXPECTED))
def test_each_broken_workflow_has_its_one_finding_and_nothing_else(folder: str) -> None:
    code, report = check_json(BROKEN / folder)
    want_code, want_at = EXPECTED[folder]
    assert code == 1
    assert {f["code"] for f in report["findings"]} == {want_code}
    assert want_at in [f["at"] for f in report["findings"]]
    assert report["summary"]["unacknowledged"] == len(report["findings"])


def test_an_unguarded_effect_names_the_calls_the_path_and_why_each_rule_does_not_cover_them() -> None:
    done = tether("check", str(BROKEN / "unguarded_effect"))
    assert done.returncode == 1
    text = done.stdout
    assert "archive_invoice (write) may be allowed with no ask, defer or deny" in text
    assert "calls with args.amount <= 1000.0" in text
    assert "path: triage" in text
    assert "allowed by rule archive-the-rest (no condition)" in text
    assert "large-archives-need-approval (ask): covers only calls with args.amount > 1000.0" in text


def test_the_refund_example_has_only_its_acknowledged_finding_with_the_reason_shown() -> None:
    code, report = check_json(REPO / "examples" / "refund")
    assert code == 0
    [finding] = report["findings"]
    assert (finding["code"], finding["at"], finding["acknowledged"]) == (
        "unguarded-effect",
        "issue_refund",
        True,
    )
    assert "Refunds up to 100 are automatic by design" in finding["reason"]
    # The facts-based rule is opaque and said to be, never counted as cover.
    assert (
        "  refund-needs-verified-order (deny): opaque: reads facts.order_total, facts.order_id"
        in (finding["detail"])
    )
    assert report["stale_acknowledgements"] == []


def test_the_retail_example_has_no_findings() -> None:
    code, report = check_json(REPO / "examples" / "retail")
    assert (code, report["findings"]) == (0, [])


def _copy(folder: str, tmp_path: Path) -> Path:
    target = tmp_path / folder
    shutil.copytree(BROKEN / folder, target)
    return target


def _append(path: Path, text: str) -> None:
    path.write_text(path.read_text() + text)


def test_an_acknowledged_finding_is_listed_with_its_reason_and_does_not_fail(tmp_path: Path) -> None:
    folder = _copy("unbounded_agent_state", tmp_path)
    _append(
        folder / "workflow.yaml",
        "acknowledge:\n  - {finding: unbounded-agent-state, at: research, reason: research runs overnight}\n",
    )
    done = tether("check", str(folder))
    assert done.returncode == 0, done.stdout
    assert "acknowledged unbounded-agent-state at research" in done.stdout
    assert "acknowledged: research runs overnight" in done.stdout


def test_an_acknowledgement_matching_no_finding_is_reported_as_stale(tmp_path: Path) -> None:
    folder = _copy("unbounded_agent_state", tmp_path)
    _append(folder / "workflow.yaml", "acknowledge:\n  - {finding: no-way-out, at: research, reason: old}\n")
    code, report = check_json(folder)
    assert code == 1
    assert report["stale_acknowledgements"] == [{"finding": "no-way-out", "at": "research", "reason": "old"}]


@pytest.mark.parametrize(
    ("entry", "problem"),
    [
        ("{finding: no-such-code, at: research, reason: x}", "unknown finding 'no-such-code'"),
        ("{finding: unbounded-agent-state, at: research, reason: '  '}", "an acknowledgement must say why"),
        ("{finding: unbounded-agent-state, at: research}", "acknowledge[1]: reason: Field required"),
    ],
)
def test_a_malformed_acknowledgement_is_bad_input_naming_the_problem(
    tmp_path: Path, entry: str, problem: str
) -> None:
    folder = _copy("unbounded_agent_state", tmp_path)
    _append(folder / "workflow.yaml", f"acknowledge:\n  - {entry}\n")
    done = tether("check", str(folder))
    assert done.returncode == 2
    assert problem in " ".join(done.stderr.split())


def test_a_workflow_that_does_not_load_is_bad_input(tmp_path: Path) -> None:
    done = tether("check", str(tmp_path / "nowhere"), "--json")
    assert done.returncode == 2
    assert json.loads(done.stdout)["error"]["code"] == "bad_input"


def _write_workflow(tmp_path: Path, policy: str) -> Path:
    (tmp_path / "gate_tools.py").write_text(
        "from typing import Any\n"
        "from tether import Evidence, tool\n\n"
        "def ok(args: dict[str, Any], result: Any, ctx: Any) -> Evidence:\n"
        "    return Evidence()\n\n"
        "@tool(effect='write', verify=ok)\n"
        "def send(to: str, urgent: bool) -> str:\n"
        "    '''Send.'''\n"
        "    return to\n"
    )
    (tmp_path / "workflow.yaml").write_text(
        "name: gate\nversion: 1\nstart: act\nstates:\n"
        "  act: {kind: agent, instructions: act, tools: [gate_tools:send], exits: {done: done}}\n"
        "  done: {kind: terminal}\n"
    )
    (tmp_path / "policy.yaml").write_text(policy)
    return tmp_path


def test_a_rule_over_the_tool_itself_covers_every_call_it_names(tmp_path: Path) -> None:
    folder = _write_workflow(
        tmp_path,
        "rules:\n"
        "  - {id: writes-are-asked, tool: '*', when: 'tool.effect == \"write\"', decision: ask}\n"
        "  - {id: anything-goes, tool: send, decision: allow}\n",
    )
    code, report = check_json(folder)
    assert (code, report["findings"]) == (0, [])


def test_a_write_default_of_allow_counts_as_allowing(tmp_path: Path) -> None:
    folder = _write_workflow(
        tmp_path,
        "defaults: {write: allow}\n"
        "rules:\n  - {id: urgent-is-asked, tool: send, when: args.urgent, decision: ask}\n",
    )
    code, report = check_json(folder)
    [finding] = report["findings"]
    assert code == 1
    assert "calls with args.urgent == false" in finding["message"]
    assert "the policy default for write is allow" in finding["detail"]


# -- the analysis against the engine ----------------------------------------------------------------


@pytest.fixture(scope="module")
def probe(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tool with arguments of every kind the analysis cuts, and one it does not."""
    tmp_path = tmp_path_factory.mktemp("probe")
    (tmp_path / "probe_tools.py").write_text(
        "from typing import Literal\nfrom tether import tool\n\n"
        "@tool(effect='write')\n"
        "def probe(amount: float, count: int, reason: str, flag: bool, "
        "kind: Literal['a', 'b', 'c'], tags: list[str]) -> None:\n"
        "    '''Probe.'''\n"
    )
    (tmp_path / "workflow.yaml").write_text(
        "name: probe\nversion: 1\nstart: s\nstates:\n"
        "  s: {kind: agent, instructions: s, tools: [probe_tools:probe], exits: {done: done}}\n"
        "  done: {kind: terminal}\n"
    )
    workflow = load_workflow(tmp_path)
    return tool_subject(workflow.tools()["probe"], "s", workflow)


CONDITIONS = [
    "args.amount > 100.0",
    "args.amount >= 100.0 && args.amount < 500.0",
    "!(args.amount <= 0.0) || args.count == 3",
    "args.count > 2 && args.count < 5",
    "args.count in [1, 7] || args.amount == -5.5",
    'args.reason in ["no longer needed", "ordered by mistake"]',
    'args.reason != "x" && args.flag',
    'args.kind == "b" ? args.amount > 10.0 : args.count >= 0',
    'tool.effect == "write" && args.amount < 1.0',
    'run.state == "s" && !args.flag',
    "size(args.tags) > 2 || args.amount > 3.0",
    "args.amount * 2.0 > 10.0",
    'args.reason.startsWith("no") && args.count < 0',
    "facts.limit < args.amount || args.count == 1",
]


@pytest.mark.parametrize("when", CONDITIONS)
def test_where_the_analysis_knows_a_condition_the_engine_agrees(probe: Any, when: str) -> None:
    subject = probe
    condition = Condition.of(Rule(id="r", tool="probe", when=when, decision="deny"))
    space = Space(subject, [condition])
    program = cel.compile(when)
    known = 0
    for point, value in zip(space.points, space.evaluate(condition), strict=True):
        if value is UNKNOWN:
            continue
        known += 1
        args = {"amount": 0.5, "count": 0, "reason": "", "flag": False, "kind": "a", "tags": []}
        args |= {name: cell.value for name, cell in point.items()}
        context = {"args": args, "tool": dict(subject.tool), "run": {**subject.run, "id": "r1"}}
        assert program.execute(context) is value, (when, args)
    # Conditions over arguments compared with constants are known everywhere.
    assert known or any(word in when for word in ("size(", "*", "startsWith", "facts"))
