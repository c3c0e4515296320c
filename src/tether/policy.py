"""The policy engine: declarative rules, evaluated deterministically, with their version.

A policy is a YAML file of rules. Each rule matches a tool (or an exit) and optionally a
condition written in CEL (Common Expression Language: no loops, no side effects, no
Python `eval`) over `args`, `data`, `facts`, `history`, `tool` and `run`, and may call the
workflow's resolvers (registered read-only lookups, e.g. `order(args.order_id).status`)
and the helpers `zip` and `sum`. Every matching rule whose
condition holds is a candidate; the most restrictive decision wins (deny > defer > ask >
allow), and among equals the first in the file. With no candidate, a default applies:
reads and exits are allowed; writes and external effects are denied. A condition that
cannot be evaluated (a missing field, a type error) denies, with reason `policy_error`.
Every decision names its rule id and the policy hash.

Conditions may call `provenance(value)` (see `tether.provenance`): where a value could have
come from — `.trusted`, `.untrusted`, `.derived`, `.sources` — traced over everything the
run has seen, and recorded with the decision. A policy's `provenance:` section adopts the
safe defaults in one line (`provenance: {untrusted: ask}`): a `write` or `external` call
whose security-relevant argument carries a value seen only in untrusted content is asked
(rule id `provenance:untrusted`), and a tool declared sensitive is asked every time
(`provenance:sensitive`). They apply over the rules and the effect defaults, and only ever
make a decision stricter: a rule may deny such a call, no rule can allow it without asking.

Evaluation is bounded. A condition longer than `MAX_CONDITION_CHARS`, nested deeper than
`MAX_CONDITION_NESTING`, or with more than `MAX_CONDITION_OPERATORS` operators is refused
at load (the CEL engine's evaluator recurses once per operator and overflows its stack, a
crash of the whole process, at about 12,000 on an 8 MB stack). Tool arguments are bounded
by the tool's schema (see `tether.tools`). And a decision whose conditions use more CPU time
than the policy's `evaluation_budget` (checked after each rule: the engine holds the GIL, so
it cannot be interrupted mid-condition) denies with `policy_error`.
"""

from __future__ import annotations

import functools
import json
import re
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import cel
import msgspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tether.decision import Decision, DecisionKind
from tether.errors import PolicyFileError
from tether.hashing import fingerprint
from tether.provenance import SeenValues, Traced, summary
from tether.reasons import ReasonCode
from tether.strict_yaml import load_yaml
from tether.tools import Tool

BUDGET_RULE_ID = "policy:evaluation_budget"
SEVERITY: dict[str, int] = {"allow": 0, "ask": 1, "defer": 2, "deny": 3}
REASON_OF: dict[str, ReasonCode] = {
    "allow": ReasonCode.POLICY_ALLOWED,
    "deny": ReasonCode.POLICY_DENIED,
    "ask": ReasonCode.APPROVAL_REQUIRED,
    "defer": ReasonCode.DEFERRED,
}
VARIABLES = frozenset({"args", "data", "facts", "history", "tool", "run"})
# Built in like the helpers, but bound per decision to the run's seen values.
PROVENANCE_FUNCTION = "provenance"
# Functions CEL itself provides, plus the two helpers every policy gets.
HELPERS: dict[str, Callable[..., Any]] = {
    "zip": lambda a, b: [list(pair) for pair in zip(a, b, strict=False)],
    "sum": lambda values: sum(values, 0.0),
}
CEL_FUNCTIONS = frozenset(
    {
        "size",
        "startsWith",
        "endsWith",
        "contains",
        "matches",
        "int",
        "uint",
        "double",
        "string",
        "bytes",
        "bool",
        "type",
        "timestamp",
        "duration",
        "dyn",
        "has",
        "all",
        "exists",
        "exists_one",
        "map",
        "filter",
        "max",
        "min",
        "getFullYear",
        "getMonth",
        "getDate",
        "getDayOfMonth",
        "getDayOfWeek",
        "getDayOfYear",
        "getHours",
        "getMinutes",
        "getSeconds",
        "getMilliseconds",
    }
)
DEFAULT_APPROVAL_SECONDS = 24 * 3600.0
# Limits on a condition, checked at load; docs/policy.md gives the measurements behind them.
MAX_CONDITION_CHARS = 4_000
MAX_CONDITION_NESTING = 32
MAX_CONDITION_OPERATORS = 500
# Seconds of CPU time the conditions of one decision may use. This thread's CPU time, not the
# wall clock: a process waiting for a core under load must not turn allowed steps into denials.
DEFAULT_EVALUATION_BUDGET = 0.05


