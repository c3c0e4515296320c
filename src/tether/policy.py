"""The policy engine: declarative rules, evaluated deterministically, with their version.

A policy is a YAML file of rules. Each rule matches a tool (or an exit) and optionally a
condition written in CEL (Common Expression Language: no loops, no side effects, no
Python `eval`) over `args`, `data`, `facts`, `history`, `tool`, `run`, `now` (the decision's
time, from the journal's clock, recorded with the decision) and `subject` (what the call is
about, per tool under `subjects:` or per rule), and the policy's named `definitions:`
(each computed at most once per decision); it may call the workflow's resolvers
(registered read-only lookups, e.g. `order(args.order_id).status`) and the helpers `zip`,
`sum`, `pairs`, `indexed`, `first`, `last`, `max` and `min`. Every matching rule whose
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
it cannot be interrupted mid-condition) denies with `policy_error`. Not counted: the lookups'
time, and the interpreter's garbage collection (a full collection in a process holding much
data takes longer than the budget, whatever the conditions are).

A resolver may be asynchronous (`async def`, or any callable returning an awaitable: a lookup
over the network, another MCP server's read tool). CEL evaluation itself is synchronous, so
`Policy.adecide` evaluates in rounds: a round in which a condition calls a lookup not yet
answered counts as null for it, notes the call and is thrown away; the calls noted are awaited
concurrently, and the decision is evaluated again, until a round needs nothing new. Only that
last round's decision is returned, with the values it read recorded in `resolved` exactly as a
synchronous resolver's are (replay answers from them, never live). The lookups of one decision
are bounded in wall time (`resolve_seconds`), in rounds and in number; a lookup that fails, or
that is still unanswered when the time is up, denies with `policy_error`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import inspect
import itertools
import json
import re
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import msgspec
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tether import cel_engine as cel
from tether.decision import REASON_OF, Decision, DecisionKind
from tether.errors import PolicyFileError
from tether.hashing import fingerprint
from tether.provenance import SeenValues, Traced, summary
from tether.reasons import ReasonCode
from tether.strict_yaml import load_yaml
from tether.tools import Tool

BUDGET_RULE_ID = "policy:evaluation_budget"
LOOKUP_RULE_ID = "policy:lookups"
HISTORY_CUT_RULE_ID = "policy:history_cut"
# The key of `decide`'s variables saying how many of the run's earlier calls `history` lacks
# (a bounded carry from a session's earlier runs was cut: tether.journal.bodies.CarriedHistory).
HISTORY_CUT = "history_cut"
# The asynchronous lookups of one decision: wall seconds for all of them (every round), rounds
# of evaluation (one per chain of lookups whose arguments come from another lookup), and calls.
DEFAULT_RESOLVE_SECONDS = 10.0
MAX_LOOKUP_ROUNDS = 8
MAX_LOOKUPS = 100
SEVERITY: dict[str, int] = {"allow": 0, "ask": 1, "defer": 2, "deny": 3}
VARIABLES = frozenset({"args", "data", "facts", "history", "tool", "run"})
# Names computed per decision, on first use: the decision's time (from the store's clock,
# recorded with the decision as `resolved["now"]`) and the call's subject (`subjects:`, or a
# rule's `subject:`).
NOW = "now"
SUBJECT = "subject"
COMPUTED = frozenset({NOW, SUBJECT})
# Built in like the helpers, but bound per decision to the run's seen values.
PROVENANCE_FUNCTION = "provenance"
# CEL's reserved words, which no definition may be named.
RESERVED = frozenset(
    {
        *("true", "false", "null", "in", "as", "break", "const", "continue", "else", "for"),
        *("function", "if", "import", "let", "loop", "package", "namespace", "return"),
        *("var", "void", "while"),
    }
)
_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _list(name: str, value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise TypeError(f"{name}() takes a list, not {type(value).__name__}")
    return value


def _pairs(values: Any) -> list[list[Any]]:
    items = _list("pairs", values)
    return [[a, b] for a, b in itertools.pairwise(items)]


def _indexed(values: Any) -> list[list[Any]]:
    return [[i, v] for i, v in enumerate(_list("indexed", values))]


def _extreme(name: str, pick: Callable[..., Any]) -> Callable[[Any], Any]:
    def helper(values: Any) -> Any:
        items = _list(name, values)
        if not items:
            raise ValueError(f"{name}() of an empty list")
        return pick(items)

    return helper


# The helpers every policy gets (docs/policy.md has the table). Each is linear in its list;
# their time counts against the evaluation budget (they run inside the condition).
HELPERS: dict[str, Callable[..., Any]] = {
    "zip": lambda a, b: [list(pair) for pair in zip(_list("zip", a), _list("zip", b), strict=False)],
    "sum": lambda values: sum(_list("sum", values), 0.0),
    "pairs": _pairs,
    "indexed": _indexed,
    "first": lambda values: _list("first", values)[0] if values else None,
    "last": lambda values: _list("last", values)[-1] if values else None,
    "max": _extreme("max", max),
    "min": _extreme("min", min),
}
# Functions the CEL engine provides (what docs/policy.md lists as working); a condition calling
# any other name must call a resolver.
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

# Seconds each thread has spent in the interpreter's garbage collection, which the budget does
# not count: a collection runs in whichever thread allocates when it is due, and a full one
# in a process holding much data (a test suite's, a server's) takes longer than the budget.
# Timed by the wall clock (no system call; a collection holds the GIL, so it is CPU time).
_GC_SECONDS: dict[int, float] = {}
_GC_STARTED: dict[int, float] = {}


def _time_collections(phase: str, info: dict[str, Any]) -> None:
    thread = threading.get_ident()
    if phase == "start":
        _GC_STARTED[thread] = time.perf_counter()
    elif thread in _GC_STARTED:
        elapsed = time.perf_counter() - _GC_STARTED.pop(thread)
        _GC_SECONDS[thread] = _GC_SECONDS.get(thread, 0.0) + elapsed


def _collected() -> float:
    """Seconds this thread has spent collecting garbage so far."""
    return _GC_SECONDS.get(threading.get_ident(), 0.0)


gc.callbacks.append(_time_collections)


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
    # What the call is about, for this rule's condition (`subject`): overrides `subjects:`.
    subject: str | None = None

    @model_validator(mode="after")
    def _target_and_fields(self) -> Rule:
        if (self.tool is None) == (self.exit is None):
            raise ValueError("give exactly one of 'tool' or 'exit'")
        if self.decision == "defer" and not self.owner:
            raise ValueError("a 'defer' rule must name an 'owner' to hand off to")
        if self.decision != "ask" and (self.approver or self.expires_in):
            raise ValueError("'approver' and 'expires_in' apply only to 'ask' rules")
        if self.decision != "ask" and self.on_expiry:
            raise ValueError("'on_expiry' applies only to 'ask' rules (what an expired approval comes to)")
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
    # Named expressions rules may read by name, each evaluated at most once per decision.
    definitions: dict[str, str] = Field(default_factory=dict)
    # Per tool: the expression giving what a call is about, read in conditions as `subject`.
    subjects: dict[str, str] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)

    def hashed(self) -> dict[str, Any]:
        """What the policy hash covers: sections left out are left out (a policy without
        `provenance:`, `definitions:`, `subjects:` or a rule's `subject:` hashes as it did
        before these existed)."""
        content = self.model_dump(mode="json")
        for section in ("provenance", "definitions", "subjects"):
            if not content[section]:
                del content[section]
        for rule in content["rules"]:  # rule fields added later: left out when not set
            for key, unset in _LATER_RULE_FIELDS.items():
                if rule.get(key, unset) == unset:
                    rule.pop(key, None)
        return content


# Rule fields added after policies were first hashed: left out of the hash when not set, so a
# policy that does not use them keeps the hash its runs are pinned to.
_LATER_RULE_FIELDS: dict[str, Any] = {
    "approvals": None,
    "forbid_self_approval": False,
    "on_expiry": None,
    "subject": None,
}


class _Expression:
    """A compiled named expression: a definition, or a subject (a tool's or a rule's)."""

    def __init__(self, label: str, program: cel.Program, definitions: Mapping[str, str]) -> None:
        self.label = label
        self.program = program
        read = set(program.variables())
        self.variables = read & VARIABLES
        self.computed = read & COMPUTED
        self.definitions = read & set(definitions)
        self.functions = _called_functions(program)
        self.operators = _operators(program.source)


class _CompiledRule:
    def __init__(
        self,
        rule: Rule,
        program: cel.Program | None,
        subject: _Expression | None,
        definitions: Mapping[str, str],
    ) -> None:
        self.rule = rule
        self.kind, self.names = rule.targets()
        self.program = program
        self.subject = subject
        read = set(program.variables()) if program else set()
        self.variables = read & VARIABLES
        self.computed = read & COMPUTED
        self.definitions = read & set(definitions)
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
        resolve_seconds: float = DEFAULT_RESOLVE_SECONDS,
    ) -> None:
        if not evaluation_budget > 0:
            raise ValueError(f"evaluation_budget must be a positive number of seconds: {evaluation_budget}")
        if not resolve_seconds > 0:
            raise ValueError(f"resolve_seconds must be a positive number of seconds: {resolve_seconds}")
        self.document = document
        self.source = source
        self.evaluation_budget = evaluation_budget
        # Wall seconds the asynchronous lookups of one decision may take, all rounds together.
        self.resolve_seconds = resolve_seconds
        self.hash = fingerprint(document.hashed())
        ids: set[str] = set()
        self._rules: list[_CompiledRule] = []
        self._by_target: dict[tuple[str, str], list[_CompiledRule]] = {}
        self._reads_history: dict[tuple[str, str], list[str]] = {}
        definitions = document.definitions
        self.definitions: dict[str, _Expression] = _compile_definitions(definitions, source)
        # Definitions reading `subject` (directly or through others): computed once per
        # decision and subject, since a rule's `subject:` may differ from the tool's.
        self.subject_dependent = frozenset(
            n
            for n in self.definitions
            if any(SUBJECT in self.definitions[d].computed for d in _closure({n}, self.definitions))
        )
        self.subjects: dict[str, _Expression] = {
            tool: _named(f"subject of {tool!r}", text, definitions, source, subject=True)
            for tool, text in document.subjects.items()
        }
        for tool, expression in self.subjects.items():
            if _closure(expression.definitions, self.definitions) & self.subject_dependent:
                raise PolicyFileError(
                    f"{source}: the subject of {tool!r} reads a definition that reads `subject`"
                )
        for rule in document.rules:
            if rule.id in ids:
                raise PolicyFileError(f"{source}: duplicate rule id {rule.id!r}")
            ids.add(rule.id)
            subject = None
            if rule.subject is not None:
                where = f"rule {rule.id!r}: subject"
                subject = _named(where, rule.subject, definitions, source, subject=True)
            compiled = _CompiledRule(rule, _compile(rule, source, definitions), subject, definitions)
            self._check_rule(compiled, source)
            self._rules.append(compiled)
        expressions = [*self.definitions.values(), *self.subjects.values()]
        expressions += [c.subject for c in self._rules if c.subject is not None]
        parts: list[_CompiledRule | _Expression] = [*self._rules, *expressions]
        # The variables any condition reads (only these are handed to the CEL engine), and the
        # resolvers any condition calls; and whether any reads `now`.
        self.variables: frozenset[str] = frozenset().union(*(p.variables for p in parts))
        self.functions: frozenset[str] = frozenset().union(*(p.functions for p in parts))
        self.reads_now = any(NOW in p.computed for p in parts)
        # Whether a condition reads a name computed on first use (a definition, `now`,
        # `subject`): only then is the engine given a lookup to ask for names with.
        self.computes = bool(self.definitions) or any(p.computed for p in parts)
        # Whether decisions need the run's provenance: a condition traces a value, or the safe
        # defaults are adopted.
        self.uses_provenance = document.provenance is not None or any(
            PROVENANCE_FUNCTION in (p.program.functions() if p.program else ()) for p in parts
        )
        # The evaluation runs share, by resolvers and thread (`evaluation`), while any run holds it.
        self._shared: weakref.WeakValueDictionary[tuple[int, int], Evaluation] = weakref.WeakValueDictionary()

    def _check_rule(self, c: _CompiledRule, source: str) -> None:
        """A rule reading `subject` needs one for each tool it names; a condition's size is
        counted with the definitions (and subject) it reads, which it evaluates nested."""
        if (
            c.subject is not None
            and _closure(c.subject.definitions, self.definitions) & self.subject_dependent
        ):
            raise PolicyFileError(
                f"{source}: rule {c.rule.id!r}: its subject reads a definition that reads `subject`"
            )
        if (SUBJECT in c.computed or c.definitions & self.subject_dependent) and c.subject is None:
            if c.kind == "exit":
                raise PolicyFileError(
                    f"{source}: rule {c.rule.id!r} reads `subject` but declares none "
                    "(give the rule a `subject:`)"
                )
            missing = [n for n in c.names if n != "*" and n not in self.subjects]
            if missing:
                raise PolicyFileError(
                    f"{source}: rule {c.rule.id!r} reads `subject`, but no subject is declared for "
                    f"{', '.join(missing)} (add it under `subjects:`, or give the rule a `subject:`)"
                )
        if c.program is None:
            return
        read = set(c.definitions)
        if c.subject is not None:
            read |= c.subject.definitions
        elif SUBJECT in c.computed:
            for n in c.names:
                if n in self.subjects:
                    read |= self.subjects[n].definitions
        used = _closure(read, self.definitions)
        total = _operators(c.program.source) + sum(self.definitions[d].operators for d in used)
        if c.subject is not None:
            total += c.subject.operators
        if used and total > MAX_CONDITION_OPERATORS:
            raise PolicyFileError(
                f"{source}: rule {c.rule.id!r}: condition with the definitions it reads "
                f"({', '.join(sorted(used))}) has {total} operators, over the limit of "
                f"{MAX_CONDITION_OPERATORS}: split it into several rules"
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

    def reads_history(self, kind: str, name: str) -> bool:
        """Whether a rule governing this tool or exit reads `history`."""
        return bool(self.history_readers(kind, name))

    def history_readers(self, kind: str, name: str) -> list[str]:
        """The rules governing this tool or exit that read `history` (in the condition, the
        rule's subject or the tool's, or a definition any of them reads); memoized per target."""
        key = (kind, name)
        known = self._reads_history.get(key)
        if known is not None:
            return known
        readers = []
        for c in self._governing(kind, name):
            subject = c.subject or (self.subjects.get(name) if kind == "tool" else None)
            names = set(c.definitions) | (subject.definitions if subject is not None else set())
            expressions = [self.definitions[d] for d in _closure(names, self.definitions)]
            if subject is not None:
                expressions.append(subject)
            if "history" in c.variables or any("history" in e.variables for e in expressions):
                readers.append(c.rule.id)
        self._reads_history[key] = readers
        return readers

    def uses(self, variable: str) -> bool:
        """Whether any rule's condition (or a definition or subject) reads `variable`
        (e.g. `history`, `now`)."""
        return self.reads_now if variable == NOW else variable in self.variables

    def evaluation(self, resolvers: Mapping[str, Callable[..., Any]]) -> Evaluation:
        """A context to decide a run's proposals in (see `Evaluation`).

        When the conditions read only `args` (converted per decision) and `tool` (one object
        per tool, converted again whenever another is bound), it keeps nothing of one run's
        between its decisions: one is shared by the runs of a thread, and a run waiting on its
        model holds none of its own (2.5 KB each). Each decision binds it afresh and is
        evaluated without yielding, so decisions of different runs never mix in it. It lives
        as long as a run holds it (a weak mapping: nothing accumulates)."""
        if self.variables - SHAREABLE:
            return Evaluation(self, resolvers)
        key = (id(resolvers), threading.get_ident())
        shared = self._shared.get(key)
        if shared is None or shared.resolvers is not resolvers:
            shared = self._shared[key] = Evaluation(self, resolvers)
        return shared

    @property
    def rules(self) -> list[Rule]:
        return [c.rule for c in self._rules]

    def check_targets(
        self, tools: Mapping[str, Tool], exits: set[str], resolvers: Mapping[str, Any] | None = None
    ) -> None:
        """Refuse rules naming a tool, exit or resolver the workflow does not have (and
        definitions or subjects calling a resolver it does not have, subjects of tools it
        does not have)."""
        for label, expression in [
            *((f"definition {n!r}", e) for n, e in self.definitions.items()),
            *((e.label, e) for e in self.subjects.values()),
            *((f"rule {c.rule.id!r}: subject", c.subject) for c in self._rules if c.subject is not None),
        ]:
            missing = sorted(expression.functions - set(resolvers or {}))
            if missing:
                offered = ", ".join(sorted(resolvers or {})) or "none"
                raise PolicyFileError(
                    f"{self.source}: {label} calls unknown function(s) {', '.join(missing)} "
                    f"(the workflow's resolvers: {offered}; helpers: {', '.join(sorted(HELPERS))})"
                )
        for name in self.subjects:
            if name not in tools:
                listing = ", ".join(sorted(tools)) or "none"
                raise PolicyFileError(
                    f"{self.source}: subjects names unknown tool {name!r} (the workflow has: {listing})"
                )
        for c in self._rules:
            missing = sorted(c.functions - set(resolvers or {}))
            if missing:
                declared = ", ".join(sorted(resolvers or {})) or "none"
                raise PolicyFileError(
                    f"{self.source}: rule {c.rule.id!r} calls unknown function(s) {', '.join(missing)} "
                    f"(the workflow's resolvers: {declared}; helpers: {', '.join(sorted(HELPERS))})"
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
        `variables[HISTORY_CUT]`, when more than 0, says `history` lacks that many of the run's
        earlier calls: if a rule governing the proposal reads `history`, it could be fooled by
        what is missing, and the proposal is denied (`history_incomplete`) without evaluating.
        """
        cut = variables.get(HISTORY_CUT)
        if isinstance(cut, int) and cut > 0 and self.reads_history(kind, name):
            return self._history_cut(kind, name, cut)
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

    async def adecide(
        self,
        *,
        kind: Literal["tool", "exit"],
        name: str,
        effect: str,
        variables: Mapping[str, Any],
        resolvers: Mapping[str, Callable[..., Any]] | None = None,
        evaluation: Evaluation | None = None,
        provenance: Callable[[Any], Traced] | None = None,
        resolve_seconds: float | None = None,
    ) -> Decision:
        """`decide`, with resolvers that may be asynchronous (see the module doc): the lookups
        the decision needs are awaited before the evaluation whose decision is returned, all
        of them within `resolve_seconds` (default: the policy's). With only synchronous
        resolvers this is `decide`, evaluated once."""
        if not resolvers:
            return self.decide(
                kind=kind,
                name=name,
                effect=effect,
                variables=variables,
                evaluation=evaluation,
                provenance=provenance,
            )
        lookups = _Lookups(resolvers)
        seconds = self.resolve_seconds if resolve_seconds is None else resolve_seconds
        deadline = time.monotonic() + seconds
        try:
            for _ in range(MAX_LOOKUP_ROUNDS):
                decision = self.decide(
                    kind=kind,
                    name=name,
                    effect=effect,
                    variables=variables,
                    resolvers=lookups.resolvers,
                    evaluation=evaluation,
                    provenance=provenance,
                )
                if not lookups.pending:
                    return decision
                if lookups.calls > MAX_LOOKUPS:
                    return self._lookups_failed(
                        lookups, f"the decision needs more than {MAX_LOOKUPS} lookups ({lookups.waiting()})"
                    )
                try:
                    async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                        await lookups.fetch()
                except TimeoutError:
                    return self._lookups_failed(
                        lookups,
                        f"lookups unanswered after {seconds:g} s, the decision's time for them "
                        f"({lookups.waiting()})",
                    )
            return self._lookups_failed(
                lookups,
                f"the decision still needs lookups after {MAX_LOOKUP_ROUNDS} rounds, each reading "
                f"what the one before found ({lookups.waiting()})",
            )
        finally:
            lookups.discard()

    def _history_cut(self, kind: str, name: str, cut: int) -> Decision:
        """A proposal governed by a rule reading `history`, in a run whose history is cut."""
        rules = self.history_readers(kind, name)
        return Decision(
            decision="deny",
            rule_id=HISTORY_CUT_RULE_ID,
            policy_hash=self.hash,
            reason_code=ReasonCode.HISTORY_INCOMPLETE,
            reason=(
                f"the run's history lacks {cut} earlier call(s) of its session (the calls carried "
                f"from its earlier runs were cut at their bound), and a rule governing {kind} "
                f"{name!r} reads history ({', '.join(rules)}): what is missing could change the "
                "decision, so it is denied"
            ),
        )

    def _lookups_failed(self, lookups: _Lookups, reason: str) -> Decision:
        """A decision whose lookups could not all be made: denied, with what was answered."""
        return Decision(
            decision="deny",
            rule_id=LOOKUP_RULE_ID,
            policy_hash=self.hash,
            reason_code=ReasonCode.POLICY_ERROR,
            reason=reason,
            resolved=lookups.answered(),
        )

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
        # The budget is CPU time (a loaded machine must not deny), read from the thread's CPU
        # clock: a system call. CPU time never exceeds wall time, so after each rule the wall
        # clock (no system call) is read first, and the CPU clock only when it might be over.
        started, wall_started, collected = time.thread_time(), time.perf_counter(), _collected()
        rules = self._governing(kind, name)
        resolved: dict[str, Any] = {}
        resolvers = resolvers or {}
        evaluation = evaluation or Evaluation(self, resolvers)
        evaluation.bind(variables, resolvers, resolved, resolving, tracer)
        subject = self.subjects.get(name) if kind == "tool" else None
        best: _CompiledRule | None = None
        matched: list[str] = []
        evaluated: dict[str, bool | str] = {}
        for c in rules:
            try:
                holds = evaluation.holds(c, c.subject or subject, name)
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
            if time.perf_counter() - wall_started <= self.evaluation_budget:
                continue
            spent = time.thread_time() - started - resolving.seconds - (_collected() - collected)
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


