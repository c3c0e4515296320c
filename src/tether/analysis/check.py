"""`tether check`: properties of a workflow and its policy together, over every path.

Each finding has a stable code, names what it is about (`at`: a state, tool or rule) and,
where it applies, the path (states from `start`) by which a run gets there. A finding
acknowledged in the workflow file (`acknowledge: [{finding, at, reason}]`) is still
listed, with its reason, but does not fail the check. docs/check.md describes each code.
"""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tether.analysis.cel_syntax import CelSyntaxError, parse
from tether.analysis.conditions import (
    RUN_FIELDS,
    Condition,
    Outcome,
    Space,
    definition_trees,
    expand,
    possible,
    references,
    tool_subject,
)
from tether.analysis.paths import StateGraph
from tether.errors import DefinitionError
from tether.loader import WORKFLOW_FILE, skill_file
from tether.policy import Rule
from tether.skills import CASES, Skill
from tether.strict_yaml import load_yaml
from tether.testing.coverage import Collector
from tether.testing.scenarios import ScenarioFileError, ScenarioResult, load_suite, run_suite
from tether.tools import Tool
from tether.workflow import AgentState, Terminal, Workflow

CODES: dict[str, str] = {
    "unguarded-effect": "a write or external tool that policy may allow with no ask, defer or deny",
    "unbounded-agent-state": "an agent state whose budget is above the bounds of a finite budget",
    "unbounded-cycle": "a cycle through agent states with no run-level step budget",
    "unreachable-terminal": "a terminal state no path reaches",
    "no-way-out": "a state from which no terminal state can be reached",
    "unknown-name": "a rule reading a field no tool, exit or run it governs has",
    "unverified-write": "a write tool with no verifier",
    "undeclared-effect": "a tool that does not declare its effect",
    # Reserved for when people are principals (identities): an `ask` whose approver role no
    # token or principal can hold. Acknowledgements may name it; nothing reports it yet.
    "approver-nobody-holds": "an ask whose approver role no principal can hold (reserved)",
    "skill-untested": "a skill that does not ship scenarios for its four test cases "
    "(normal, borderline, failure, escalation)",
    "skill-test-failed": "a skill whose scenarios do not pass",
}
# What "finite" means for one visit to an agent state (docs/check.md). Each limit has a
# default; raising one beyond these bounds is treated as removing it.
BOUNDS = {"max_steps": 1_000, "max_tool_calls": 1_000, "max_seconds": 86_400.0}
GATES = ("ask", "defer", "deny")


@dataclass
class Finding:
    code: str
    at: str  # the state, tool or rule it is about; what an acknowledgement names
    message: str
    path: list[str] = field(default_factory=list)
    detail: list[str] = field(default_factory=list)
    acknowledged: str | None = None  # the acknowledgement's reason

    def as_dict(self) -> dict[str, Any]:
        return {
            "code": self.code,
            "at": self.at,
            "message": self.message,
            "path": self.path,
            "detail": self.detail,
            "acknowledged": self.acknowledged is not None,
            "reason": self.acknowledged,
        }


class Acknowledgement(BaseModel):
    """A finding the workflow's authors accept, with why."""

    model_config = ConfigDict(extra="forbid")

    finding: str
    at: str = Field(min_length=1)
    reason: str = Field(min_length=1)

    @field_validator("finding")
    @classmethod
    def _known_code(cls, code: str) -> str:
        if code not in CODES:
            raise ValueError(f"unknown finding {code!r} (known: {', '.join(CODES)})")
        return code

    @field_validator("reason")
    @classmethod
    def _said(cls, reason: str) -> str:
        if not reason.strip():
            raise ValueError("an acknowledgement must say why")
        return reason