class OnExpiryEscalate(BaseModel):
    """`on_expiry: {escalate: ROLE}`: an expired ticket escalates the run to ROLE."""

    model_config = ConfigDict(extra="forbid")

    escalate: str = Field(min_length=1)


class Rule(BaseModel):
    """One rule. `tool` or `exit` names what it governs ("*" for every tool)."""

    model_config = ConfigDict(extra="forbid")

    id: str = Field(min_length=1)
    tool: str | list[str] | None = None
    exit: str | list[str] | None = None
    when: str | None = None
    decision: DecisionKind
    reason: str = ""
    approver: str | None = None
    owner: str | None = None
    expires_in: float | None = Field(None, gt=0, description="seconds an approval stays valid")
    # Separation of duties (ask rules): how many distinct principals must approve, and
    # whether the principal who started the run is barred from approving it.
    approvals: int | None = Field(None, ge=1, le=10, description="distinct approvers needed")
    forbid_self_approval: bool = False
    # What a ticket of this rule comes to when nobody decides it in time: `deny` (the
    # default), or `{escalate: ROLE}` (the run is escalated to ROLE, actionable by a person).
    on_expiry: Literal["deny"] | OnExpiryEscalate | None = None

    @model_validator(mode="after")
    def _target_and_fields(self) -> Rule:
        if (self.tool is None) == (self.exit is None):
            raise ValueError("give exactly one of 'tool' or 'exit'")
        if self.decision == "defer" and not self.owner:
            raise ValueError("a 'defer' rule must name an 'owner' to hand off to")
        if self.decision != "ask" and (self.approver or self.expires_in or self.on_expiry):
            raise ValueError("'approver', 'expires_in' and 'on_expiry' apply only to 'ask' rules")
        if self.decision != "ask" and (self.approvals is not None or self.forbid_self_approval):
            raise ValueError("'approvals' and 'forbid_self_approval' apply only to 'ask' rules")
        return self

    def targets(self) -> tuple[str, list[str]]:
        kind = "tool" if self.tool is not None else "exit"
        value = self.tool if self.tool is not None else self.exit
        return kind, [value] if isinstance(value, str) else list(value or [])


class Defaults(BaseModel):
    model_config = ConfigDict(extra="forbid")

    read: DecisionKind = "allow"
    write: DecisionKind = "deny"
    external: DecisionKind = "deny"
    exit: DecisionKind = "allow"

    @model_validator(mode="after")
    def _no_defer(self) -> Defaults:
        if "defer" in (self.read, self.write, self.external, self.exit):
            raise ValueError("a default cannot be 'defer' (it names no owner)")
        return self


class ProvenanceDefaults(BaseModel):
    """The safe defaults over provenance, adopted with `provenance: {untrusted: ask}`."""

    model_config = ConfigDict(extra="forbid")

    untrusted: Literal["ask", "deny"] = "ask"
    sensitive: Literal["ask", "deny"] = "ask"
    approver: str | None = None
    expires_in: float | None = Field(None, gt=0, description="seconds an approval stays valid")


class PolicyDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | int = 1
    defaults: Defaults = Field(default_factory=Defaults)
    provenance: ProvenanceDefaults | None = None
    rules: list[Rule] = Field(default_factory=list)

    def hashed(self) -> dict[str, Any]:
        """What the policy hash covers: sections left out are left out (a policy without
        `provenance:` hashes as it did before the section existed)."""
        content = self.model_dump(mode="json")
        if content["provenance"] is None:
            del content["provenance"]
        for rule in content["rules"]:  # so are a rule's separation-of-duties options
            for key, unset in _LATER_RULE_FIELDS.items():
                if rule.get(key, unset) == unset:
                    rule.pop(key, None)
        for rule in content["rules"]:  # likewise a rule without `on_expiry:`
            if rule.get("on_expiry") is None:
                rule.pop("on_expiry", None)
        return content


# Rule fields added after policies were first hashed: left out of the hash when not set, so a
# policy that does not use them keeps the hash its runs are pinned to.
_LATER_RULE_FIELDS: dict[str, Any] = {"approvals": None, "forbid_self_approval": False}


class _CompiledRule:
    def __init__(self, rule: Rule, program: cel.Program | None) -> None:
        self.rule = rule
        self.kind, self.names = rule.targets()
        self.program = program
        self.variables = set(program.variables()) & VARIABLES if program else set()
        self.functions = _called_functions(program) if program else set()

    def governs(self, kind: str, name: str) -> bool:
        return kind == self.kind and ("*" in self.names or name in self.names)


