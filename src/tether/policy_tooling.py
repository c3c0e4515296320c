"""Tools for policy authors: lint a policy, explain a recorded decision, run policy test cases.

These sit beside the engine (`tether.policy`), not inside it: nothing here is on the path
of a governed step.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import cel
import msgspec
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from tether.decision import Decision
from tether.errors import PolicyFileError
from tether.journal import Entry
from tether.journal import bodies as b
from tether.loader import load_workflow
from tether.policy import HELPERS, SEVERITY, Policy, Rule
from tether.proposals import Exit, Finish, ToolCall, as_dict
from tether.strict_yaml import load_yaml
from tether.tools import ToolContext
from tether.workflow import Workflow

PRECEDENCE = (
    "the most restrictive rule whose condition holds wins (deny > defer > ask > allow); "
    "among equals, the first in the file"
)


# -- lint ------------------------------------------------------------------------------


@dataclass
class Finding:
    rule_id: str
    problem: str


def lint(policy: Policy, workflow: Workflow | None = None) -> list[Finding]:
    """Rules that can never match, or can never decide because another always wins.

    Unknown tools, exits, resolvers and fields are errors raised while loading; this finds
    what loads fine but cannot do what its author meant.
    """
    if workflow is not None:
        policy.check_targets(workflow.tools(), workflow.exit_names(), workflow.resolvers)
    findings: list[Finding] = []
    rules = policy.rules
    for rule in rules:
        if _constant(rule) is False:
            findings.append(Finding(rule.id, "its condition is always false: it can never match"))
    for index, rule in enumerate(rules):
        for other_index, other in enumerate(rules):
            if other is rule or not _always_holds(other) or not _covers(other, rule):
                continue
            stronger = SEVERITY[other.decision] > SEVERITY[rule.decision]
            earlier_equal = SEVERITY[other.decision] == SEVERITY[rule.decision] and other_index < index
            if stronger or earlier_equal:
                findings.append(
                    Finding(
                        rule.id,
                        f"shadowed by rule {other.id!r} ({other.decision}, no condition) "
                        "which always wins for the same target: it can never decide",
                    )
                )
                break
    if workflow is not None:
        findings.extend(_redundant_allows(policy, workflow))
    return findings


def _constant(rule: Rule) -> bool | None:
    if rule.when is None:
        return True
    program = cel.compile(rule.when)
    if program.variables() or set(program.functions()) & ({"has"} | set(HELPERS)):
        return None
    try:
        value = program.execute({})
    except Exception:  # an expression that fails on constants: the engine reports it at run time
        return None
    return value if isinstance(value, bool) else None


def _always_holds(rule: Rule) -> bool:
    return _constant(rule) is True


def _covers(broad: Rule, narrow: Rule) -> bool:
    kind, names = broad.targets()
    other_kind, other_names = narrow.targets()
    return kind == other_kind and ("*" in names or set(other_names) <= set(names))


def _redundant_allows(policy: Policy, workflow: Workflow) -> list[Finding]:
    findings = []
    tools = workflow.tools()
    for rule in policy.rules:
        kind, names = rule.targets()
        if kind == "tool" and rule.decision == "allow" and "*" not in names:
            defaults = policy.document.defaults
            if (
                all(getattr(defaults, tools[n].effect) == "allow" for n in names if n in tools)
                and rule.when is None
            ):
                findings.append(
                    Finding(rule.id, "allows what the defaults already allow: it changes nothing")
                )
    return findings


# -- explain ---------------------------------------------------------------------------


@dataclass
class Explanation:
    step_id: str
    state: str | None
    proposal: Any
    decision: Decision
    rules: list[dict[str, Any]] = field(default_factory=list)
    facts: dict[str, Any] = field(default_factory=dict)
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id,
            "state": self.state,
            "proposal": self.proposal,
            "decision": self.decision.as_dict(),
            "rules": self.rules,
            "facts_at_the_time": self.facts,
            "why": self.why,
        }


def explain(entries: list[Entry], step_id: str, policy: Policy | None) -> Explanation:
    """Why a recorded step got its decision: each governing rule, its result, the values."""
    decided = [
        (e, record)
        for e in entries
        if e.step_id == step_id
        and isinstance(record := e.body, b.StepRecord)
        and isinstance(getattr(record, "decision", None), Decision)
        and not getattr(record, "continuation", False)
    ]
    if not decided:
        steps = sorted({e.step_id for e in entries if e.step_id}, key=lambda s: int(s[1:]))
        raise LookupError(f"no decided step {step_id!r} in this run (steps: {', '.join(steps)})")
    entry, record = decided[0]
    decision: Decision = record.decision  # type: ignore[attr-defined]
    evaluated = decision.evaluated or _evaluated(decision, record, policy)
    facts = _facts_before(entries, entry.seq)
    known = {r.id: (i, r) for i, r in enumerate(policy.rules)} if policy else {}
    order = sorted(evaluated, key=lambda rid: known[rid][0] if rid in known else len(known))
    rules = []
    for rule_id in order:
        rule = known[rule_id][1] if rule_id in known else None
        when = " ".join(rule.when.split()) if rule and rule.when else None
        rules.append(
            {
                "rule": rule_id,
                "decision": rule.decision if rule else None,
                "when": when,
                "result": evaluated[rule_id],
                "winner": rule_id == decision.rule_id,
            }
        )
    if decision.rule_id.startswith("default:"):
        why = f"no rule's condition held, so the default applies: {decision.reason}"
    elif decision.rule_id.startswith(("runtime:", "approval:", "workflow:")):
        why = f"refused before policy was consulted: {decision.reason}"
    elif decision.reason_code == "policy_error":
        why = f"a condition could not be evaluated, which denies: {decision.reason}"
    else:
        why = f"{PRECEDENCE}: {decision.rule_id} ({decision.decision})"
    decision = msgspec.structs.replace(decision, evaluated=evaluated)
    proposal = record.proposal() if isinstance(record, b.ToolStep) else getattr(record, "proposal", None)
    shown = as_dict(proposal) if proposal is not None else getattr(record, "raw", None)
    return Explanation(step_id, entry.state, shown, decision, rules, facts, why)


def _evaluated(decision: Decision, record: Any, policy: Policy | None) -> dict[str, bool | str]:
    """Each governing rule's result, from the pinned policy and what the journal kept: the
    rules that held (`matched`) and, for a condition error, the rule that raised it. Rules
    after an error were not evaluated."""
    if policy is None or decision.rule_id.startswith(("runtime:", "approval:", "workflow:")):
        return {}
    if isinstance(record, b.ToolStep):
        kind, name = "tool", record.tool
    elif isinstance(record, b.Transition):
        kind, name = "exit", record.exit
    else:
        proposal = getattr(record, "proposal", None)
        if isinstance(proposal, ToolCall):
            kind, name = "tool", proposal.tool
        elif isinstance(proposal, Exit | Finish):
            kind, name = "exit", proposal.exit if isinstance(proposal, Exit) else "finish"
        else:
            return {}
    evaluated: dict[str, bool | str] = {}
    for rule in policy.governing(kind, name):
        if decision.reason_code == "policy_error" and rule.id == decision.rule_id:
            evaluated[rule.id] = f"error: {decision.reason}"
            break
        evaluated[rule.id] = rule.id in decision.matched
    return evaluated


def _facts_before(entries: list[Entry], seq: int) -> dict[str, Any]:
    facts: dict[str, Any] = {}
    for e in entries:
        if e.seq >= seq:
            continue
        record = e.body
        if isinstance(record, b.StepDone):
            facts.update(record.facts)
        elif isinstance(record, b.Executed) and record.verification and record.verification.get("ok"):
            facts.update(record.verification.get("facts") or {})
    return facts


# -- test cases ------------------------------------------------------------------------


class Expectation(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Literal["allow", "deny", "ask", "defer"]
    rule: str | None = None
    reason_code: str | None = None


class Case(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str
    tool: str | None = None
    exit: str | None = None
    effect: Literal["read", "write", "external"] | None = None
    args: dict[str, Any] = Field(default_factory=dict)
    data: dict[str, Any] = Field(default_factory=dict)
    facts: dict[str, Any] = Field(default_factory=dict)
    history: list[dict[str, Any]] = Field(default_factory=list)
    expect: Expectation


class CaseFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    policy: str
    workflow: str | None = None
    data: dict[str, Any] = Field(default_factory=dict)
    cases: list[Case] = Field(min_length=1)


@dataclass
class CaseResult:
    name: str
    passed: bool
    decision: Decision
    expected: Expectation

    @property
    def summary(self) -> str:
        got = f"{self.decision.decision} by {self.decision.rule_id} ({self.decision.reason_code})"
        want = self.expected.decision + (f" by {self.expected.rule}" if self.expected.rule else "")
        want += f" ({self.expected.reason_code})" if self.expected.reason_code else ""
        return got if self.passed else f"expected {want}, got {got}"


def run_cases(path: Path) -> list[CaseResult]:
    """Evaluate every case of a policy test file. Paths in the file are relative to it."""
    try:
        content = load_yaml(path.read_text())
        spec = CaseFile.model_validate(content)
    except FileNotFoundError:
        raise PolicyFileError(f"policy test file not found: {path}") from None
    except ValidationError as exc:
        raise PolicyFileError(
            f"{path}: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
    except Exception as exc:  # YAML syntax
        raise PolicyFileError(f"{path}: not valid YAML: {exc}") from None
    base = path.parent.resolve()
    policy = Policy.from_file(base / spec.policy)
    workflow = None
    if spec.workflow:
        workflow = load_workflow(base / spec.workflow, policy=base / spec.policy)
    with contextlib.chdir(base):
        return [_run_case(case, spec, policy, workflow) for case in spec.cases]


def _run_case(case: Case, spec: CaseFile, policy: Policy, workflow: Workflow | None) -> CaseResult:
    if (case.tool is None) == (case.exit is None):
        raise PolicyFileError(f"case {case.name!r}: give exactly one of 'tool' or 'exit'")
    data = {**spec.data, **case.data}
    kind: Literal["tool", "exit"] = "tool" if case.tool else "exit"
    name = case.tool or case.exit or ""
    tool = workflow.tools().get(name) if workflow and case.tool else None
    if workflow is not None and case.tool and tool is None:
        raise PolicyFileError(f"case {case.name!r}: the workflow has no tool {name!r}")
    effect = case.effect or (tool.effect if tool else ("exit" if kind == "exit" else "read"))
    args = tool.validate(case.args).values if tool else case.args
    ctx = ToolContext(
        run_id="policy-test", step_id="s1", idempotency_key="policy-test:s1", data=data, facts=case.facts
    )
    resolvers = {n: functools.partial(fn, ctx) for n, fn in (workflow.resolvers if workflow else {}).items()}
    tool_info = {"name": name, "effect": effect, "idempotent": tool.idempotent if tool else effect == "read"}
    decision = policy.decide(
        kind=kind,
        name=name,
        effect=effect,
        resolvers=resolvers,
        variables={
            "args": args,
            "data": data,
            "facts": case.facts,
            "history": case.history,
            "tool": tool_info,
            "run": {"id": "policy-test", "workflow": "", "version": "", "state": ""},
        },
    )
    want = case.expect
    passed = (
        decision.decision == want.decision
        and (want.rule is None or decision.rule_id == want.rule)
        and (want.reason_code is None or decision.reason_code == want.reason_code)
    )
    return CaseResult(case.name, passed, decision, want)
