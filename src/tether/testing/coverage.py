"""Governance coverage: which parts of a workflow and its policy the tests exercised.

Computed from the journals of the runs, per workflow definition (its hash and its policy's
hash), over five kinds of items:

- states: each state, entered by some run;
- exits: each agent state's exits and each deterministic step's next states, taken;
- rules: each policy rule, deciding some step (the winner, not only a candidate);
- branches: each rule's condition, true in some decision and false in another (a rule with
  no condition has no false branch: it is listed as such, not counted);
- decisions: each decision the policy can give here (its rules' and its defaults' for the
  workflow's effects), given by policy to some step.

A rule's result in a decision is rebuilt from the pinned policy and the decision's
`matched` list, as `tether policy explain` does: the journal stores which rules held, not
every rule's result. Refusals made before policy (`runtime:…`), a person's verdict on a
ticket (`approval:…`) and a condition that could not be evaluated (`policy_error`, which
denies) are not a rule's decision: they cover no rule and no decision (the rules evaluated
before an error still cover their branches).

An item may be excluded with a reason (`exclude`), like a `pragma: no cover`: excluded items
are listed with their reason, and not counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from tether.decision import Decision
from tether.errors import TetherError
from tether.journal import Entry
from tether.journal import bodies as b
from tether.loader import load_workflow
from tether.policy import Policy
from tether.policy_tooling import explain
from tether.reasons import ReasonCode
from tether.workflow import AgentState, Step, Workflow

KINDS = ("states", "exits", "rules", "branches", "decisions")
_SINGULAR = {
    "states": "state",
    "exits": "exit",
    "rules": "rule",
    "branches": "branch",
    "decisions": "decision",
}
_DECISION_ORDER = ("allow", "ask", "defer", "deny")
_NOT_POLICY = ("runtime:", "approval:", "workflow:")
Key = tuple[str, str]  # (workflow hash, policy hash)


@dataclass(frozen=True)
class Item:
    kind: str
    name: str
    label: str

    @property
    def id(self) -> str:
        """`state:done`, `exit:resolve.refunded`, `rule:X`, `branch:X=false`, `decision:ask`."""
        return f"{_SINGULAR[self.kind]}:{self.name}"


class Definition:
    """The coverable items of one workflow definition with its policy, and what runs covered."""

    def __init__(self, workflow: Workflow) -> None:
        self.workflow = workflow
        self.policy = workflow.policy or Policy.default()
        self.key: Key = (workflow.hash, self.policy.hash)
        self.items = _items(workflow, self.policy)
        self.ids = {item.id for item in self.items}
        self.no_condition = [r.id for r in self.policy.rules if r.when is None]
        self.covered: set[str] = set()
        self.runs: set[str] = set()
        self.excluded: dict[str, str] = {}

    def exclude(self, item_id: str, why: str) -> None:
        """Leave an item out of the count, with the reason it cannot (or need not) be covered."""
        if item_id not in self.ids:
            name = f"{self.workflow.name} {self.workflow.version}"
            raise KeyError(f"{name} has no coverage item {item_id!r} (items: {', '.join(sorted(self.ids))})")
        self.excluded[item_id] = why

    def observe(self, entries: list[Entry], entry: Entry, record: Any, *, decides: bool) -> None:
        """What one entry of a run of this definition covers; `decides` when it holds its
        step's decision (a step's later records repeat it)."""
        if entry.state:
            self.covered.add(f"state:{entry.state}")
        if isinstance(record, b.StepDone):
            self.covered |= {f"state:{record.next}", f"exit:{entry.state}.{record.next}"}
        elif isinstance(record, b.Transition):
            self.covered |= {f"state:{record.next}", f"exit:{entry.state}.{record.exit}"}
        decision = getattr(record, "decision", None)
        if not decides or not isinstance(decision, Decision) or decision.rule_id.startswith(_NOT_POLICY):
            return
        if decision.reason_code != ReasonCode.POLICY_ERROR:  # an error is no rule's decision
            self.covered |= {f"decision:{decision.decision}", f"rule:{decision.rule_id}"}
        assert entry.step_id is not None
        # Rules after one whose condition errored were not evaluated: explain leaves them out.
        for row in explain(entries, entry.step_id, self.policy).rules:
            if isinstance(row["result"], bool):
                self.covered.add(f"branch:{row['rule']}={'true' if row['result'] else 'false'}")


def _items(workflow: Workflow, policy: Policy) -> list[Item]:
    items = [Item("states", name, name) for name in workflow.states]
    for state in workflow.states.values():
        if isinstance(state, Step):
            items += [Item("exits", f"{state.name}.{n}", f"{state.name} → {n}") for n in state.next]
        elif isinstance(state, AgentState):
            items += [
                Item("exits", f"{state.name}.{e}", f"{state.name}.{e} → {t}") for e, t in state.exits.items()
            ]
    for rule in policy.rules:
        items.append(Item("rules", rule.id, rule.id))
    for rule in policy.rules:
        items.append(Item("branches", f"{rule.id}=true", f"{rule.id}=true"))
        if rule.when is not None:
            items.append(Item("branches", f"{rule.id}=false", f"{rule.id}=false"))
    defaults = policy.document.defaults
    possible = {r.decision for r in policy.rules}
    possible |= {getattr(defaults, t.effect) for t in workflow.tools().values()}
    if workflow.exit_names():
        possible.add(defaults.exit)
    items += [Item("decisions", d, d) for d in _DECISION_ORDER if d in possible]
    return items


# -- collecting runs ---------------------------------------------------------------------------


class Collector:
    """Definitions seen, and the runs of each; runs whose definition is unknown are counted apart."""

    def __init__(self) -> None:
        self.definitions: dict[Key, Definition] = {}
        self.unattributed: dict[str, set[str]] = {}
        self._unloadable: set[Key] = set()

    def know(self, workflow: Workflow) -> Definition:
        definition = Definition(workflow)
        return self.definitions.setdefault(definition.key, definition)

    def observe(self, entries: list[Entry], *, workflow_ref: str = "", policy_ref: str | None = None) -> None:
        """Everything a run's entries cover. Observing a run again (after it went further)
        only adds: coverage is a union."""
        if not entries:
            return
        definition: Definition | None = None
        decided: set[str] = set()
        for entry in entries:
            record = entry.body
            if isinstance(record, b.RunStarted):
                definition = self._find((record.workflow.hash, record.policy_hash), workflow_ref, policy_ref)
                if definition is None:
                    self.unattributed.setdefault(record.workflow.name, set()).add(entry.run_id)
            elif isinstance(record, b.Migrated):
                definition = self._find((record.to.hash, record.to.policy_hash), record.to.ref, None)
            if definition is None:
                continue
            definition.runs.add(entry.run_id)
            decides = (
                entry.step_id is not None
                and entry.step_id not in decided
                # A rollback's compensation is decided by policy too (tether.compensation).
                and isinstance(record, b.StepRecord | b.CompensationStep)
                and isinstance(getattr(record, "decision", None), Decision)
                and not getattr(record, "continuation", False)
            )
            if decides:
                decided.add(entry.step_id or "")
            definition.observe(entries, entry, record, decides=decides)

    def _find(self, key: Key, workflow_ref: str, policy_ref: str | None) -> Definition | None:
        """A known definition, or the one its run was loaded from if that file still has it."""
        unknown = not workflow_ref or workflow_ref.startswith("<") or key in self._unloadable
        if key in self.definitions or unknown:
            return self.definitions.get(key)
        try:
            workflow = load_workflow(workflow_ref, policy=policy_ref, pinned=key[0])
        except TetherError:
            workflow = None
        if workflow is None or (workflow.hash, (workflow.policy or Policy.default()).hash) != key:
            self._unloadable.add(key)  # gone, changed since, or refused: not tried again
            return None
        return self.know(workflow)

    def report(self) -> CoverageReport:
        run = [d for d in self.definitions.values() if d.runs]
        titles = [f"{d.workflow.name} {d.workflow.version}" for d in run]
        workflows = []
        for title, definition in zip(titles, run, strict=True):
            if titles.count(title) > 1:
                title += f" (policy {definition.key[1][:15]}…)"
            workflows.append(WorkflowCoverage.of(title, definition))
        unattributed = {name: len(runs) for name, runs in sorted(self.unattributed.items())}
        return CoverageReport(workflows, unattributed)


# -- the report -----------------------------------------------------------------------------------


@dataclass
class KindCoverage:
    kind: str
    items: int
    covered: int
    missed: list[Item]

    @property
    def percent(self) -> float | None:
        return 100.0 * self.covered / self.items if self.items else None


@dataclass
class WorkflowCoverage:
    title: str
    runs: int
    kinds: list[KindCoverage]
    excluded: dict[str, str] = field(default_factory=dict)
    # Excluded items some run covered all the same: the exclusion's reason is wrong.
    excluded_but_covered: list[str] = field(default_factory=list)
    no_false_branch: list[str] = field(default_factory=list)

    @classmethod
    def of(cls, title: str, d: Definition) -> WorkflowCoverage:
        kinds = []
        for kind in KINDS:
            counted = [i for i in d.items if i.kind == kind and i.id not in d.excluded]
            missed = [i for i in counted if i.id not in d.covered]
            kinds.append(KindCoverage(kind, len(counted), len(counted) - len(missed), missed))
        covered_anyway = sorted(i for i in d.excluded if i in d.covered)
        return cls(title, len(d.runs), kinds, dict(d.excluded), covered_anyway, list(d.no_condition))

    @property
    def total(self) -> KindCoverage:
        return KindCoverage(
            "total",
            sum(k.items for k in self.kinds),
            sum(k.covered for k in self.kinds),
            [m for k in self.kinds for m in k.missed],
        )

    def table(self) -> list[str]:
        rows = [["kind", "items", "covered", "missed", "cover", "missing"]]
        for k in [*self.kinds, self.total]:
            missing = ", ".join(i.label for i in k.missed) if k.kind != "total" else ""
            rows.append([k.kind, str(k.items), str(k.covered), str(len(k.missed)), _percent(k), missing])
        lines = [f"governance coverage of {self.title} ({self.runs} run{'s' if self.runs != 1 else ''})"]
        lines += ["  " + line for line in _right_aligned(rows)]
        if self.no_false_branch:
            lines.append(f"  no false branch (no condition): {', '.join(self.no_false_branch)}")
        for item, why in self.excluded.items():
            lines.append(f"  excluded: {item} — {why}")
        for item in self.excluded_but_covered:
            lines.append(f"  warning: {item} is excluded but a run covered it")
        return lines

    def as_dict(self) -> dict[str, Any]:
        def kind(k: KindCoverage) -> dict[str, Any]:
            missed = [i.id for i in k.missed]
            return {"items": k.items, "covered": k.covered, "missed": missed, "percent": k.percent}

        return {
            "workflow": self.title,
            "runs": self.runs,
            **{k.kind: kind(k) for k in self.kinds},
            "total": kind(self.total),
            "excluded": self.excluded,
            "excluded_but_covered": self.excluded_but_covered,
            "no_false_branch": self.no_false_branch,
        }


@dataclass
class CoverageReport:
    workflows: list[WorkflowCoverage]
    # Workflow name -> runs whose definition was never given to the collector.
    unattributed: dict[str, int] = field(default_factory=dict)

    @property
    def items(self) -> int:
        return sum(w.total.items for w in self.workflows)

    @property
    def covered(self) -> int:
        return sum(w.total.covered for w in self.workflows)

    @property
    def percent(self) -> float:
        return 100.0 * self.covered / self.items if self.items else 100.0

    def below(self, threshold: float | None) -> bool:
        return threshold is not None and self.percent < threshold

    def lines(self) -> list[str]:
        lines: list[str] = []
        for w in self.workflows:
            lines += [*w.table(), ""]
        if not self.workflows:
            lines.append("governance coverage: no runs of a known workflow")
        elif len(self.workflows) > 1:
            lines.append(
                f"governance coverage, all workflows: {self.covered} of {self.items} items ({self.display()})"
            )
        for name, runs in self.unattributed.items():
            lines.append(
                f"{runs} run(s) of workflow {name} not counted: its definition was built in code and "
                "never given to a tether.testing helper (run it with run_to_end)"
            )
        return lines

    def display(self) -> str:
        return _percent(KindCoverage("total", self.items, self.covered, []))

    def as_dict(self) -> dict[str, Any]:
        return {
            "workflows": [w.as_dict() for w in self.workflows],
            "items": self.items,
            "covered": self.covered,
            "percent": self.percent,
            "unattributed_runs": self.unattributed,
        }


def _percent(k: KindCoverage) -> str:
    """Like code coverage: 100% only when nothing is missed, 0% only when nothing is covered."""
    if k.percent is None:
        return "-"
    shown = round(k.percent)
    if k.covered < k.items:
        shown = min(shown, 99)
    if k.covered:
        shown = max(shown, 1)
    return f"{shown}%"


def _right_aligned(rows: list[list[str]]) -> list[str]:
    """The first column left-aligned, the numbers right-aligned, the list of missed items last."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    lines = []
    for row in rows:
        cells = [row[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(row[1:-1], widths[1:], strict=True)]
        lines.append("  ".join([*cells, row[-1]]).rstrip())
    return lines


# -- the session's collector (the pytest plugin and `tether test` turn it on) -------------------

_active: Collector | None = None


def activate(collector: Collector | None) -> None:
    """Make `collector` receive every run `run_to_end` drives (None: stop collecting)."""
    global _active
    _active = collector


def active() -> Collector | None:
    return _active


def observe(workflow: Workflow, entries: list[Entry]) -> None:
    """A run driven by a tether.testing helper, given to the active collector, if any."""
    if _active is not None:
        _active.know(workflow)
        _active.observe(entries)
