"""Broken workflow and policy files are refused before anything runs, each with its own message."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

from tether import AgentState, DefinitionError, PolicyFileError, Terminal, Workflow, load_workflow
from tether.policy import Policy

FIXTURES = Path(__file__).parent / "fixtures" / "broken"

GOOD = """\
name: demo
version: 1
start: begin
states:
  begin: {kind: step, run: "good_tools:begin", next: [work]}
  work:
    kind: agent
    instructions: Do the work.
    tools: ["good_tools:look", "good_tools:change"]
    exits: {done: end}
  end: {kind: terminal}
"""


@pytest.fixture(autouse=True)
def fresh_modules(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test copies the tool modules to its own folder; forget earlier imports of them."""
    for name in ("good_tools", "exploding_tools"):
        monkeypatch.delitem(sys.modules, name, raising=False)


def write(tmp_path: Path, workflow: str, policy: str | None = None) -> Path:
    for module in FIXTURES.glob("*.py"):
        shutil.copy(module, tmp_path / module.name)
    (tmp_path / "workflow.yaml").write_text(workflow)
    if policy is not None:
        (tmp_path / "policy.yaml").write_text(policy)
    return tmp_path


def test_the_good_definition_loads(tmp_path: Path) -> None:
    wf = load_workflow(write(tmp_path, GOOD, "rules: [{id: ok, tool: change, decision: allow}]"))
    assert (wf.name, wf.version, wf.start) == ("demo", "1", "begin")
    assert wf.policy is not None and wf.policy.rules[0].id == "ok"
    assert wf.hash == load_workflow(tmp_path).hash  # stable across loads


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("start: begin", "start: nowhere"), "start state 'nowhere' is not defined"),
        (
            ("exits: {done: end}", "exits: {done: the_moon}"),
            "state 'work' leads to 'the_moon', which is not a state",
        ),
        (("next: [work]", "next: [wrok]"), "state 'begin' leads to 'wrok', which is not a state"),
        (
            ("  end: {kind: terminal}", "  end: {kind: terminal}\n  orphan: {kind: terminal}"),
            "terminal state 'orphan' is unreachable from start 'begin'",
        ),
        (("exits: {done: end}", "exits: {}"), "declares no exits"),
        (
            ('good_tools:look", "good_tools:change', 'good_tools:look", "good_tools:look'),
            "duplicate tool name(s) look",
        ),
        (('good_tools:change"]', 'good_tools:another_look"]'), "duplicate tool name(s) look"),
        (('good_tools:look",', 'no_such_module:look",'), "cannot import module 'no_such_module'"),
        (('good_tools:look",', 'good_tools:lookk",'), "module 'good_tools' has no attribute 'lookk'"),
        (
            ('good_tools:look",', 'exploding_tools:look",'),
            "importing 'exploding_tools' (first needed here) failed: RuntimeError: database password not set",
        ),
        (('good_tools:look",', 'good_tools",'), "is not an import path of the form module:name"),
        (("kind: terminal}", "kind: terminus}"), "states.end: Input tag 'terminus'"),
        (("version: 1", "version: 1\nstats: {}"), "stats: Extra inputs are not permitted"),
        (("name: demo\n", ""), "name: Field required"),
        (
            ("  end: {kind: terminal}", "  end: {kind: terminal}\n  end: {kind: terminal}"),
            "duplicate key 'end'",
        ),
        (
            ("exits: {done: end}", "exits: {done: end}\n    budget: {max_steps: 0}"),
            "budget.max_steps: Input should be greater than or equal to 1",
        ),
        (("start: begin", "start: [begin"), "not valid YAML"),
    ],
)
def test_broken_workflow_files_name_what_is_wrong(
    tmp_path: Path, change: tuple[str, str], message: str
) -> None:
    old, new = change
    assert old in GOOD
    with pytest.raises(DefinitionError) as caught:
        load_workflow(write(tmp_path, GOOD.replace(old, new, 1)))
    assert message in str(caught.value)


def test_a_workflow_must_be_able_to_end(tmp_path: Path) -> None:
    text = GOOD.replace("exits: {done: end}", "exits: {done: work}").replace("  end: {kind: terminal}\n", "")
    with pytest.raises(DefinitionError, match="no terminal state"):
        load_workflow(write(tmp_path, text))


