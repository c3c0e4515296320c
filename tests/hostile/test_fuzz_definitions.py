"""Property tests: whatever text or structure arrives, the loaders answer with a result or
their own definition error, and `parse_proposal` with a proposal or `MalformedProposal`;
never another exception, never a crash.

A few seconds in the normal suite (profile `quick`, derandomized); `make fuzz` runs the
`fuzz` profile (HYPOTHESIS_PROFILE=fuzz: 20,000 random examples per property).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tether import DefinitionError, PolicyFileError, load_workflow
from tether.policy import Policy
from tether.proposals import MalformedProposal, parse_proposal
from tether.strict_yaml import load_yaml

settings.register_profile(
    "quick",
    max_examples=40,
    deadline=None,
    database=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "fuzz",
    max_examples=20_000,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "quick"))

# Pieces of YAML syntax, including the hostile ones (anchors, aliases, tags, merge keys,
# complex keys), so that random sequences of them reach the parser's corners quickly.
YAML_PIECES = [
    "[",
    "]",
    "{",
    "}",
    ":",
    ": ",
    "- ",
    "? ",
    ",",
    "\n",
    "  ",
    "    ",
    "\t",
    "#",
    "'",
    '"',
    "|",
    ">",
    "&a ",
    "*a",
    "&b ",
    "*b",
    "<<: ",
    "!!str ",
    "!!int ",
    "!!float ",
    "!!binary ",
    "!!timestamp ",
    "!!set ",
    "!!map ",
    "!!python/object:os.system ",
    "!custom ",
    "---",
    "...",
    "%YAML 1.1\n",
    "~",
    "null",
    "true",
    "1",
    "-1.5e3",
    "0x1F",
    ".inf",
    ".nan",
    "2001-02-30",
    "2001-12-14t21:59:43.10-05:00",
    "a",
    "name",
    "rules",
    "states",
    "kind",
    "agent",
    "tools",
    "when",
    "decision",
    "\\x00",
    "\x85",
    "\ufeff",
]
yaml_ish = st.lists(st.sampled_from(YAML_PIECES), max_size=60).map("".join)
any_text = st.text(max_size=400)

# JSON-like values, nested; with the keys the loaders look for, so some reach validation.
KEYS = [
    "name",
    "version",
    "start",
    "states",
    "kind",
    "run",
    "next",
    "tools",
    "exits",
    "instructions",
    "terminal",
    "agent",
    "step",
    "policy",
    "rules",
    "id",
    "tool",
    "exit",
    "when",
    "decision",
    "defaults",
    "read",
    "write",
    "ref",
    "effect",
    "budget",
    "x",
]
scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=30)
    | st.sampled_from(["agent", "step", "terminal", "deny", "allow", "ask", "*", "args.x > 1", "good:look"])
)
structures = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=5)
        | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=6)
    ),
    max_leaves=40,
)

TOOLS_MODULE = """\
from tether import tool


@tool(effect="read")
def look(item: str) -> str:
    return item


def begin(data):
    return "work"
"""


def _to_yaml(value: Any) -> str:
    return yaml.safe_dump(value, allow_unicode=True)


@PROFILE
@given(st.one_of(any_text, yaml_ish, structures.map(_to_yaml)))
@example("[" * 20_000 + "]" * 20_000)
@example("? [a]\n: 1\n")
@example("{[1]: 2}")
@example("a: &a [*a]")
@example("a: 2001-02-30")
def test_the_strict_yaml_loader_returns_a_value_or_a_yaml_error(text: str) -> None:
    with contextlib.suppress(yaml.YAMLError):
        load_yaml(text)


@PROFILE
@given(st.one_of(any_text, yaml_ish, structures.map(_to_yaml)))
@example("rules:\n  - {id: a, tool: '*', when: '" + " + ".join(["1"] * 30_000) + " > 0', decision: deny}\n")
@example("rules: [{id: a, tool: x, when: '" + "(" * 200 + "1" + ")" * 200 + "', decision: deny}]")
def test_the_policy_loader_returns_a_policy_or_a_policy_file_error(text: str) -> None:
    with contextlib.suppress(PolicyFileError):
        Policy.from_yaml(text, "fuzz.yaml")


CEL_PIECES = [
    "args",
    ".",
    "x",
    "amount",
    " ",
    "1",
    "1.0",
    "-",
    "+",
    "*",
    "/",
    "%",
    "==",
    "!=",
    "<",
    ">=",
    "&&",
    "||",
    "!",
    "?",
    ":",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    ",",
    "'s'",
    '"s"',
    "r'\\'",
    "b'x'",
    "in",
    "size",
    "all",
    "exists",
    "map",
    "filter",
    "has",
    "order",
    "zip",
    "sum",
    "int",
    "double",
    "true",
    "null",
    "history",
    "data",
    "facts",
    "tool",
    "run",
    "i",
    "x.all(i, i > 1)",
    "'''",
    '"""',
    "\\",
    "//",
    "\n",
    "r'",
    'r"',
    "1 + 1 + 1 + 1 + 1 + 1 + 1 + 1",
]
cel_ish = st.lists(st.sampled_from(CEL_PIECES), max_size=80).map("".join)
rules = st.fixed_dictionaries(
    {
        "id": st.text(min_size=1, max_size=5),
        "decision": st.sampled_from(["allow", "deny", "ask", "defer", "x"]),
    },
    optional={
        "tool": st.sampled_from(["*", "refund", ["a", "b"], 3]),
        "exit": st.sampled_from(["done", ["x"]]),
        "when": cel_ish | st.text(max_size=50),
        "owner": st.text(max_size=5),
        "approver": st.text(max_size=5),
        "expires_in": st.floats(allow_nan=True) | st.integers(),
    },
)


