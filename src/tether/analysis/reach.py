"""Which tools a policy can never allow: every call of them is denied, whatever the run holds.

The MCP gateway hides such a tool from a caller's `tools/list` (a caller is not shown what it
could only ever be refused). The answer comes from the same three-valued reading of the
rules as `tether check` (tether.analysis.conditions): a tool counts as never allowed only
when, for every combination of argument values the conditions distinguish, the one possible
decision is `deny`. A condition that reads what only the run can tell (facts, data, history,
resolvers) may hold or not, so a rule behind it never hides a tool: the analysis is cautious,
never clever.
"""

from __future__ import annotations

from tether.analysis.conditions import Condition, Outcome, Space, definition_trees, possible, tool_subject
from tether.policy import Policy
from tether.tools import Tool
from tether.workflow import Workflow


def never_allowed(workflow: Workflow, state: str, tool: Tool) -> str | None:
    """Why no call of `tool` in `state` can be anything but denied (the rules that deny it),
    or None when some call may be allowed, asked for or deferred."""
    policy = workflow.policy or Policy.default()
    rules = policy.governing("tool", tool.name)
    definitions = definition_trees(policy)
    conditions = [Condition.of(rule, definitions) for rule in rules]
    space = Space(tool_subject(tool, state, workflow), conditions)
    values = [space.evaluate(condition) for condition in conditions]
    default = Outcome(getattr(policy.document.defaults, tool.effect), f"default:{tool.effect}")
    deciding: dict[str, None] = {}
    for i in range(len(space.points)):
        outcome = possible(rules, [value[i] for value in values], default)
        if outcome.decisions() != {"deny"}:
            return None
        deciding[outcome.base.rule] = None
    return f"every call is denied by {', '.join(deciding)}"
