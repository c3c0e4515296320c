"""Skills: reusable, versioned units of agent work with a contract, used as agent states.

A skill is a folder `skills/NAME/` holding `skill.yaml` (+ a tools module, + `policy.yaml`,
+ `scenarios.yaml`):

    name: refund
    version: 2
    purpose: Refund what a customer is owed for one order, within the refund policy.
    instructions: Look the order up first; refund at most what it totalled.
    inputs:                          # checked against the run's data when a visit begins
      order_id: {type: string}
      reason: {type: string, required: false}
    tools: [refund_skill_tools:lookup_order, refund_skill_tools:issue_refund]
    exits: {refunded: success, declined: failure}
    output:                          # JSON Schema a success exit's `update` must satisfy
      type: object
      required: [refunded_amount]
      properties: {refunded_amount: {type: number}}
    success:                         # must hold to take a success exit (else it is denied)
      - {id: refund-verified, when: "has(facts.refunded)"}
    stop:                            # budget, escalation and handoff owners
      budget: {max_steps: 8, max_tool_calls: 4, max_seconds: 60}
      escalate_to: supervisor

A workflow uses it as an agent state — `resolve: {uses: skills/refund@2, exits: {refunded:
done, declined: rejected}}` — mapping every exit of the skill to a state. The skill's
policy fragment (its `policy.yaml`, and one deny rule per success criterion) is merged into
the workflow's policy with each rule id prefixed `NAME/`, so the policy hash covers it; the
skill's name, version and hash are part of the workflow's description, so every run records
them. `tether check` runs the skill's scenarios and requires one of each case: normal,
borderline, failure and escalation. docs/skills.md describes it all.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from tether.budget import Budget
from tether.errors import DefinitionError, PolicyFileError
from tether.hashing import fingerprint
from tether.loader import ToolRef, _explain, _import, _tool
from tether.policy import Policy, PolicyDocument, Rule
from tether.strict_yaml import load_yaml
from tether.tools import Tool
from tether.workflow import BUILTIN_RESOLVERS, AgentState, Terminal, Workflow, _describe_state, _source_hash

SKILL_FILE = "skill.yaml"
POLICY_FILE = "policy.yaml"
SCENARIOS_FILE = "scenarios.yaml"
# The test cases every skill ships as scenarios (`case:` in its scenarios file).
CASES = ("normal", "borderline", "failure", "escalation")
Outcome = Literal["success", "failure"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Criterion(_Strict):
    """A success criterion: a CEL condition over `args` (the exit and its `update`), `data`,
    `facts`, `history` and `run` that must hold for a success exit to be taken."""

    id: str = Field(min_length=1, pattern=r"^[A-Za-z0-9_.:-]+$")
    when: str = Field(min_length=1)
    reason: str = ""


class StopDoc(_Strict):
    """When the skill stops short of an exit, and who takes over."""

    budget: Budget = Field(default_factory=Budget)
    escalate_to: str = "operator"
    handoff_to: list[str] = Field(default_factory=list)
    on_budget_exhausted: Literal["escalate", "fail"] = "escalate"
    on_verification_failed: Literal["retry", "escalate", "fail"] = "retry"


class SkillDoc(_Strict):
    name: str = Field(pattern=r"^[a-z][a-z0-9_-]*$")
    version: str | int
    purpose: str = Field(min_length=1)
    instructions: str = ""
    inputs: dict[str, dict[str, Any]] = Field(default_factory=dict)
    tools: list[str | ToolRef] = Field(min_length=1)
    exits: dict[str, Outcome] = Field(min_length=1)
    output: dict[str, Any] | None = None
    success: list[Criterion] = Field(default_factory=list)
    stop: StopDoc = Field(default_factory=StopDoc)
    resolvers: dict[str, str] = Field(default_factory=dict)
    policy: str | None = None
    scenarios: str = SCENARIOS_FILE
    # Findings of `tether check` on the skill alone that its authors accept (tether.analysis.check).
    acknowledge: list[Any] = Field(default_factory=list)

    @field_validator("version")
    @classmethod
    def _plain_version(cls, version: str | int) -> str | int:
        if "@" in str(version) or not str(version).strip():
            raise ValueError("a version is a non-empty name without '@'")
        return version


@dataclass(frozen=True)
class Input:
    name: str
    required: bool
    description: str
    schema: dict[str, Any]


@dataclass(frozen=True, eq=False)
class Skill:
    """A loaded skill: its contract, its tools and its policy fragment, ready to be a state."""

    name: str
    version: str
    folder: Path
    purpose: str
    instructions: str
    inputs: tuple[Input, ...]
    tools: tuple[Tool, ...]
    exits: dict[str, Outcome]
    output: dict[str, Any] | None
    criteria: tuple[Criterion, ...]
    stop: StopDoc
    resolvers: dict[str, Callable[..., Any]]
    rules: tuple[Rule, ...]  # the policy fragment, namespaced, success criteria included
    scenarios: Path
    hash: str

    @property
    def ref(self) -> str:
        """`refund@2`: how workflows, findings and `tether show` name it."""
        return f"{self.name}@{self.version}"

    def identity(self) -> dict[str, str]:
        return {"name": self.name, "version": self.version, "hash": self.hash}

    @property
    def success_exits(self) -> list[str]:
        return [e for e, outcome in self.exits.items() if outcome == "success"]

    # -- the contract at run time ----------------------------------------------------------

    def input_problem(self, data: Mapping[str, Any]) -> str | None:
        """Why the run's data cannot be this skill's input, or None."""
        problems = []
        for spec in self.inputs:
            if spec.name not in data:
                if spec.required:
                    problems.append(f"{spec.name}: required, and the run's data has none")
                continue
            problems += _problems(self._input_validators[spec.name], data[spec.name], spec.name)
        if not problems:
            return None
        return f"the run's data is not the input skill {self.ref} takes: " + "; ".join(problems)

    def output_problem(self, exit: str, update: Mapping[str, Any]) -> str | None:
        """Why a success exit's `update` does not satisfy the output contract, or None."""
        if self.output is None or self.exits.get(exit) != "success":
            return None
        problems = _problems(self._output_validator, dict(update))
        if not problems:
            return None
        return (
            f"exit {exit!r}: its update does not satisfy the output contract of skill {self.ref}: "
            + "; ".join(problems)
        )

    @functools.cached_property
    def _input_validators(self) -> dict[str, Any]:
        return {spec.name: _validator(spec.schema) for spec in self.inputs}

    @functools.cached_property
    def _output_validator(self) -> Any:
        return _validator(self.output or {}, strict_objects=True)

    # -- as a state ------------------------------------------------------------------------

    def state(self, name: str, exits: Mapping[str, str], where: str = "") -> AgentState:
        """The agent state a workflow makes of this skill, each of its exits mapped to a state."""
        where = where or f"state {name!r}"
        missing = sorted(set(self.exits) - set(exits))
        extra = sorted(set(exits) - set(self.exits))
        if missing or extra:
            said = [f"map exit(s) {', '.join(missing)}" if missing else "", f"no exit(s) {', '.join(extra)}"]
            raise DefinitionError(
                f"{where}: skill {self.ref} has exits {', '.join(self.exits)}: "
                + "; ".join(s for s in said if s).replace("no exit(s)", "it has no exit(s)")
            )
        return AgentState(
            name,
            self._prompt(),
            self.tools,
            dict(exits),
            budget=self.stop.budget,
            escalate_to=self.stop.escalate_to,
            handoff_to=tuple(self.stop.handoff_to),
            on_budget_exhausted=self.stop.on_budget_exhausted,
            on_verification_failed=self.stop.on_verification_failed,
            skill=self,
        )

    def harness(self) -> Workflow:
        """A workflow of this skill alone, for its scenarios: it starts in the skill's state,
        and each exit ends the run in a terminal state of the exit's name (failed for a
        failure exit). Its input is the skill's input."""
        terminals = [Terminal(e, failed=outcome == "failure") for e, outcome in self.exits.items()]
        return Workflow(
            f"skill:{self.name}",
            self.version,
            self.name,
            [self.state(self.name, {e: e for e in self.exits}), *terminals],
            policy=Policy(PolicyDocument(), f"skill {self.ref}"),
            resolvers=self.resolvers,
            description=self.purpose,
        )

    def _prompt(self) -> str:
        """What the model is told: purpose, instructions, and the contract it is held to."""
        parts = [self.purpose.strip(), self.instructions.strip()]
        if self.criteria:
            parts.append(
                "Success (checked before a success exit is taken): "
                + "; ".join(c.reason or c.when for c in self.criteria)
            )
        if self.output is not None:
            exits = ", ".join(self.success_exits)
            parts.append(
                f"The update of exit {exits} must be a JSON object satisfying this JSON Schema: "
                + json.dumps(self.output, sort_keys=True)
            )
        return "\n\n".join(p for p in parts if p)


