"""`tether replay`: a run rebuilt from its journal alone, every decision evaluated again under
the policy recorded with it; nothing is executed, no model is asked; a changed record shows."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from conftest import Shop, call, run
from tether import Policy, Runtime, ScriptedModel, Tool
from tether.errors import JournalError
from tether.journal import Journal, open_journal, verify_chain
from tether.journal.records import GENESIS_HASH, entry_hash
from tether.replay import ReplayReport, replay_run
from tether.testing import Collector, load_suite, run_suite, scenarios

ROOT = Path(__file__).resolve().parent.parent
SUITES = [ROOT / "examples" / "refund" / "scenarios.yaml", ROOT / "examples" / "retail" / "scenarios.yaml"]
DONE = {"kind": "exit", "exit": "done"}
# The shop's policy, with a resolver: a refund of a paid order over 50 is asked.
POLICY = {
    "rules": [
        {"id": "no-big-refunds", "tool": "refund", "when": "args.amount > 500.0", "decision": "deny"},
        {
            "id": "refund-ask",
            "tool": "refund",
            "when": 'status(args.order_id) == "paid" && args.amount > 50.0',
            "decision": "ask",
            "approver": "supervisor",
        },
        {"id": "refund-ok", "tool": "refund", "decision": "allow"},
    ]
}


@pytest.fixture(autouse=True)
def examples_tools(monkeypatch: pytest.MonkeyPatch) -> None:
    """The refund example's tools module, not another test's module of the same name."""
    monkeypatch.delitem(sys.modules, "refund_tools", raising=False)


def opened(db: Path) -> contextlib.closing[Journal]:
    return contextlib.closing(open_journal(str(db)))


def status_of(shop: Shop) -> dict[str, Any]:
    """The shop's resolver (one definition: the workflow hash covers its source)."""
    return {"status": lambda ctx, order_id: shop.orders[order_id]["status"]}


def shop_run(journal: Journal, shop: Shop, script: list[Any]) -> str:
    """A shop run driven to its end, its tickets approved by a supervisor."""
    workflow = shop.workflow(POLICY, resolvers=status_of(shop))
    runtime = Runtime(journal)
    model = ScriptedModel(script)
    result = run(runtime.start(workflow, model))
    while result.status == "paused":
        run(journal.decide_ticket(result.ticket_id or "", approve=True, by="supervisor"))
        result = run(runtime.resume(result.run_id, workflow, model))
    assert result.status == "completed"
    return result.run_id


SCRIPT = [
    call("read_order", order_id="A1"),
    call("refund", order_id="A1", amount=900.0),  # denied
    call("refund", order_id="A1", amount=30.0),  # allowed
    call("refund", order_id="A1", amount=60.0),  # asked, approved, executed
    call("delete_order", order_id="A1"),  # out of scope: refused by the runtime
    DONE,
]


# -- replay reproduces ---------------------------------------------------------------------------


