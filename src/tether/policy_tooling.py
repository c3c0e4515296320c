"""Tools for policy authors: lint a policy, explain a recorded decision, run policy test cases.

These sit beside the engine (`tether.policy`), not inside it: nothing here is on the path
of a governed step.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tether import cel_engine as cel
from tether.decision import REASON_OF, Decision
from tether.errors import PolicyFileError
from tether.journal import Entry
from tether.journal import bodies as b
from tether.loader import load_workflow
from tether.policy import (
    BUDGET_RULE_ID,
    HELPERS,
    HISTORY_CUT_RULE_ID,
    SEVERITY,
    Policy,
    Rule,
    cel_code,
)
from tether.proposals import Exit, Finish, ToolCall, as_dict
from tether.provenance import SeenValues
from tether.reasons import ReasonCode
from tether.strict_yaml import load_yaml
from tether.tools import ArgumentError, Tool, ToolContext, Trust
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
    what loads fine but cannot do what its author meant. With the workflow, it also finds
    arithmetic mixing int and double over arguments the tools' schemas type (see
    `_mixed_arithmetic` for what it can and cannot see).
    """
    if workflow is not None:
        policy.check_targets(
            workflow.tools() | workflow.compensations(), workflow.exit_names(), workflow.resolvers
        )
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
        findings.extend(_mixed_arithmetic(policy, workflow.tools()))
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
    tools = workflow.tools() | workflow.compensations()  # a rollback's tools are governed too
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


# CEL's arithmetic has no int/double overloads: `args.amount * 2` fails when amount is a
# double, and the rule denies with policy_error every time. (Comparisons do mix: `> 100` is fine.)
_TOKEN = re.compile(
    r"""\s+
    |(?P<number>0[xX][0-9a-fA-F]+u?|\d+\.\d*(?:[eE][+-]?\d+)?|\.\d+(?:[eE][+-]?\d+)?|\d+[eE][+-]?\d+|\d+u?)
    |(?P<name>[A-Za-z_]\w*(?:\s*\.\s*[A-Za-z_]\w*)*)
    |(?P<op>&&|\|\||[<>=!]=|.)""",
    re.VERBOSE,
)
_ARITHMETIC = {"+", "-", "*", "/", "%"}
_RESULT_OF = {"size": "int", "int": "int", "uint": "uint", "double": "double", "sum": "double"}


def _mixed_arithmetic(policy: Policy, tools: Mapping[str, Tool]) -> list[Finding]:
    """Arithmetic between operands of known, different numeric types: an argument the tool's
    schema types (a top-level field written `args.NAME`), a number literal, or a call of
    size/int/uint/double/sum. Anything else (data, facts, resolver results, nested fields,
    parenthesised sub-expressions) is untyped here and not checked."""
    findings = []
    for rule in policy.rules:
        kind, names = rule.targets()
        if kind != "tool" or rule.when is None:
            continue
        for name in sorted(tools) if "*" in names else [n for n in names if n in tools]:
            fields = _numeric_fields(tools[name].json_schema())
            problem = _first_mix(rule.when, fields)
            if problem:
                findings.append(Finding(rule.id, f"{problem} (tool {name!r})"))
                break
    return findings


def _first_mix(expression: str, fields: dict[str, str]) -> str | None:
    matches = _TOKEN.finditer(cel_code(expression))
    tokens = [(m.lastgroup, re.sub(r"\s+", "", m.group())) for m in matches if m.lastgroup]
    for i, (kind, text) in enumerate(tokens):
        if kind != "op" or text not in _ARITHMETIC or i == 0 or i + 1 >= len(tokens):
            continue
        left, right = _type_before(tokens, i, fields), _type_after(tokens, i, fields)
        if left and right and left[0] != right[0]:
            return (
                f"`{left[1]} {text} {right[1]}` mixes {left[0]} and {right[0]}: CEL arithmetic does not "
                "convert between them, so this condition fails closed (deny, policy_error) whenever it "
                "is evaluated; write the literal in the argument's type (e.g. 100.0 for a number)"
            )
    return None