# A decision's own arguments, converted for the engine once per decision (a lookup through
# the context's resolver instead would convert them again for every condition that reads
# them: ~35 µs per decision measured with 9 conditions on `args`); every other variable,
# `tool` included (a tool's `info` is one object), changes between steps, if at all, and is
# converted again only when it does (converting a tool's 7 fields costs ~10 µs).
PER_DECISION = frozenset({"args"})
# What an evaluation shared by runs may be bound to: nothing of one run's is kept in it.
SHAREABLE = PER_DECISION | {"tool"}


class Evaluation:
    """The CEL engine's context for the decisions of one run.

    Converting Python values into the engine's is most of what a decision costs (about 27 µs
    of 32 for five conditions over small values; milliseconds when a rule reads a large
    `data`). So a run keeps one context: `data`, `facts`, `run` and `history` are converted
    when they change (a new object, or a list that grew), `args` and `tool` are looked up per
    decision, and the workflow's resolvers are registered once and record into the decision
    being made.

    Definitions, `subject` and `now` are computed on first use in a decision (the engine asks
    for them by name) and kept for the rest of it. One that cannot be computed makes the
    condition that read it fail, even where CEL would have absorbed the error (`x || true`).
    """

    def __init__(self, policy: Policy, resolvers: Mapping[str, Callable[..., Any]]) -> None:
        self.resolvers = resolvers
        self._used = policy.variables
        self._definitions = policy.definitions
        self._subject_dependent = policy.subject_dependent
        self._held: dict[str, tuple[Any, int]] = {}
        self._recorders: dict[str, Callable[..., Any]] = {}
        self._tracer: Callable[[Any], Any] = _Tracer(None, {}, _Stopwatch())
        # Per decision: the computed values (by definition name, or the subject's expression),
        # what failed while computing them in the condition being evaluated, the time given.
        self._values: dict[Any, Any] = {}
        self._failures: list[str] = []
        self._now: Any = None
        self._resolved: dict[str, Any] = {}
        self._subject: _Expression | None = None
        self._target = ""
        functions: dict[str, Callable[..., Any]] = dict(HELPERS)
        functions[PROVENANCE_FUNCTION] = lambda value: self._tracer(value)
        for fname in resolvers:
            functions[fname] = functools.partial(self._dispatch, fname)
        # A computed name whose value is null falls through to these (a resolver answering
        # None means "not mine" to the engine); `now` has none: without a time it is unknown.
        fallback = dict.fromkeys([*self._definitions, SUBJECT])
        self._context = cel.Context(fallback, functions=functions)
        self._computes = policy.computes
        if policy.computes:  # the engine consults a lookup on every read of every variable
            self._context.set_variable_resolver(self._variable)

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
                self._context.add_variable(name, variables.get(name))
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
        self._values = {}
        self._now = variables.get(NOW)
        self._resolved = resolved
        return self._context

    def holds(self, c: _CompiledRule, subject: _Expression | None, target: str) -> bool:
        """Whether the rule's condition holds, with `subject` bound to this expression's value."""
        program = c.program
        if program is None:
            return True
        if self._computes:  # read only by the engine's lookup of computed names
            self._subject, self._target = subject, target
            if self._failures:
                self._failures = []
        try:
            value = program.execute(self._context)
        except Exception as exc:  # the CEL runtime raises KeyError, TypeError, ValueError...
            if self._failures:
                raise _ConditionError(f"rule {c.rule.id!r}: {self._failures[0]}") from None
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).split("\n")[0]
            raise _ConditionError(f"rule {c.rule.id!r}: condition could not be evaluated: {detail}") from None
        if self._failures:
            raise _ConditionError(f"rule {c.rule.id!r}: {self._failures[0]}")
        if value is True or value is False:
            return value
        gave = f"{type(value).__name__} {value!r}"
        raise _ConditionError(f"rule {c.rule.id!r}: condition gave {gave}, not true/false")

    def _variable(self, name: str) -> Any:
        """The engine's lookup of a name: `now`, the subject and definitions, on first use.
        None falls through to the context's variables."""
        if name == NOW:
            return self._time()
        if name == SUBJECT:
            if self._subject is None:
                return self._fail(
                    f"no subject is declared for {self._target!r} (`subjects:` or the rule's `subject:`)"
                )
            return self._computed(self._subject, self._subject)
        expression = self._definitions.get(name)
        if expression is not None:
            key = (name, id(self._subject)) if name in self._subject_dependent else name
            return self._computed(key, expression)
        return None

    def _computed(self, key: Any, expression: _Expression) -> Any:
        if key in self._values:
            value = self._values[key]
            if isinstance(value, _Failed):
                self._failures.append(value.message)
                return None
            return value
        before = len(self._failures)
        try:
            value = expression.program.execute(self._context)
        except Exception as exc:
            detail = f"missing field {exc}" if isinstance(exc, KeyError) else str(exc).split("\n")[0]
            value = None
            if len(self._failures) == before:
                self._failures.append(f"{expression.label} could not be evaluated: {detail}")
        if len(self._failures) > before:
            self._values[key] = _Failed(self._failures[before])
            return None
        self._values[key] = value
        return value

    def _time(self) -> Any:
        try:
            now = self._now() if callable(self._now) else self._now
        except Exception as exc:  # a replay whose decision recorded no time, say
            return self._fail(f"`now` is not available: {exc}")
        if now is None:
            return self._fail("`now` is not available: this decision was made without a time")
        if not isinstance(now, datetime):
            now = datetime.fromtimestamp(float(now), UTC)
        elif now.tzinfo is None:
            now = now.replace(tzinfo=UTC)
        self._resolved[NOW] = now.isoformat().replace("+00:00", "Z")
        return now

    def _fail(self, message: str) -> None:
        self._failures.append(message)
        return None