def test_replay_reproduces_every_decision_of_every_run_the_refund_and_retail_scenarios_make(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    reports: list[ReplayReport] = []
    drive = scenarios.run_to_end_async

    async def driven_then_replayed(*args: Any, journal: Journal, **kwargs: Any) -> Any:
        try:
            return await drive(*args, journal=journal, **kwargs)
        finally:
            for record in await journal.list_runs(limit=1000):
                reports.append(await replay_run(journal, record.run_id))

    monkeypatch.setattr(scenarios, "run_to_end_async", driven_then_replayed)

    async def every_suite() -> list[str]:
        problems = []
        for path in SUITES:
            collector = Collector()
            suite = await load_suite(path, collector)
            problems += [p for r in await run_suite(suite, collector) for p in r.problems]
        return problems

    assert asyncio.run(every_suite()) == []
    assert len(reports) == 14  # one run per scenario
    assert [r.as_dict() for r in reports if not r.ok or r.having("unknown") or r.notes] == []
    counts = {s: sum(r.summary()[s] for r in reports) for s in ("same", "not re-evaluated")}
    # Every policy decision of every run came out as recorded; one refusal was the runtime's
    # (made before policy, so not the policy's to reproduce).
    assert counts == {"same": 72, "not re-evaluated": 1}


def test_replay_never_calls_a_tool_a_verifier_a_resolver_or_a_model(
    journal: Journal, shop: Shop, monkeypatch: pytest.MonkeyPatch
) -> None:
    run_id = shop_run(journal, shop, SCRIPT)
    assert shop.executed == ["read_order", "refund", "refund"]

    def never(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("replay must never act")

    monkeypatch.setattr(Tool, "call", never)
    monkeypatch.setattr(Tool, "verify", never)
    monkeypatch.setattr(ScriptedModel, "propose", never)
    shop.orders.clear()  # the resolver would raise a KeyError: it answers from the record

    report = run(replay_run(journal, run_id))

    assert report.ok, report.as_dict()
    decided = [
        (d.step_id, d.subject, d.recorded.decision, d.recorded.rule_id, d.status) for d in report.decisions
    ]
    assert decided == [
        ("s1", "tool read_order", "allow", "default:read", "same"),
        ("s2", "tool refund", "deny", "no-big-refunds", "same"),
        ("s3", "tool refund", "allow", "refund-ok", "same"),
        ("s4", "tool refund", "ask", "refund-ask", "same"),
        ("s5", "tool delete_order", "deny", "runtime:scope", "not re-evaluated"),
        ("s6", "exit done", "allow", "default:exit", "same"),
    ]
    # The resolver's value is the one recorded with the decision.
    assert report.decisions[3].decision is not None
    assert report.decisions[3].decision.resolved == {'status("A1")': "paid"}
    assert shop.executed == ["read_order", "refund", "refund"]


def test_replay_uses_the_policy_recorded_with_the_run_not_the_workflows_current_one(
    journal: Journal, shop: Shop
) -> None:
    run_id = shop_run(journal, shop, SCRIPT)

    # A policy given for the replay is a what-if; without one, the recorded text decides.
    report = run(replay_run(journal, run_id))
    record = run(journal.get_run(run_id))
    kept = run(journal.get_definition(record.policy_hash))

    assert report.ok and report.policy is None
    assert (
        kept is not None and kept.kind == "policy" and json.loads(kept.body)["rules"][1]["id"] == "refund-ask"
    )
    workflow = run(journal.get_definition(record.workflow_hash))
    assert workflow is not None and json.loads(workflow.body)["name"] == "shop"


# -- tampering ---------------------------------------------------------------------------------------


def rewrite(db: Path, run_id: str, seq: int, edit: Any) -> None:
    """Change one entry's body by SQL and rewrite the chain after it consistently (every hash
    recomputed, the run's head moved): the chain verifies, the record is still false."""
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TRIGGER entries_no_update")
        rows = conn.execute(
            "SELECT seq, kind, step_id, state, body, created_at FROM entries WHERE run_id = ? ORDER BY seq",
            (run_id,),
        ).fetchall()
        prev = GENESIS_HASH  # a link is the hash of the entry before it
        for number, kind, step_id, state, body, created_at in rows:
            if number == seq:
                body = json.dumps(edit(json.loads(body)), sort_keys=True, separators=(",", ":"))
            digest = entry_hash(run_id, number, kind, step_id, state, body, prev, created_at)
            conn.execute(
                "UPDATE entries SET body = ?, hash = ? WHERE run_id = ? AND seq = ?",
                (body, bytes.fromhex(digest), run_id, number),
            )
            prev = digest
        conn.execute("UPDATE runs SET last_hash = ? WHERE run_id = ?", (prev, run_id))


def entry_of(journal: Journal, run_id: str, step_id: str, kind: str) -> int:
    return next(e.seq for e in run(journal.read_entries(run_id)) if e.step_id == step_id and e.kind == kind)


def decision_set(**values: Any) -> Any:
    def edit(body: dict[str, Any]) -> dict[str, Any]:
        body["decision"] |= values
        return body

    return edit


@pytest.mark.parametrize(
    ("step_id", "kind", "edit", "shows"),
    [
        # A denial rewritten as allowed (the refund of 900 then looks permitted).
        (
            "s2",
            "refused",
            decision_set(decision="allow", rule_id="refund-ok"),
            "s2: diverged: differs in decision",
        ),
        # The rule that decided, renamed where it was first recorded (the intent)...
        ("s3", "intent", decision_set(rule_id="refund-small"), "s3: diverged: differs in rule_id"),
        # ... and where it was repeated (the executed call).
        (
            "s3",
            "executed",
            decision_set(rule_id="refund-small"),
            "step s3): its decision is not the one entry",
        ),
        # The resolver value recorded with the ask, changed to one that would have allowed it.
        (
            "s4",
            "awaiting_approval",
            decision_set(resolved={'status("A1")': "refunded"}),
            "s4: diverged: differs in",
        ),
        # Who was to approve: every field of the decision is compared.
        ("s4", "awaiting_approval", decision_set(approver="anyone"), "s4: diverged: differs in approver"),
    ],
)
def test_a_decision_changed_in_the_database_shows_as_a_divergence_though_the_chain_verifies(
    tmp_path: Path, shop: Shop, step_id: str, kind: str, edit: Any, shows: str
) -> None:
    db = tmp_path / "journal.db"
    with opened(db) as journal:
        run_id = shop_run(journal, shop, SCRIPT)
        seq = entry_of(journal, run_id, step_id, kind)
    rewrite(db, run_id, seq, edit)

    with opened(db) as journal:
        assert verify_chain(run(journal.read_entries(run_id))) == []
        report = run(replay_run(journal, run_id))

    assert not report.ok
    found = [f"{d.step_id}: {d.status}: {d.note}" for d in report.diverged] + report.problems
    # The first finding is the edited entry; the step's later entries, which repeat the
    # decision, may disagree with it too.
    assert shows in found[0] and all(step_id in f for f in found), found


def test_arguments_changed_after_the_decision_show_as_a_divergence(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "journal.db"
    with opened(db) as journal:
        run_id = shop_run(journal, shop, SCRIPT)
        seq = entry_of(journal, run_id, "s4", "executed")

    def smaller(body: dict[str, Any]) -> dict[str, Any]:
        body["args"]["amount"] = 40.0  # would have been allowed without asking
        return body

    rewrite(db, run_id, seq, smaller)
    with opened(db) as journal:
        report = run(replay_run(journal, run_id))

    assert report.problems == [
        f"entry {seq} (executed, step s4): its arguments do not hash to the args_hash recorded with them"
    ]


def test_data_changed_after_the_fact_shows_as_a_problem_of_the_run(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "journal.db"
    with opened(db) as journal:
        workflow = shop.workflow(POLICY, resolvers={"status": lambda ctx, o: "paid"})
        result = run(
            Runtime(journal).start(
                workflow, ScriptedModel([{"kind": "exit", "exit": "done", "update": {"refunded": 30.0}}])
            )
        )
        seq = entry_of(journal, result.run_id, "s1", "transition")

    def more(body: dict[str, Any]) -> dict[str, Any]:
        body["proposal"]["update"]["refunded"] = 3000.0
        return body

    rewrite(db, result.run_id, seq, more)
    with opened(db) as journal:
        report = run(replay_run(journal, result.run_id))

    assert not report.ok
    assert report.problems == [
        f"entry {seq + 1} (run_finished): the data it records is not the data the entries before it make"
    ]


# -- definitions ----------------------------------------------------------------------------------


def test_a_definition_is_kept_once_per_hash_and_an_edited_one_is_refused(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "journal.db"
    with opened(db) as journal:
        first = shop_run(journal, shop, [DONE])
        shop_run(journal, shop, [DONE])
        policy_hash = run(journal.get_run(first)).policy_hash
    with sqlite3.connect(db) as conn:
        assert conn.execute(
            "SELECT kind, count(*) FROM definitions GROUP BY kind ORDER BY kind"
        ).fetchall() == [
            ("policy", 1),
            ("workflow", 1),
        ]
        conn.execute(
            "UPDATE definitions SET body = replace(body, '500.0', '5000.0') WHERE hash = ?", (policy_hash,)
        )

    with opened(db) as journal, pytest.raises(JournalError, match="does not hash to its key"):
        run(replay_run(journal, first))


def test_a_run_from_before_definitions_were_kept_replays_with_its_workflow_given(
    tmp_path: Path, shop: Shop
) -> None:
    db = tmp_path / "journal.db"
    with opened(db) as journal:
        run_id = shop_run(journal, shop, SCRIPT)
    with sqlite3.connect(db) as conn:
        conn.execute("DELETE FROM definitions")

    workflow = shop.workflow(POLICY, resolvers=status_of(shop))
    other = shop.workflow(None, resolvers=status_of(shop))  # another policy: not the run's, unused
    with opened(db) as journal:
        unknown = run(replay_run(journal, run_id))
        wrong = run(replay_run(journal, run_id, workflows=[other]))
        given = run(replay_run(journal, run_id, workflows=[workflow]))

    assert {d.status for d in unknown.decisions} == {"unknown", "not re-evaluated"}
    assert "is not kept in this journal" in unknown.notes[0]
    assert {d.status for d in wrong.decisions} == {"unknown", "not re-evaluated"}
    assert given.ok and {d.status for d in given.decisions} == {"same", "not re-evaluated"}


def test_a_migrated_run_is_replayed_under_each_policy_it_was_pinned_to(journal: Journal, shop: Shop) -> None:
    resolvers = {"status": lambda ctx, order_id: "paid"}
    first = shop.workflow(POLICY, resolvers=resolvers)
    stricter = {"rules": [{"id": "refund-ask-all", "tool": "refund", "decision": "ask"}]}
    second = shop.workflow(stricter, resolvers=resolvers)
    second.version = "2"
    runtime = Runtime(journal)
    # A scripted model proposes by position in the state's transcript: one script for both.
    script = [call("refund", order_id="A1", amount=a) for a in (30.0, 70.0, 20.0)] + [DONE]
    paused = run(runtime.start(first, ScriptedModel(script)))
    assert paused.status == "paused"
    run(runtime.migrate(paused.run_id, second, by="ops", workflow_ref="<test>"))
    run(journal.decide_ticket(paused.ticket_id or "", approve=True, by="supervisor"))
    result = run(runtime.resume(paused.run_id, second, ScriptedModel(script)))
    assert result.status == "paused"  # the 20 was asked, under the new policy

    report = run(replay_run(journal, paused.run_id))

    assert report.ok, report.as_dict()
    assert [(d.recorded.rule_id, d.status) for d in report.decisions] == [
        ("refund-ok", "same"),
        ("refund-ask", "same"),
        ("refund-ask-all", "same"),
    ]


# -- the command ------------------------------------------------------------------------------------


def tether(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], cwd=cwd, capture_output=True, text=True, env=env, timeout=120
    )


def test_tether_replay_prints_every_decision_and_exits_1_on_a_divergence(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "journal.db"
    with opened(db) as journal:
        run_id = shop_run(journal, shop, SCRIPT)

    same = tether("replay", run_id, "--db", str(db), cwd=tmp_path)
    as_json = tether("replay", run_id, "--db", str(db), "--json", cwd=tmp_path)

    assert same.returncode == 0, same.stderr
    assert (
        'refund({"amount": 900.0, "order_id": "A1"})  deny by no-big-refunds  deny by no-big-refunds  same'
        in same.stdout
    )
    assert "6 decision(s): 5 same, 1 not re-evaluated — reproduced" in same.stdout
    shown = json.loads(as_json.stdout)
    assert shown["ok"] is True and shown["summary"]["same"] == 5

    with opened(db) as journal:
        seq = entry_of(journal, run_id, "s2", "refused")
    rewrite(db, run_id, seq, decision_set(decision="allow", rule_id="refund-ok"))
    diverged = tether("replay", run_id, "--db", str(db), cwd=tmp_path)

    assert diverged.returncode == 1
    assert "DIVERGED" in diverged.stdout and "diverged: differs in decision" in diverged.stdout


def test_tether_replay_of_an_unknown_run_is_refused(tmp_path: Path, shop: Shop) -> None:
    db = tmp_path / "journal.db"
    with opened(db) as journal:
        shop_run(journal, shop, [DONE])

    missing = tether("replay", "run_nowhere", "--db", str(db), "--json", cwd=tmp_path)

    assert missing.returncode == 2
    assert json.loads(missing.stdout)["error"]["code"] == "not_found"


def test_rerun_is_the_model_that_re_proposes_recorded_answers_and_replay_is_its_old_name(
    journal: Journal, shop: Shop
) -> None:
    from tether.models import resolve_model

    run_id = shop_run(journal, shop, [call("read_order", order_id="A1"), DONE])

    rerun = resolve_model(f"rerun:{run_id}", journal=journal)
    old = resolve_model(f"replay:{run_id}", journal=journal)

    assert (rerun.name, old.name) == (f"rerun:{run_id}", f"replay:{run_id}")
    again = run(
        Runtime(journal).start(shop.workflow(POLICY, resolvers={"status": lambda c, o: "paid"}), rerun)
    )
    assert again.status == "completed" and shop.executed == ["read_order", "read_order"]  # it acts


# -- PostgreSQL ----------------------------------------------------------------------------------


def test_on_postgresql_definitions_are_kept_and_checked_and_a_run_replays(
    tether_journal_postgres: Journal, shop: Shop
) -> None:
    journal = tether_journal_postgres
    run_id = shop_run(journal, shop, SCRIPT)
    record = run(journal.get_run(run_id))

    report = run(replay_run(journal, run_id))

    assert report.ok and report.summary() == {
        "same": 5,
        "diverged": 0,
        "changed": 0,
        "unknown": 0,
        "not re-evaluated": 1,
    }
    kept = run(journal.get_definition(record.policy_hash))
    assert kept is not None and kept.intact()
    # Kept once: a second runtime writes the same hash again, and nothing changes.
    run(
        Runtime(journal).keep_definitions(
            shop.workflow(POLICY, resolvers=status_of(shop)), Policy.from_dict(POLICY, "test-policy")
        )
    )
    assert run(journal.get_definition(record.policy_hash)) == kept