class Policy:
    """A parsed, compiled policy. Build with `Policy.from_file`, `from_yaml` or `from_dict`."""

    def __init__(
        self,
        document: PolicyDocument,
        source: str = "<policy>",
        *,
        evaluation_budget: float = DEFAULT_EVALUATION_BUDGET,
    ) -> None:
        if not evaluation_budget > 0:
            raise ValueError(f"evaluation_budget must be a positive number of seconds: {evaluation_budget}")
        self.document = document
        self.source = source
        self.evaluation_budget = evaluation_budget
        self.hash = fingerprint(document.hashed())
        ids: set[str] = set()
        self._rules: list[_CompiledRule] = []
        self._by_target: dict[tuple[str, str], list[_CompiledRule]] = {}
        for rule in document.rules:
            if rule.id in ids:
                raise PolicyFileError(f"{source}: duplicate rule id {rule.id!r}")
            ids.add(rule.id)
            self._rules.append(_CompiledRule(rule, _compile(rule, source)))
        # The variables any condition reads (only these are handed to the CEL engine), and the
        # resolvers any condition calls.
        self.variables: frozenset[str] = frozenset().union(*(c.variables for c in self._rules))
        self.functions: frozenset[str] = frozenset().union(*(c.functions for c in self._rules))
        # Whether decisions need the run's provenance: a condition traces a value, or the safe
        # defaults are adopted.
        self.uses_provenance = document.provenance is not None or any(
            PROVENANCE_FUNCTION in (c.program.functions() if c.program else ()) for c in self._rules
        )

    @classmethod
    def default(cls) -> Policy:
        return cls(PolicyDocument(), "<default policy>")

    @classmethod
    def from_dict(
        cls, content: Any, source: str = "<policy>", *, evaluation_budget: float = DEFAULT_EVALUATION_BUDGET
    ) -> Policy:
        if content is None:
            content = {}
        if not isinstance(content, dict):
            raise PolicyFileError(f"{source}: a policy must be a mapping with 'rules'")
        try:
            document = PolicyDocument.model_validate(content)
        except ValidationError as exc:
            raise PolicyFileError(f"{source}: " + _explain(exc, content)) from None
        return cls(document, source, evaluation_budget=evaluation_budget)

    @classmethod
    def from_yaml(
        cls, text: str, source: str = "<policy>", *, evaluation_budget: float = DEFAULT_EVALUATION_BUDGET
    ) -> Policy:
        try:
            content = load_yaml(text)
        except yaml.YAMLError as exc:
            raise PolicyFileError(f"{source}: not valid YAML: {exc}") from None
        return cls.from_dict(content, source, evaluation_budget=evaluation_budget)

    @classmethod
    def from_file(cls, path: str | Path, *, evaluation_budget: float = DEFAULT_EVALUATION_BUDGET) -> Policy:
        file = Path(path)
        try:
            text = file.read_text()
        except FileNotFoundError:
            raise PolicyFileError(f"policy file not found: {_tried(file)}") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise PolicyFileError(f"policy file {_tried(file)} cannot be read: {exc}") from None
        return cls.from_yaml(text, str(file), evaluation_budget=evaluation_budget)

    def _governing(self, kind: str, name: str) -> list[_CompiledRule]:
        """The rules naming this tool or exit (or "*"), in file order; memoized per target."""
        key = (kind, name)
        if key not in self._by_target:
            self._by_target[key] = [c for c in self._rules if c.governs(kind, name)]
        return self._by_target[key]

    def governing(self, kind: str, name: str) -> list[Rule]:
        """The rules naming this tool or exit (or "*"), in file order."""
        return [c.rule for c in self._governing(kind, name)]

    def uses(self, variable: str) -> bool:
        """Whether any rule's condition reads `variable` (e.g. `history`)."""
        return variable in self.variables

    def evaluation(self, resolvers: Mapping[str, Callable[..., Any]]) -> Evaluation:
        """A context to decide a run's proposals in (see `Evaluation`)."""
        return Evaluation(self, resolvers)

    @property
    def rules(self) -> list[Rule]:
        return [c.rule for c in self._rules]

    def check_targets(
        self, tools: Mapping[str, Tool], exits: set[str], resolvers: Mapping[str, Any] | None = None
    ) -> None:
        """Refuse rules naming a tool, exit or resolver the workflow does not have."""
        for c in self._rules:
            missing = sorted(c.functions - set(resolvers or {}))
            if missing:
                known = ", ".join(sorted(resolvers or {})) or "none"
                raise PolicyFileError(
                    f"{self.source}: rule {c.rule.id!r} calls unknown function(s) {', '.join(missing)} "
                    f"(the workflow's resolvers: {known}; helpers: {', '.join(sorted(HELPERS))})"
                )
            known = set(tools) if c.kind == "tool" else exits
            for name in c.names:
                if name != "*" and name not in known:
                    listing = ", ".join(sorted(known)) or "none"
                    raise PolicyFileError(
                        f"{self.source}: rule {c.rule.id!r} names unknown {c.kind} {name!r} "
                        f"(the workflow has: {listing})"
                    )

    def _default(
        self,
        kind: str,
        effect: str,
        variables: Mapping[str, Any],
        evaluated: dict[str, bool | str],
        resolved: dict[str, Any],
    ) -> Decision:
        default = getattr(self.document.defaults, "exit" if kind == "exit" else effect)
        reason = f"no rule matched; default for {effect} is {default}"
        tool = variables.get("tool")
        if kind == "tool" and isinstance(tool, Mapping) and tool.get("effect_declared") is False:
            reason += (
                f" (tool {tool.get('name')!r} declares no effect, so it counts as {effect}: declare one "
                'with @tool(effect="read") or Tool(fn, effect=...) in code, or '
                "{ref: module:function, effect: read} in the workflow's tools)"
            )
        return Decision(
            decision=default,
            rule_id=f"default:{kind if kind == 'exit' else effect}",
            policy_hash=self.hash,
            reason_code=REASON_OF[default],
            reason=reason,
            evaluated=evaluated,
            resolved=resolved,
        )

    def decide(
        self,
        *,
        kind: Literal["tool", "exit"],
        name: str,
        effect: str,
        variables: Mapping[str, Any],
        resolvers: Mapping[str, Callable[..., Any]] | None = None,
        evaluation: Evaluation | None = None,
        provenance: Callable[[Any], Traced] | None = None,
    ) -> Decision:
        """Evaluate every governing rule and return the winning decision.

        `variables` may hold zero-argument callables for costly values (e.g. `history`):
        they are computed only when a governing rule uses them. `resolvers` are the
        lookups conditions may call; each call is memoized and recorded in the decision.
        `evaluation` (from `Policy.evaluation()`) keeps the engine's context across the
        decisions of one run, so that unchanged values are not converted again.
        `provenance` traces a value over what the run has seen (without it, nothing has been
        seen: every value is derived); what it traced is recorded in the decision.
        """
        resolving = _Stopwatch()
        args = variables.get("args")
        tracer = _Tracer(provenance, args if isinstance(args, Mapping) else {}, resolving)
        decision = self._by_rules(kind, name, effect, variables, resolvers, evaluation, tracer, resolving)
        if kind == "tool" and self.document.provenance is not None and decision.decision != "deny":
            safe = self._safe_default(variables.get("tool"), tracer)
            if safe is not None and SEVERITY[safe.decision] > SEVERITY[decision.decision]:
                decision = msgspec.structs.replace(
                    safe, matched=decision.matched, evaluated=decision.evaluated, resolved=decision.resolved
                )
        if tracer.recorded:
            decision = msgspec.structs.replace(decision, provenance=tracer.recorded)
        return decision

    def _safe_default(self, tool: Any, tracer: _Tracer) -> Decision | None:
        """What the safe defaults say about a tool call, if anything: the stricter of
        `provenance:untrusted` (a security-relevant argument carrying a value seen only in
        untrusted content, for a write or external tool) and `provenance:sensitive`."""
        defaults = self.document.provenance
        if defaults is None or not isinstance(tool, Mapping):
            return None
        candidates: list[tuple[DecisionKind, str, str]] = []
        if tool.get("effect") in ("write", "external"):
            declared = tool.get("security")
            # An external tool that names none: everything it sends out counts.
            params = declared if declared is not None else []
            if declared is None and tool["effect"] == "external":
                params = list(tracer.args)
            carried = []
            for param in params:
                if tracer.args.get(param) is None:
                    continue
                traced = tracer.of(tracer.args[param])
                if traced.untrusted:
                    carried.append(f"{param} {_short(tracer.args[param])} {summary(traced.record())}")
            if carried:
                why = "; ".join(carried) + " (what only untrusted content said is not sent without a person)"
                if declared is None:
                    why += "; the tool names no security-relevant parameters, so every argument counts"
                candidates.append((defaults.untrusted, "provenance:untrusted", why))
        if tool.get("sensitive"):
            done = "asked" if defaults.sensitive == "ask" else "denied"
            why = f"tool {tool.get('name')!r} is declared sensitive: every call is {done}"
            candidates.append((defaults.sensitive, "provenance:sensitive", why))
        if not candidates:
            return None
        decision, rule_id, reason = max(candidates, key=lambda c: SEVERITY[c[0]])
        asks = decision == "ask"
        return Decision(
            decision=decision,
            rule_id=rule_id,
            policy_hash=self.hash,
            reason_code=REASON_OF[decision],
            reason=reason,
            approver=defaults.approver if asks else None,
            expires_in=(defaults.expires_in or DEFAULT_APPROVAL_SECONDS) if asks else None,
        )

    def _by_rules(
        self,
        kind: Literal["tool", "exit"],
        name: str,
        effect: str,
        variables: Mapping[str, Any],
        resolvers: Mapping[str, Callable[..., Any]] | None,
        evaluation: Evaluation | None,
        tracer: _Tracer,
        resolving: _Stopwatch,
    ) -> Decision:
        """The decision of the rules (or the effect's default), before the safe defaults."""
        started = time.thread_time()
        rules = self._governing(kind, name)
        resolved: dict[str, Any] = {}
        resolvers = resolvers or {}
        evaluation = evaluation or Evaluation(self, resolvers)
        context = evaluation.bind(variables, resolvers, resolved, resolving, tracer)
        best: _CompiledRule | None = None
        matched: list[str] = []
        evaluated: dict[str, bool | str] = {}
        for c in rules:
            try:
                holds = _holds(c, context)
            except _ConditionError as exc:
                evaluated[c.rule.id] = f"error: {exc}"
                return Decision(
                    decision="deny",
                    rule_id=c.rule.id,
                    policy_hash=self.hash,
                    reason_code=ReasonCode.POLICY_ERROR,
                    reason=str(exc),
                    matched=[*matched, c.rule.id],
                    evaluated=evaluated,
                    resolved=resolved,
                )
            evaluated[c.rule.id] = holds
            if holds:
                matched.append(c.rule.id)
                if best is None or SEVERITY[c.rule.decision] > SEVERITY[best.rule.decision]:
                    best = c
            spent = time.thread_time() - started - resolving.seconds
            if spent > self.evaluation_budget:
                return Decision(
                    decision="deny",
                    rule_id=BUDGET_RULE_ID,
                    policy_hash=self.hash,
                    reason_code=ReasonCode.POLICY_ERROR,
                    reason=(
                        f"policy evaluation took {spent * 1000:.1f} ms of CPU, over its budget of "
                        f"{self.evaluation_budget * 1000:g} ms (after rule {c.rule.id!r}, "
                        f"{len(evaluated)} of {len(rules)} rules evaluated)"
                    ),
                    matched=matched,
                    evaluated=evaluated,
                    resolved=resolved,
                )
        if best is None:
            return self._default(kind, effect, variables, evaluated, resolved)
        rule = best.rule
        return Decision(
            decision=rule.decision,
            rule_id=rule.id,
            policy_hash=self.hash,
            reason_code=REASON_OF[rule.decision],
            reason=rule.reason,
            approver=(rule.approver or "approver") if rule.decision == "ask" else None,
            owner=rule.owner,
            expires_in=(rule.expires_in or DEFAULT_APPROVAL_SECONDS) if rule.decision == "ask" else None,
            approvals=rule.approvals,
            forbid_self_approval=rule.forbid_self_approval,
            escalate_on_expiry=rule.on_expiry.escalate
            if isinstance(rule.on_expiry, OnExpiryEscalate)
            else None,
            matched=matched,
            evaluated=evaluated,
            resolved=resolved,
        )


