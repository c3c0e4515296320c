"""Scenario files: runs described in YAML — input, scripted proposals, a scripted person —
with the decisions, states visited and end status expected of them (`tether test`).

    workflow: .                      # relative to this file; a scenario may name its own
    files: {db.json: db.json}        # copied afresh into each scenario's temporary folder
    env: {REFUND_LEDGER: "{tmp}/ledger.sqlite"}   # {tmp}: that folder (also in input)
    person:                          # the scripted person (a scenario may give its own)
      - {tool: issue_refund, when: "args.amount < 200.0", approve: true}
      - {tool: issue_refund, deny: "200 or more goes through finance"}
    unreachable:                     # coverage items no run can reach, and why
      branch:some-rule=false: ...
    scenarios:
      - name: a refund under 100 goes through without asking
        input: {order_id: A-1002}
        proposals: [...]             # a list, a mapping of agent state to list, or a JSON file
        expect:
          decisions:
            - {decision: allow, rule: default:read}
            - {decision: allow, rule: refund-small, outcome: executed}
          path: [intake, resolve, done]
          status: completed

Every scenario runs in a fresh temporary journal and folder. The file is read with
`strict_yaml` and validated strictly: an unknown field, a rule id, state, tool or exit the
workflow does not have, or an unknown coverage item is a `ScenarioFileError` naming the
scenario and the field, before anything runs.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tether.errors import TetherError
from tether.journal import Journal, RunStatus, open_journal
from tether.loader import load_workflow_async
from tether.models import Model, ScriptedModel
from tether.runtime import RunResult
from tether.strict_yaml import load_yaml
from tether.testing.assertions import ExpectedStep, decision_problems, path_problems, status_problems
from tether.testing.coverage import Collector
from tether.testing.driving import RunOutcome, run_to_end_async
from tether.testing.person import PersonHasNoRule, PersonRule, ScriptedPerson
from tether.workflow import Workflow

TMP = "{tmp}"
SCENARIO_PERSON = "scenario-person"


class ScenarioFileError(TetherError):
    """A scenario file that cannot be run as written; nothing was run."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Expectations(_Strict):
    decisions: list[ExpectedStep] | None = None
    path: list[str] | None = None
    status: RunStatus | None = None
    reason_code: str | None = None

    @model_validator(mode="after")
    def _something(self) -> Expectations:
        if self.decisions is None and self.path is None and self.status is None:
            raise ValueError("expect at least one of decisions, path or status")
        if self.reason_code is not None and self.status is None:
            raise ValueError("reason_code is the end status's: give status too")
        return self


class Scenario(_Strict):
    name: str = Field(min_length=1)
    # Which of a skill's four test cases this scenario is (tether.skills): `tether check`
    # requires one of each in the scenarios a skill ships.
    case: Literal["normal", "borderline", "failure", "escalation"] | None = None
    workflow: str | None = None
    input: dict[str, Any] = Field(default_factory=dict)
    proposals: list[Any] | dict[str, list[Any]] | str | None = None
    person: list[PersonRule] | None = None
    expect: Expectations


class ScenarioFile(_Strict):
    workflow: str | None = None
    files: dict[str, str] = Field(default_factory=dict)
    env: dict[str, str] = Field(default_factory=dict)
    person: list[PersonRule] = Field(default_factory=list)
    unreachable: dict[str, str] = Field(default_factory=dict)
    scenarios: list[Scenario] = Field(min_length=1)

    @model_validator(mode="after")
    def _names(self) -> ScenarioFile:
        names = [s.name for s in self.scenarios]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"scenario names must be unique (repeated: {', '.join(map(repr, twice))})")
        return self


@dataclass
class ScenarioResult:
    name: str
    problems: list[str]
    run: RunOutcome | None

    @property
    def passed(self) -> bool:
        return not self.problems

    def report(self) -> list[str]:
        """The problems, then what the run did (unless a decision table already shows it)."""
        lines = [line for p in self.problems for line in p.splitlines()]
        if self.run is not None and not any(p.startswith("decisions differ") for p in self.problems):
            lines += self.run.describe().splitlines()
        return lines

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "passed": self.passed,
            "problems": self.problems,
            "run": self.run.as_dict() if self.run else None,
        }


