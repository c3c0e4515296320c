"""Hostile and mistaken definitions: a missing policy, YAML built to crash or exhaust the
loader, and a tool that never said what it does. Each is refused (exit 2, naming the file
and the problem) or governed as the most restrictive thing it could be."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from conftest import call, run
from tether import (
    AgentState,
    DefinitionError,
    ModelSpecError,
    PolicyFileError,
    Runtime,
    ScriptedModel,
    Terminal,
    Tool,
    Workflow,
    load_workflow,
    tool,
)
from tether.journal import Journal
from tether.models.options import PriceTable
from tether.policy import Policy
from tether.policy_tooling import run_cases
from tether.strict_yaml import load_yaml

# The documented limits of the strict loader (docs/policy.md).
MAX_DEPTH = 100
MAX_ALIAS_NODES = 10_000

TOOLS = '''\
from tether import tool


@tool(effect="read")
def look(item: str) -> str:
    """Look at an item."""
    return item
'''

WORKFLOW = """\
name: hostile
version: 1
start: work
states:
  work:
    kind: agent
    instructions: Work.
    tools: ["hostile_tools:look"]
    exits: {done: end}
  end: {kind: terminal}
"""

POLICY = "rules: [{id: look-ok, tool: look, decision: allow}]\n"


def tether(
    *args: str, cwd: Path, memory: int | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """The CLI in a fresh process (optionally with its address space capped, in bytes)."""

    def cap() -> None:
        if memory is not None:
            resource.setrlimit(resource.RLIMIT_AS, (memory, memory))

    return subprocess.run(
        [sys.executable, "-m", "tether", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200"},
        preexec_fn=cap,
    )


def folder(tmp_path: Path, workflow: str = WORKFLOW, policy: str | None = POLICY) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "hostile_tools.py").write_text(TOOLS)
    (tmp_path / "workflow.yaml").write_text(workflow)
    if policy is not None:
        (tmp_path / "policy.yaml").write_text(policy)
    return tmp_path


def laughs(levels: int, fanout: int = 10) -> str:
    """A "billion laughs" document: each anchor repeats the previous one `fanout` times."""
    lines = ["l0: &l0 [" + ", ".join(["lol"] * fanout) + "]"]
    for n in range(1, levels):
        lines.append(f"l{n}: &l{n} [" + ", ".join([f"*l{n - 1}"] * fanout) + "]")
    return "\n".join(lines) + "\n"


# -- a policy that is named must be there ----------------------------------------------------


def test_a_missing_policy_file_given_on_the_command_line_is_an_error_naming_the_path(tmp_path: Path) -> None:
    wf = folder(tmp_path / "wf")
    out = tether("run", str(wf), "--policy", "nope.yaml", "--db", str(tmp_path / "t.db"), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "policy file not found: nope.yaml" in out.stderr
    assert str(tmp_path / "nope.yaml") in out.stderr.replace("\n", "")
    assert not (tmp_path / "t.db").exists()  # nothing ran, nothing was recorded


def test_a_missing_policy_given_with_one_declared_by_the_workflow_blames_the_one_given(
    tmp_path: Path,
) -> None:
    wf = folder(tmp_path / "wf", WORKFLOW.replace("start: work", "start: work\npolicy: strict.yaml"), None)
    (wf / "strict.yaml").write_text(POLICY)
    out = tether(
        "run", str(wf), "--policy", str(tmp_path / "nope.yaml"), "--db", str(tmp_path / "t.db"), cwd=tmp_path
    )
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"policy file not found: {tmp_path / 'nope.yaml'}" in out.stderr.replace("\n", "")
    assert "strict.yaml" not in out.stderr


def test_a_policy_declared_by_the_workflow_and_missing_is_an_error_naming_the_path(tmp_path: Path) -> None:
    wf = folder(tmp_path, WORKFLOW.replace("start: work", "start: work\npolicy: rules/strict.yaml"), None)
    with pytest.raises(PolicyFileError) as caught:
        load_workflow(wf)
    assert str(tmp_path.resolve() / "rules" / "strict.yaml") in str(caught.value)


@pytest.mark.parametrize("kind", ["a directory", "not UTF-8"])
def test_an_unreadable_policy_file_is_an_error_naming_the_path(tmp_path: Path, kind: str) -> None:
    wf = folder(tmp_path / "wf")
    bad = tmp_path / "bad.yaml"
    if kind == "a directory":
        bad.mkdir()
    else:
        bad.write_bytes(b"rules: [\xff\xfe]\n")
    out = tether("run", str(wf), "--policy", str(bad), "--db", str(tmp_path / "t.db"), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert f"policy file {bad} cannot be read" in out.stderr.replace("\n", "")


# -- YAML: depth, keys, aliases --------------------------------------------------------------

DEEP = "[" * 20_000 + "]" * 20_000
HOSTILE_YAML = {
    "nested 20,000 deep": (DEEP, f"nesting deeper than {MAX_DEPTH} levels"),
    "a sequence as a key": ("? [a]\n: 1\n", "a mapping key must be a scalar"),
    "a flow sequence as a key": ("{[1]: 2}\n", "a mapping key must be a scalar"),
    "an impossible date": ("a: 2001-02-30\n", "day is out of range"),
    "an alias inside its own anchor": ("a: &a [1, *a]\n", "refers to a node that contains it"),
    "aliases expanding past the limit": (laughs(5), f"aliases expand to more than {MAX_ALIAS_NODES} nodes"),
    "depth reached through aliases": (
        "a: &a " + "[" * 60 + "]" * 60 + "\nb: " + "[" * 60 + "*a" + "]" * 60 + "\n",
        f"nesting deeper than {MAX_DEPTH} levels (through aliases)",
    ),
}


@pytest.mark.parametrize("text", [v[0] for v in HOSTILE_YAML.values()], ids=list(HOSTILE_YAML))
def test_the_strict_loader_refuses_hostile_yaml_with_a_yaml_error_naming_the_problem(text: str) -> None:
    message = next(m for t, m in HOSTILE_YAML.values() if t == text)
    with pytest.raises(yaml.YAMLError) as caught:
        load_yaml(text)
    assert message in str(caught.value)


def test_anchors_reused_within_the_limits_still_load() -> None:
    text = "base: &base {retries: 3, tags: [a, b]}\nfirst: *base\nsecond: {<<: *base, retries: 5}\n"
    assert load_yaml(text) == {
        "base": {"retries": 3, "tags": ["a", "b"]},
        "first": {"retries": 3, "tags": ["a", "b"]},
        "second": {"retries": 5, "tags": ["a", "b"]},
    }


def _load_workflow_file(tmp_path: Path, text: str) -> Any:
    return load_workflow(folder(tmp_path, text, None))


def _load_policy_file(tmp_path: Path, text: str) -> Any:
    (tmp_path / "p.yaml").write_text(text)
    return Policy.from_file(tmp_path / "p.yaml")


def _run_policy_tests(tmp_path: Path, text: str) -> Any:
    (tmp_path / "cases.yaml").write_text(text)
    return run_cases(tmp_path / "cases.yaml")


def _load_price_table(tmp_path: Path, text: str) -> Any:
    (tmp_path / "prices.yaml").write_text(text)
    return PriceTable.from_file(tmp_path / "prices.yaml")


READERS = {
    "workflow": (_load_workflow_file, DefinitionError),
    "policy": (_load_policy_file, PolicyFileError),
    "policy tests": (_run_policy_tests, PolicyFileError),
    "price table": (_load_price_table, ModelSpecError),
}


@pytest.mark.parametrize("reader", list(READERS))
@pytest.mark.parametrize("case", list(HOSTILE_YAML))
def test_every_yaml_file_tether_reads_refuses_hostile_yaml_as_that_file_s_error(
    tmp_path: Path, reader: str, case: str
) -> None:
    load, error = READERS[reader]
    text, message = HOSTILE_YAML[case]
    with pytest.raises(error) as caught:
        load(tmp_path, text)
    assert message in str(caught.value)


@pytest.mark.parametrize("command", ["run", "policy check"])
@pytest.mark.parametrize("case", ["nested 20,000 deep", "a sequence as a key", "a flow sequence as a key"])
def test_the_cli_reports_hostile_yaml_as_a_definition_error_not_a_traceback(
    tmp_path: Path, command: str, case: str
) -> None:
    text = HOSTILE_YAML[case][0]
    if command == "run":
        wf = folder(tmp_path, text, None)
        out = tether("run", str(wf), "--db", str(tmp_path / "t.db"), cwd=tmp_path)
    else:
        (tmp_path / "p.yaml").write_text(text)
        out = tether("policy", "check", str(tmp_path / "p.yaml"), cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "not valid YAML" in out.stderr and "Traceback" not in out.stderr


def test_a_billion_laughs_policy_test_file_is_refused_in_bounded_memory(tmp_path: Path) -> None:
    # 10 levels of 10: a billion strings once expanded (the tool's argument check serializes
    # them). Before the limit this reached 3 GB; the cap on the process's address space
    # (1.5 GB) turns that into a failure instead of a stalled machine.
    wf = folder(tmp_path)
    anchors = "\n".join("  " + line for line in laughs(10).splitlines())
    (wf / "cases.yaml").write_text(
        f"policy: policy.yaml\nworkflow: workflow.yaml\ndata:\n{anchors}\n"
        "cases: [{name: bomb, tool: look, args: {item: *l9}, expect: {decision: allow}}]\n"
    )
    out = tether("policy", "test", str(wf / "cases.yaml"), cwd=tmp_path, memory=1_500_000_000)
    assert out.returncode == 2, out.stdout + out.stderr[-2000:]
    assert f"aliases expand to more than {MAX_ALIAS_NODES} nodes" in out.stderr


# -- an undeclared effect is the most restrictive ---------------------------------------------


def test_a_function_named_in_yaml_without_an_effect_is_denied_as_external(tmp_path: Path) -> None:
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    wf = folder(
        tmp_path / "wf", WORKFLOW.replace('tools: ["hostile_tools:look"]', 'tools: ["os:remove"]'), None
    )
    script = tmp_path / "script.json"
    script.write_text(
        json.dumps([call("remove", path=str(victim)), {"kind": "exit", "exit": "done", "summary": "gave up"}])
    )
    out = tether(
        "run", str(wf), "--model", f"script:{script}", "--db", str(tmp_path / "t.db"), "--json", cwd=tmp_path
    )
    assert victim.read_text() == "keep me", out.stdout + out.stderr
    denied = next(row for row in json.loads(out.stdout)["steps"] if row["decision"])
    assert (denied["decision"], denied["rule_id"]) == ("deny", "default:external")
    assert "tool 'remove' declares no effect, so it counts as external" in denied["reason"]
    assert "effect: read" in denied["reason"]


def test_tools_declared_in_code_without_an_effect_are_external_and_flagged(journal: Journal) -> None:
    def peek(item: str) -> str:
        return item

    @tool
    def poke(item: str) -> str:
        return item

    undeclared = [Tool(peek), poke]
    assert [(t.effect, t.effect_declared, t.idempotent) for t in undeclared] == [
        ("external", False, False)
    ] * 2
    assert (Tool(peek, effect="read").effect_declared, tool(effect="write")(peek).effect_declared) == (
        True,
        True,
    )

    wf = Workflow("w", "1", "work", [AgentState("work", "Work.", (poke,), {"done": "end"}), Terminal("end")])
    result = run(
        Runtime(journal).start(wf, ScriptedModel([call("poke", item="x"), {"kind": "exit", "exit": "done"}]))
    )
    entries = run(journal.read_entries(result.run_id))
    decision = next(e.body.decision for e in entries if getattr(e.body, "decision", None))
    assert decision.decision == "deny" and "declares no effect" in decision.reason


def test_a_yaml_override_keeps_an_undeclared_tool_undeclared(tmp_path: Path) -> None:
    (tmp_path / "undeclared_tools.py").write_text(
        "from tether import tool\n\n\n@tool\ndef poke(item: str) -> str:\n    return item\n"
    )
    workflow = WORKFLOW.replace(
        'tools: ["hostile_tools:look"]', 'tools: [{ref: "undeclared_tools:poke", name: prod}]'
    )
    wf = load_workflow(folder(tmp_path, workflow, None))
    prod = wf.tools()["prod"]
    assert (prod.effect, prod.effect_declared) == ("external", False)
