"""What can be said about policy conditions before a run: where each rule surely holds,
surely does not, or cannot be known.

A decision is about a *subject*: one tool (or exit) proposed in one state. Before the run,
`tool` and most of `run` are known; `args` is not, but a condition comparing an argument
with constants (`args.amount > 500.0`, `args.reason in ["a", "b"]`) splits the argument's
values into a few *cells* in which the comparison cannot change (below 500, exactly 500,
above). Every combination of cells is evaluated in three-valued logic: true, false, or
unknown. Unknown is what the run alone can tell — facts, data, history, resolvers, functions
over arguments, arguments that are not a number, string or boolean — and is never guessed:
a rule that is unknown somewhere is reported as opaque there, naming what it reads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tether.analysis.cel_syntax import (
    MACROS,
    RELATIONS,
    Binary,
    Call,
    CelSyntaxError,
    Conditional,
    Ident,
    Index,
    ListExpr,
    Literal,
    MapExpr,
    Node,
    Select,
    Unary,
    bound_name,
    children,
    parse,
)
from tether.policy import SEVERITY, Rule

# The fields of `run` (the run's id is the only one not known before the run).
RUN_FIELDS = ("id", "workflow", "version", "state")
# Cells beyond this many (the product over every compared argument) are not enumerated: the
# arguments are then treated as unknown, which only makes the analysis more cautious.
MAX_CELLS = 20_000


class _Unknown:
    def __repr__(self) -> str:
        return "unknown"


UNKNOWN: Any = _Unknown()


# -- the subject of a decision ----------------------------------------------------------------


@dataclass(frozen=True)
class Domain:
    """The values an argument may take, as far as its schema says: number, integer, string,
    boolean, or an enumeration."""

    kind: str  # "number", "integer", "string", "boolean", "enum"
    values: tuple[Any, ...] = ()  # an enumeration's values

    @classmethod
    def of(cls, schema: Mapping[str, Any]) -> Domain | None:
        """The domain of a property schema, or None when it is not analysed (lists,
        objects, optional values...)."""
        if "enum" in schema and isinstance(schema["enum"], list):
            return cls("enum", tuple(schema["enum"]))
        if "const" in schema:
            return cls("enum", (schema["const"],))
        kind = schema.get("type")
        return cls(kind) if kind in ("number", "integer", "string", "boolean") else None


@dataclass(frozen=True)
class Subject:
    """One tool or exit as proposed in one state: what a condition can know of it."""

    kind: str  # "tool" or "exit"
    name: str
    effect: str  # read/write/external, or "exit"
    state: str
    tool: Mapping[str, Any]  # the `tool` variable, in full
    run: Mapping[str, Any]  # the known fields of `run`
    params: frozenset[str]  # the fields `args` always has
    domains: Mapping[str, Domain] = field(default_factory=dict)
    fixed: Mapping[str, Any] = field(default_factory=dict)  # arguments known exactly
    resolvers: frozenset[str] = frozenset()


def tool_subject(tool: Any, state: str, workflow: Any) -> Subject:
    schema = tool.json_schema()
    properties = schema.get("properties", {})
    domains = {name: d for name, prop in properties.items() if (d := Domain.of(prop)) is not None}
    return Subject(
        kind="tool",
        name=tool.name,
        effect=tool.effect,
        state=state,
        tool=dict(tool.info),
        run={"workflow": workflow.name, "version": workflow.version, "state": state},
        params=frozenset(properties),
        domains=domains,
        resolvers=frozenset(workflow.resolvers),
    )


def exit_subject(name: str, state: str, workflow: Any) -> Subject:
    return Subject(
        kind="exit",
        name=name,
        effect="exit",
        state=state,
        tool={"name": name, "effect": "exit"},
        run={"workflow": workflow.name, "version": workflow.version, "state": state},
        params=frozenset({"exit", "update"}),
        fixed={"exit": name},
        resolvers=frozenset(workflow.resolvers),
    )


# -- conditions ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Condition:
    """A rule's condition as read for analysis: no condition, a tree, or unreadable."""

    rule: Rule
    tree: Node | None
    unreadable: str | None = None

    @classmethod
    def of(cls, rule: Rule, definitions: Mapping[str, Node] | None = None) -> Condition:
        """The rule's condition, each definition it reads by name read in its place
        (`definitions` from `definition_trees`)."""
        if rule.when is None:
            return cls(rule, None)
        try:
            tree = parse(rule.when)
        except CelSyntaxError as exc:
            return cls(rule, None, f"the analysis does not read this condition ({exc})")
        return cls(rule, expand(tree, definitions) if definitions else tree)

    @property
    def always(self) -> bool:
        return self.rule.when is None


