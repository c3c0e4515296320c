"""Workflow definitions: states, agent envelopes, budgets, and the checks run at load.

A workflow fixes the allowed path. Deterministic `Step`s are Python functions that return
`Next`; `AgentState`s let a model propose inside a declared envelope (tools, exits,
budget, escalation); `Terminal`s end the run. `Workflow.validate()` refuses a broken
definition with a message naming what is wrong, before anything runs.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from tether.budget import Budget, Limits, RunBudget
from tether.errors import DefinitionError
from tether.hashing import fingerprint
from tether.models.protocol import ExitSpec, ToolSpec
from tether.paths import realpath
from tether.policy import Policy, PolicyDocument, Rule
from tether.tools import Tool

if TYPE_CHECKING:  # skills build agent states; a state only keeps the skill it was made from
    from tether.skills import Skill

# Resolvers every workflow has: part of tether, so not part of a workflow's hash.
BUILTIN_RESOLVERS: dict[str, Callable[..., Any]] = {"realpath": realpath}


@dataclass(frozen=True)
class Next:
    """What a deterministic step returns: the next state, data to merge, facts established.

    `history` (rarely given) carries tool calls made elsewhere into the run's `history`, ahead
    of its own, each as `history` holds a call (`tether.run.history_item`), with the run each
    was executed in (`history_runs`, same length) and how many earlier ones were left out
    (`history_cut`: rules reading `history` then refuse). The step's entry records them
    (`step_done`'s `history`); the MCP gateway's `carry` step carries a session's calls.
    """

    to: str
    update: dict[str, Any] = field(default_factory=dict)
    facts: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)
    history_runs: list[str] = field(default_factory=list)
    history_cut: int = 0


StepFn = Callable[[dict[str, Any]], "Next | Awaitable[Next]"]
OnFailure = Literal["escalate", "fail"]


@dataclass(frozen=True)
class Step:
    """A deterministic state: `fn(data) -> Next`, allowed to go only to `next`.

    `checkpoint=False` writes this step's record together with the next checkpoint
    instead of on its own; a crash in between re-runs it (it is deterministic). Agent
    states always checkpoint every governed step: their decisions are never held back.
    """

    name: str
    fn: StepFn
    next: tuple[str, ...]
    checkpoint: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "next", tuple(self.next))


@dataclass(frozen=True)
class AgentState:
    """A state in which a model proposes steps inside a declared envelope."""

    name: str
    instructions: str
    tools: tuple[Tool, ...]
    exits: dict[str, str]
    budget: Budget = field(default_factory=Budget)
    escalate_to: str = "operator"
    handoff_to: tuple[str, ...] = ()
    on_budget_exhausted: OnFailure = "escalate"
    on_verification_failed: Literal["retry", "escalate", "fail"] = "retry"
    # `rollback`: a run that fails in this state runs the compensations of its effects.
    on_failure: Literal["stop", "rollback"] = "stop"
    # What a policy `defer` to a person hands over: the run (`hand_off`: it stops, handed
    # off, until the person picks it up), or only the call (`continue`: the handoff is
    # recorded with everything it carries, the call is not run, and the run goes on: an MCP
    # gateway's session). A defer routed to an agent state is received there either way.
    on_defer: Literal["hand_off", "continue"] = "hand_off"
    # The longest a ticket asked here stays open, whatever the policy's `expires_in` (an MCP
    # gateway's --approval-timeout: its caller cannot wait longer). None: as the policy says.
    max_ticket_seconds: float | None = None
    # Facts a person's answer may establish here: name -> what it is. A question proposing
    # `fact: NAME` sets `facts.NAME` to the answer, its source recorded (the answer entry).
    facts_from_answers: Mapping[str, str] = field(default_factory=dict)
    # The skill this state is made from (`uses: skills/NAME@VERSION`): its inputs are checked
    # when a visit begins, its output contract on every success exit (tether.skills).
    skill: Skill | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "tools", tuple(self.tools))
        object.__setattr__(self, "handoff_to", tuple(self.handoff_to))

    def tool(self, name: str) -> Tool | None:
        return self._tools_by_name().get(name)

    def _tools_by_name(self) -> dict[str, Tool]:
        found: dict[str, Tool] | None = self.__dict__.get("_by_name")
        if found is None:
            found = {t.name: t for t in self.tools}
            object.__setattr__(self, "_by_name", found)
        return found

    def model_specs(self) -> tuple[list[ToolSpec], list[ExitSpec]]:
        """What a model is offered here: each tool with its schema, each exit (made once)."""
        specs: tuple[list[ToolSpec], list[ExitSpec]] | None = self.__dict__.get("_specs")
        if specs is None:
            specs = (
                [
                    ToolSpec(
                        name=t.name, description=t.description, effect=t.effect, parameters=t.json_schema()
                    )
                    for t in self.tools
                ],
                [ExitSpec(name=n, target=t) for n, t in self.exits.items()],
            )
            object.__setattr__(self, "_specs", specs)
        return specs


@dataclass(frozen=True)
class Terminal:
    """An end state; `failed=True` marks the run failed rather than completed."""

    name: str
    failed: bool = False


State = Step | AgentState | Terminal


class Workflow:
    """A named, versioned graph of states. Construct, then `validate()` (loaders do)."""

    def __init__(
        self,
        name: str,
        version: str,
        start: str,
        states: list[State],
        *,
        policy: Policy | None = None,
        resolvers: Mapping[str, Callable[..., Any]] | None = None,
        budget: RunBudget | None = None,
        limits: Limits | None = None,
        description: str = "",
    ) -> None:
        self.name = name
        self.version = str(version)
        self.start = start
        self.description = description
        # Read-only lookups policy conditions may call: `fn(ctx: ToolContext, *args)`; the
        # built-in ones (`realpath`) unless the workflow registers its own under their names,
        # and those of the skills its states are made from.
        self.resolvers: dict[str, Callable[..., Any]] = {
            **BUILTIN_RESOLVERS,
            **(resolvers or {}),
            **_skill_resolvers(name, states, resolvers or {}),
        }
        self.budget = budget or RunBudget()
        self.limits = limits or Limits()
        self._state_list = list(states)
        self.states: dict[str, State] = {s.name: s for s in states}
        self.policy = policy
        self._hash: str | None = None
        self.validate()

    def __repr__(self) -> str:
        return f"Workflow({self.name!r}, version={self.version!r})"

    @property
    def policy(self) -> Policy | None:
        return self._policy

    @policy.setter
    def policy(self, policy: Policy | None) -> None:
        """The policy runs are decided by: the one given, with the policy fragment of each
        skill a state is made from merged in (rules namespaced by skill), so the policy hash
        covers them whichever policy file the workflow is run with."""
        fragments = [
            r for s in self._state_list if isinstance(s, AgentState) and s.skill for r in s.skill.rules
        ]
        self._policy = _with_rules(policy, fragments) if fragments else policy

    def tools(self) -> dict[str, Tool]:
        return {t.name: t for s in self.states.values() if isinstance(s, AgentState) for t in s.tools}

    def compensations(self) -> dict[str, Tool]:
        """The tools that undo its tools' effects in a rollback (governed by policy too)."""
        return {
            t.compensation.tool.name: t.compensation.tool for t in self.tools().values() if t.compensation
        }

    def successors(self, state: State) -> tuple[str, ...]:
        if isinstance(state, Step):
            return state.next
        if isinstance(state, AgentState):
            return (*state.exits.values(), *self.handoff_states(state))
        return ()

    def handoff_states(self, state: AgentState) -> tuple[str, ...]:
        """The states of this workflow an agent state's handoffs are routed to: the entries
        of its `handoff_to` that name a state (the others name people or roles)."""
        return tuple(h for h in state.handoff_to if h in self.states)

    def validate(self) -> None:
        """Refuse a broken definition; each message names the offending part."""
        _check_names(self.name, self._state_list)
        if self.start not in self.states:
            raise DefinitionError(f"workflow {self.name!r}: start state {self.start!r} is not defined")
        for state in self._state_list:
            for target in self.successors(state):
                if target not in self.states:
                    raise DefinitionError(
                        f"workflow {self.name!r}: state {state.name!r} leads to {target!r}, "
                        "which is not a state"
                    )
            if isinstance(state, AgentState):
                _check_envelope(self.name, state)
                self._check_handoff_routes(state)
        self._check_reachability()
        self._check_skill_scope()
        seen: dict[str, Tool] = {}
        for t in (t for s in self._state_list if isinstance(s, AgentState) for t in s.tools):
            if seen.setdefault(t.name, t) is not t and seen[t.name].fn is not t.fn:
                raise DefinitionError(f"workflow {self.name!r}: two different tools are named {t.name!r}")
        if self.policy is not None:
            self.policy.check_targets(self.tools() | self.compensations(), self.exit_names(), self.resolvers)

    def _check_skill_scope(self) -> None:
        """A skill's rules govern its tools and exits by name, so no other state may offer
        them: the fragment would govern that state too."""
        agents = [s for s in self._state_list if isinstance(s, AgentState)]
        for state in (s for s in agents if s.skill is not None):
            assert state.skill is not None
            names = {("tool", t.name) for t in state.tools} | {("exit", e) for e in state.exits}
            for other in agents:
                if other is state:
                    continue
                offered = {("tool", t.name) for t in other.tools} | {("exit", e) for e in other.exits}
                shared = names & offered
                if shared:
                    listed = ", ".join(f"{kind} {name}" for kind, name in sorted(shared))
                    raise DefinitionError(
                        f"workflow {self.name!r}: state {other.name!r} offers {listed} of skill "
                        f"{state.skill.ref} (state {state.name!r}); a skill's policy governs its tools "
                        "and exits by name, so only the skill's state may offer them"
                    )

    def _check_handoff_routes(self, state: AgentState) -> None:
        for target in self.handoff_states(state):
            if target == state.name or not isinstance(self.states[target], AgentState):
                kind = type(self.states[target]).__name__
                what = "itself" if target == state.name else f"{kind} {target!r}"
                raise DefinitionError(
                    f"workflow {self.name!r}, agent state {state.name!r}: handoff_to names {what}; "
                    "a handoff is routed only to another agent state (or names a person or role)"
                )

    def skills(self) -> dict[str, str]:
        """The skills the states are made from: `NAME@VERSION` -> the skill's hash."""
        return {s.skill.ref: s.skill.hash for s in self._state_list if isinstance(s, AgentState) and s.skill}

    def exit_names(self) -> set[str]:
        return {e for s in self.states.values() if isinstance(s, AgentState) for e in s.exits}

    def _check_reachability(self) -> None:
        reachable, frontier = {self.start}, [self.start]
        while frontier:
            for target in self.successors(self.states[frontier.pop()]):
                if target not in reachable:
                    reachable.add(target)
                    frontier.append(target)
        terminals = [s.name for s in self._state_list if isinstance(s, Terminal)]
        if not terminals:
            raise DefinitionError(f"workflow {self.name!r}: no terminal state; a run could never end")
        for state in self._state_list:
            if state.name not in reachable:
                kind = "terminal state" if isinstance(state, Terminal) else "state"
                raise DefinitionError(
                    f"workflow {self.name!r}: {kind} {state.name!r} is unreachable from start {self.start!r}"
                )

    def describe(self) -> dict[str, Any]:
        """A JSON description of the definition; its fingerprint is the workflow hash."""
        return {
            "name": self.name,
            "version": self.version,
            "start": self.start,
            "states": [_describe_state(s) for s in self._state_list],
            "budget": self.budget.model_dump(),
            **({"limits": self.limits.model_dump()} if self.limits != Limits() else {}),
            "resolvers": {
                n: {"fn": _ref(f), "source": _source_hash(f)}
                for n, f in sorted(self.resolvers.items())
                if BUILTIN_RESOLVERS.get(n) is not f  # tether's own, not the definition's
            },
        }

    @property
    def hash(self) -> str:
        """Computed once: reading sources and schemas costs milliseconds."""
        if self._hash is None:
            self._hash = fingerprint(self.describe())
        return self._hash


def _skill_resolvers(
    workflow: str, states: list[State], own: Mapping[str, Callable[..., Any]]
) -> dict[str, Callable[..., Any]]:
    found: dict[str, Callable[..., Any]] = {}
    for state in states:
        if not isinstance(state, AgentState) or state.skill is None:
            continue
        for name, fn in state.skill.resolvers.items():
            known = found.get(name, own.get(name))
            if known is not None and known is not fn:
                raise DefinitionError(
                    f"workflow {workflow!r}: resolver {name!r} of skill {state.skill.ref} is not the "
                    "resolver the workflow (or another skill) registers under that name"
                )
            found[name] = fn
    return found


def _with_rules(policy: Policy | None, rules: list[Rule]) -> Policy:
    """`policy` with `rules` appended (those it already holds, identical, are not repeated)."""
    document = policy.document if policy is not None else PolicyDocument()
    held = {r.id: r for r in document.rules}
    for rule in rules:
        if rule.id in held and held[rule.id] != rule:
            raise DefinitionError(
                f"policy rule {rule.id!r} is defined twice (by a skill and by the workflow)"
            )
    added = [r for r in rules if r.id not in held]
    if not added:
        assert policy is not None
        return policy
    merged = document.model_copy(update={"rules": [*document.rules, *added]})
    source = policy.source if policy is not None else "<no policy file>"
    skills = sorted({r.id.partition("/")[0] for r in added})
    return Policy(
        merged,
        f"{source} + skill(s) {', '.join(skills)}",
        **({"evaluation_budget": policy.evaluation_budget} if policy is not None else {}),
    )


def _check_names(workflow: str, states: list[State]) -> None:
    names: set[str] = set()
    for state in states:
        if not state.name or not isinstance(state.name, str):
            raise DefinitionError(f"workflow {workflow!r}: a state has no name")
        if state.name in names:
            raise DefinitionError(f"workflow {workflow!r}: duplicate state name {state.name!r}")
        names.add(state.name)


def _check_envelope(workflow: str, state: AgentState) -> None:
    where = f"workflow {workflow!r}, agent state {state.name!r}"
    if not state.exits:
        raise DefinitionError(f"{where}: declares no exits; the model could never leave it")
    names = [t.name for t in state.tools]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DefinitionError(f"{where}: duplicate tool name(s) {', '.join(duplicates)}")
    for t in state.tools:
        if not isinstance(t, Tool):
            raise DefinitionError(f"{where}: {t!r} is not a tool (decorate it with @tether.tool)")


def _ref(fn: Any) -> str:
    return f"{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', repr(fn))}"


def _source_hash(fn: Any) -> str | None:
    try:
        try:
            return _hash_of_source(fn)
        except TypeError:  # an unhashable callable: its source is read each time
            return fingerprint(inspect.getsource(fn))
    except (OSError, TypeError):
        return None


@functools.lru_cache(maxsize=4096)
def _hash_of_source(fn: Any) -> str:
    """The hash of a function's source as first read in this process: the code it runs does
    not change after that (reading the file again costs ~100 µs per function per run)."""
    return fingerprint(inspect.getsource(fn))


def _describe_state(state: State) -> dict[str, Any]:
    if isinstance(state, Step):
        return {
            "kind": "step",
            "name": state.name,
            "fn": _ref(state.fn),
            "source": _source_hash(state.fn),
            "next": list(state.next),
            "checkpoint": state.checkpoint,
        }
    if isinstance(state, AgentState):
        return {
            "kind": "agent",
            "name": state.name,
            "instructions": state.instructions,
            "tools": [
                {
                    "name": t.name,
                    "fn": _ref(t.fn),
                    "source": _source_hash(t.fn),
                    "effect": t.effect,
                    "idempotent": t.idempotent,
                    "verifier": _ref(t.verifier) if t.verifier else None,
                    "schema": t.json_schema(),
                    **_provenance_declarations(t),
                    # Only when declared: workflows without compensations keep their hash.
                    **({"compensate": t.compensation.describe()} if t.compensation else {}),
                }
                for t in state.tools
            ],
            "exits": state.exits,
            "budget": state.budget.model_dump(),
            "escalate_to": state.escalate_to,
            "handoff_to": list(state.handoff_to),
            "on_budget_exhausted": state.on_budget_exhausted,
            "on_verification_failed": state.on_verification_failed,
            **({"on_failure": state.on_failure} if state.on_failure != "stop" else {}),
            **({"on_defer": state.on_defer} if state.on_defer != "hand_off" else {}),
            **({"max_ticket_seconds": state.max_ticket_seconds} if state.max_ticket_seconds else {}),
            # A skill's version and hash: part of the workflow hash, so every run records them.
            **({"skill": state.skill.identity()} if state.skill is not None else {}),
            **({"facts_from_answers": dict(state.facts_from_answers)} if state.facts_from_answers else {}),
        }
    return {"kind": "terminal", "name": state.name, "failed": state.failed}


def _provenance_declarations(tool: Tool) -> dict[str, Any]:
    """A tool's provenance declarations, where they differ from its kind's defaults (so that
    workflows that declare none keep their hash, and the runs pinned to it)."""
    declared: dict[str, Any] = {}
    if tool.results != type(tool).results:
        declared["results"] = tool.results
    if tool.security is not None:
        declared["security"] = list(tool.security)
    if tool.sensitive:
        declared["sensitive"] = True
    if tool.sensitive_fields:  # what is kept out of the record (tether.sensitive)
        declared["sensitive_fields"] = sorted(tool.sensitive_fields)
    return declared