class _Stopwatch:
    """CPU time spent in resolvers and in tracing provenance, which the evaluation budget
    does not count: a lookup's cost is the workflow's business (and tracing the runtime's),
    the conditions' own work is the policy's."""

    def __init__(self) -> None:
        self.seconds = 0.0


class _Tracer:
    """`provenance(value)` for one decision: each value traced once, and recorded under the
    argument it is (`args.recipient`) or as the call (`provenance("…")`)."""

    def __init__(
        self, trace: Callable[[Any], Traced] | None, args: Mapping[str, Any], stopwatch: _Stopwatch
    ) -> None:
        self._trace = trace or SeenValues().trace
        self.args = args
        self._stopwatch = stopwatch
        self.recorded: dict[str, Any] = {}
        self._memo: dict[str, Traced] = {}

    def of(self, value: Any) -> Traced:
        key = json.dumps(value, sort_keys=True, default=str)
        traced = self._memo.get(key)
        if traced is None:
            started = time.thread_time()
            try:
                traced = self._memo[key] = self._trace(value)
            finally:
                self._stopwatch.seconds += time.thread_time() - started
            names = (f"args.{n}" for n, v in self.args.items() if v == value and type(v) is type(value))
            self.recorded[next(names, f"{PROVENANCE_FUNCTION}({key})")] = traced.record()
        return traced

    def __call__(self, value: Any) -> dict[str, Any]:
        return self.of(value).as_cel()