@dataclass
class Suite:
    """A loaded scenario file: its scenarios with their workflows, ready to run."""

    path: Path
    spec: ScenarioFile
    workflows: dict[str, Workflow]  # scenario name -> workflow


async def load_suite(path: Path, collector: Collector) -> Suite:
    """Read, validate and check a scenario file against its workflows; nothing runs."""
    spec = _parse(path)
    base = path.parent.resolve()
    loaded: dict[Path, Workflow] = {}
    workflows: dict[str, Workflow] = {}
    for number, scenario in enumerate(spec.scenarios, start=1):
        where = f"{path}: scenario {scenario.name!r} (#{number})"
        target = scenario.workflow or spec.workflow
        if target is None:
            raise ScenarioFileError(f"{where}: no workflow (give 'workflow' in the scenario or the file)")
        folder = (base / target).resolve()
        if folder not in loaded:
            try:
                loaded[folder] = await load_workflow_async(folder)
            except TetherError as exc:
                raise ScenarioFileError(f"{where}, field workflow: {target}: {exc}") from None
        workflows[scenario.name] = loaded[folder]
        _check_names(where, scenario, loaded[folder])
        if isinstance(scenario.proposals, str) and not (base / scenario.proposals).is_file():
            raise ScenarioFileError(f"{where}, field proposals: no file {base / scenario.proposals}")
    for name, source in spec.files.items():
        if not (base / source).exists():
            raise ScenarioFileError(f"{path}: field files.{name}: no file {base / source}")
    definitions = [collector.know(w) for w in loaded.values()]
    for item, why in spec.unreachable.items():
        having = [d for d in definitions if item in d.ids]
        if not having:
            rule = item.removeprefix("branch:").removesuffix("=false")
            if item.endswith("=false") and any(rule in d.no_condition for d in definitions):
                raise ScenarioFileError(
                    f"{path}: field unreachable: {item!r}: rule {rule!r} has no condition, so no false "
                    "branch to cover (it is not counted)"
                )
            known = ", ".join(sorted(set().union(*(d.ids for d in definitions))))
            raise ScenarioFileError(f"{path}: field unreachable: no coverage item {item!r} (items: {known})")
        for d in having:
            d.exclude(item, why)
    return Suite(path, spec, workflows)


def _parse(path: Path) -> ScenarioFile:
    try:
        content = load_yaml(path.read_text())
    except FileNotFoundError:
        raise ScenarioFileError(f"scenario file not found: {path}") from None
    except yaml.YAMLError as exc:
        raise ScenarioFileError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(content, dict):
        raise ScenarioFileError(f"{path}: a scenario file is a mapping with 'scenarios'")
    try:
        return ScenarioFile.model_validate(content)
    except ValidationError as exc:
        raise ScenarioFileError(f"{path}: " + "; ".join(_where(e, content) for e in exc.errors())) from None