class _Failed:
    def __init__(self, message: str) -> None:
        self.message = message


def call_key(name: str, args: tuple[Any, ...]) -> str:
    """A resolver call as a decision records it: `order("A-1", 2)`, each argument as JSON."""
    return f"{name}({', '.join(json.dumps(a, default=str) for a in args)})"


def _recording(
    name: str, fn: Callable[..., Any], resolved: dict[str, Any], resolving: _Stopwatch
) -> Callable[..., Any]:
    def call(*args: Any) -> Any:
        key = call_key(name, args)
        if key not in resolved:
            started = time.thread_time()
            try:
                value = fn(*args)
                if inspect.isawaitable(value):
                    _discard(value)
                    raise TypeError(
                        f"resolver {name!r} is asynchronous: its decisions are made with Policy.adecide"
                    )
                resolved[key] = value
            finally:
                resolving.seconds += time.thread_time() - started
        return resolved[key]

    return call


class LookupFailed(Exception):
    """An asynchronous lookup a condition read failed: the condition cannot be evaluated."""


class _Lookups:
    """The resolvers of one `adecide`, answering from what was fetched so far.

    A call already answered returns its value (or fails, when the lookup failed); a
    synchronous resolver is called at once (and kept for the later rounds); an asynchronous
    one not yet answered returns null for this round and is noted as pending."""

    def __init__(self, resolvers: Mapping[str, Callable[..., Any]]) -> None:
        self._answers: dict[str, tuple[bool, Any]] = {}
        self.pending: dict[str, Awaitable[Any]] = {}
        self.calls = 0
        self.resolvers = {n: functools.partial(self._call, n, fn) for n, fn in resolvers.items()}

    def _call(self, name: str, fn: Callable[..., Any], *args: Any) -> Any:
        key = call_key(name, args)
        answer = self._answers.get(key)
        if answer is not None:
            ok, value = answer
            if ok:
                return value
            raise LookupFailed(f"{key} failed: {value}")
        if key in self.pending:
            return None
        value = fn(*args)
        if inspect.isawaitable(value):
            self.pending[key] = value
            self.calls += 1
            return None
        self._answers[key] = (True, value)
        return value

    async def fetch(self) -> None:
        """Await every pending lookup, concurrently; each answer (or failure) is kept."""
        pending, self.pending = self.pending, {}
        tasks = {key: asyncio.ensure_future(aw) for key, aw in pending.items()}
        try:
            await asyncio.wait(tasks.values())
        finally:
            for key, task in tasks.items():
                if not task.done():
                    task.cancel()
                    self.pending[key] = task  # still unanswered: named by `waiting`
                elif task.cancelled():
                    self._answers[key] = (False, "cancelled")
                elif (exc := task.exception()) is not None:
                    self._answers[key] = (False, f"{type(exc).__name__}: {exc}")
                else:
                    self._answers[key] = (True, task.result())

    def waiting(self) -> str:
        keys = list(self.pending)
        shown = ", ".join(keys[:5]) + (f" and {len(keys) - 5} more" if len(keys) > 5 else "")
        return f"waiting on {shown}" if keys else "none waiting"

    def answered(self) -> dict[str, Any]:
        return {key: value for key, (ok, value) in self._answers.items() if ok}

    def discard(self) -> None:
        """Nothing is left running or unawaited when the decision is made."""
        for aw in self.pending.values():
            _discard(aw)
        self.pending = {}