def _short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= 60 else text[:57] + "…"


def _tried(file: Path) -> str:
    """A path as given, and where that is when it is relative."""
    return str(file) if file.is_absolute() else f"{file} (looked for {file.absolute()})"


# A decision's own values, looked up through the context's resolver; every other variable
# changes between steps, if at all, and is converted again only when it does.
PER_DECISION = frozenset({"args", "tool"})


class Evaluation:
    """The CEL engine's context for the decisions of one run.

    Converting Python values into the engine's is most of what a decision costs (about 27 µs
    of 32 for five conditions over small values; milliseconds when a rule reads a large
    `data`). So a run keeps one context: `data`, `facts`, `run` and `history` are converted
    when they change (a new object, or a list that grew), `args` and `tool` are looked up per
    decision, and the workflow's resolvers are registered once and record into the decision
    being made.
    """

    def __init__(self, policy: Policy, resolvers: Mapping[str, Callable[..., Any]]) -> None:
        self._used = policy.variables
        self._call: dict[str, Any] = {}
        self._held: dict[str, tuple[Any, int]] = {}
        self._recorders: dict[str, Callable[..., Any]] = {}
        self._tracer: Callable[[Any], Any] = _Tracer(None, {}, _Stopwatch())
        functions: dict[str, Callable[..., Any]] = dict(HELPERS)
        functions[PROVENANCE_FUNCTION] = lambda value: self._tracer(value)
        for fname in resolvers:
            functions[fname] = functools.partial(self._dispatch, fname)
        self._context = cel.Context({}, functions=functions)
        self._context.set_variable_resolver(self._call.get)

    def _dispatch(self, name: str, *args: Any) -> Any:
        return self._recorders[name](*args)

    def bind(
        self,
        variables: Mapping[str, Any],
        resolvers: Mapping[str, Callable[..., Any]],
        resolved: dict[str, Any],
        resolving: _Stopwatch,
        tracer: Callable[[Any], Any] | None = None,
    ) -> cel.Context:
        """The context for one decision over `variables`, its resolver calls recorded (and
        its `provenance()` calls, by `tracer`)."""
        for name in self._used:
            if name in PER_DECISION:
                self._call[name] = variables.get(name)
                continue
            value = variables.get(name)
            value = value() if callable(value) else value
            held = (value, len(value) if isinstance(value, list) else -1)
            known = self._held.get(name)
            if known is None or known[0] is not value or known[1] != held[1]:
                self._context.add_variable(name, value)
                self._held[name] = held
        self._recorders = {n: _recording(n, fn, resolved, resolving) for n, fn in resolvers.items()}
        self._tracer = tracer or _Tracer(None, {}, resolving)
        return self._context