def definition_trees(policy: Any) -> dict[str, Node]:
    """A policy's definitions parsed, each with the definitions it reads expanded in it
    (the loader refused cycles). A definition the analysis does not read is left out: a
    condition reading it sees an unknown name, as before."""
    texts: Mapping[str, str] = policy.document.definitions if policy is not None else {}
    trees: dict[str, Node] = {}
    parsed: dict[str, Node] = {}
    for name, text in texts.items():
        with contextlib.suppress(CelSyntaxError):
            parsed[name] = parse(text)

    def tree(name: str) -> Node:
        if name not in trees:
            inner = {d: tree(d) for d in _free_names(parsed[name]) if d in parsed and d != name}
            trees[name] = expand(parsed[name], inner)
        return trees[name]

    for name in parsed:
        tree(name)
    return trees


def _free_names(node: Node, bound: frozenset[str] = frozenset()) -> set[str]:
    if isinstance(node, Ident):
        return set() if node.name in bound else {node.name}
    inner = bound | ({b} if (b := bound_name(node)) else set())
    target = getattr(node, "target", None)
    found: set[str] = set()
    for child in children(node):
        found |= _free_names(child, bound if child is target else inner)
    return found


def expand(node: Node, definitions: Mapping[str, Node], bound: frozenset[str] = frozenset()) -> Node:
    """The tree with each definition it reads by name (not rebound by a comprehension)
    replaced by the definition's own tree."""
    if isinstance(node, Ident):
        return definitions.get(node.name, node) if node.name not in bound else node
    inner = bound | ({b} if (b := bound_name(node)) else set())
    target = getattr(node, "target", None)

    def sub(value: Any) -> Any:
        if isinstance(value, Node):
            return expand(value, definitions, bound if value is target else inner)
        if isinstance(value, tuple):
            return tuple(sub(v) for v in value)
        return value

    changes = {f.name: sub(getattr(node, f.name)) for f in dataclasses.fields(node)}
    return dataclasses.replace(node, **changes)


def references(tree: Node, root: str) -> list[tuple[str, Node]]:
    """Every `root.FIELD` the expression reads (outside comprehensions binding `root`)."""
    found: list[tuple[str, Node]] = []

    def walk(node: Node, bound: frozenset[str]) -> None:
        operand = node.operand if isinstance(node, Select) else None
        if (
            isinstance(node, Select)
            and isinstance(operand, Ident)
            and operand.name == root
            and root not in bound
        ):
            found.append((node.field, node))
        inner = bound | ({name} if (name := bound_name(node)) else set())
        for child in children(node):
            walk(child, inner if child is not getattr(node, "target", None) else bound)

    walk(tree, frozenset())
    return found


# -- cells ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Cell:
    """A set of values of one argument in which no compared constant is crossed."""

    index: int
    value: Any  # a representative
    exact: bool  # the cell holds this one value
    low: float = -math.inf
    high: float = math.inf
    low_closed: bool = False
    high_closed: bool = False
    other: bool = False  # a string equal to none of the compared constants


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def cells(domain: Domain, constants: Iterable[Any]) -> list[Cell]:
    if domain.kind in ("enum", "boolean"):
        values = domain.values if domain.kind == "enum" else (False, True)
        return [Cell(i, v, True) for i, v in enumerate(values)]
    if domain.kind == "string":
        literals = sorted({c for c in constants if isinstance(c, str)})
        other = next(s for s in ("", "\x00", "\x00\x00") if s not in literals)
        found = [Cell(i, v, True) for i, v in enumerate(literals)]
        return [*found, Cell(len(found), other, False, other=True)]
    return _number_cells(domain.kind == "integer", sorted({float(c) for c in constants if _is_number(c)}))


def _number_cells(integer: bool, points: list[float]) -> list[Cell]:
    found: list[Cell] = []
    bounds = [-math.inf, *points, math.inf]
    for low, high in itertools.pairwise(bounds):
        between = _between(integer, low, high)
        if between is not None:
            value, exact = between
            found.append(Cell(len(found), value, exact, low, high))
        if high != math.inf and (not integer or high.is_integer()):
            value = int(high) if integer else high
            found.append(Cell(len(found), value, True, high, high, True, True))
    return found


