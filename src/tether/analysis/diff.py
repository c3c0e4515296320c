"""`tether diff`: the change in autonomy surface between two versions of a workflow.

Structural changes (states, envelopes, tools, effects, verifiers, exits, budgets, escalation,
rules and defaults) and the decisions that change: for every tool and exit both versions
offer in a state, the calls (as far as the conditions can be analysed, see
`tether.analysis.conditions`) whose decision differs, and whether that is more or less
permissive (deny > defer > ask > allow). `redecide` does the same for recorded proposals.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from tether.analysis.conditions import (
    UNKNOWN,
    Condition,
    Outcome,
    Possible,
    Space,
    Subject,
    definition_trees,
    exit_subject,
    possible,
    tool_subject,
)
from tether.decision import Decision, runtime_refusal
from tether.journal import Entry
from tether.journal import bodies as b
from tether.policy import HISTORY_CUT, SEVERITY, Policy, Rule, cel_code
from tether.proposals import Exit, Finish, ToolCall, as_dict
from tether.provenance import SeenValues
from tether.reasons import ReasonCode
from tether.run import history_item
from tether.tools import ArgumentError
from tether.workflow import AgentState, Step, Terminal, Workflow

MORE = "more permissive"
LESS = "less permissive"
CHANGED = "changed"
DIRECTIONS = (MORE, LESS, CHANGED)
EFFECT_RANK = {"read": 0, "write": 1, "external": 2}


@dataclass
class Change:
    kind: str  # e.g. tool-added, budget-raised, rule-edited, decision
    subject: str  # what changed: "state resolve", "tool issue_refund", "rule x", ...
    text: str
    direction: str
    detail: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "subject": self.subject,
            "text": self.text,
            "direction": self.direction,
            "detail": self.detail,
        }


@dataclass
class Diff:
    old: Workflow
    new: Workflow
    changes: list[Change]

    def by_direction(self, direction: str) -> list[Change]:
        return [c for c in self.changes if c.direction == direction]

    def as_dict(self) -> dict[str, Any]:
        return {
            "old": identity(self.old),
            "new": identity(self.new),
            "changes": [c.as_dict() for c in self.changes],
            "summary": {d: len(self.by_direction(d)) for d in DIRECTIONS},
        }


def identity(workflow: Workflow) -> dict[str, Any]:
    policy = workflow.policy or Policy.default()
    return {"name": workflow.name, "version": workflow.version, "hash": workflow.hash, "policy": policy.hash}


def diff(old: Workflow, new: Workflow) -> Diff:
    changes = [
        *_states(old, new),
        *_envelopes(old, new),
        *_tools(old, new),
        *_run_budget(old, new),
        *_defaults(old, new),
        *_rules(old, new),
        *_decisions(old, new),
    ]
    return Diff(old, new, changes)


def _direction(lower: bool, higher: bool) -> str:
    """More permissive when something got lower (a decision, a limit taken away), less when higher."""
    if lower and not higher:
        return MORE
    if higher and not lower:
        return LESS
    return CHANGED


# -- structure ------------------------------------------------------------------------------------


def _kind(state: Any) -> str:
    return {Step: "step", AgentState: "agent", Terminal: "terminal"}[type(state)]


def _states(old: Workflow, new: Workflow) -> list[Change]:
    changes = []
    for name, state in new.states.items():
        if name not in old.states:
            changes.append(
                Change("state-added", f"state {name}", f"{_kind(state)} state {name} added", CHANGED)
            )
        elif _kind(old.states[name]) != _kind(state):
            was = _kind(old.states[name])
            text = f"state {name} changed from {was} to {_kind(state)}"
            changes.append(Change("state-changed", f"state {name}", text, CHANGED))
    for name, state in old.states.items():
        if name not in new.states:
            changes.append(
                Change("state-removed", f"state {name}", f"{_kind(state)} state {name} removed", CHANGED)
            )
    for name, state in new.states.items():
        before = old.states.get(name)
        if isinstance(state, Step) and isinstance(before, Step) and set(state.next) != set(before.next):
            text = f"step {name} may now go to {', '.join(state.next)} (was {', '.join(before.next)})"
            changes.append(Change("step-next-changed", f"state {name}", text, CHANGED))
    return changes


def _envelopes(old: Workflow, new: Workflow) -> list[Change]:
    changes: list[Change] = []
    for name, state in new.states.items():
        was = old.states.get(name)
        if isinstance(state, AgentState) and isinstance(was, AgentState):
            changes.extend(_envelope(name, was, state))
    return changes


def _envelope(name: str, old: AgentState, new: AgentState) -> list[Change]:
    subject = f"state {name}"
    changes = []
    old_tools, new_tools = {t.name: t for t in old.tools}, {t.name: t for t in new.tools}
    for tool in new.tools:
        if tool.name not in old_tools:
            text = f"{name}: tool {tool.name} ({tool.effect}) added to the envelope"
            changes.append(Change("tool-added", subject, text, MORE))
    for tool in old.tools:
        if tool.name not in new_tools:
            text = f"{name}: tool {tool.name} ({tool.effect}) removed from the envelope"
            changes.append(Change("tool-removed", subject, text, LESS))
    for exit_name, target in new.exits.items():
        if exit_name not in old.exits:
            changes.append(Change("exit-added", subject, f"{name}: exit {exit_name} → {target} added", MORE))
        elif old.exits[exit_name] != target:
            text = f"{name}: exit {exit_name} now leads to {target} (was {old.exits[exit_name]})"
            changes.append(Change("exit-retargeted", subject, text, CHANGED))
    for exit_name, target in old.exits.items():
        if exit_name not in new.exits:
            changes.append(
                Change("exit-removed", subject, f"{name}: exit {exit_name} → {target} removed", LESS)
            )
    return changes + _settings(name, old, new)


def _settings(name: str, old: AgentState, new: AgentState) -> list[Change]:
    subject = f"state {name}"
    changes = _limits(subject, f"{name}: budget", old.budget.model_dump(), new.budget.model_dump())
    for role in sorted(set(new.handoff_to) - set(old.handoff_to)):
        changes.append(Change("handoff-added", subject, f"{name}: may now hand off to {role}", MORE))
    for role in sorted(set(old.handoff_to) - set(new.handoff_to)):
        changes.append(Change("handoff-removed", subject, f"{name}: may no longer hand off to {role}", LESS))
    settings = ("escalate_to", "on_budget_exhausted", "on_verification_failed")
    for setting in settings:
        before, after = getattr(old, setting), getattr(new, setting)
        if before != after:
            kind = "escalation-changed" if setting == "escalate_to" else "handling-changed"
            changes.append(Change(kind, subject, f"{name}: {setting} {before} → {after}", CHANGED))
    return changes


def _limits(subject: str, label: str, old: dict[str, Any], new: dict[str, Any]) -> list[Change]:
    """Each limit raised or lowered; None is no limit at all."""
    changes = []
    for key in new:
        before, after = old.get(key), new[key]
        if before == after:
            continue
        raised = after is None or (before is not None and after > before)
        shown = [("no limit" if v is None else f"{v:g}") for v in (before, after)]
        kind = "budget-raised" if raised else "budget-lowered"
        text = f"{label} {key} {'raised' if raised else 'lowered'}: {shown[0]} → {shown[1]}"
        changes.append(Change(kind, subject, text, MORE if raised else LESS))
    return changes


def _run_budget(old: Workflow, new: Workflow) -> list[Change]:
    return _limits("workflow", "run budget", old.budget.model_dump(), new.budget.model_dump())


def _tools(old: Workflow, new: Workflow) -> list[Change]:
    changes = []
    old_tools = old.tools()
    for name, tool in new.tools().items():
        was = old_tools.get(name)
        if was is None:
            continue
        subject = f"tool {name}"
        if was.effect != tool.effect:
            lowered = EFFECT_RANK[tool.effect] < EFFECT_RANK[was.effect]
            text = f"tool {name}: effect {was.effect} → {tool.effect}"
            changes.append(Change("effect-changed", subject, text, MORE if lowered else LESS))
        if was.idempotent != tool.idempotent:
            # An idempotent tool is re-run after a crash without asking anyone.
            text = f"tool {name}: idempotent {str(was.idempotent).lower()} → {str(tool.idempotent).lower()}"
            changes.append(Change("idempotent-changed", subject, text, MORE if tool.idempotent else LESS))
        if was.verifier is not None and tool.verifier is None:
            text = f"tool {name}: verifier removed (its effect is no longer re-read)"
            changes.append(Change("verifier-removed", subject, text, MORE))
        elif was.verifier is None and tool.verifier is not None:
            changes.append(Change("verifier-added", subject, f"tool {name}: verifier added", LESS))
    return changes


# -- policy --------------------------------------------------------------------------------------


def _policy(workflow: Workflow) -> Policy:
    return workflow.policy or Policy.default()


def _defaults(old: Workflow, new: Workflow) -> list[Change]:
    changes = []
    before, after = _policy(old).document.defaults, _policy(new).document.defaults
    for key in ("read", "write", "external", "exit"):
        was, now = getattr(before, key), getattr(after, key)
        if was != now:
            direction = MORE if SEVERITY[now] < SEVERITY[was] else LESS
            changes.append(
                Change("default-changed", "policy defaults", f"default for {key}: {was} → {now}", direction)
            )
    return changes


def _rules(old: Workflow, new: Workflow) -> list[Change]:
    old_rules = {r.id: r for r in _policy(old).rules}
    new_rules = {r.id: r for r in _policy(new).rules}
    changes = []
    for rule_id, rule in new_rules.items():
        if rule_id not in old_rules:
            direction = {"allow": MORE, "deny": LESS}.get(rule.decision, CHANGED)
            text = f"rule {rule_id} added: {_rule_text(rule)}"
            changes.append(Change("rule-added", f"rule {rule_id}", text, direction))
        elif old_rules[rule_id] != rule or _definitions_changed(old, new, rule):
            changes.append(_rule_edit(old, new, old_rules[rule_id], rule))
    for rule_id, rule in old_rules.items():
        if rule_id not in new_rules:
            direction = {"allow": LESS, "deny": MORE}.get(rule.decision, CHANGED)
            text = f"rule {rule_id} removed: {_rule_text(rule)}"
            changes.append(Change("rule-removed", f"rule {rule_id}", text, direction))
    return changes


def _definitions_changed(old: Workflow, new: Workflow, rule: Rule) -> list[str]:
    """The definitions a rule reads (directly or through others) that differ between the
    two policies: the rule's text is the same, its condition is not."""
    if rule.when is None:
        return []
    was, now = _policy(old).document.definitions, _policy(new).document.definitions
    read: set[str] = set()
    todo = [rule.when]
    while todo:
        text = todo.pop()
        for name in set(re.findall(r"[A-Za-z_]\w*", cel_code(text))) - read:
            if name in was or name in now:
                read.add(name)
                todo.extend(t for t in (was.get(name), now.get(name)) if t)
    return sorted(n for n in read if was.get(n) != now.get(n))