@PROFILE
@given(st.one_of(structures, st.fixed_dictionaries({"rules": st.lists(rules, max_size=4)})))
def test_a_policy_from_any_structure_loads_or_is_a_policy_file_error_and_decides_without_raising(
    content: Any,
) -> None:
    try:
        policy = Policy.from_dict(content, "fuzz")
    except PolicyFileError:
        return
    for name in ("refund", "a"):
        decision = policy.decide(
            kind="tool",
            name=name,
            effect="write",
            variables={"args": {"x": 1, "amount": 2.5}, "data": {}, "facts": {}, "history": [], "tool": {}},
        )
        assert decision.decision in ("allow", "deny", "ask", "defer")


@PROFILE
@given(st.one_of(any_text, yaml_ish, structures.map(_to_yaml)))
@example("[" * 20_000 + "]" * 20_000)
@example(
    "name: w\nversion: 1\nstart: work\nstates:\n  work: {kind: agent, instructions: i, tools: [good:look], "
    "exits: {done: end}}\n  end: {kind: terminal}\n"
)
def test_the_workflow_loader_returns_a_workflow_or_a_definition_error(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        (base / "good.py").write_text(TOOLS_MODULE)
        (base / "workflow.yaml").write_text(text, encoding="utf-8", errors="surrogatepass")
        try:
            load_workflow(base)
        except (DefinitionError, PolicyFileError):
            pass
        finally:
            sys.modules.pop("good", None)


# -- model output ------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=50),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(["kind", "tool", "args", "exit", "x"]) | st.text(max_size=5), inner, max_size=4
        )
    ),
    max_leaves=30,
)
proposal_shaped = st.fixed_dictionaries(
    {"kind": st.sampled_from(["tool_call", "exit", "question", "handoff", "finish", "other"])},
    optional={
        "tool": st.text(max_size=10),
        "args": json_values,
        "exit": st.text(max_size=5),
        "summary": st.text(),
    },
)


def _refused_or_parsed(raw: Any) -> None:
    with contextlib.suppress(MalformedProposal):
        parse_proposal(raw)


@PROFILE
@given(
    st.one_of(
        json_values,
        proposal_shaped,
        proposal_shaped.map(lambda p: json.dumps(p, allow_nan=True)),
        st.text(max_size=200),
        st.sampled_from(
            ["NaN", "Infinity", "-Infinity", '{"kind": "exit", "exit": NaN}', "1e999", "[]", "{}"]
        ),
    )
)
@example("x" * 1_000_000)
@example({"kind": "tool_call", "tool": "t", "args": {"amount": -math.inf}})
def test_parse_proposal_turns_any_value_into_a_proposal_or_a_malformed_proposal(raw: Any) -> None:
    _refused_or_parsed(raw)


def _nested(depth: int) -> str:
    return '{"kind": "tool_call", "tool": "t", "args": {"a": ' + "[" * depth + "]" * depth + "}}"


@PROFILE
@given(st.integers(min_value=1, max_value=5_000).map(_nested))
@example(_nested(5_000))
@example("9" * 5_000)
def test_parse_proposal_refuses_deep_and_oversized_json_as_malformed(raw: str) -> None:
    _refused_or_parsed(raw)