def _between(integer: bool, low: float, high: float) -> tuple[Any, bool] | None:
    """A value strictly between two bounds (and whether it is the only one), or None."""
    if not integer:
        if low == -math.inf and high == math.inf:
            return 0.0, False
        if low == -math.inf:
            return high - 1.0, False
        if high == math.inf:
            return low + 1.0, False
        return (low + high) / 2, False
    first = math.floor(low) + 1 if low != -math.inf else None
    last = math.ceil(high) - 1 if high != math.inf else None
    if first is not None and last is not None:
        return (first, first == last) if first <= last else None
    return (first if first is not None else last if last is not None else 0), False


@dataclass(frozen=True)
class FieldRef:
    """An argument whose cell holds more than one value: only a comparison with a
    constant is known for the whole cell."""

    name: str
    cell: Cell


class Space:
    """Every combination of cells of the arguments the conditions compare with constants."""

    def __init__(self, subject: Subject, conditions: Sequence[Condition]) -> None:
        self.subject = subject
        constants: dict[str, list[Any]] = {}
        for condition in conditions:
            if condition.tree is not None:
                for name, value in _compared_constants(condition.tree, subject):
                    constants.setdefault(name, []).append(value)
                # Booleans and enumerations have few values, each exact: read anywhere, they are cut.
                for name, _ in references(condition.tree, "args"):
                    if subject.domains.get(name, Domain("number")).kind in ("boolean", "enum"):
                        constants.setdefault(name, [])
        names = sorted(n for n in constants if n in subject.domains and n not in subject.fixed)
        per_field = [cells(subject.domains[n], constants[n]) for n in names]
        size = math.prod(len(c) for c in per_field)
        # Too many combinations: arguments are not analysed at all (all unknown), which is safe.
        self.coarse = size > MAX_CELLS
        if self.coarse:
            names, per_field = [], []
        self.fields: list[str] = names
        self.cells: dict[str, list[Cell]] = dict(zip(names, per_field, strict=True))
        self.points: list[dict[str, Cell]] = [
            dict(zip(names, combo, strict=True)) for combo in itertools.product(*per_field)
        ]

    def evaluate(self, condition: Condition, subject: Subject | None = None) -> list[Any]:
        """The condition's value in each combination: True, False or UNKNOWN."""
        if condition.always:
            return [True] * len(self.points)
        if condition.tree is None:
            return [UNKNOWN] * len(self.points)
        values = []
        for point in self.points:
            value = Evaluator(subject or self.subject, point).truth(condition.tree)
            values.append(value)
        return values

    def opaque(self, condition: Condition, subject: Subject | None = None) -> list[str]:
        """What the condition reads that cannot be known before the run."""
        if condition.unreadable:
            return [condition.unreadable]
        if condition.tree is None:
            return []
        why: dict[str, None] = {}
        for point in self.points:
            evaluator = Evaluator(subject or self.subject, point, why)
            evaluator.truth(condition.tree)
        return list(why)

    def describe(self, indexes: Iterable[int], subject_name: str = "args") -> str:
        """The combinations `indexes` as a condition a person reads."""
        chosen = sorted(set(indexes))
        if not chosen:
            return "no call"
        if len(chosen) == len(self.points):
            return "every call"
        rows = [self.points[i] for i in chosen]
        projections = {n: sorted({row[n].index for row in rows}) for n in self.fields}
        if math.prod(len(p) for p in projections.values()) == len(rows):
            parts = [_describe_field(n, self.cells[n], projections[n]) for n in self.fields]
            return " && ".join(p for p in parts if p) or "every call"
        shown = [
            " && ".join(p for n in self.fields if (p := _describe_field(n, self.cells[n], [row[n].index])))
            for row in rows[:3]
        ]
        more = f" (and {len(rows) - 3} more combinations)" if len(rows) > 3 else ""
        return " || ".join(f"({s})" for s in shown) + more