# -- loading ----------------------------------------------------------------------------------


def split_use(uses: str) -> tuple[str, str]:
    """`skills/refund@2` -> (`skills/refund`, `2`)."""
    path, at, version = uses.rpartition("@")
    if not at or not path or not version:
        raise DefinitionError(
            f"uses: {uses!r} names no version: write uses: PATH@VERSION (e.g. skills/refund@2)"
        )
    return path, version


def load_skill(folder: str | Path, version: str | None = None) -> Skill:
    """Load the skill in `folder`; with `version`, refuse any other version."""
    folder = Path(folder)
    file = folder / SKILL_FILE if folder.is_dir() or not folder.suffix else folder
    base = file.parent.resolve()
    try:
        content = load_yaml(file.read_text())
    except FileNotFoundError:
        raise DefinitionError(f"no skill at {folder}: {file} not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise DefinitionError(f"skill file {file} cannot be read: {exc}") from None
    except yaml.YAMLError as exc:
        raise DefinitionError(f"{file}: not valid YAML: {exc}") from None
    if not isinstance(content, dict):
        raise DefinitionError(f"{file}: a skill file must be a mapping")
    try:
        doc = SkillDoc.model_validate(content)
    except ValidationError as exc:
        raise DefinitionError(f"{file}: " + _explain(exc)) from None
    named, at, kept = base.name.partition("@")  # `refund`, or `refund@1` for a version kept
    if doc.name != named:
        raise DefinitionError(f"{file}: the skill is named {doc.name!r}, but its folder is {base.name!r}")
    if at and kept != str(doc.version):
        raise DefinitionError(f"{file}: the folder {base.name} holds version {doc.version} of {doc.name}")
    if version is not None and str(doc.version) != version:
        raise DefinitionError(
            f"{file}: skill {doc.name} is version {doc.version}, not {version} as the workflow asks; "
            "use the version the folder holds, or keep the old version's folder"
        )
    ref = f"{doc.name}@{doc.version}"
    where = f"{file} (skill {ref})"
    if doc.name in doc.exits:
        raise DefinitionError(f"{where}: an exit is named like the skill ({doc.name!r}); rename it")
    if doc.success and not any(o == "success" for o in doc.exits.values()):
        raise DefinitionError(f"{where}: success criteria are given, but no exit is a success exit")
    inputs = tuple(_input(name, spec, where) for name, spec in doc.inputs.items())
    if doc.output is not None:
        _check_schema(doc.output, f"{where}: output")
    tools = tuple(_tool(t, base, f"{where}, tool {i + 1}", None) for i, t in enumerate(doc.tools))
    resolvers = {n: _import(r, where=f"{where}: resolver {n!r}", base=base) for n, r in doc.resolvers.items()}
    rules = _fragment(doc, base, where, tools, resolvers)
    plain = AgentState(doc.name, "", tools, {e: e for e in doc.exits})
    identity = {
        "skill": doc.model_dump(mode="json", exclude={"acknowledge"}),
        "tools": _describe_state(plain)["tools"],
        "resolvers": {n: _source_hash(f) for n, f in sorted(resolvers.items())},
        "rules": [r.model_dump(mode="json") for r in rules],
    }
    return Skill(
        name=doc.name,
        version=str(doc.version),
        folder=base,
        purpose=doc.purpose,
        instructions=doc.instructions,
        inputs=inputs,
        tools=tools,
        exits=dict(doc.exits),
        output=doc.output,
        criteria=tuple(doc.success),
        stop=doc.stop,
        resolvers=resolvers,
        rules=tuple(rules),
        scenarios=base / doc.scenarios,
        hash=fingerprint(identity),
    )


def _input(name: str, spec: dict[str, Any], where: str) -> Input:
    schema = dict(spec)
    required = schema.pop("required", True)
    description = schema.pop("description", "")
    if not isinstance(required, bool):
        raise DefinitionError(f"{where}: input {name!r}: required must be true or false")
    _check_schema(schema, f"{where}: input {name!r}")
    return Input(name, required, str(description), schema)


def _fragment(
    doc: SkillDoc, base: Path, where: str, tools: tuple[Tool, ...], resolvers: dict[str, Any]
) -> list[Rule]:
    """The skill's policy rules, namespaced `NAME/ID`, with one deny rule per success
    criterion on the success exits. They may govern only the skill's own tools and exits."""
    file = base / (doc.policy or POLICY_FILE)
    if doc.policy is not None and not file.exists():
        raise PolicyFileError(f"{where} names policy {doc.policy!r}, which is not found: {file}")
    own = Policy.from_file(file) if file.exists() else Policy.default()
    if own.document.defaults != PolicyDocument().defaults:
        raise PolicyFileError(f"{file}: a skill's policy may not set defaults (the workflow's apply)")
    if own.document.definitions or own.document.subjects or any(r.subject for r in own.rules):
        # Its rules are merged into the workflow's policy, where these names are not carried.
        raise PolicyFileError(
            f"{file}: a skill's policy may not declare definitions or subjects (write them out in its rules)"
        )
    tool_names, exit_names = [t.name for t in tools], list(doc.exits)
    own.check_targets({t.name: t for t in tools}, set(exit_names), {**BUILTIN_RESOLVERS, **resolvers})
    rules = []
    for rule in own.rules:
        kind, names = rule.targets()
        if "*" in names:  # every tool (or exit) of the skill, not of the workflow using it
            names = tool_names if kind == "tool" else exit_names
        rules.append(rule.model_copy(update={"id": f"{doc.name}/{rule.id}", kind: names}))
    success = [e for e, outcome in doc.exits.items() if outcome == "success"]
    for criterion in doc.success:
        rules.append(
            Rule(
                id=f"{doc.name}/{criterion.id}",
                exit=success,
                when=f"!({criterion.when})",
                decision="deny",
                reason=criterion.reason
                or f"success criterion {criterion.id} does not hold: {criterion.when}",
            )
        )
    ids = [r.id for r in rules]
    twice = sorted({i for i in ids if ids.count(i) > 1})
    if twice:
        raise PolicyFileError(
            f"{where}: rule id(s) {', '.join(twice)} given twice (policy and success criteria)"
        )
    # Compiled here, so a condition that does not parse is reported against the skill's files.
    Policy(PolicyDocument(rules=rules), f"{file} + success criteria of {where}")
    return rules


# -- JSON Schema ---------------------------------------------------------------------------------


def _check_schema(schema: dict[str, Any], where: str) -> None:
    import jsonschema  # only when a skill is loaded

    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise DefinitionError(f"{where}: not a valid JSON Schema: {exc.message}") from None


def _validator(schema: dict[str, Any], *, strict_objects: bool = False) -> Any:
    """A validator; with `strict_objects`, an object schema that names its properties refuses
    others unless it says otherwise (as tool arguments do)."""
    import jsonschema

    if (
        strict_objects
        and "properties" in schema
        and not {"additionalProperties", "patternProperties"} & set(schema)
    ):
        schema = {**schema, "additionalProperties": False}
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema)


def _problems(validator: Any, value: Any, name: str = "") -> list[str]:
    """Each way `value` fails the schema, placed: `name.field: message`."""
    found: list[str] = []
    for error in sorted(validator.iter_errors(value), key=lambda e: list(map(str, e.absolute_path))):
        place = ".".join(map(str, [*([name] if name else []), *error.absolute_path]))
        if error.validator == "required":
            missing = [p for p in error.validator_value if p not in error.instance]
            found.extend(f"{place + '.' if place else ''}{m}: required" for m in missing)
        elif error.validator == "additionalProperties" and error.validator_value is False:
            known = set(error.schema.get("properties") or {})
            extra = sorted(k for k in error.instance if k not in known)
            found.append(f"{place or '(update)'}: unknown field(s) {', '.join(extra)} (not in the contract)")
        else:
            found.append(f"{place or '(update)'}: {error.message}")
    return found