def _recording(
    name: str, fn: Callable[..., Any], resolved: dict[str, Any], resolving: _Stopwatch
) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        key = f"{name}({', '.join(json.dumps(a, default=str) for a in args)})"
        if key not in resolved:
            started = time.thread_time()
            try:
                resolved[key] = fn(*args)
            finally:
                resolving.seconds += time.thread_time() - started
        return resolved[key]

    return call


class _ConditionError(Exception):
    pass


def _holds(c: _CompiledRule, context: cel.Context) -> bool:
    if c.program is None:
        return True
    try:
        value = c.program.execute(context)
    except Exception as exc:  # the CEL runtime raises KeyError, TypeError, ValueError...
        detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).split("\n")[0]
        raise _ConditionError(f"rule {c.rule.id!r}: condition could not be evaluated: {detail}") from None
    if not isinstance(value, bool):
        raise _ConditionError(
            f"rule {c.rule.id!r}: condition gave {type(value).__name__} {value!r}, not true/false"
        )
    return value


def _compile(rule: Rule, source: str) -> cel.Program | None:
    if rule.when is None:
        return None
    _check_size(rule.id, rule.when, source)
    try:
        program = cel.compile(rule.when)
    except ValueError as exc:
        raise PolicyFileError(f"{source}: rule {rule.id!r}: condition does not parse: {exc}") from None
    unknown = sorted(set(program.variables()) - VARIABLES - _bound_names(rule.when))
    if unknown:
        raise PolicyFileError(
            f"{source}: rule {rule.id!r}: unknown name(s) {', '.join(unknown)} in condition "
            f"(conditions may use: {', '.join(sorted(VARIABLES))})"
        )
    return program