def _compared_constants(tree: Node, subject: Subject) -> list[tuple[str, Any]]:
    """(argument, constant) for every comparison of an argument with a constant."""
    found: list[tuple[str, Any]] = []
    constant = Evaluator(subject, {})

    def walk(node: Node, bound: frozenset[str]) -> None:
        if isinstance(node, Binary) and node.op in RELATIONS:
            for side, other in ((node.left, node.right), (node.right, node.left)):
                name = _argument(side, bound)
                if name is None or not _free_of(other, "args", bound):
                    continue
                value = constant.value(other, bound)
                if node.op == "in" and side is node.left and isinstance(value, list):
                    found.extend((name, v) for v in value)
                elif value is not UNKNOWN and not isinstance(value, FieldRef):
                    found.append((name, value))
        inner = bound | ({name} if (name := bound_name(node)) else set())
        for child in children(node):
            walk(child, inner if child is not getattr(node, "target", None) else bound)

    walk(tree, frozenset())
    return found


def _argument(node: Node, bound: frozenset[str]) -> str | None:
    """`FIELD` when the node is `args.FIELD` (with `args` not rebound)."""
    if isinstance(node, Select) and isinstance(node.operand, Ident) and node.operand.name == "args":
        return node.field if "args" not in bound else None
    return None


def _free_of(node: Node, name: str, bound: frozenset[str]) -> bool:
    if isinstance(node, Ident):
        return node.name != name or name in bound
    inner = bound | ({b} if (b := bound_name(node)) else set())
    return all(
        _free_of(c, name, inner if c is not getattr(node, "target", None) else bound) for c in children(node)
    )


# -- three-valued evaluation -----------------------------------------------------------------------


