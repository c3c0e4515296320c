"""tether.testing: the scripted person, run_to_end, the assertions, and the pytest plugin.

The runs are real (the refund example, a SQLite journal per test, its ledger in tmp_path);
the plugin is exercised in pytest sessions of its own (pytester), as a user's suite would.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from tether.journal import Journal, Ticket
from tether.testing import (
    PersonHasNoRule,
    PersonRule,
    ScriptedPerson,
    Verdict,
    assert_decisions,
    assert_path,
    assert_status,
    run_to_end,
    run_to_end_async,
)

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
REFUND = ROOT / "examples" / "refund"
SUPERVISOR = [
    {"tool": "issue_refund", "when": "args.amount < 200.0", "approve": True},
    {"tool": "issue_refund", "deny": "200 or more goes through finance"},
]


@pytest.fixture(autouse=True)
def ledger(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "ledger.sqlite"
    monkeypatch.setenv("REFUND_LEDGER", str(path))
    # Another test's refund workflow (tests/fixtures/format1) has a module of the same name,
    # which the loader refuses to mistake for this one: import the example's, for this test.
    monkeypatch.delitem(sys.modules, "refund_tools", raising=False)
    return path


def refund_script(order_id: str, amount: float) -> list[dict[str, Any]]:
    return [
        {"kind": "tool_call", "tool": "lookup_order", "args": {"order_id": order_id}},
        {
            "kind": "tool_call",
            "tool": "issue_refund",
            "args": {"order_id": order_id, "amount": amount, "reason": "x"},
        },
        {"kind": "exit", "exit": "refunded"},
        {"kind": "exit", "exit": "declined"},
    ]


# -- the scripted person -----------------------------------------------------------------------


def test_a_person_who_approves_refunds_under_200_lets_180_through(journal: Journal) -> None:
    run = run_to_end(
        REFUND,
        refund_script("A-1001", 180.0),
        journal=journal,
        input={"order_id": "A-1001"},
        person=ScriptedPerson(SUPERVISOR, name="sam"),
    )
    assert_status(run, "completed")
    assert run.steps[1].describe() == (
        "ask by refund-above-100-needs-approval (approval_required) → executed [approved by sam]"
    )
    ticket = asyncio.run(journal.list_tickets(None))[0]
    assert (ticket.status, ticket.decided_by) == ("consumed", "person:sam")


def test_the_same_person_denies_450_and_the_model_is_told(journal: Journal) -> None:
    run = run_to_end(
        REFUND,
        [*refund_script("A-1003", 450.0)[:2], {"kind": "exit", "exit": "declined"}],
        journal=journal,
        input={"order_id": "A-1003"},
        person=ScriptedPerson(SUPERVISOR),
    )
    assert_decisions(
        run,
        [
            ("allow", "default:read"),
            {"decision": "ask", "outcome": "approval_denied"},
            {"exit": "declined", "outcome": "transition"},
        ],
    )
    assert_path(run, ["intake", "resolve", "rejected"])
    assert_status(run, "failed")
    assert run.steps[1].ticket == "denied by scripted-person"


def test_a_person_function_answers_a_question_and_the_answer_reaches_the_model(journal: Journal) -> None:
    def supervisor(ticket: Ticket) -> Verdict | None:
        return Verdict.answer("yes, photo attached") if ticket.kind == "question" else None

    seen: list[str] = []
    script = [
        {"kind": "question", "question": "Did the customer send a photo?"},
        {"kind": "exit", "exit": "declined"},
    ]

    def model(ctx: Any) -> Any:
        seen.extend(str(m.content) for m in ctx.transcript if m.role == "person")
        return script[ctx.proposals_made]

    from tether import FunctionModel

    run = run_to_end(
        REFUND,
        FunctionModel(model),
        journal=journal,
        input={"order_id": "A-1002"},
        person=ScriptedPerson(supervisor),
    )
    assert_decisions(run, [{"decision": "ask", "rule": "runtime:question", "outcome": "answered"}, "allow"])
    assert any("yes, photo attached" in text for text in seen)


def test_a_person_who_takes_over_leaves_the_run_paused_on_the_ticket(journal: Journal) -> None:
    run = run_to_end(
        REFUND,
        refund_script("A-1001", 150.0),
        journal=journal,
        input={"order_id": "A-1001"},
        person=ScriptedPerson([{"take_over": True}]),
    )
    assert_status(run, "paused")
    assert run.ticket_id is not None
    assert run.taken_over is not None and run.ticket_id in run.taken_over
    assert "issue_refund(" in run.taken_over
    assert asyncio.run(journal.get_ticket(run.ticket_id)).status == "pending"


def test_a_ticket_no_rule_decides_is_an_error_naming_the_ticket(journal: Journal) -> None:
    person = ScriptedPerson([{"tool": "issue_refund", "when": "args.amount < 100.0", "approve": True}])
    with pytest.raises(
        PersonHasNoRule, match=r"no rule for ticket tkt_\w+ \(approval of issue_refund\(.*150\.0"
    ):
        run_to_end(
            REFUND,
            refund_script("A-1001", 150.0),
            journal=journal,
            input={"order_id": "A-1001"},
            person=person,
        )


def test_without_a_person_the_run_stays_paused_at_its_first_ticket(journal: Journal) -> None:
    run = run_to_end(REFUND, refund_script("A-1001", 150.0), journal=journal, input={"order_id": "A-1001"})
    assert_status(run, "paused")
    assert run.taken_over is None


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({"tool": "issue_refund", "approve": True, "deny": "no"}, "exactly one action"),
        ({"tool": "issue_refund"}, "exactly one action"),
        ({"tool": "issue_refund", "answer": "yes"}, "add question: true"),
        ({"question": True, "approve": True}, "answered, not approved"),
        ({"tool": "issue_refund", "when": "amount > 3.0", "approve": True}, r"unknown name\(s\) amount"),
        ({"tool": "issue_refund", "when": "args.amount >", "approve": True}, "does not parse"),
        ({"tool": "issue_refund", "aprove": True}, "aprove"),
    ],
)
def test_a_malformed_person_rule_is_refused_saying_why(rule: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        PersonRule.model_validate(rule)


def test_person_rules_match_by_tool_exit_question_and_approver() -> None:
    def ticket(**values: Any) -> Ticket:
        base = {
            "ticket_id": "tkt_1",
            "run_id": "r",
            "step_id": "s1",
            "kind": "approval",
            "subject": "issue_refund",
        }
        return Ticket.model_validate(
            {
                **base,
                "args": {},
                "args_hash": "h",
                "approver": "supervisor",
                "created_at": 0,
                "expires_at": 1,
                **values,
            }
        )

    person = ScriptedPerson(
        [
            {"exit": "refunded", "deny": "not yet"},
            {"question": True, "answer": "blue"},
            {"approver": "finance", "take_over": True},
            {"tool": ["issue_refund", "other"], "approve": True},
        ]
    )
    assert person.decide(ticket(subject="exit:refunded")) == Verdict.deny("not yet")
    assert person.decide(ticket(kind="question", subject="question", question="which?")) == Verdict.answer(
        "blue"
    )
    assert person.decide(ticket(approver="finance")) == Verdict.take_over()
    assert person.decide(ticket()) == Verdict.approve()
    with pytest.raises(PersonHasNoRule, match="approval of lookup_order"):
        person.decide(ticket(subject="lookup_order"))


# -- assertions ----------------------------------------------------------------------------------


def test_a_decision_assertion_shows_what_was_expected_and_what_the_run_did_step_by_step(
    journal: Journal,
) -> None:
    run = run_to_end(REFUND, refund_script("A-1002", 20.0), journal=journal, input={"order_id": "A-1002"})
    with pytest.raises(AssertionError) as failure:
        assert_decisions(
            run,
            [
                ("allow", "default:read"),
                ("deny", "refund-over-hard-limit", "policy_denied"),
                "allow",
                "allow",
            ],
        )
    message = str(failure.value)
    lines = message.splitlines()
    assert lines[0].startswith("decisions differ from those expected at steps 2, 4 (4 expected, 3 in the run")
    wrong = next(line for line in lines if "issue_refund(" in line)
    assert wrong.lstrip().startswith("✗  2")
    assert "deny by refund-over-hard-limit (policy_denied)" in wrong
    assert "allow by refund-small (policy_allowed) → executed" in wrong
    missing = lines[-2]
    assert missing.lstrip().startswith("✗  4") and missing.rstrip().endswith("(no such step)")
    assert lines[-1].strip() == "the run is completed in state done"


def test_path_and_status_assertions_name_both_and_list_the_steps(journal: Journal) -> None:
    run = run_to_end(REFUND, refund_script("A-1002", 20.0), journal=journal, input={"order_id": "A-1002"})
    with pytest.raises(AssertionError) as path_failure:
        assert_path(run, ["intake", "resolve", "rejected"])
    assert str(path_failure.value).startswith(
        "states visited: expected intake → resolve → rejected; the run went intake → resolve → done\n"
    )
    assert "issue_refund(" in str(path_failure.value)
    with pytest.raises(
        AssertionError, match=r"status: expected escalated; the run is completed in state done"
    ):
        assert_status(run, "escalated")
    with pytest.raises(AssertionError, match=r"reason code: expected budget_exhausted; the run's is none"):
        assert_status(run, "completed", reason_code="budget_exhausted")


def test_an_expected_step_as_a_tuple_longer_than_three_is_refused(journal: Journal) -> None:
    run = run_to_end(REFUND, refund_script("A-1002", 20.0), journal=journal, input={"order_id": "A-1002"})
    with pytest.raises(ValueError, match=r"\(decision, rule\[, reason_code\]\)"):
        assert_decisions(run, [("allow", "default:read", "policy_allowed", "executed")])


def test_run_to_end_inside_an_event_loop_points_at_the_async_helper(journal: Journal) -> None:
    async def inside() -> None:
        with pytest.raises(RuntimeError, match=r"await run_to_end_async"):
            run_to_end(REFUND, [], journal=journal, input={"order_id": "A-1002"})
        run = await run_to_end_async(
            REFUND, refund_script("A-1002", 20.0), journal=journal, input={"order_id": "A-1002"}
        )
        assert_status(run, "completed")

    asyncio.run(inside())


# -- the pytest plugin ------------------------------------------------------------------------------


def user_tests(journal: str = "tether_journal") -> str:
    """A user's test module: one small refund, driven with run_to_end on the plugin's fixture."""
    return f"""