def _type_before(tokens: list[tuple[str, str]], i: int, fields: dict[str, str]) -> tuple[str, str] | None:
    kind, text = tokens[i - 1]
    if kind == "number":
        return _literal_type(text), text
    if kind == "name" and (i < 2 or tokens[i - 2][1] != "."):
        return _field_type(text, fields)
    if text == ")":  # a call of a function whose result type is known
        depth, j = 0, i - 1
        while j >= 0:
            depth += {")": 1, "(": -1}.get(tokens[j][1], 0)
            if depth == 0:
                break
            j -= 1
        if j >= 1 and tokens[j - 1][0] == "name" and tokens[j - 1][1] in _RESULT_OF:
            return _RESULT_OF[tokens[j - 1][1]], f"{tokens[j - 1][1]}(…)"
    return None


def _type_after(tokens: list[tuple[str, str]], i: int, fields: dict[str, str]) -> tuple[str, str] | None:
    kind, text = tokens[i + 1]
    following = tokens[i + 2][1] if i + 2 < len(tokens) else ""
    if kind == "number":
        return _literal_type(text), text
    if kind == "name" and following == "(":
        return (_RESULT_OF[text], f"{text}(…)") if text in _RESULT_OF else None
    if kind == "name" and following not in (".", "["):
        return _field_type(text, fields)
    return None


def _literal_type(text: str) -> str:
    if text.endswith(("u", "U")):
        return "uint"
    return "double" if any(c in text for c in ".eE") and not text.lower().startswith("0x") else "int"


def _field_type(path: str, fields: dict[str, str]) -> tuple[str, str] | None:
    parts = path.split(".")
    if len(parts) == 2 and parts[0] == "args" and parts[1] in fields:
        return fields[parts[1]], path
    return None