def _rule_text(rule: Rule) -> str:
    kind, names = rule.targets()
    role = (
        f" ({rule.approver or 'approver'})"
        if rule.decision == "ask"
        else f" ({rule.owner})"
        if rule.owner
        else ""
    )
    when = f" when {' '.join(rule.when.split())}" if rule.when else ""
    return f"{rule.decision}{role} {kind} {', '.join(names)}{when}"


def _rule_edit(old: Workflow, new: Workflow, before: Rule, after: Rule) -> Change:
    detail: list[str] = []
    lower = higher = False
    if before.decision != after.decision:
        detail.append(f"decision {before.decision} → {after.decision}")
        lower |= SEVERITY[after.decision] < SEVERITY[before.decision]
        higher |= SEVERITY[after.decision] > SEVERITY[before.decision]
    allow = after.decision == "allow"
    if before.targets() != after.targets():
        was, now = set(before.targets()[1]), set(after.targets()[1])
        gained, lost = bool(now - was) or "*" in now, bool(was - now) or "*" in was
        detail.append(f"targets {', '.join(before.targets()[1])} → {', '.join(after.targets()[1])}")
        # Governing more calls is more permissive for an allow, more restrictive for a gate.
        lower |= gained if allow else lost
        higher |= lost if allow else gained
    redefined = _definitions_changed(old, new, after)
    if before.when != after.when or redefined:
        widened, narrowed, note = _compare_conditions(old, new, before, after)
        if before.when != after.when:
            detail.append(f"condition {_when(before)} → {_when(after)}: {note}")
        else:
            detail.append(f"condition reads changed definition(s) {', '.join(redefined)}: {note}")
        lower |= widened if allow else narrowed
        higher |= narrowed if allow else widened
    for setting in ("approver", "owner"):
        if getattr(before, setting) != getattr(after, setting):
            detail.append(f"{setting} {getattr(before, setting)} → {getattr(after, setting)}")
    if before.expires_in != after.expires_in:
        detail.append(f"expires_in {before.expires_in} → {after.expires_in}")
    if before.reason != after.reason:
        detail.append("reason reworded")
    text = f"rule {after.id} edited: {'; '.join(detail)}"
    return Change("rule-edited", f"rule {after.id}", text, _direction(lower, higher))