def _where(error: Any, content: dict[str, Any]) -> str:
    """`scenario 'name' (#2), field expect.status: Input should be …`, or `field files: …`."""
    loc = list(error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if len(loc) >= 2 and loc[0] == "scenarios" and isinstance(loc[1], int):
        listed = content.get("scenarios")
        item = listed[loc[1]] if isinstance(listed, list) and loc[1] < len(listed) else None
        name = item.get("name") if isinstance(item, dict) else None
        scenario = f"scenario {name!r} (#{loc[1] + 1})" if name else f"scenario #{loc[1] + 1}"
        rest = ".".join(map(str, loc[2:]))
        return f"{scenario}, " + (f"field {rest}: {message}" if rest else message)
    return f"field {'.'.join(map(str, loc))}: {message}" if loc else message


def _check_names(where: str, scenario: Scenario, workflow: Workflow) -> None:
    """Every rule, state, tool and exit a scenario expects exists: a typo fails here, not as a
    confusing difference later."""
    policy_rules = {r.id for r in workflow.policy.rules} if workflow.policy else set()
    defaults = {"default:read", "default:write", "default:external", "default:exit"}
    tools, exits, states = set(workflow.tools()), workflow.exit_names() | {"finish"}, set(workflow.states)
    expect = scenario.expect
    for state in expect.path or []:
        if state not in states:
            raise ScenarioFileError(f"{where}, field expect.path: no state {state!r} in {workflow.name}")
    for i, step in enumerate(expect.decisions or []):
        field_ = f"{where}, field expect.decisions.{i}"
        rule = step.rule
        if rule is not None and ":" not in rule and rule not in policy_rules:
            known = ", ".join(sorted(policy_rules)) or "none"
            raise ScenarioFileError(f"{field_}.rule: the policy has no rule {rule!r} (its rules: {known})")
        if rule is not None and rule.startswith("default:") and rule not in defaults:
            raise ScenarioFileError(
                f"{field_}.rule: {rule!r} is not a default ({', '.join(sorted(defaults))})"
            )
        for name, value, known_names in (("tool", step.tool, tools), ("exit", step.exit, exits)):
            if value is not None and value not in known_names:
                raise ScenarioFileError(f"{field_}.{name}: {workflow.name} has no {name} {value!r}")
        if step.state is not None and step.state not in states:
            raise ScenarioFileError(f"{field_}.state: no state {step.state!r} in {workflow.name}")


async def run_suite(suite: Suite, collector: Collector) -> list[ScenarioResult]:
    """Run every scenario of a suite, each in a fresh temporary journal and folder."""
    return [await _run(suite, scenario, collector) for scenario in suite.spec.scenarios]


async def _run(suite: Suite, scenario: Scenario, collector: Collector) -> ScenarioResult:
    spec, base = suite.spec, suite.path.parent.resolve()
    workflow = suite.workflows[scenario.name]
    rules = scenario.person if scenario.person is not None else spec.person
    person = ScriptedPerson(rules, name=SCENARIO_PERSON) if rules else None
    with tempfile.TemporaryDirectory(prefix="tether-scenario-") as tmp:
        for name, source in spec.files.items():
            copy = shutil.copytree if (base / source).is_dir() else shutil.copy2
            copy(base / source, Path(tmp) / name)
        env = {k: v.replace(TMP, tmp) for k, v in spec.env.items()}
        with _environment(env), contextlib.closing(open_journal(str(Path(tmp) / "journal.db"))) as journal:
            problems: list[str] = []
            try:
                run: RunOutcome | None = await run_to_end_async(
                    workflow,
                    _model(scenario.proposals, base),
                    journal=journal,
                    input=_substituted(scenario.input, tmp),
                    person=person,
                )
            except (PersonHasNoRule, TetherError) as exc:
                problems.append(f"the run could not be driven to its end: {exc}")
                run = await _where_it_stopped(journal, workflow)
            if run is None:
                return ScenarioResult(scenario.name, problems, None)
            collector.know(workflow)
            collector.observe(run.entries)
    expect = scenario.expect
    if expect.decisions is not None:
        problems += decision_problems(run, expect.decisions)
    if expect.path is not None:
        problems += path_problems(run, expect.path)
    if expect.status is not None:
        problems += status_problems(run, expect.status, expect.reason_code)
    return ScenarioResult(scenario.name, problems, run)


def _model(proposals: Any, base: Path) -> Model:
    """The scripted model; with no proposals, one that has none (a run that reaches an agent
    state escalates, saying the script is used up)."""
    if proposals is None:
        return ScriptedModel([])
    if isinstance(proposals, str):
        return ScriptedModel.from_file(base / proposals)
    return ScriptedModel(proposals)


async def _where_it_stopped(journal: Journal, workflow: Workflow) -> RunOutcome | None:
    """The scenario's run as far as it went, when driving it raised."""
    runs = await journal.list_runs(limit=1)
    if not runs:
        return None
    return RunOutcome.of(RunResult.of(runs[0]), workflow, await journal.read_entries(runs[0].run_id))


def _substituted(value: Any, tmp: str) -> Any:
    if isinstance(value, str):
        return value.replace(TMP, tmp)
    if isinstance(value, dict):
        return {k: _substituted(v, tmp) for k, v in value.items()}
    if isinstance(value, list):
        return [_substituted(v, tmp) for v in value]
    return value


@contextlib.contextmanager
def _environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for one scenario, and put back what was there."""
    before = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, old in before.items():
            if old is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = old