# What in a condition is not syntax: comments, and string and bytes literals. One scanner,
# left to right, so a quote inside a comment or `//` inside a string is read as CEL reads it;
# a raw literal (r"...") ends at the first matching quote, whatever backslashes it holds.
_CEL_NOT_SYNTAX = re.compile(
    r"(?P<comment>//[^\n]*)"
    r"|(?<!\w)(?:[bB]?[rR]|[rR][bB])"
    r"""(?:\"\"\"[\s\S]*?\"\"\"|'''[\s\S]*?'''|"[^"\n]*"|'[^'\n]*')"""
    r"|(?<!\w)[bB]?"
    r"""(?:\"\"\"(?:\\[\s\S]|[^\\])*?\"\"\"|'''(?:\\[\s\S]|[^\\])*?'''|"(?:\\.|[^"\\\n])*"|'(?:\\.|[^'\\\n])*')"""
)
# Characters of operators, member access, indexing, calls and literals. Each node of the
# expression tree the engine recurses through has at least one, so their count bounds its depth.
_CEL_OPERATOR = re.compile(r"[-+*/%!<>=&|?.\[({]|\bin\b")


def cel_code(expression: str) -> str:
    """The expression with comments removed and each literal string emptied: only syntax."""
    return _CEL_NOT_SYNTAX.sub(lambda m: " " if m.group("comment") else '""', expression)


def _check_size(rule_id: str, expression: str, source: str) -> None:
    """Refuse a condition too large for the engine to evaluate safely (see the module doc)."""
    where = f"{source}: rule {rule_id!r}: condition"
    if len(expression) > MAX_CONDITION_CHARS:
        raise PolicyFileError(
            f"{where} is {len(expression)} characters long, over the limit of {MAX_CONDITION_CHARS}"
        )
    code = cel_code(expression)
    operators = len(_CEL_OPERATOR.findall(code))
    if operators > MAX_CONDITION_OPERATORS:
        raise PolicyFileError(
            f"{where} has {operators} operators, over the limit of {MAX_CONDITION_OPERATORS}: "
            "split it into several rules"
        )
    depth = deepest = 0
    for char in code:
        if char in "([{":
            depth += 1
            deepest = max(deepest, depth)
        elif char in ")]}":
            depth -= 1
    if deepest > MAX_CONDITION_NESTING:
        raise PolicyFileError(
            f"{where} nests brackets {deepest} deep, over the limit of {MAX_CONDITION_NESTING}"
        )


def _called_functions(program: cel.Program) -> set[str]:
    """Named functions a condition calls, other than CEL's own and the helpers."""
    names = {f for f in program.functions() if re.fullmatch(r"[A-Za-z_]\w*", f)}
    return names - CEL_FUNCTIONS - set(HELPERS) - {PROVENANCE_FUNCTION}


def _bound_names(expression: str) -> set[str]:
    """Names bound by comprehension macros (`x` in `list.all(x, ...)`), which CEL reports too."""
    return set(re.findall(r"\.(?:all|exists|exists_one|map|filter)\(\s*([A-Za-z_]\w*)\s*,", expression))


def _explain(exc: ValidationError, content: dict[str, Any]) -> str:
    problems = []
    for e in exc.errors():
        loc = list(e["loc"])
        if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
            rules = content.get("rules") or []
            rule = rules[loc[1]] if loc[1] < len(rules) else {}
            rid = rule.get("id", f"#{loc[1] + 1}") if isinstance(rule, dict) else f"#{loc[1] + 1}"
            where = f"rule {rid!r}" + (f", field {'.'.join(map(str, loc[2:]))}" if loc[2:] else "")
        else:
            where = ".".join(map(str, loc)) or "(policy)"
        problems.append(f"{where}: {e['msg']}")
    return "; ".join(problems)