def _when(rule: Rule) -> str:
    return " ".join(rule.when.split()) if rule.when else "(always)"


def _compare_conditions(old: Workflow, new: Workflow, before: Rule, after: Rule) -> tuple[bool, bool, str]:
    """(widened, narrowed, what can be said) over every tool or exit the rule governs in both."""
    pairs = list(_subjects(old, new, after))
    if not pairs:
        return False, False, "not compared (it governs nothing both versions offer)"
    conditions = (
        Condition.of(before, definition_trees(_policy(old))),
        Condition.of(after, definition_trees(_policy(new))),
    )
    widened = narrowed = opaque = False
    for old_subject, new_subject in pairs:
        space = Space(new_subject, conditions)
        was, now = space.evaluate(conditions[0], old_subject), space.evaluate(conditions[1], new_subject)
        for a, c in zip(was, now, strict=True):
            if a is UNKNOWN or c is UNKNOWN:
                opaque |= a is not c
                continue
            widened |= c and not a
            narrowed |= a and not c
    if widened and narrowed:
        return True, True, "holds for some calls it did not, and no longer for others"
    if widened or narrowed:
        word = "widened: holds for more calls" if widened else "narrowed: holds for fewer calls"
        return widened, narrowed, word + (" (as far as can be analysed)" if opaque else "")
    return False, False, "cannot be compared (opaque)" if opaque else "holds for the same calls"


