"""Assertions on a run's decisions, states visited and outcome.

Each failure says what was expected and what the run did, step by step: a table of the
run's governed steps (proposal, expected decision, the run's decision and outcome) with the
differing ones marked, or the expected and the actual path or status followed by the run's
steps.

The `…_problems` functions return the same messages as a list (empty when all holds); the
scenario runner reports them without raising.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from tether.testing.driving import RunOutcome, StepDecision, aligned


class ExpectedStep(BaseModel):
    """What one governed step should be; only the fields given are compared."""

    model_config = ConfigDict(extra="forbid")

    decision: Literal["allow", "deny", "ask", "defer"] | None = None
    rule: str | None = None
    reason_code: str | None = None
    outcome: str | None = None
    tool: str | None = None
    exit: str | None = None
    state: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _decision_alone(cls, value: Any) -> Any:
        """`allow` is short for `{decision: allow}` (in scenario files too)."""
        return {"decision": value} if isinstance(value, str) else value

    @classmethod
    def of(cls, value: Any) -> ExpectedStep:
        """From a mapping, `(decision, rule[, reason_code])`, or a decision alone."""
        if isinstance(value, ExpectedStep):
            return value
        if isinstance(value, tuple):
            names = ("decision", "rule", "reason_code")
            if not 1 <= len(value) <= len(names):
                raise ValueError(
                    f"an expected step as a tuple is (decision, rule[, reason_code]), not {value!r}"
                )
            return cls.model_validate(dict(zip(names, value, strict=False)))
        return cls.model_validate(value)

    def matches(self, step: StepDecision) -> bool:
        actual = {
            "decision": step.decision,
            "rule": step.rule_id,
            "reason_code": step.reason_code,
            "outcome": step.outcome,
            "tool": step.tool,
            "exit": step.exit,
            "state": step.state,
        }
        return all(want is None or actual[name] == want for name, want in self.model_dump().items())

    def describe(self) -> str:
        parts: list[str] = [self.decision or "any decision"]
        if self.rule:
            parts.append(f"by {self.rule}")
        if self.reason_code:
            parts.append(f"({self.reason_code})")
        text = " ".join(parts)
        if self.outcome:
            text += f" → {self.outcome}"
        where = [
            f"{k} {v}" for k, v in (("tool", self.tool), ("exit", self.exit), ("in state", self.state)) if v
        ]
        return text + (f" [{', '.join(where)}]" if where else "")


def decision_problems(run: RunOutcome, expected: Sequence[Any]) -> list[str]:
    """Empty when the run's governed steps are exactly the expected ones, in order."""
    wanted = [ExpectedStep.of(e) for e in expected]
    steps = run.steps
    rows = [["", "#", "step", "state", "proposal", "expected", "the run"]]
    wrong = []
    for i in range(max(len(wanted), len(steps))):
        want = wanted[i] if i < len(wanted) else None
        step = steps[i] if i < len(steps) else None
        ok = want is not None and step is not None and want.matches(step)
        if not ok:
            wrong.append(str(i + 1))
        rows.append(
            [
                "" if ok else "✗",
                str(i + 1),
                step.step_id if step else "-",
                step.state if step else "-",
                step.proposed(48) if step else "-",
                want.describe() if want else "(no step expected)",
                step.describe() if step else "(no such step)",
            ]
        )
    if not wrong:
        return []
    head = (
        f"decisions differ from those expected at step{'s' if len(wrong) > 1 else ''} {', '.join(wrong)} "
        f"({len(wanted)} expected, {len(steps)} in the run {run.run_id}):"
    )
    return ["\n".join([head, *("  " + line for line in aligned(rows)), f"  the run is {run.ended()}"])]


def path_problems(run: RunOutcome, expected: Sequence[str]) -> list[str]:
    if list(expected) == run.path:
        return []
    return [f"states visited: expected {' → '.join(expected)}; the run went {' → '.join(run.path)}"]


def status_problems(run: RunOutcome, status: str, reason_code: str | None = None) -> list[str]:
    problems = []
    if run.status != status:
        problems.append(f"status: expected {status}; the run is {run.ended()}")
    if reason_code is not None and run.reason_code != reason_code:
        problems.append(f"reason code: expected {reason_code}; the run's is {run.reason_code or 'none'}")
    return problems


def assert_decisions(run: RunOutcome, expected: Sequence[Any]) -> None:
    """The run's governed steps are exactly these, in order. Each expected step is a mapping
    (`decision`, `rule`, `reason_code`, `outcome`, `tool`, `exit`, `state`: only those given
    are compared), a tuple `(decision, rule[, reason_code])`, or a decision alone."""
    problems = decision_problems(run, expected)
    if problems:
        raise AssertionError(problems[0])


def assert_path(run: RunOutcome, expected: Sequence[str]) -> None:
    """The run entered exactly these states, in order (its start state first)."""
    _raise(run, path_problems(run, expected))


def assert_status(run: RunOutcome, status: str, *, reason_code: str | None = None) -> None:
    """The run ended with this status (and, if given, this reason code)."""
    _raise(run, status_problems(run, status, reason_code))


def _raise(run: RunOutcome, problems: list[str]) -> None:
    if problems:
        raise AssertionError("\n".join(problems) + "\n" + run.describe())