@dataclass
class Report:
    workflow: Workflow
    findings: list[Finding]
    stale: list[Acknowledgement] = field(default_factory=list)

    @property
    def unacknowledged(self) -> list[Finding]:
        return [f for f in self.findings if f.acknowledged is None]

    def as_dict(self) -> dict[str, Any]:
        return {
            "workflow": {
                "name": self.workflow.name,
                "version": self.workflow.version,
                "hash": self.workflow.hash,
            },
            "findings": [f.as_dict() for f in self.findings],
            "summary": {
                "findings": len(self.findings),
                "acknowledged": len(self.findings) - len(self.unacknowledged),
                "unacknowledged": len(self.unacknowledged),
            },
            "stale_acknowledgements": [a.model_dump() for a in self.stale],
        }


def workflow_file(target: str | Path) -> Path | None:
    """The YAML file a workflow target names (None for `module:attribute`); for a skill
    checked alone, its `skill.yaml` (which may acknowledge findings too)."""
    path = Path(target)
    skill = skill_file(path)
    if skill is not None:
        return skill
    if path.is_dir():
        return path / WORKFLOW_FILE
    return path if path.suffix in (".yaml", ".yml") or path.exists() else None


def acknowledgements(target: str | Path) -> list[Acknowledgement]:
    """The `acknowledge:` list of a workflow file (none for a workflow defined in Python)."""
    file = workflow_file(target)
    if file is None:
        return []
    try:
        content = load_yaml(file.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise DefinitionError(f"{file}: cannot be read: {exc}") from None
    listed = content.get("acknowledge", []) if isinstance(content, dict) else []
    if not isinstance(listed, list):
        raise DefinitionError(f"{file}: acknowledge must be a list of {{finding, at, reason}}")
    found = []
    for i, item in enumerate(listed):
        try:
            found.append(Acknowledgement.model_validate(item))
        except ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc'])) or 'entry'}: {e['msg']}" for e in exc.errors()
            )
            raise DefinitionError(f"{file}: acknowledge[{i + 1}]: {problems}") from None
    return found


def check(workflow: Workflow, acknowledged: Sequence[Acknowledgement] = ()) -> Report:
    graph = StateGraph(workflow)
    findings = [
        *_unguarded_effects(graph),
        *_unbounded_states(graph),
        *_unbounded_cycles(graph),
        *_unreachable_terminals(graph),
        *_no_way_out(graph),
        *_unknown_names(workflow),
        *_unverified_writes(graph),
        *_undeclared_effects(graph),
        *_skill_findings(graph),
    ]
    used: set[int] = set()
    for finding in findings:
        for i, ack in enumerate(acknowledged):
            if ack.finding == finding.code and ack.at == finding.at:
                finding.acknowledged = ack.reason
                used.add(i)
                break
    stale = [a for i, a in enumerate(acknowledged) if i not in used]
    return Report(workflow, findings, stale)


def arrow(path: Sequence[str]) -> str:
    return " → ".join(path)


# -- unguarded effects -----------------------------------------------------------------------------


def _unguarded_effects(graph: StateGraph) -> list[Finding]:
    by_tool: dict[str, list[tuple[str, str, list[str]]]] = {}
    tools: dict[str, Tool] = {}
    for state in _agent_states(graph):
        for tool in state.tools:
            if tool.effect in ("write", "external"):
                found = _unguarded_in(graph, state.name, tool)
                if found is not None:
                    by_tool.setdefault(tool.name, []).append((state.name, *found))
                    tools[tool.name] = tool
    findings = []
    for name, places in by_tool.items():
        tool = tools[name]
        first_state, region, detail = places[0]
        where = ", ".join(s for s, _, _ in places)
        same = all(r == region and d == detail for _, r, d in places)
        message = (
            f"{name} ({tool.effect}) may be allowed with no ask, defer or deny, for calls with "
            f"{region}, in state {where}"
        )
        if not same:
            detail = [
                line
                for s, r, d in places
                for line in [f"in state {s} (path {arrow(graph.paths[s])}): calls with {r}", *d]
            ]
        findings.append(Finding("unguarded-effect", name, message, graph.paths[first_state], detail))
    return findings