from tether.testing import assert_status, run_to_end

SCRIPT = [
    {{"kind": "tool_call", "tool": "lookup_order", "args": {{"order_id": "A-1002"}}}},
    {{"kind": "tool_call", "tool": "issue_refund",
      "args": {{"order_id": "A-1002", "amount": 20.0, "reason": "x"}}}},
    {{"kind": "exit", "exit": "refunded"}},
]

def test_a_small_refund({journal}, tmp_path, monkeypatch):
    monkeypatch.setenv("REFUND_LEDGER", str(tmp_path / "ledger.sqlite"))
    run = run_to_end({str(REFUND)!r}, SCRIPT, journal={journal}, input={{"order_id": "A-1002"}})
    assert_status(run, "completed")
"""


def test_the_plugin_prints_governance_coverage_of_the_sessions_runs(pytester: pytest.Pytester) -> None:
    pytester.makepyfile(test_refund=user_tests())
    result = pytester.runpytest("-p", "tether.testing", "--tether-coverage")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(
        [
            "*tether governance coverage*",
            "governance coverage of refund 1 (1 run)",
            "  kind       items  covered  missed  cover  missing",
            "  states         4        3       1    75%  rejected",
            "  exits          4        2       2    50%  intake → rejected, resolve.declined → rejected",
            "  rules          6        1       5    17%  *",
            "  branches      10        5       5    50%  refund-over-hard-limit=true, "
            "refund-needs-verified-order=true, refund-above-100-needs-approval=true, "
            "refunded-only-when-verified=true, void-refund-on-rollback=true",
            "  decisions      3        1       2    33%  ask, deny",
            "  total         27       12      15    44%",
        ]
    )
    assert result.ret == 0


def test_without_the_option_the_plugin_prints_nothing_and_below_the_threshold_the_session_fails(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(test_refund=user_tests())
    quiet = pytester.runpytest("-p", "tether.testing")
    quiet.assert_outcomes(passed=1)
    assert "governance coverage" not in quiet.stdout.str()
    failing = pytester.runpytest("-p", "tether.testing", "--tether-fail-under", "90")
    failing.assert_outcomes(passed=1)
    failing.stdout.fnmatch_lines(["FAIL: governance coverage 44% is below --tether-fail-under 90%"])
    assert failing.ret == pytest.ExitCode.TESTS_FAILED
    assert pytester.runpytest("-p", "tether.testing", "--tether-fail-under", "44").ret == pytest.ExitCode.OK


def test_runs_driven_directly_in_the_sqlite_journal_fixture_count_when_their_workflow_loads(
    pytester: pytest.Pytester,
) -> None:
    pytester.makepyfile(
        test_direct=f"""
        import asyncio
        from tether import AgentState, Runtime, ScriptedModel, Terminal, Workflow, load_workflow

        def test_a_loaded_workflow(tether_journal, tmp_path, monkeypatch):
            assert tether_journal.path.parent == tmp_path
            monkeypatch.setenv("REFUND_LEDGER", str(tmp_path / "ledger.sqlite"))
            runtime = Runtime(tether_journal)
            asyncio.run(runtime.start(load_workflow({str(REFUND)!r}), ScriptedModel([]),
                                      input={{"order_id": "nope"}}, workflow_ref={str(REFUND)!r}))

        def test_a_workflow_built_in_code(tether_journal):
            work = AgentState("work", "x", (), {{"done": "end"}})
            wf = Workflow("inline", "1", "work", [work, Terminal("end")])
            model = ScriptedModel([{{"kind": "exit", "exit": "done"}}])
            asyncio.run(Runtime(tether_journal).start(wf, model))
        """
    )
    result = pytester.runpytest("-p", "tether.testing", "--tether-coverage")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(
        [
            "governance coverage of refund 1 (1 run)",
            "  states         4        2       2    50%  resolve, done",
            "1 run(s) of workflow inline not counted: its definition was built in code and never given to a "
            "tether.testing helper (run it with run_to_end)",
        ]
    )


def test_the_postgres_journal_fixture_runs_on_a_fresh_schema_dropped_afterwards(
    pytester: pytest.Pytester,
) -> None:
    schema_of = (
        "\n\ndef test_its_schema(tether_journal_postgres):\n"
        "    import pathlib\n"
        "    pathlib.Path('schema.txt').write_text(tether_journal_postgres.url.split('search_path%3D')[1])\n"
    )
    pytester.makepyfile(test_pg=user_tests("tether_journal_postgres") + schema_of)
    result = pytester.runpytest("-p", "tether.testing", "--tether-coverage", "-rs")
    outcomes = result.parseoutcomes()
    if outcomes.get("skipped") and os.environ.get("CI") != "true":
        pytest.skip(f"the plugin skipped its PostgreSQL test: {result.stdout.str()[-400:]}")
    result.assert_outcomes(passed=2)
    result.stdout.fnmatch_lines(["governance coverage of refund 1 (1 run)"])
    import psycopg

    schema = (pytester.path / "schema.txt").read_text()
    assert schema.startswith("tether_test_")
    url = os.environ.get("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:5432/test")
    with psycopg.connect(url) as conn:
        left = conn.execute("SELECT 1 FROM information_schema.schemata WHERE schema_name = %s", (schema,))
        assert left.fetchall() == [], f"schema {schema} was not dropped"


def test_the_postgres_fixture_skips_without_a_server_and_fails_under_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    pytester.makepyfile(test_pg="def test_needs_postgres(tether_journal_postgres):\n    pass\n")
    monkeypatch.setenv("TETHER_TEST_PG", "postgresql://postgres@127.0.0.1:1/test")
    monkeypatch.delenv("CI", raising=False)
    skipped = pytester.runpytest("-p", "tether.testing", "-rs")
    skipped.assert_outcomes(skipped=1)
    skipped.stdout.fnmatch_lines(
        ["*PostgreSQL not reachable at postgresql://postgres@127.0.0.1:1/test*TETHER_TEST_PG*"]
    )
    monkeypatch.setenv("CI", "true")
    failed = pytester.runpytest("-p", "tether.testing")
    failed.assert_outcomes(errors=1)
    failed.stdout.fnmatch_lines(["*CI=true: this must not be skipped*"])


def test_installed_the_plugin_loads_from_its_entry_point_once_with_or_without_p(tmp_path: Path) -> None:
    """What `pip install` makes of pyproject's entry point, simulated by a dist-info folder on the path."""
    entry_points = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]["pytest11"]
    assert entry_points == {"tether.testing": "tether.testing.plugin"}
    site = tmp_path / "site"
    dist = site / "tether_plugin_probe-1.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: tether-plugin-probe\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[pytest11]\n" + "".join(f"{name} = {target}\n" for name, target in entry_points.items())
    )
    (tmp_path / "test_it.py").write_text("def test_fixture(tether_journal):\n    assert tether_journal\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT / "src")])}
    env.pop("PYTEST_DISABLE_PLUGIN_AUTOLOAD", None)
    for extra in ([], ["-p", "tether.testing"]):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                *extra,
                "--tether-coverage",
                "test_it.py",
            ],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        assert "1 passed" in out.stdout
        assert "governance coverage: no runs of a known workflow" in out.stdout