def _discard(awaitable: Awaitable[Any]) -> None:
    if inspect.iscoroutine(awaitable):
        awaitable.close()
    elif isinstance(awaitable, asyncio.Future):
        awaitable.cancel()


class _ConditionError(Exception):
    pass


def _compile(rule: Rule, source: str, definitions: Mapping[str, str]) -> cel.Program | None:
    if rule.when is None:
        return None
    return _compile_named(f"rule {rule.id!r}: condition", rule.when, definitions, source, rule_id=rule.id)


def _compile_named(
    where: str,
    expression: str,
    definitions: Mapping[str, str],
    source: str,
    *,
    rule_id: str | None = None,
    may_read_subject: bool = True,
) -> cel.Program:
    """Compile a condition, a definition or a subject: bounded in size, every name known."""
    _check_size(where, expression, source)
    try:
        program = cel.compile(expression)
    except ValueError as exc:
        what = f"rule {rule_id!r}: condition" if rule_id else where
        raise PolicyFileError(f"{source}: {what} does not parse: {exc}") from None
    allowed = VARIABLES | COMPUTED | set(definitions)
    unknown = sorted(set(program.variables()) - allowed - _bound_names(expression))
    if unknown:
        names = ", ".join(sorted(VARIABLES | COMPUTED))
        defined = f"; definitions: {', '.join(sorted(definitions))}" if definitions else ""
        raise PolicyFileError(
            f"{source}: {f'rule {rule_id!r}' if rule_id else where}: unknown name(s) {', '.join(unknown)} "
            f"in {'condition' if rule_id else 'expression'} (conditions may use: {names}{defined})"
        )
    if not may_read_subject and SUBJECT in program.variables():
        raise PolicyFileError(f"{source}: {where}: a subject cannot read `subject`")
    return program