def _unguarded_in(graph: StateGraph, state: str, tool: Tool) -> tuple[str, list[str]] | None:
    """The calls of `tool` in `state` policy may allow with no gate: (region, why), or None."""
    policy = graph.policy
    subject = tool_subject(tool, state, graph.workflow)
    rules = policy.governing("tool", tool.name)
    definitions = definition_trees(policy)
    conditions = [Condition.of(r, definitions) for r in rules]
    space = Space(subject, conditions)
    values = [space.evaluate(c) for c in conditions]
    default = Outcome(getattr(policy.document.defaults, tool.effect), f"default:{tool.effect}")
    allowed = [
        i for i in range(len(space.points)) if possible(rules, [v[i] for v in values], default).may_allow()
    ]
    if not allowed:
        return None
    detail = _allowed_by(space, conditions, values, allowed, default)
    gates = [(c, v) for c, v in zip(conditions, values, strict=True) if c.rule.decision in GATES]
    if gates:
        detail.append("rules considered:")
        detail.extend(f"  {c.rule.id} ({c.rule.decision}): {_coverage(space, c, v)}" for c, v in gates)
    else:
        detail.append("no ask, defer or deny rule governs this tool")
    if space.coarse:
        detail.append(
            "too many combinations of argument values to analyse: arguments were treated as unknown"
        )
    return space.describe(allowed), detail


def _allowed_by(
    space: Space, conditions: list[Condition], values: list[list[Any]], allowed: list[int], default: Outcome
) -> list[str]:
    lines = []
    for condition, value in zip(conditions, values, strict=True):
        if condition.rule.decision != "allow" or not any(value[i] is not False for i in allowed):
            continue
        if condition.always:
            lines.append(f"allowed by rule {condition.rule.id} (no condition)")
        elif all(value[i] is True for i in allowed):
            lines.append(f"allowed by rule {condition.rule.id}")
        else:
            lines.append(
                f"may be allowed by rule {condition.rule.id}, whose condition is opaque here: "
                f"reads {', '.join(space.opaque(condition))}"
            )
    if default.decision == "allow":
        lines.append(f"the policy default for {default.rule.removeprefix('default:')} is allow")
    return lines


def _coverage(space: Space, condition: Condition, value: list[Any]) -> str:
    """Why a gate rule does not cover every call."""
    if condition.unreadable:
        return condition.unreadable
    holds = [i for i, v in enumerate(value) if v is True]
    opaque = space.opaque(condition)
    reads = f"opaque: reads {', '.join(opaque)}" if opaque else ""
    if not holds:
        return reads or "never holds for this tool"
    covers = f"covers only calls with {space.describe(holds)}"
    return f"{covers}; elsewhere {reads}" if reads else covers


# -- budgets and cycles ------------------------------------------------------------------------------


def _agent_states(graph: StateGraph) -> list[AgentState]:
    return [
        s for s in graph.workflow.states.values() if isinstance(s, AgentState) and graph.reachable(s.name)
    ]


def _unbounded_states(graph: StateGraph) -> list[Finding]:
    findings = []
    for state in _agent_states(graph):
        budget = state.budget.model_dump()
        over = [f"{k} {budget[k]:g} (bound {v:g})" for k, v in BOUNDS.items() if budget[k] > v]
        if over:
            findings.append(
                Finding(
                    "unbounded-agent-state",
                    state.name,
                    f"agent state {state.name} has a budget above the bounds of a finite one: "
                    + ", ".join(over),
                    graph.paths[state.name],
                )
            )
    return findings


def _unbounded_cycles(graph: StateGraph) -> list[Finding]:
    workflow = graph.workflow
    if workflow.budget.max_steps is not None:
        return []
    findings = []
    for part in graph.cycles():
        agents = [n for n in part if isinstance(workflow.states[n], AgentState)]
        if not agents:
            continue
        cycle = graph.cycle_path(part)
        findings.append(
            Finding(
                "unbounded-cycle",
                agents[0],
                f"a run can go round {arrow(cycle)} through agent state(s) {', '.join(agents)} without end: "
                "each visit has a budget of its own, and the workflow has no run-level budget.max_steps",
                graph.paths[part[0]],
                [f"states in the cycle: {', '.join(part)}"],
            )
        )
    return findings