def _numeric_fields(schema: Mapping[str, Any]) -> dict[str, str]:
    """Top-level arguments the schema types as a number ("double") or an integer ("int")."""
    kinds = {"number": "double", "integer": "int"}
    found = {}
    for name, prop in (schema.get("properties") or {}).items():
        options = prop.get("anyOf", [prop]) if isinstance(prop, Mapping) else []
        types = {o.get("type") for o in options if isinstance(o, Mapping)} - {"null"}
        if len(types) == 1 and (kind := kinds.get(str(types.pop()))):
            found[name] = kind
    return found


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
        (e, record, found)
        for e in entries
        if e.step_id == step_id
        and isinstance(record := e.body, b.StepRecord | b.CompensationStep)  # a rollback's too
        and isinstance(found := getattr(record, "decision", None), Decision)
        and not getattr(record, "continuation", False)
    ]
    if not decided:
        steps = sorted({e.step_id for e in entries if e.step_id}, key=lambda s: int(s[1:]))
        raise LookupError(f"no decided step {step_id!r} in this run (steps: {', '.join(steps)})")
    entry, record, decision = decided[0]
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
    elif decision.rule_id.startswith("provenance:"):
        why = (
            "the policy's safe defaults (its provenance: section) apply over the rules and only "
            f"make a decision stricter: {decision.reason}"
        )
    elif decision.rule_id == HISTORY_CUT_RULE_ID:
        why = (
            "the run's history is incomplete and a rule governing the call reads it, which "
            f"denies without evaluating the rules: {decision.reason}"
        )
    elif decision.rule_id == BUDGET_RULE_ID:
        why = f"the conditions took longer than one decision may, which denies: {decision.reason}"
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
    if decision.rule_id == HISTORY_CUT_RULE_ID:  # denied before any rule was evaluated
        return {}
    if isinstance(record, b.ToolStep | b.CompensationStep):
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
    """The decision a case expects. Without `reason_code`, the ordinary one for the decision
    is expected (policy_denied for deny...): a deny from a condition that failed
    (policy_error) or from arguments the tool refuses (invalid_arguments) meets only a case
    that names that reason code."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["allow", "deny", "ask", "defer"]
    rule: str | None = None
    reason_code: ReasonCode | None = None

    @property
    def wanted_reason(self) -> ReasonCode:
        return self.reason_code or REASON_OF[self.decision]

    def met_by(self, decision: Decision) -> bool:
        return (
            decision.decision == self.decision
            and (self.rule is None or decision.rule_id == self.rule)
            and decision.reason_code == self.wanted_reason
        )


class Observed(BaseModel):
    """A tool result the run of a case has seen (for provenance): untrusted unless said."""

    model_config = ConfigDict(extra="forbid")

    tool: str
    result: Any
    trust: Trust = "untrusted"
    step_id: str | None = None


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
    # What the run has seen, for `provenance()` and the safe defaults: its input (trusted)
    # and tool results.
    input: dict[str, Any] = Field(default_factory=dict)
    observed: list[Observed] = Field(default_factory=list)
    # The decision's time, for conditions reading `now` (an ISO 8601 time; UTC if it names no
    # zone). Without it, a condition reading `now` fails (policy_error).
    now: datetime | None = None
    expect: Expectation

    @model_validator(mode="after")
    def _one_target(self) -> Case:
        if (self.tool is None) == (self.exit is None):
            raise ValueError("give exactly one of 'tool' or 'exit'")
        return self


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
        want += f" ({self.expected.wanted_reason})"
        if self.passed:
            return got
        return f"expected {want}, got {got}" + (f": {self.decision.reason}" if self.decision.reason else "")


def run_cases(path: Path) -> list[CaseResult]:
    """Evaluate every case of a policy test file. Paths in the file are relative to it."""
    try:
        content = load_yaml(path.read_text())
        spec = CaseFile.model_validate(content)
    except FileNotFoundError:
        raise PolicyFileError(f"policy test file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyFileError(f"policy test file {path} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise PolicyFileError(f"{path}: not valid YAML: {exc}") from None
    except ValidationError as exc:
        raise PolicyFileError(
            f"{path}: " + "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        ) from None
    base = path.parent.resolve()
    policy = Policy.from_file(base / spec.policy)
    workflow = None
    if spec.workflow:
        workflow = load_workflow(base / spec.workflow, policy=base / spec.policy)
    with contextlib.chdir(base):
        return [_run_case(case, spec, policy, workflow) for case in spec.cases]


def _run_case(case: Case, spec: CaseFile, policy: Policy, workflow: Workflow | None) -> CaseResult:
    data = {**spec.data, **case.data}
    kind: Literal["tool", "exit"] = "tool" if case.tool else "exit"
    name = case.tool or case.exit or ""
    tool = workflow.tools().get(name) if workflow and case.tool else None
    if workflow is not None and case.tool and tool is None:
        raise PolicyFileError(f"case {case.name!r}: the workflow has no tool {name!r}")
    effect = case.effect or (tool.effect if tool else ("exit" if kind == "exit" else "read"))
    try:
        args = tool.validate(case.args).values if tool else case.args
    except ArgumentError as exc:  # refused before policy, as the runtime refuses it
        refused = Decision(
            decision="deny",
            rule_id="runtime:arguments",
            policy_hash=policy.hash,
            reason_code=ReasonCode.INVALID_ARGUMENTS,
            reason=str(exc),
        )
        return CaseResult(case.name, case.expect.met_by(refused), refused, case.expect)
    ctx = ToolContext(
        run_id="policy-test", step_id="s1", idempotency_key="policy-test:s1", data=data, facts=case.facts
    )
    resolvers = {n: functools.partial(fn, ctx) for n, fn in (workflow.resolvers if workflow else {}).items()}
    tool_info = {
        "name": name,
        "effect": effect,
        "idempotent": tool.idempotent if tool else effect == "read",
        "effect_declared": tool.effect_declared if tool else True,
    }
    if tool is not None:  # its provenance declarations (results, security, sensitive)
        tool_info = {**tool.info, **tool_info}
    seen = SeenValues()
    seen.add_input(case.input)
    for i, observed in enumerate(case.observed):
        step_id = observed.step_id or f"o{i + 1}"
        seen.add_result(observed.tool, observed.result, trust=observed.trust, step_id=step_id)
    decision = policy.decide(
        provenance=seen.trace,
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
            "now": case.now,
        },
    )
    return CaseResult(case.name, case.expect.met_by(decision), decision, case.expect)
