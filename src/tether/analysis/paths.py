"""The state graph of a workflow under its policy: which edges a run can take, and the
paths, cycles and dead ends that follow.

An edge is a deterministic step's `next`, an agent state's exit, or a handoff it routes to
another agent state. An exit that policy
always denies from that state (a deny rule that holds for every proposal, or a `deny`
default no rule can override) is *closed*: no run takes it. Paths are sequences of states
from `start` over open edges; the path named for a state is a shortest one.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from tether.analysis.conditions import (
    Condition,
    Outcome,
    Possible,
    Space,
    definition_trees,
    exit_subject,
    possible,
)
from tether.policy import Policy
from tether.workflow import AgentState, Step, Terminal, Workflow


@dataclass(frozen=True)
class Edge:
    source: str
    target: str
    exit: str | None  # None for a deterministic step's `next`
    decision: Possible | None = None  # what policy may decide on the exit

    @property
    def closed(self) -> bool:
        return self.decision is not None and self.decision.decisions() == {"deny"}

    @property
    def closed_by(self) -> str | None:
        return self.decision.base.rule if self.decision is not None and self.closed else None


class StateGraph:
    def __init__(self, workflow: Workflow, policy: Policy | None = None) -> None:
        self.workflow = workflow
        self.policy = policy or workflow.policy or Policy.default()
        self.edges: list[Edge] = []
        for state in workflow.states.values():
            if isinstance(state, Step):
                self.edges.extend(Edge(state.name, target, None) for target in state.next)
            elif isinstance(state, AgentState):
                for name, target in state.exits.items():
                    self.edges.append(Edge(state.name, target, name, self.exit_decision(state.name, name)))
                # A handoff routed to another agent state is a way there, as an exit is.
                self.edges.extend(Edge(state.name, t, None) for t in workflow.handoff_states(state))
        self.paths = self._shortest_paths()
        self.finishing = self._finishing()

    def exit_decision(self, state: str, name: str) -> Possible:
        """What policy may decide when a model proposes exit `name` in `state`."""
        subject = exit_subject(name, state, self.workflow)
        rules = self.policy.governing("exit", name)
        conditions = [Condition.of(r, definition_trees(self.policy)) for r in rules]
        space = Space(subject, conditions)
        values = [space.evaluate(c)[0] for c in conditions]
        default = self.policy.document.defaults.exit
        return possible(rules, values, Outcome(default, "default:exit"))

    def open_edges(self, source: str) -> list[Edge]:
        return [e for e in self.edges if e.source == source and not e.closed]

    def _shortest_paths(self) -> dict[str, list[str]]:
        start = self.workflow.start
        paths = {start: [start]}
        queue = deque([start])
        while queue:
            state = queue.popleft()
            for edge in self.open_edges(state):
                if edge.target not in paths:
                    paths[edge.target] = [*paths[state], edge.target]
                    queue.append(edge.target)
        return paths

    def _finishing(self) -> set[str]:
        """States from which some terminal state is reachable over open edges."""
        found = {n for n, s in self.workflow.states.items() if isinstance(s, Terminal)}
        changed = True
        while changed:
            changed = False
            for edge in self.edges:
                if not edge.closed and edge.target in found and edge.source not in found:
                    found.add(edge.source)
                    changed = True
        return found

    def reachable(self, state: str) -> bool:
        return state in self.paths

    def cycles(self) -> list[list[str]]:
        """The reachable strongly connected parts of the graph that hold a cycle, each as its
        states in definition order (Tarjan's algorithm over open edges)."""
        order = [n for n in self.workflow.states if self.reachable(n)]
        index: dict[str, int] = {}
        low: dict[str, int] = {}
        stack: list[str] = []
        on_stack: set[str] = set()
        found: list[list[str]] = []

        def connect(node: str) -> None:
            index[node] = low[node] = len(index)
            stack.append(node)
            on_stack.add(node)
            for edge in self.open_edges(node):
                if edge.target not in index:
                    connect(edge.target)
                    low[node] = min(low[node], low[edge.target])
                elif edge.target in on_stack:
                    low[node] = min(low[node], index[edge.target])
            if low[node] == index[node]:
                part = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    part.append(member)
                    if member == node:
                        break
                looping = len(part) > 1 or any(e.target == node for e in self.open_edges(node))
                if looping:
                    found.append([n for n in order if n in part])

        for node in order:
            if node not in index:
                connect(node)
        return sorted(found, key=lambda part: order.index(part[0]))

    def cycle_path(self, part: list[str]) -> list[str]:
        """One cycle through the first state of a strongly connected part, as a state sequence."""
        first, members = part[0], set(part)
        paths = {first: [first]}
        queue = deque([first])
        while queue:
            state = queue.popleft()
            for edge in self.open_edges(state):
                if edge.target == first:
                    return [*paths[state], first]
                if edge.target in members and edge.target not in paths:
                    paths[edge.target] = [*paths[state], edge.target]
                    queue.append(edge.target)
        return [first, first]