# -- reachability -----------------------------------------------------------------------------------


def _closed_edges_into(graph: StateGraph, target: str) -> list[str]:
    return [
        f"exit {e.exit} of {e.source} is always denied (by {e.closed_by})"
        if e.closed
        else f"{e.source} is not reachable"
        for e in graph.edges
        if e.target == target
    ]


def _unreachable_terminals(graph: StateGraph) -> list[Finding]:
    findings = []
    for name, state in graph.workflow.states.items():
        if isinstance(state, Terminal) and not graph.reachable(name):
            why = _closed_edges_into(graph, name)
            findings.append(
                Finding(
                    "unreachable-terminal",
                    name,
                    f"terminal state {name} is reached by no path from {graph.workflow.start}: "
                    + "; ".join(why),
                )
            )
    return findings


def _no_way_out(graph: StateGraph) -> list[Finding]:
    findings = []
    for name, state in graph.workflow.states.items():
        if isinstance(state, Terminal) or not graph.reachable(name) or name in graph.finishing:
            continue
        leads = sorted({e.target for e in graph.open_edges(name)})
        closed = [
            f"{e.exit} (always denied by {e.closed_by})" for e in graph.edges if e.source == name and e.closed
        ]
        detail = [f"leads only to: {', '.join(leads)}" if leads else "no edge leads out of it"]
        if closed:
            detail.append(f"closed exits: {', '.join(closed)}")
        findings.append(
            Finding(
                "no-way-out",
                name,
                f"no terminal state can be reached from state {name}",
                graph.paths[name],
                detail,
            )
        )
    return findings


# -- names ------------------------------------------------------------------------------------------


def _unknown_names(workflow: Workflow) -> list[Finding]:
    policy = workflow.policy
    if policy is None:
        return []
    tools = workflow.tools()
    findings = []
    definitions = definition_trees(policy)
    for rule in policy.rules:
        if rule.when is None:
            continue
        try:
            # What a definition the rule reads reads, the rule reads.
            tree = expand(parse(rule.when), definitions)
        except CelSyntaxError:
            continue  # not read: nothing can be said of its names
        offered = _offered(rule, tools)
        unknown = [
            f"{root}.{name}"
            for root, fields in offered.items()
            for name, _ in references(tree, root)
            if name not in fields
        ]
        if unknown:
            governed = ", ".join(_governed_names(rule, tools)) or "nothing"
            roots = dict.fromkeys(name.partition(".")[0] for name in unknown)
            detail = [f"{root} offers: {', '.join(sorted(offered[root])) or 'nothing'}" for root in roots]
            findings.append(
                Finding(
                    "unknown-name",
                    rule.id,
                    f"rule {rule.id} reads {', '.join(dict.fromkeys(unknown))}, which nothing it governs "
                    f"({governed}) has",
                    detail=detail,
                )
            )
    return findings


def _governed_names(rule: Rule, tools: dict[str, Tool]) -> list[str]:
    kind, names = rule.targets()
    if kind == "tool" and "*" in names:
        return sorted(tools)
    return [n for n in names if n != "*"]


def _offered(rule: Rule, tools: dict[str, Tool]) -> dict[str, set[str]]:
    """The fields of `args`, `tool` and `run` a rule's targets offer."""
    kind, _ = rule.targets()
    if kind == "exit":
        return {"args": {"exit", "update"}, "tool": {"name", "effect"}, "run": set(RUN_FIELDS)}
    governed = [tools[n] for n in _governed_names(rule, tools) if n in tools]
    params = {p for t in governed for p in t.json_schema().get("properties", {})}
    info = {k for t in governed for k in t.info}
    return {"args": params, "tool": info, "run": set(RUN_FIELDS)}


# -- tools ------------------------------------------------------------------------------------------


def _tool_path(graph: StateGraph, tool: str) -> list[str]:
    for state in _agent_states(graph):
        if state.tool(tool) is not None:
            return graph.paths[state.name]
    return []


