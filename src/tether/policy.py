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
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal

import cel
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tether.decision import Decision, DecisionKind
from tether.errors import PolicyFileError
from tether.hashing import fingerprint
from tether.reasons import ReasonCode
from tether.strict_yaml import load_yaml
from tether.tools import Tool

SEVERITY: dict[str, int] = {"allow": 0, "ask": 1, "defer": 2, "deny": 3}
_REASON_OF: dict[str, ReasonCode] = {
    "allow": ReasonCode.POLICY_ALLOWED,
    "deny": ReasonCode.POLICY_DENIED,
    "ask": ReasonCode.APPROVAL_REQUIRED,
    "defer": ReasonCode.DEFERRED,
}
VARIABLES = frozenset({"args", "data", "facts", "history", "tool", "run"})
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

    @model_validator(mode="after")
    def _target_and_fields(self) -> Rule:
        if (self.tool is None) == (self.exit is None):
            raise ValueError("give exactly one of 'tool' or 'exit'")
        if self.decision == "defer" and not self.owner:
            raise ValueError("a 'defer' rule must name an 'owner' to hand off to")
        if self.decision != "ask" and (self.approver or self.expires_in):
            raise ValueError("'approver' and 'expires_in' apply only to 'ask' rules")
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


class PolicyDocument(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: str | int = 1
    defaults: Defaults = Field(default_factory=Defaults)
    rules: list[Rule] = Field(default_factory=list)


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

    def __init__(self, document: PolicyDocument, source: str = "<policy>") -> None:
        self.document = document
        self.source = source
        self.hash = fingerprint(document.model_dump(mode="json"))
        ids: set[str] = set()
        self._rules: list[_CompiledRule] = []
        self._by_target: dict[tuple[str, str], list[_CompiledRule]] = {}
        for rule in document.rules:
            if rule.id in ids:
                raise PolicyFileError(f"{source}: duplicate rule id {rule.id!r}")
            ids.add(rule.id)
            self._rules.append(_CompiledRule(rule, _compile(rule, source)))

    @classmethod
    def default(cls) -> Policy:
        return cls(PolicyDocument(), "<default policy>")

    @classmethod
    def from_dict(cls, content: Any, source: str = "<policy>") -> Policy:
        if content is None:
            content = {}
        if not isinstance(content, dict):
            raise PolicyFileError(f"{source}: a policy must be a mapping with 'rules'")
        try:
            document = PolicyDocument.model_validate(content)
        except ValidationError as exc:
            raise PolicyFileError(f"{source}: " + _explain(exc, content)) from None
        return cls(document, source)

    @classmethod
    def from_yaml(cls, text: str, source: str = "<policy>") -> Policy:
        try:
            content = load_yaml(text)
        except yaml.YAMLError as exc:
            raise PolicyFileError(f"{source}: not valid YAML: {exc}") from None
        return cls.from_dict(content, source)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        file = Path(path)
        try:
            text = file.read_text()
        except FileNotFoundError:
            raise PolicyFileError(f"policy file not found: {file}") from None
        return cls.from_yaml(text, str(file))

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
        return any(variable in c.variables for c in self._rules)

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

    def decide(
        self,
        *,
        kind: Literal["tool", "exit"],
        name: str,
        effect: str,
        variables: Mapping[str, Any],
        resolvers: Mapping[str, Callable[..., Any]] | None = None,
    ) -> Decision:
        """Evaluate every governing rule and return the winning decision.

        `variables` may hold zero-argument callables for costly values (e.g. `history`):
        they are computed only when a governing rule uses them. `resolvers` are the
        lookups conditions may call; each call is memoized and recorded in the decision.
        """
        rules = self._governing(kind, name)
        resolved: dict[str, Any] = {}
        context = _context(rules, variables, resolvers or {}, resolved)
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
        if best is None:
            default = getattr(self.document.defaults, "exit" if kind == "exit" else effect)
            return Decision(
                decision=default,
                rule_id=f"default:{kind if kind == 'exit' else effect}",
                policy_hash=self.hash,
                reason_code=_REASON_OF[default],
                reason=f"no rule matched; default for {effect} is {default}",
                evaluated=evaluated,
                resolved=resolved,
            )
        rule = best.rule
        return Decision(
            decision=rule.decision,
            rule_id=rule.id,
            policy_hash=self.hash,
            reason_code=_REASON_OF[rule.decision],
            reason=rule.reason,
            approver=(rule.approver or "approver") if rule.decision == "ask" else None,
            owner=rule.owner,
            expires_in=(rule.expires_in or DEFAULT_APPROVAL_SECONDS) if rule.decision == "ask" else None,
            matched=matched,
            evaluated=evaluated,
            resolved=resolved,
        )


def _context(
    rules: list[_CompiledRule],
    variables: Mapping[str, Any],
    resolvers: Mapping[str, Callable[..., Any]],
    resolved: dict[str, Any],
) -> cel.Context:
    """One CEL context per decision, holding only what the governing rules use."""
    used = set().union(*(c.variables for c in rules)) if rules else set()
    values = {k: (v() if callable(v) else v) for k, v in variables.items() if k in used}
    functions: dict[str, Callable[..., Any]] = dict(HELPERS)
    for fname, fn in resolvers.items():
        functions[fname] = _recording(fname, fn, resolved)
    return cel.Context(values, functions=functions)


def _recording(name: str, fn: Callable[..., Any], resolved: dict[str, Any]) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        key = f"{name}({', '.join(json.dumps(a, default=str) for a in args)})"
        if key not in resolved:
            resolved[key] = fn(*args)
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


def _called_functions(program: cel.Program) -> set[str]:
    """Named functions a condition calls, other than CEL's own and the helpers."""
    names = {f for f in program.functions() if re.fullmatch(r"[A-Za-z_]\w*", f)}
    return names - CEL_FUNCTIONS - set(HELPERS)


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