class Evaluator:
    """Evaluates a condition for one combination of cells, as CEL would for any call in it.

    Values are Python values, `UNKNOWN`, or a `FieldRef` (an argument known only up to its
    cell). `why` collects what made a value unknown.
    """

    def __init__(self, subject: Subject, point: Mapping[str, Cell], why: dict[str, None] | None = None):
        self.subject = subject
        self.point = point
        self.why = why if why is not None else {}
        self.reasons = 0  # reasons given so far, repeated ones too

    def unknown(self, reason: str) -> Any:
        self.why[reason] = None
        self.reasons += 1
        return UNKNOWN

    def truth(self, tree: Node) -> Any:
        value = self.value(tree, frozenset())
        if not isinstance(value, bool):
            if self.reasons == 0:
                self.unknown("a value that is not true or false")
            return UNKNOWN
        return value

    def value(self, node: Node, bound: frozenset[str]) -> Any:
        """The node's value; a FieldRef only where a comparison may use it."""
        match node:
            case Literal(value=value):
                return value
            case Select():
                return self.select(node, bound)
            case Ident(name=name):
                return self.ident(name, bound)
            case Binary():
                return self.binary(node, bound)
            case Unary():
                return self.unary(node, bound)
            case Conditional():
                return self.conditional(node, bound)
            case ListExpr(items=items):
                values = [self.known(i, bound) for i in items]
                return UNKNOWN if any(v is UNKNOWN for v in values) else values
            case MapExpr(entries=entries):
                return self.mapping(entries, bound)
            case Index():
                return _index(self.known(node.operand, bound), self.known(node.index, bound))
            case Call():
                return self.call(node, bound)
        return self.unknown("an expression the analysis does not read")

    def binary(self, node: Binary, bound: frozenset[str]) -> Any:
        if node.op in ("&&", "||"):
            return _logic(node.op, self.known(node.left, bound), self.known(node.right, bound))
        if node.op in RELATIONS:
            return self.relation(node, bound)
        return self.arithmetic(node, bound)

    def unary(self, node: Unary, bound: frozenset[str]) -> Any:
        operand = self.known(node.operand, bound)
        if node.op == "!":
            return (not operand) if isinstance(operand, bool) else UNKNOWN
        return -operand if _is_number(operand) else UNKNOWN

    def known(self, node: Node, bound: frozenset[str]) -> Any:
        """The node's value where an argument's cell is not enough: exact, or unknown."""
        value = self.value(node, bound)
        if isinstance(value, FieldRef):
            return self.unknown(f"args.{value.name} (only its comparisons with constants are analysed)")
        return value

    def ident(self, name: str, bound: frozenset[str]) -> Any:
        if name in bound:
            return UNKNOWN  # a comprehension's variable: its list was reported where it was read
        if name in ("facts", "data", "history"):
            return self.unknown(name)
        if name == "tool":
            return dict(self.subject.tool)
        if name in ("now", "subject"):  # the decision's time, the call's subject: the run's
            return self.unknown(name)
        return self.unknown(f"{name} as a whole")

    def select(self, node: Select, bound: frozenset[str]) -> Any:
        operand = node.operand
        if isinstance(operand, Ident) and operand.name not in bound:
            root = operand.name
            if root == "args":
                return self.argument(node.field)
            if root == "run":
                if node.field in self.subject.run:
                    return self.subject.run[node.field]
                return self.unknown(f"run.{node.field}")
            if root in ("facts", "data"):
                return self.unknown(f"{root}.{node.field}")
        container = self.known(operand, bound)
        if isinstance(container, dict) and node.field in container:
            return container[node.field]
        if container is UNKNOWN:
            return UNKNOWN
        return self.unknown(f"{_path(node)} (not present)")

    def argument(self, name: str) -> Any:
        if name in self.subject.fixed:
            return self.subject.fixed[name]
        cell = self.point.get(name)
        if cell is None:
            if name not in self.subject.params:
                return self.unknown(f"args.{name} (no such argument)")
            if name in self.subject.domains:
                return UNKNOWN  # compared with no constant: what it is used with is the reason
            return self.unknown(f"args.{name} (not a number, string or boolean)")
        return cell.value if cell.exact else FieldRef(name, cell)

    def relation(self, node: Binary, bound: frozenset[str]) -> Any:
        reasons = self.reasons
        value = self.compare(node, bound)
        uses_args = not _free_of(node.left, "args", bound) and not _free_of(node.right, "args", bound)
        if value is UNKNOWN and self.reasons == reasons and uses_args:
            return self.unknown(f"{_path(node.left)} {node.op} {_path(node.right)}")
        return value

    def compare(self, node: Binary, bound: frozenset[str]) -> Any:
        left, right = self.value(node.left, bound), self.value(node.right, bound)
        for ref, other, other_node in ((left, right, node.right), (right, left, node.left)):
            if isinstance(ref, FieldRef):
                if isinstance(other, FieldRef) or not _free_of(other_node, "args", bound):
                    return self.unknown(f"args.{ref.name} compared with another argument")
                if other is UNKNOWN:
                    return UNKNOWN
                if not _cell_decides(node.op, ref, other, ref is left):
                    return self.unknown(f"args.{ref.name} {node.op} (a comparison the analysis does not cut)")
        left = left.cell.value if isinstance(left, FieldRef) else left
        right = right.cell.value if isinstance(right, FieldRef) else right
        if left is UNKNOWN or right is UNKNOWN:
            return UNKNOWN
        return _relate(node.op, left, right)

    def arithmetic(self, node: Binary, bound: frozenset[str]) -> Any:
        left, right = self.known(node.left, bound), self.known(node.right, bound)
        if left is UNKNOWN or right is UNKNOWN:
            return UNKNOWN
        return _arithmetic(node.op, left, right)

    def conditional(self, node: Conditional, bound: frozenset[str]) -> Any:
        test = self.known(node.test, bound)
        then, otherwise = self.known(node.then, bound), self.known(node.otherwise, bound)
        if isinstance(test, bool):
            return then if test else otherwise
        if then is not UNKNOWN and otherwise is not UNKNOWN and _equal(then, otherwise):
            return then
        return UNKNOWN

    def mapping(self, entries: tuple[tuple[Node, Node], ...], bound: frozenset[str]) -> Any:
        result = {}
        for key_node, value_node in entries:
            key, value = self.known(key_node, bound), self.known(value_node, bound)
            if key is UNKNOWN or value is UNKNOWN or isinstance(key, list | dict):
                return UNKNOWN
            result[key] = value
        return result

    def call(self, node: Call, bound: frozenset[str]) -> Any:
        if node.function == "has" and node.target is None and len(node.args) == 1:
            return self.has(node.args[0], bound)
        if node.target is None and node.function in self.subject.resolvers:
            for arg in node.args:
                self.known(arg, bound)
            return self.unknown(f"resolver {node.function}()")
        before = self.reasons
        inner = bound | ({name} if (name := bound_name(node)) else set())
        values = [self.known(a, inner if node.function in MACROS else bound) for a in node.args]
        target = self.known(node.target, bound) if node.target is not None else None
        if node.function == "size" and (len(values) == 1 or node.target is not None):
            sized = target if node.target is not None else values[0]
            if isinstance(sized, str | bytes | list | dict):
                return len(sized)
        if self.reasons > before:
            return UNKNOWN  # what its operands read is the reason
        return self.unknown(f"{node.function}()")

    def has(self, node: Node, bound: frozenset[str]) -> Any:
        if not isinstance(node, Select):
            return self.unknown("has() of something other than a field")
        operand = node.operand
        if isinstance(operand, Ident) and operand.name not in bound:
            known_fields = {"args": self.subject.params, "tool": self.subject.tool, "run": RUN_FIELDS}
            if operand.name in known_fields:
                return node.field in known_fields[operand.name]
            if operand.name in ("facts", "data"):
                return self.unknown(f"{operand.name}.{node.field}")
        container = self.known(operand, bound)
        return node.field in container if isinstance(container, dict) else UNKNOWN