@pytest.mark.parametrize(
    ("policy", "message"),
    [
        (
            "rules: [{id: r1, tool: chnage, decision: allow}]",
            "rule 'r1' names unknown tool 'chnage' (the workflow has: change, look)",
        ),
        ("rules: [{id: r1, exit: finish, decision: allow}]", "rule 'r1' names unknown exit 'finish'"),
        ("rules: [{id: r1, tool: change, decision: maybe}]", "rule 'r1', field decision"),
        (
            "rules: [{id: r1, tool: change, decision: allow, when: 'args.item =='}]",
            "rule 'r1': condition does not parse",
        ),
        (
            "rules: [{id: r1, tool: change, decision: allow, when: 'request.item == \"x\"'}]",
            "rule 'r1': unknown name(s) request in condition",
        ),
        (
            "rules: [{id: r1, tool: change, decision: allow}, {id: r1, tool: look, decision: allow}]",
            "duplicate rule id 'r1'",
        ),
        ("rules: [{id: r1, tool: change, decision: defer}]", "a 'defer' rule must name an 'owner'"),
        (
            "rules: [{id: r1, tool: change, exit: done, decision: allow}]",
            "give exactly one of 'tool' or 'exit'",
        ),
        (
            "rules: [{id: r1, tool: change, decision: allow, approver: boss}]",
            "'approver' and 'expires_in' apply only to 'ask' rules",
        ),
        ("rules: [{id: r1, tool: change, decision: allow, colour: red}]", "rule 'r1', field colour"),
        ("defaults: {write: defer}", "a default cannot be 'defer'"),
        ("- just\n- a list", "a policy must be a mapping"),
        ("rules: [{id: r1, tool: change, decision: allow}\n", "not valid YAML"),
    ],
)
def test_broken_policy_files_name_the_rule_and_field(tmp_path: Path, policy: str, message: str) -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_workflow(write(tmp_path, GOOD, policy))
    assert message in str(caught.value)
    assert "policy.yaml" in str(caught.value)


def test_a_named_policy_file_must_exist(tmp_path: Path) -> None:
    with pytest.raises(PolicyFileError) as caught:
        load_workflow(write(tmp_path, GOOD.replace("start: begin", "start: begin\npolicy: strict.yaml")))
    assert f"names policy 'strict.yaml', which is not found: {tmp_path.resolve() / 'strict.yaml'}" in str(
        caught.value
    )


def test_python_definitions_are_checked_the_same_way() -> None:
    from tether import tool

    @tool
    def look(item: str) -> str:
        return item

    agent = AgentState("work", "Work.", (look,), {"done": "end"})
    with pytest.raises(DefinitionError, match="duplicate state name 'work'"):
        Workflow("w", "1", "work", [agent, agent, Terminal("end")])
    with pytest.raises(PolicyFileError, match="unknown tool 'nope'"):
        Workflow(
            "w",
            "1",
            "work",
            [agent, Terminal("end")],
            policy=Policy.from_dict({"rules": [{"id": "x", "tool": "nope", "decision": "allow"}]}),
        )


def test_a_module_name_taken_by_another_workflow_folder_is_refused(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    load_workflow(write(tmp_path / "a", GOOD))
    with pytest.raises(DefinitionError, match="module 'good_tools' is already imported from"):
        load_workflow(write(tmp_path / "b", GOOD))


def test_the_workflow_hash_changes_with_the_definition(tmp_path: Path) -> None:
    first = load_workflow(write(tmp_path, GOOD)).hash
    second = load_workflow(write(tmp_path, GOOD.replace("Do the work.", "Do the work well."))).hash
    assert first != second


def test_yaml_overrides_keep_what_the_decorator_declared(tmp_path: Path) -> None:
    (tmp_path / "declared.py").write_text(
        "from tether import tool\n\n"
        "@tool(effect='external', idempotent=True)\n"
        "def notify(to: str) -> None:\n"
        "    '''Notify someone.'''\n\n"
        "def check(args, result, ctx):\n"
        "    from tether import Evidence\n"
        "    return Evidence()\n"
    )
    text = GOOD.replace(
        'tools: ["good_tools:look", "good_tools:change"]',
        'tools: [{ref: "declared:notify", verify: "declared:check"}]',
    )
    wf = load_workflow(write(tmp_path, text))
    notify = wf.tools()["notify"]
    assert (notify.effect, notify.idempotent, notify.description) == ("external", True, "Notify someone.")
    assert notify.verifier is not None