def _unverified_writes(graph: StateGraph) -> list[Finding]:
    return [
        Finding(
            "unverified-write",
            t.name,
            f"write tool {t.name} has no verifier: its effect is never re-read, and each call is "
            "recorded as evidence_missing",
            _tool_path(graph, t.name),
        )
        for t in graph.workflow.tools().values()
        if t.effect == "write" and t.verifier is None
    ]


def _undeclared_effects(graph: StateGraph) -> list[Finding]:
    return [
        Finding(
            "undeclared-effect",
            t.name,
            f"tool {t.name} declares no effect, so it counts as {t.effect}: declare one "
            '(@tool(effect="read"), or {ref: ..., effect: read} in the workflow)',
            _tool_path(graph, t.name),
        )
        for t in graph.workflow.tools().values()
        if not t.effect_declared
    ]


# -- skills -------------------------------------------------------------------------------------------


@dataclass
class SkillTests:
    """What running a skill's scenarios showed: the scenarios of each case, every result,
    and why they could not be run (no file, a file that does not load)."""

    skill: Skill
    cases: dict[str, list[str]] = field(default_factory=dict)
    results: list[ScenarioResult] = field(default_factory=list)
    problem: str | None = None

    @property
    def missing(self) -> list[str]:
        return [c for c in CASES if not self.cases.get(c)]


async def test_skill(skill: Skill) -> SkillTests:
    """Run a skill's scenarios (each in a fresh journal, as `tether test` does). Only the
    scenarios that run the skill itself count as its cases."""
    if not skill.scenarios.is_file():
        return SkillTests(skill, problem=f"it has no scenarios file ({skill.scenarios})")
    collector = Collector()
    try:
        suite = await load_suite(skill.scenarios, collector)
    except ScenarioFileError as exc:
        return SkillTests(skill, problem=f"its scenarios cannot be run: {exc}")
    harness = skill.harness().hash
    own = [s for s in suite.spec.scenarios if suite.workflows[s.name].hash == harness]
    cases = {c: [s.name for s in own if s.case == c] for c in CASES}
    return SkillTests(skill, cases, await run_suite(suite, collector))


def _skill_findings(graph: StateGraph) -> list[Finding]:
    """Each skill a state is made from ships its four cases as scenarios, and they pass."""
    findings: list[Finding] = []
    tested: set[str] = set()
    for state in _agent_states(graph):
        skill = state.skill
        if skill is None or skill.hash in tested:
            continue
        tested.add(skill.hash)
        report = _run(test_skill(skill))
        path = graph.paths[state.name]
        if report.problem is not None:
            message = f"skill {skill.ref} is untested: {report.problem}"
            findings.append(Finding("skill-untested", skill.ref, message, path))
            continue
        if report.missing:
            have = [f"{c}: {', '.join(map(repr, names))}" for c, names in report.cases.items() if names]
            findings.append(
                Finding(
                    "skill-untested",
                    skill.ref,
                    f"skill {skill.ref} ships no scenario for case(s) {', '.join(report.missing)} "
                    f"(every skill ships {', '.join(CASES)}; mark each with case: in {skill.scenarios.name})",
                    path,
                    [f"scenarios: {skill.scenarios}", *(have or ["no scenario names a case"])],
                )
            )
        failed = [r for r in report.results if not r.passed]
        if failed:
            detail: list[str] = []
            for r in failed:
                detail += [f"scenario {r.name!r} failed:", *(f"  {line}" for line in r.report())]
            message = f"skill {skill.ref}: {len(failed)} of {len(report.results)} scenario(s) failed"
            findings.append(Finding("skill-test-failed", skill.ref, message, path, detail))
    return findings


def _run(coroutine: Coroutine[object, object, SkillTests]) -> SkillTests:
    """Run a coroutine to its end from synchronous code, inside a running loop or not."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coroutine)
    with ThreadPoolExecutor(1, thread_name_prefix="tether-check") as pool:
        return pool.submit(asyncio.run, coroutine).result()