def _path(node: Node) -> str:
    if isinstance(node, Select):
        return f"{_path(node.operand)}.{node.field}"
    return node.name if isinstance(node, Ident) else "(...)"


def _cell_decides(op: str, ref: FieldRef, constant: Any, ref_on_left: bool) -> bool:
    """Whether the comparison has one value over the whole cell: numbers are cut at every
    compared constant; strings only at equality."""
    if op == "in":
        return ref_on_left and isinstance(constant, list)
    if ref.cell.other:
        return op in ("==", "!=")
    return True


def _logic(op: str, left: Any, right: Any) -> Any:
    # CEL's && and || are commutative and absorb errors: false && error is false.
    decisive = op == "||"
    if left is decisive or right is decisive:
        return decisive
    if left is (not decisive) and right is (not decisive):
        return not decisive
    return UNKNOWN


def _kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if _is_number(value):
        return "number"
    return {str: "string", bytes: "bytes", list: "list", dict: "map", type(None): "null"}.get(
        type(value), "other"
    )


def _equal(left: Any, right: Any) -> bool:
    kind = _kind(left)
    if kind != _kind(right):
        return False
    if kind == "list":
        return len(left) == len(right) and all(_equal(a, b) for a, b in zip(left, right, strict=True))
    if kind == "map":
        return left.keys() == right.keys() and all(_equal(left[k], right[k]) for k in left)
    return bool(left == right)


def _relate(op: str, left: Any, right: Any) -> Any:
    if op == "==":
        return _equal(left, right)
    if op == "!=":
        return not _equal(left, right)
    if op == "in":
        if isinstance(right, list):
            return any(_equal(left, item) for item in right)
        if isinstance(right, dict):
            return any(_equal(left, key) for key in right)
        return UNKNOWN
    kind = _kind(left)
    if kind != _kind(right) or kind not in ("number", "string", "bytes", "bool"):
        return UNKNOWN  # no such overload: the engine raises, and the rule denies with policy_error
    return {"<": left < right, "<=": left <= right, ">": left > right, ">=": left >= right}[op]


def _arithmetic(op: str, left: Any, right: Any) -> Any:
    if type(left) is not type(right) or isinstance(left, bool):
        return UNKNOWN  # CEL has no int/double overloads: a type error
    if isinstance(left, str | list) and op == "+":
        return left + right
    if not _is_number(left):
        return UNKNOWN
    if op in ("+", "-", "*"):
        return {"+": left + right, "-": left - right, "*": left * right}[op]
    if right == 0:
        return UNKNOWN
    if isinstance(left, float):
        return left / right if op == "/" else UNKNOWN
    quotient = abs(left) // abs(right) * (1 if (left >= 0) == (right >= 0) else -1)
    return quotient if op == "/" else left - right * quotient


def _index(container: Any, key: Any) -> Any:
    if isinstance(container, list) and isinstance(key, int) and not isinstance(key, bool):
        return container[key] if 0 <= key < len(container) else UNKNOWN
    if isinstance(container, dict) and not isinstance(key, list | dict) and key is not UNKNOWN:
        return container.get(key, UNKNOWN)
    return UNKNOWN


# -- describing cells -------------------------------------------------------------------------------


