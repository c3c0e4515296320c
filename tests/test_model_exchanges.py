"""Model exchanges recorded beside the journal, and replay of a run from them."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import Shop, call, run
from tether import Runtime
from tether.journal import Journal
from tether.models import (
    Attempt,
    Exchange,
    FunctionModel,
    ModelCallError,
    ModelContext,
    ModelReply,
    ReplayModel,
    Usage,
    resolve_model,
)
from tether.timeline import timeline

REPO = Path(__file__).resolve().parents[1]


def wandering_model(seed: int) -> FunctionModel:
    """A stand-in for a real model: its choices vary from run to run (seeded), and it
    reports an exchange like a vendor adapter does."""
    rng = random.Random(seed)

    def propose(ctx: ModelContext) -> ModelReply:
        turn = ctx.proposals_made
        if turn == 0:
            output: Any = call("read_order", order_id="A1")
        elif turn == 1:
            output = call("refund", order_id="A1", amount=rng.choice([20.0, 30.0, 40.0]))
        elif turn == 2:
            output = rng.choice(
                ['{"kind": "tool_call", "tool": "refund"', call("delete_order", order_id="A1")]
            )
        else:
            output = {"kind": "exit", "exit": "done"}
        return ModelReply(
            output=output,
            usage=Usage(input_tokens=100 + turn, output_tokens=10),
            exchange=Exchange(
                request={"messages": [{"role": "user", "content": f"turn {turn}"}]},
                response={"id": f"resp-{turn}"},
                attempts=[Attempt(number=1, seconds=0.01)],
            ),
        )

    return FunctionModel(propose, name="wandering")


def decisions(entries: list[Any]) -> list[tuple[Any, ...]]:
    """What a regression test compares: per step, the proposal, decision and outcome."""
    return [
        (
            row["state"],
            json.dumps(row.get("proposal"), sort_keys=True),
            row.get("decision"),
            row.get("rule_id"),
            row.get("outcome"),
            row.get("reason_code"),
        )
        for row in timeline(entries)
        if row.get("decision") is not None
    ]


def test_every_model_call_is_recorded_with_the_step_it_served(journal: Journal, shop: Shop) -> None:
    async def scenario() -> None:
        result = await Runtime(journal).start(shop.workflow(), wandering_model(1))
        assert result.status == "completed"
        recorded = await journal.read_exchanges(result.run_id)
        entries = await journal.read_entries(result.run_id)
        step_ids = [row["step_id"] for row in timeline(entries) if row["kind"] == "step"]
        assert [x.seq for x in recorded] == [1, 2, 3, 4]
        assert [x.step_id for x in recorded] == step_ids
        assert recorded[0].request == {"messages": [{"role": "user", "content": "turn 0"}]}
        assert recorded[0].response == {"id": "resp-0"} and recorded[0].model == "wandering"
        assert recorded[0].output == call("read_order", order_id="A1")
        assert [x.usage["input_tokens"] for x in recorded] == [100, 101, 102, 103]
        # The entries keep usage and proposals, not the prompts: those live in the exchanges.
        assert '"request"' not in "".join(e.body_json for e in entries)

    run(scenario())


def test_a_failed_call_is_recorded_with_its_attempts_and_escalates(journal: Journal, shop: Shop) -> None:
    attempts = [
        Attempt(number=1, seconds=0.2, error="rate limited", reason_code="model_rate_limited", retry_in=1.0),
        Attempt(number=2, seconds=0.1, error="rate limited", reason_code="model_rate_limited"),
    ]

    def propose(ctx: ModelContext) -> ModelReply:
        raise ModelCallError(
            "model_rate_limited", "rate limited (attempt 2 of 2)", request={"m": 1}, attempts=attempts
        )

    async def scenario() -> None:
        result = await Runtime(journal).start(shop.workflow(), FunctionModel(propose))
        assert (result.status, result.reason_code) == ("escalated", "model_rate_limited")
        assert result.message == "rate limited (attempt 2 of 2)"
        [x] = await journal.read_exchanges(result.run_id)
        assert (x.reason_code, x.error, x.output, x.request) == (
            "model_rate_limited",
            "rate limited (attempt 2 of 2)",
            None,
            {"m": 1},
        )
        assert [a["reason_code"] for a in x.attempts] == ["model_rate_limited", "model_rate_limited"]

        def crash(ctx: ModelContext) -> ModelReply:
            raise KeyError("choices")

        other = await Runtime(journal).start(shop.workflow(), FunctionModel(crash))
        assert (other.status, other.reason_code) == ("escalated", "model_error")
        [y] = await journal.read_exchanges(other.run_id)
        assert y.error == "KeyError: 'choices'"

    run(scenario())


def test_a_replayed_run_makes_the_same_decisions_offline(journal: Journal, shop: Shop) -> None:
    async def scenario() -> None:
        runtime = Runtime(journal)
        original = await runtime.start(shop.workflow(), wandering_model(7))
        replayed = await runtime.start(
            shop.workflow(), resolve_model(f"replay:{original.run_id}", journal=journal)
        )
        assert (replayed.status, replayed.data) == (original.status, original.data)
        first, second = [await journal.read_entries(r.run_id) for r in (original, replayed)]
        assert decisions(second) == decisions(first)
        assert len(decisions(first)) == 5  # read, refund (intent, result), a refused third call, exit
        # A stricter policy replayed against the same answers shows where behaviour changes.
        strict = shop.workflow(policy={"rules": [{"id": "no-refunds", "tool": "refund", "decision": "deny"}]})
        changed = await runtime.start(strict, ReplayModel(journal, original.run_id))
        third = await journal.read_entries(changed.run_id)
        assert [d[2:4] for d in decisions(third)][1] == ("deny", "no-refunds")

    run(scenario())


def test_replay_resumes_where_it_was_and_reports_running_past_the_recording(
    journal: Journal, shop: Shop
) -> None:
    script = [call("read_order", order_id="A1"), call("refund", order_id="A1", amount=60.0)]

    async def scenario() -> None:
        runtime = Runtime(journal)
        recorded = await runtime.start(shop.workflow(), FunctionModel(lambda ctx: script[ctx.proposals_made]))
        assert recorded.status == "paused"  # refund above 50 asks a supervisor
        replay = await runtime.start(shop.workflow(), ReplayModel(journal, recorded.run_id))
        assert replay.status == "paused" and replay.ticket_id
        await journal.decide_ticket(replay.ticket_id, approve=True, by="sam", now=runtime.clock())
        # Another process: a new replay model finds its place from the run's own exchanges.
        result = await Runtime(journal).resume(
            replay.run_id, shop.workflow(), ReplayModel(journal, recorded.run_id)
        )
        assert (result.status, result.reason_code) == ("escalated", "model_error")
        assert "has 2 model call(s); call 3 was asked" in (result.message or "")
        assert shop.refunds == [("A1", 60.0)]

        missing = await runtime.start(shop.workflow(), ReplayModel(journal, "run-that-never-was"))
        assert missing.reason_code == "model_error" and "no recorded model exchanges" in (
            missing.message or ""
        )

    run(scenario())


def test_a_replayed_failure_fails_the_same_way(journal: Journal, shop: Shop) -> None:
    def overloaded(ctx: ModelContext) -> ModelReply:
        raise ModelCallError("model_unavailable", "529 overloaded (attempt 4 of 4)")

    async def scenario() -> None:
        runtime = Runtime(journal)
        original = await runtime.start(shop.workflow(), FunctionModel(overloaded))
        again = await runtime.start(shop.workflow(), ReplayModel(journal, original.run_id))
        assert (again.status, again.reason_code) == ("escalated", "model_unavailable")

    run(scenario())


def test_recording_can_be_switched_off(journal: Journal, shop: Shop) -> None:
    async def scenario() -> None:
        result = await Runtime(journal, record_exchanges=False).start(shop.workflow(), wandering_model(3))
        assert result.status == "completed"
        assert await journal.read_exchanges(result.run_id) == []

    run(scenario())


def tether(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REFUND_LEDGER": str(cwd / "ledger.sqlite")}
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )


def test_cli_shows_replays_and_prunes_exchanges(tmp_path: Path) -> None:
    db = str(tmp_path / "t.db")
    refund = str(REPO / "examples" / "refund")

    def refund_run(model: str) -> subprocess.CompletedProcess[str]:
        return tether(
            "run", refund, "--model", model, "--input", '{"order_id": "A-1001", "reason": "broken"}',
            "--answer", "approve-all", "--db", db, "--json", cwd=tmp_path,
        )  # fmt: skip

    first = refund_run(f"script:{refund}/proposals.json")
    run_id = json.loads(first.stdout)["run_id"]
    # An in-process model's proposals are all in the run's entries: no exchange repeats them.
    scripted = tether("exchanges", run_id, "--db", db, cwd=tmp_path)
    assert scripted.returncode == 0 and "no recorded model exchanges" in scripted.stdout

    # Replay reads the scripted run's calls from its entries; the replaying run records its own.
    again = refund_run(f"replay:{run_id}")
    a, b = json.loads(first.stdout), json.loads(again.stdout)
    assert b["status"] == a["status"]
    assert [(s.get("decision"), s.get("outcome")) for s in b["steps"]] == [
        (s.get("decision"), s.get("outcome")) for s in a["steps"]
    ]
    run_id = b["run_id"]
    shown = tether("exchanges", run_id, "--db", db, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert " 1 " in shown.stdout and "lookup_order" in shown.stdout
    listed = json.loads(tether("exchanges", run_id, "--db", db, "--json", cwd=tmp_path).stdout)
    assert [x["seq"] for x in listed] == list(range(1, len(listed) + 1)) and listed

    bad = tether("db", "prune-exchanges", "--older-than", "a while", "--db", db, cwd=tmp_path)
    assert bad.returncode == 2 and "--older-than must be a number with a unit" in bad.stderr + bad.stdout
    pruned = tether("db", "prune-exchanges", "--older-than", "0s", "--db", db, cwd=tmp_path)
    assert pruned.returncode == 0 and f"deleted {len(listed)} model exchange(s)" in pruned.stdout
    gone = tether("exchanges", run_id, "--db", db, cwd=tmp_path)
    assert "no recorded model exchanges" in gone.stdout
    unknown = tether("exchanges", "nope", "--db", db, cwd=tmp_path)
    assert unknown.returncode == 2 and "no run 'nope'" in unknown.stderr + unknown.stdout


def test_an_observer_sees_every_commit_and_its_failure_is_not_the_runs(journal: Journal, shop: Shop) -> None:
    seen: list[str] = []

    def observe(entries: list[Any]) -> None:
        seen.extend(e.kind for e in entries)
        raise BrokenPipeError("the terminal went away")

    async def scenario() -> None:
        result = await Runtime(journal, on_commit=observe).start(shop.workflow(), wandering_model(2))
        assert result.status == "completed"
        committed = [e.kind for e in await journal.read_entries(result.run_id)]
        assert seen == committed[1:]  # everything after run_started, which is written at creation

    run(scenario())