def _subjects(old: Workflow, new: Workflow, rule: Rule) -> list[tuple[Subject, Subject]]:
    """(old, new) subjects of every state offering a tool or exit the rule governs, in both."""
    kind, names = rule.targets()
    pairs = []
    for name, state in new.states.items():
        was = old.states.get(name)
        if not (isinstance(state, AgentState) and isinstance(was, AgentState)):
            continue
        if kind == "exit":
            for exit_name in state.exits:
                if exit_name in was.exits and ("*" in names or exit_name in names):
                    pairs.append((exit_subject(exit_name, name, old), exit_subject(exit_name, name, new)))
            continue
        for tool in state.tools:
            old_tool = was.tool(tool.name)
            if old_tool is not None and ("*" in names or tool.name in names):
                pairs.append((tool_subject(old_tool, name, old), tool_subject(tool, name, new)))
    return pairs


# -- decisions ---------------------------------------------------------------------------------------


def _decisions(old: Workflow, new: Workflow) -> list[Change]:
    grouped: dict[tuple[str, str, str, str, str], list[str]] = {}
    for name, state in new.states.items():
        was = old.states.get(name)
        if not (isinstance(state, AgentState) and isinstance(was, AgentState)):
            continue
        for tool in state.tools:
            old_tool = was.tool(tool.name)
            if old_tool is not None:
                pair = (tool_subject(old_tool, name, old), tool_subject(tool, name, new))
                for key in _changed_calls(old, new, *pair):
                    grouped.setdefault(key, []).append(name)
        for exit_name in state.exits:
            if exit_name in was.exits:
                pair = (exit_subject(exit_name, name, old), exit_subject(exit_name, name, new))
                for key in _changed_calls(old, new, *pair):
                    grouped.setdefault(key, []).append(name)
    changes = []
    for (target, region, before, after, direction), states in grouped.items():
        where = ", ".join(states)
        text = f"{target} in {where}, {region}: {before} → {after}"
        changes.append(Change("decision", target, text, direction))
    return changes