def literal(value: Any) -> str:
    """A value as CEL writes it."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return repr(value) if math.isfinite(value) else str(value)
    if isinstance(value, str):
        return json.dumps(value)
    return str(value)


def _describe_field(name: str, domain_cells: list[Cell], chosen: list[int]) -> str | None:
    """The chosen cells of one argument as a condition, or None for all of them."""
    if len(chosen) == len(domain_cells):
        return None
    arg = f"args.{name}"
    picked = [domain_cells[i] for i in chosen]
    if any(c.other for c in domain_cells):
        return _describe_strings(arg, domain_cells, picked)
    if all(c.exact and c.low == -math.inf and c.high == math.inf for c in domain_cells):
        values = [literal(c.value) for c in picked]
        return f"{arg} == {values[0]}" if len(values) == 1 else f"{arg} in [{', '.join(values)}]"
    runs: list[list[Cell]] = []
    for cell in picked:
        if runs and runs[-1][-1].index == cell.index - 1:
            runs[-1].append(cell)
        else:
            runs.append([cell])
    return " || ".join(_interval(arg, run[0], run[-1]) for run in runs)


def _describe_strings(arg: str, domain_cells: list[Cell], picked: list[Cell]) -> str:
    if any(c.other for c in picked):
        excluded = [literal(c.value) for c in domain_cells if not c.other and c not in picked]
        if len(excluded) == 1:
            return f"{arg} != {excluded[0]}"
        return f"!({arg} in [{', '.join(excluded)}])"
    values = [literal(c.value) for c in picked]
    return f"{arg} == {values[0]}" if len(values) == 1 else f"{arg} in [{', '.join(values)}]"


def _interval(arg: str, first: Cell, last: Cell) -> str:
    low, high = first.low, last.high
    if low == high:
        return f"{arg} == {literal(first.value)}"
    # Bounds are written as the argument's type is: 100 for an integer, 100.0 for a number.
    integer = isinstance(first.value, int)
    lower = "" if low == -math.inf else f"{_bound(low, integer)} {'<=' if first.low_closed else '<'} "
    upper = "" if high == math.inf else f" {'<=' if last.high_closed else '<'} {_bound(high, integer)}"
    if lower and upper:
        return f"{lower}{arg}{upper}"
    if upper:
        return f"{arg}{upper}"
    return f"{arg} {'>=' if first.low_closed else '>'} {_bound(low, integer)}"


def _bound(value: float, integer: bool) -> str:
    return literal(int(value)) if integer and value.is_integer() else literal(value)


# -- decisions ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Outcome:
    """A decision as a rule (or the default) would make it."""

    decision: str
    rule: str
    role: str | None = None  # the approver of an ask, the owner of a defer

    @property
    def severity(self) -> int:
        return SEVERITY[self.decision]

    def text(self) -> str:
        role = f" ({self.role})" if self.role else ""
        return f"{self.decision}{role} by {self.rule}"


def rule_outcome(rule: Rule) -> Outcome:
    role = (rule.approver or "approver") if rule.decision == "ask" else rule.owner
    return Outcome(rule.decision, rule.id, role)


@dataclass(frozen=True)
class Possible:
    """What may be decided for calls in one combination of cells: `base` when every opaque
    condition is false, or one of `otherwise` when an opaque rule holds."""

    base: Outcome
    otherwise: tuple[Outcome, ...] = ()

    def decisions(self) -> set[str]:
        return {self.base.decision, *(o.decision for o in self.otherwise)}

    def may_allow(self) -> bool:
        return "allow" in self.decisions()

    def text(self) -> str:
        if not self.otherwise:
            return self.base.text()
        return f"{self.base.text()} (or {', '.join(o.text() for o in self.otherwise)} when it holds)"


def possible(rules: Sequence[Rule], values: Sequence[Any], default: Outcome) -> Possible:
    """The possible decisions given each governing rule's value (True/False/UNKNOWN), in
    file order: the most restrictive rule that holds wins, the first among equals."""
    holding = [r for r, v in zip(rules, values, strict=True) if v is True]
    maybe = [r for r, v in zip(rules, values, strict=True) if v is UNKNOWN]
    winner = None
    for rule in holding:
        if winner is None or SEVERITY[rule.decision] > SEVERITY[winner.decision]:
            winner = rule
    if winner is None:
        # With no rule surely holding, any rule that may hold could decide instead of the default.
        return Possible(default, tuple(dict.fromkeys(rule_outcome(r) for r in maybe)))
    stronger = [rule_outcome(r) for r in maybe if SEVERITY[r.decision] > SEVERITY[winner.decision]]
    return Possible(rule_outcome(winner), tuple(dict.fromkeys(stronger)))
