"""`tether graph`: a workflow drawn as Mermaid text or a self-contained SVG.

Deterministic steps, agent states and terminal states are drawn apart; each agent state
shows its envelope (tools with their effects and the gates policy puts on them, exits,
budget, escalation owner); exits show the ask, defer and deny rules on them, and an exit
policy always denies is dashed. A run's path (from its `run_started`, `step_done` and
`transition` entries) can be highlighted. The SVG is laid out here, in layers from the
start state (no graphviz); the same input always gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from html import escape

from tether.analysis.paths import Edge, StateGraph
from tether.journal import Entry
from tether.policy import Rule
from tether.timeline import transitions
from tether.tools import Tool
from tether.workflow import AgentState, Step, Terminal, Workflow


@dataclass
class NodeView:
    name: str
    kind: str  # "step", "agent", "terminal", "failed"
    lines: list[str]  # the first is the title
    visited: bool = False


@dataclass
class EdgeView:
    source: str
    target: str
    label: str
    closed: bool = False
    taken: int = 0


@dataclass
class RunPath:
    """The states a run visited and the edges it took (with how many times)."""

    run_id: str
    visited: list[str] = field(default_factory=list)
    taken: dict[tuple[str, str, str | None], int] = field(default_factory=dict)


def run_path(run_id: str, entries: list[Entry]) -> RunPath:
    start, moves = transitions(entries)
    path = RunPath(run_id, [start] if start else [])
    for move in moves:
        path.taken[move] = path.taken.get(move, 0) + 1
        path.visited.append(move[1])
    return path


def views(workflow: Workflow, run: RunPath | None = None) -> tuple[list[NodeView], list[EdgeView]]:
    graph = StateGraph(workflow)
    visited = set(run.visited) if run else set()
    nodes = [
        NodeView(name, _kind(state), _lines(graph, state), name in visited)
        for name, state in workflow.states.items()
    ]
    edges = [
        EdgeView(
            e.source,
            e.target,
            _edge_label(graph, e),
            e.closed,
            run.taken.get((e.source, e.target, e.exit), 0) if run else 0,
        )
        for e in graph.edges
    ]
    return nodes, edges


def _kind(state: Step | AgentState | Terminal) -> str:
    if isinstance(state, Terminal):
        return "failed" if state.failed else "terminal"
    return "agent" if isinstance(state, AgentState) else "step"


def _lines(graph: StateGraph, state: Step | AgentState | Terminal) -> list[str]:
    if isinstance(state, Terminal):
        return [state.name, "terminal, failed" if state.failed else "terminal"]
    if isinstance(state, Step):
        fn = state.fn
        return [state.name, f"step {getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}"]
    lines = [state.name, "agent"]
    lines.extend(f"• {t.name} ({_tool_note(graph, t)})" for t in state.tools)
    if not state.tools:
        lines.append("no tools")
    lines.append(f"exits: {', '.join(state.exits)}")
    lines.append(f"budget: {_budget(state)}")
    owners = [f"escalates to {state.escalate_to}"]
    if state.handoff_to:
        owners.append(f"hands off to {', '.join(state.handoff_to)}")
    lines.append("; ".join(owners))
    return lines


def _tool_note(graph: StateGraph, tool: Tool) -> str:
    parts = [tool.effect + (", verified" if tool.verifier is not None else "")]
    gates = _gates(graph.policy.governing("tool", tool.name))
    if gates:
        parts.append(gates)
    return "; ".join(parts)


def _gates(rules: list[Rule]) -> str:
    """The ask, defer and deny rules on a tool or exit, briefly: `ask supervisor, deny`."""
    found: dict[str, None] = {}
    for rule in rules:
        if rule.decision == "ask":
            found[f"ask {rule.approver or 'approver'}"] = None
        elif rule.decision == "defer":
            found[f"defer to {rule.owner}"] = None
        elif rule.decision == "deny":
            found["deny" if rule.when else "always deny"] = None
    return ", ".join(found)


def _budget(state: AgentState) -> str:
    budget = state.budget
    parts = [f"{budget.max_steps} steps", f"{budget.max_tool_calls} tool calls", f"{budget.max_seconds:g} s"]
    if budget.max_tokens is not None:
        parts.append(f"{budget.max_tokens} tokens")
    if budget.max_cost is not None:
        parts.append(f"cost {budget.max_cost:g}")
    return ", ".join(parts)


def _edge_label(graph: StateGraph, edge: Edge) -> str:
    if edge.exit is None:
        return ""
    if edge.closed:
        return f"{edge.exit}: always denied ({edge.closed_by})"
    rules = [r for r in graph.policy.governing("exit", edge.exit) if r.decision != "allow"]
    gates = [f"{r.decision}{_role(r)} by {r.id}" for r in rules]
    return edge.exit + (f": {'; '.join(gates)}" if gates else "")


def _role(rule: Rule) -> str:
    if rule.decision == "ask":
        return f" {rule.approver or 'approver'}"
    return f" to {rule.owner}" if rule.decision == "defer" else ""


# -- Mermaid -------------------------------------------------------------------------------------

_SHAPES = {"step": ('["', '"]'), "agent": ('("', '")'), "terminal": ('(["', '"])'), "failed": ('(["', '"])')}
_CLASSES = {
    "step": "fill:#e8eefc,stroke:#3b5bdb,color:#1c2a4a",
    "agent": "fill:#fff4e0,stroke:#d9480f,color:#4a2a00",
    "terminal": "fill:#e6f4ea,stroke:#2b8a3e,color:#123d1f",
    "failed": "fill:#fdecea,stroke:#c92a2a,color:#4a1010",
    "visited": "stroke:#7048e8,stroke-width:4px",
}
HIGHLIGHT = "#7048e8"


def _mermaid_text(text: str) -> str:
    replacements = {"&": "#amp;", '"': "#quot;", "<": "#lt;", ">": "#gt;"}
    return "".join(replacements.get(c, c) for c in text)


def mermaid(workflow: Workflow, run: RunPath | None = None) -> str:
    nodes, edges = views(workflow, run)
    ids = {n.name: f"s{i}" for i, n in enumerate(nodes)}
    out = ["flowchart TD", "  start((start))"]
    for node in nodes:
        opening, closing = _SHAPES[node.kind]
        title, *rest = (_mermaid_text(line) for line in node.lines)
        label = "<br/>".join([f"<b>{title}</b>", *rest])
        out.append(f"  {ids[node.name]}{opening}{label}{closing}:::{node.kind}")
    links = [f"  start --> {ids[workflow.start]}"]
    for edge in edges:
        arrow = "-.->" if edge.closed else "-->"
        label = f'|"{_mermaid_text(edge.label)}"|' if edge.label else ""
        links.append(f"  {ids[edge.source]} {arrow}{label} {ids[edge.target]}")
    out.extend(links)
    out.extend(f"  classDef {name} {style}" for name, style in _CLASSES.items())
    visited = [ids[n.name] for n in nodes if n.visited]
    if visited:
        out.append(f"  class {','.join(visited)} visited")
    taken = [str(i + 1) for i, e in enumerate(edges) if e.taken]
    if run is not None and run.visited and run.visited[0] == workflow.start:
        taken.insert(0, "0")
    if taken:
        out.append(f"  linkStyle {','.join(taken)} stroke:{HIGHLIGHT},stroke-width:4px")
    return "\n".join(out) + "\n"


# -- SVG -----------------------------------------------------------------------------------------

CHAR_WIDTH = 7.2  # 12px monospace
LINE_HEIGHT = 16.0
PAD = 10.0
GAP_X = 90.0
GAP_Y = 70.0
MARGIN = 30.0
LOOP_SPACE = 60.0  # to the right of the widest layer, for edges going back up
_FILL = {
    "step": ("#e8eefc", "#3b5bdb"),
    "agent": ("#fff4e0", "#d9480f"),
    "terminal": ("#e6f4ea", "#2b8a3e"),
    "failed": ("#fdecea", "#c92a2a"),
}


@dataclass
class _Box:
    node: NodeView
    x: float = 0.0
    y: float = 0.0

    @property
    def width(self) -> float:
        return max(len(line) for line in self.node.lines) * CHAR_WIDTH + 2 * PAD

    @property
    def height(self) -> float:
        return len(self.node.lines) * LINE_HEIGHT + 2 * PAD


def _layers(workflow: Workflow, edges: list[EdgeView]) -> list[list[str]]:
    """States by their distance from start (any edge); the definition order within a layer."""
    depth = {workflow.start: 0}
    frontier = [workflow.start]
    while frontier:
        following = []
        for state in frontier:
            for edge in edges:
                if edge.source == state and edge.target not in depth:
                    depth[edge.target] = depth[state] + 1
                    following.append(edge.target)
        frontier = following
    last = max(depth.values(), default=0) + 1
    layers: list[list[str]] = [[] for _ in range(last + 1)]
    for name in workflow.states:
        layers[depth.get(name, last)].append(name)
    return [layer for layer in layers if layer]


def _n(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def svg(workflow: Workflow, run: RunPath | None = None) -> str:
    nodes, edges = views(workflow, run)
    boxes = {n.name: _Box(n) for n in nodes}
    layers = _layers(workflow, edges)
    widths = [sum(boxes[n].width for n in layer) + GAP_X * (len(layer) - 1) for layer in layers]
    inner = max(widths, default=0.0)
    y = MARGIN + 50.0  # room for the start marker
    for layer, width in zip(layers, widths, strict=True):
        x = MARGIN + (inner - width) / 2
        for name in layer:
            boxes[name].x, boxes[name].y = x, y
            x += boxes[name].width + GAP_X
        y += max(boxes[n].height for n in layer) + GAP_Y
    total_width = max(MARGIN * 2 + inner + LOOP_SPACE * (1 + _back_edges(edges, boxes)), _legend_width(run))
    legend_y = y - GAP_Y + 30.0
    total_height = legend_y + 30.0
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{_n(total_width)}" height="{_n(total_height)}" '
        f'viewBox="0 0 {_n(total_width)} {_n(total_height)}" font-family="monospace" font-size="12">',
        f"<title>{escape(workflow.name)} {escape(workflow.version)}</title>",
        "<defs>",
        _marker("arrow", "#555"),
        _marker("arrow-taken", HIGHLIGHT),
        "</defs>",
        '<rect width="100%" height="100%" fill="#ffffff"/>',
    ]
    parts.extend(_start(boxes[workflow.start], run is not None and bool(run.visited)))
    back = 0
    for edge in edges:
        source, target = boxes[edge.source], boxes[edge.target]
        if target.y > source.y:
            parts.extend(_down(edge, source, target))
        elif target.y == source.y and edge.source != edge.target:
            parts.extend(_across(edge, source, target))
        else:
            back += 1
            parts.extend(_around(edge, source, target, MARGIN + inner + LOOP_SPACE * back))
    for name in workflow.states:
        parts.extend(_node(boxes[name]))
    parts.extend(_legend(legend_y, run))
    parts.append("</svg>")
    return "\n".join(parts) + "\n"


def _back_edges(edges: list[EdgeView], boxes: dict[str, _Box]) -> int:
    return sum(1 for e in edges if boxes[e.target].y < boxes[e.source].y or e.source == e.target)


def _marker(name: str, colour: str) -> str:
    return (
        f'<marker id="{name}" viewBox="0 0 10 10" refX="10" refY="5" markerWidth="8" markerHeight="8" '
        f'orient="auto-start-reverse"><path d="M 0 0 L 10 5 L 0 10 z" fill="{colour}"/></marker>'
    )


def _start(box: _Box, taken: bool) -> list[str]:
    cx, cy = box.x + box.width / 2, MARGIN + 12.0
    colour = HIGHLIGHT if taken else "#555"
    marker = "arrow-taken" if taken else "arrow"
    return [
        f'<circle cx="{_n(cx)}" cy="{_n(cy)}" r="10" fill="#333"/>',
        f'<text x="{_n(cx + 16)}" y="{_n(cy + 4)}" fill="#333">start</text>',
        f'<path d="M {_n(cx)} {_n(cy + 10)} L {_n(cx)} {_n(box.y)}" stroke="{colour}" '
        f'stroke-width="{3 if taken else 1.5}" fill="none" marker-end="url(#{marker})"/>',
    ]


def _stroke(edge: EdgeView) -> str:
    if edge.taken:
        return f'stroke="{HIGHLIGHT}" stroke-width="3" fill="none" marker-end="url(#arrow-taken)"'
    dash = ' stroke-dasharray="6 4"' if edge.closed else ""
    return f'stroke="#555" stroke-width="1.5" fill="none"{dash} marker-end="url(#arrow)"'


def _down(edge: EdgeView, source: _Box, target: _Box) -> list[str]:
    x1, y1 = source.x + source.width / 2, source.y + source.height
    x2, y2 = target.x + target.width / 2, target.y
    bend = (y2 - y1) / 2
    path = f"M {_n(x1)} {_n(y1)} C {_n(x1)} {_n(y1 + bend)} {_n(x2)} {_n(y2 - bend)} {_n(x2)} {_n(y2)}"
    return [f'<path d="{path}" {_stroke(edge)}/>', *_label(edge, (x1 + x2) / 2, (y1 + y2) / 2)]


def _across(edge: EdgeView, source: _Box, target: _Box) -> list[str]:
    """An edge to a state in the same layer: from the facing sides, bowed downwards."""
    rightwards = target.x > source.x
    x1 = source.x + source.width if rightwards else source.x
    x2 = target.x if rightwards else target.x + target.width
    y1, y2 = source.y + source.height * 0.75, target.y + target.height * 0.75
    sag = 30.0
    path = f"M {_n(x1)} {_n(y1)} C {_n(x1)} {_n(y1 + sag)} {_n(x2)} {_n(y2 + sag)} {_n(x2)} {_n(y2)}"
    return [f'<path d="{path}" {_stroke(edge)}/>', *_label(edge, (x1 + x2) / 2, (y1 + y2) / 2 + sag * 0.75)]


def _around(edge: EdgeView, source: _Box, target: _Box, right: float) -> list[str]:
    """An edge to a state at or above its source: out of the right side and round."""
    x1, y1 = source.x + source.width, source.y + source.height / 2
    x2, y2 = target.x + target.width, target.y + target.height / 2 - (8 if edge.source != edge.target else -8)
    path = f"M {_n(x1)} {_n(y1)} C {_n(right)} {_n(y1)} {_n(right)} {_n(y2)} {_n(x2)} {_n(y2)}"
    return [f'<path d="{path}" {_stroke(edge)}/>', *_label(edge, right - 10, (y1 + y2) / 2)]


def _label(edge: EdgeView, x: float, y: float) -> list[str]:
    if not edge.label:
        return []
    text = edge.label + (f" ×{edge.taken}" if edge.taken > 1 else "")
    width = len(text) * CHAR_WIDTH + 8
    colour = HIGHLIGHT if edge.taken else "#333"
    return [
        f'<rect x="{_n(x - width / 2)}" y="{_n(y - 10)}" width="{_n(width)}" height="16" rx="3" '
        'fill="#ffffff" fill-opacity="0.9"/>',
        f'<text x="{_n(x)}" y="{_n(y + 2)}" text-anchor="middle" fill="{colour}">{escape(text)}</text>',
    ]


def _node(box: _Box) -> list[str]:
    node = box.node
    fill, stroke = _FILL[node.kind]
    radius = {"agent": 12, "step": 2}.get(node.kind, box.height / 2 if len(node.lines) <= 2 else 18)
    width = 4 if node.visited else 1.5
    colour = HIGHLIGHT if node.visited else stroke
    parts = [
        f'<g class="state {node.kind}{" visited" if node.visited else ""}">',
        f'<rect x="{_n(box.x)}" y="{_n(box.y)}" width="{_n(box.width)}" height="{_n(box.height)}" '
        f'rx="{_n(min(radius, box.height / 2))}" fill="{fill}" stroke="{colour}" stroke-width="{width}"/>',
    ]
    for i, line in enumerate(node.lines):
        y = box.y + PAD + LINE_HEIGHT * (i + 0.75)
        weight = ' font-weight="bold"' if i == 0 else ""
        parts.append(f'<text x="{_n(box.x + PAD)}" y="{_n(y)}"{weight}>{escape(line)}</text>')
    parts.append("</g>")
    return parts


_LEGEND = (
    ("step", "deterministic step"),
    ("agent", "agent state"),
    ("terminal", "terminal"),
    ("failed", "failed"),
)


def _legend_width(run: RunPath | None) -> float:
    width = MARGIN + sum(40 + len(text) * CHAR_WIDTH for _, text in _LEGEND) + 36 + 13 * CHAR_WIDTH + 20
    return width + (36 + len(f"run {run.run_id}") * CHAR_WIDTH + MARGIN if run is not None else MARGIN)


def _legend(y: float, run: RunPath | None) -> list[str]:
    entries = _LEGEND
    parts = []
    x = MARGIN
    for kind, text in entries:
        fill, stroke = _FILL[kind]
        parts.append(
            f'<rect x="{_n(x)}" y="{_n(y - 10)}" width="14" height="14" fill="{fill}" stroke="{stroke}"/>'
        )
        parts.append(f'<text x="{_n(x + 20)}" y="{_n(y + 1)}">{escape(text)}</text>')
        x += 20 + len(text) * CHAR_WIDTH + 20
    parts.append(
        f'<path d="M {_n(x)} {_n(y - 3)} L {_n(x + 30)} {_n(y - 3)}" stroke="#555" stroke-dasharray="6 4"/>'
    )
    parts.append(f'<text x="{_n(x + 36)}" y="{_n(y + 1)}">always denied</text>')
    if run is not None:
        x += 36 + len("always denied") * CHAR_WIDTH + 20
        parts.append(
            f'<path d="M {_n(x)} {_n(y - 3)} L {_n(x + 30)} {_n(y - 3)}" '
            f'stroke="{HIGHLIGHT}" stroke-width="3"/>'
        )
        parts.append(f'<text x="{_n(x + 36)}" y="{_n(y + 1)}">run {escape(run.run_id)}</text>')
    return parts