def _changed_calls(
    old: Workflow, new: Workflow, was: Subject, now: Subject
) -> list[tuple[str, str, str, str, str]]:
    """(target, region, old decision, new decision, direction) for each group of calls whose
    possible decisions differ."""
    old_rules = _policy(old).governing(was.kind, was.name)
    new_rules = _policy(new).governing(now.kind, now.name)
    old_conditions = [Condition.of(r, definition_trees(_policy(old))) for r in old_rules]
    new_conditions = [Condition.of(r, definition_trees(_policy(new))) for r in new_rules]
    space = Space(now, [*old_conditions, *new_conditions])
    old_values = [space.evaluate(c, was) for c in old_conditions]
    new_values = [space.evaluate(c, now) for c in new_conditions]
    old_default = _default_outcome(old, was)
    new_default = _default_outcome(new, now)
    groups: dict[tuple[Possible, Possible], list[int]] = {}
    for i in range(len(space.points)):
        before = possible(old_rules, [v[i] for v in old_values], old_default)
        after = possible(new_rules, [v[i] for v in new_values], new_default)
        if before != after:
            groups.setdefault((before, after), []).append(i)
    target = f"{now.kind} {now.name}" + (f" ({now.effect})" if now.kind == "tool" else "")
    found = []
    for (before, after), indexes in groups.items():
        region = "every proposal" if now.kind == "exit" else f"calls with {space.describe(indexes)}"
        region = "every call" if region == "calls with every call" else region
        found.append((target, region, before.text(), after.text(), _compare(before, after)))
    return found


def _default_outcome(workflow: Workflow, subject: Subject) -> Outcome:
    defaults = _policy(workflow).document.defaults
    key = "exit" if subject.kind == "exit" else subject.effect
    return Outcome(getattr(defaults, key), f"default:{key}")


def _compare(before: Possible, after: Possible) -> str:
    was = [SEVERITY[d] for d in before.decisions()]
    now = [SEVERITY[d] for d in after.decisions()]
    lower = min(now) < min(was) or max(now) < max(was)
    higher = min(now) > min(was) or max(now) > max(was)
    return _direction(lower, higher)


# -- recorded proposals ----------------------------------------------------------------------------


@dataclass
class Redecision:
    """A recorded proposal decided again under another version."""

    run_id: str
    step_id: str
    state: str
    proposal: dict[str, Any]
    recorded: Decision
    decision: Decision | None  # None: it could not be decided (see `note`)
    status: str  # "changed", "same", "not decidable", "not re-decided"
    note: str = ""

    @property
    def direction(self) -> str | None:
        if self.decision is None or self.status != "changed":
            return None
        was, now = SEVERITY[self.recorded.decision], SEVERITY[self.decision.decision]
        return _direction(now < was, now > was)

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "step_id": self.step_id,
            "state": self.state,
            "proposal": self.proposal,
            "recorded": _decision_dict(self.recorded),
            "decision": _decision_dict(self.decision) if self.decision else None,
            "status": self.status,
            "direction": self.direction,
            "note": self.note,
        }


