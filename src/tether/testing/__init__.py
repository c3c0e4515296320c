"""tether's testing toolkit: drive runs with a scripted model and a scripted person, assert
on their decisions, path and outcome, run scenario files, and measure governance coverage.

    from tether.testing import ScriptedPerson, assert_decisions, assert_status, run_to_end

    person = ScriptedPerson([
        {"tool": "issue_refund", "when": "args.amount < 200.0", "approve": True},
        {"tool": "issue_refund", "deny": "200 or more goes through finance"},
    ])
    run = run_to_end("examples/refund", script, journal=tether_journal, input={...}, person=person)
    assert_status(run, "completed")

Installed, it is also a pytest plugin (fixtures `tether_journal`, `tether_journal_postgres`;
`pytest --tether-coverage`); see docs/testing.md. This module does not import pytest.
"""

from tether.models import FunctionModel, ScriptedModel
from tether.testing.assertions import (
    ExpectedStep,
    assert_decisions,
    assert_path,
    assert_status,
    decision_problems,
    path_problems,
    status_problems,
)
from tether.testing.coverage import Collector, CoverageReport
from tether.testing.driving import RunOutcome, StepDecision, run_to_end, run_to_end_async
from tether.testing.person import PersonHasNoRule, PersonRule, ScriptedPerson, Verdict
from tether.testing.scenarios import ScenarioFileError, ScenarioResult, load_suite, run_suite

# `pytest -p tether.testing` (when the package is not installed, so its entry point is not
# registered) loads this module as a plugin, and with it the plugin proper.
pytest_plugins = ["tether.testing.plugin"]

__all__ = [
    "Collector",
    "CoverageReport",
    "ExpectedStep",
    "FunctionModel",
    "PersonHasNoRule",
    "PersonRule",
    "RunOutcome",
    "ScenarioFileError",
    "ScenarioResult",
    "ScriptedModel",
    "ScriptedPerson",
    "StepDecision",
    "Verdict",
    "assert_decisions",
    "assert_path",
    "assert_status",
    "decision_problems",
    "load_suite",
    "path_problems",
    "run_suite",
    "run_to_end",
    "run_to_end_async",
    "status_problems",
]