def _named(
    label: str, text: str, definitions: Mapping[str, str], source: str, *, subject: bool = False
) -> _Expression:
    """A definition, or (`subject`) a subject expression, which cannot read `subject` itself."""
    program = _compile_named(label, text, definitions, source, may_read_subject=not subject)
    return _Expression(label, program, definitions)


def _compile_definitions(definitions: Mapping[str, str], source: str) -> dict[str, _Expression]:
    """Each definition compiled; names checked; no definition reaching itself."""
    for name in definitions:
        problem = None
        if not _NAME.fullmatch(name):
            problem = "is not a name (letters, digits and _, not starting with a digit)"
        elif name in VARIABLES | COMPUTED:
            problem = "is a variable every condition has"
        elif name in RESERVED:
            problem = "is a reserved word of CEL"
        elif name in HELPERS or name in CEL_FUNCTIONS or name == PROVENANCE_FUNCTION:
            problem = "is a function's name"
        if problem:
            raise PolicyFileError(f"{source}: definition {name!r} {problem}")
    compiled = {
        name: _named(f"definition {name!r}", text, definitions, source) for name, text in definitions.items()
    }
    # A cycle: depth-first over the references, naming the path that closes it.
    done: set[str] = set()

    def visit(name: str, path: list[str]) -> None:
        if name in path:
            cycle = " -> ".join([*path[path.index(name) :], name])
            raise PolicyFileError(f"{source}: definitions refer to themselves: {cycle}")
        if name in done:
            return
        for other in sorted(compiled[name].definitions):
            visit(other, [*path, name])
        done.add(name)

    for name in compiled:
        visit(name, [])
    return compiled


def _closure(names: set[str], definitions: Mapping[str, _Expression]) -> set[str]:
    """The definitions these names read, directly or through each other."""
    found: set[str] = set()
    todo = list(names)
    while todo:
        name = todo.pop()
        if name not in found:
            found.add(name)
            todo.extend(definitions[name].definitions)
    return found


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


def _operators(expression: str) -> int:
    """The operators counted in an expression (see `_CEL_OPERATOR`)."""
    return len(_CEL_OPERATOR.findall(cel_code(expression)))


def _check_size(label: str, expression: str, source: str) -> None:
    """Refuse a condition (or definition, subject) too large for the engine to evaluate
    safely (see the module doc)."""
    where = f"{source}: {label}"
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