def _decision_dict(decision: Decision) -> dict[str, Any]:
    values = {
        "decision": decision.decision,
        "rule_id": decision.rule_id,
        "reason_code": decision.reason_code,
        "matched": decision.matched,
    }
    role = decision.approver or decision.owner
    return values | ({"role": role} if role else {})


# Refusals made before policy on counters a re-decision cannot rebuild, and calls refused
# because their run waited on a ticket (`approval:TICKET`, tether.external: no policy decided
# them): kept as recorded.
_NOT_REDECIDED = ("runtime:budget", "runtime:loop", "runtime:parse", "approval:")


class _Replay:
    """A run's variables as they were before each entry: data, facts, history, and the values
    it had seen (provenance, with the tools' trust as `workflow` declares it)."""

    def __init__(self, workflow: Workflow) -> None:
        self.data: dict[str, Any] = {}
        self.facts: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.history_cut = 0  # earlier calls `history` lacks (a carry cut at its bound)
        tools = workflow.tools()
        self.seen = SeenValues(lambda name: tools[name].results if name in tools else "trusted")

    def apply(self, entry: Entry) -> None:
        self.seen.add_entry(entry)
        record = entry.body
        if isinstance(record, b.RunStarted):
            self.data = dict(record.input)
        elif isinstance(record, b.StepDone):
            self.data.update(record.update)
            self.facts.update(record.facts)
            if record.history is not None:  # calls carried in from a session's earlier runs
                self.history.extend(record.history.calls)
                self.history_cut += record.history.cut
        elif isinstance(record, b.Transition):
            self.data.update(record.proposal.update)
        elif isinstance(record, b.Answered) and record.fact is not None and record.answer is not None:
            self.facts[record.fact] = record.answer  # a fact from a person's answer
        elif isinstance(record, b.Executed):
            self.history.append(history_item(record, entry.step_id, entry.state))
            verification = record.verification or {}
            if not isinstance(record, b.VerificationFailed) and verification.get("ok"):
                self.facts.update(verification.get("facts") or {})


def redecide(run_id: str, entries: Sequence[Entry], workflow: Workflow) -> list[Redecision]:
    """Every proposal recorded in a run, decided again under `workflow` with the values of
    its time: arguments as recorded, data and facts rebuilt from the entries before it,
    resolver values as recorded with its decision (a call not recorded is not decidable)."""
    replay = _Replay(workflow)
    seen: set[str] = set()
    found = []
    for entry in entries:
        record = entry.body
        proposal = _proposal(record)
        if proposal is not None and entry.step_id and entry.step_id not in seen:
            seen.add(entry.step_id)
            recorded: Decision = record.decision  # type: ignore[union-attr]
            found.append(_redecide(run_id, entry, proposal, recorded, replay, workflow))
        replay.apply(entry)
    return found


def _proposal(record: Any) -> ToolCall | Exit | Finish | None:
    """The tool call or exit a governed step decided on (None for anything else)."""
    if not isinstance(record, b.StepRecord) or record.continuation:
        return None
    if isinstance(record, b.ToolStep):
        return record.proposal()
    if isinstance(record, b.Refused | b.AwaitingApproval | b.Transition) and not isinstance(
        record, b.AwaitingAnswer
    ):
        proposal = record.proposal
        return proposal if isinstance(proposal, ToolCall | Exit | Finish) else None
    return None


def _redecide(
    run_id: str,
    entry: Entry,
    proposal: ToolCall | Exit | Finish,
    recorded: Decision,
    replay: _Replay,
    workflow: Workflow,
) -> Redecision:
    state = entry.state or ""
    shown = as_dict(proposal)
    if recorded.rule_id.startswith(_NOT_REDECIDED):
        note = f"refused before policy ({recorded.rule_id}); not decided again"
        return Redecision(run_id, entry.step_id or "", state, shown, recorded, None, "not re-decided", note)
    missing: list[str] = []
    try:
        decision = _decide(
            workflow,
            state,
            proposal,
            replay,
            run_id,
            _recorded_resolvers(workflow, recorded, missing),
            _recorded_now(recorded, missing),
        )
    except LookupError as exc:
        return Redecision(
            run_id, entry.step_id or "", state, shown, recorded, None, "not decidable", str(exc)
        )
    if missing:
        note = f"resolver call(s) not recorded with the decision: {', '.join(missing)}"
        return Redecision(run_id, entry.step_id or "", state, shown, recorded, None, "not decidable", note)
    same = (decision.decision, decision.rule_id) == (recorded.decision, recorded.rule_id)
    status = "same" if same else "changed"
    return Redecision(run_id, entry.step_id or "", state, shown, recorded, decision, status)


class _NotRecorded(Exception):
    pass


def _recorded_resolvers(
    workflow: Workflow, recorded: Decision, missing: list[str]
) -> dict[str, Callable[..., Any]]:
    """Resolvers answering from the values recorded with the decision, never live."""

    def resolver(name: str) -> Callable[..., Any]:
        def call(*args: Any) -> Any:
            key = f"{name}({', '.join(json.dumps(a, default=str) for a in args)})"
            if key not in recorded.resolved:
                missing.append(key)
                raise _NotRecorded(key)
            return recorded.resolved[key]

        return call

    return {name: resolver(name) for name in workflow.resolvers}


def _recorded_now(recorded: Decision, missing: list[str]) -> Callable[[], Any]:
    """The decision's time as recorded with it (`resolved["now"]`), never the clock's now."""

    def now() -> Any:
        if "now" not in recorded.resolved:
            missing.append("now")
            raise _NotRecorded("now")
        return datetime.fromisoformat(recorded.resolved["now"])

    return now


def _decide(
    workflow: Workflow,
    state_name: str,
    proposal: ToolCall | Exit | Finish,
    replay: _Replay,
    run_id: str,
    resolvers: dict[str, Callable[..., Any]],
    now: Callable[[], Any] | None = None,
) -> Decision:
    state = workflow.states.get(state_name)
    if not isinstance(state, AgentState):
        raise LookupError(f"state {state_name} is not an agent state of {workflow.name} {workflow.version}")
    variables: dict[str, Any] = {
        "data": replay.data,
        "facts": replay.facts,
        "history": replay.history,
        "run": {"id": run_id, "workflow": workflow.name, "version": workflow.version, "state": state_name},
        "now": now,
    }
    if replay.history_cut:
        variables[HISTORY_CUT] = replay.history_cut
    policy = _policy(workflow)
    if isinstance(proposal, ToolCall):
        tool = state.tool(proposal.tool)
        if tool is None:
            return _out_of_scope(workflow, state, proposal.tool)
        try:
            args = tool.validate(proposal.args)
        except ArgumentError as exc:
            return runtime_refusal("arguments", ReasonCode.INVALID_ARGUMENTS, str(exc))
        variables |= {"args": args.values, "tool": tool.info}
        return policy.decide(
            kind="tool",
            name=tool.name,
            effect=tool.effect,
            variables=variables,
            resolvers=resolvers,
            provenance=replay.seen.trace,
        )
    name = proposal.exit if isinstance(proposal, Exit) else "finish"
    if name not in state.exits:
        reason = f"exit {name!r} is not allowed in state {state_name!r}"
        return runtime_refusal("scope", ReasonCode.OUT_OF_SCOPE, reason)
    variables |= {"args": {"exit": name, "update": proposal.update}, "tool": {"name": name, "effect": "exit"}}
    return policy.decide(
        kind="exit",
        name=name,
        effect="exit",
        variables=variables,
        resolvers=resolvers,
        provenance=replay.seen.trace,
    )


def _out_of_scope(workflow: Workflow, state: AgentState, name: str) -> Decision:
    code = ReasonCode.OUT_OF_SCOPE if name in workflow.tools() else ReasonCode.UNKNOWN_TOOL
    return runtime_refusal("scope", code, f"tool {name!r} is not in state {state.name!r}'s envelope")
