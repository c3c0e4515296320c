"""Limits on what a run holds, poison runs, and leases given back on every exit path."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import Shop, call, run, step_rows
from tether import InputError, Limits, ModelReply, Runtime, ScriptedModel, tool
from tether.journal import Journal, LeaseHeld
from tether.models import FunctionModel, ModelContext
from tether.runtime import MAX_CRASHES


def test_an_input_over_the_limit_is_refused_before_anything_is_created(journal: Journal, shop: Shop) -> None:
    big = {"notes": "x" * 2_000_000}
    with pytest.raises(
        InputError, match=r"the run.s input is refused: .*2,000,000 .*exceeds the limit of 1,000,000"
    ):
        run(Runtime(journal).start(shop.workflow(), ScriptedModel([]), input=big))
    with pytest.raises(InputError, match="numbers must be finite"):
        run(Runtime(journal).start(shop.workflow(), ScriptedModel([]), input={"n": float("nan")}))
    assert run(journal.list_runs()) == []


def test_a_workflow_may_raise_its_limits(journal: Journal, shop: Shop) -> None:
    wf = shop.workflow()
    wf.limits = Limits(max_input_bytes=3_000_000)
    result = run(
        Runtime(journal).start(wf, ScriptedModel([{"kind": "finish"}]), input={"n": "x" * 2_000_000})
    )
    assert result.status == "completed"


def test_arguments_over_the_limit_are_refused_and_never_reach_the_tool(journal: Journal, shop: Shop) -> None:
    script = [call("read_order", order_id="x" * 300_000), {"kind": "finish"}]
    result = run(Runtime(journal).start(shop.workflow(), ScriptedModel(script)))

    refused = step_rows(journal, result.run_id)[0]
    assert refused["reason_code"] == "invalid_arguments"
    assert "the limit is 256,000" in refused["decision"]["reason"]
    assert shop.executed == []


def test_a_result_over_the_limit_is_recorded_as_a_note_not_stored_whole(tmp_path: Path) -> None:
    from tether import AgentState, Terminal, Workflow, open_journal

    @tool(effect="read")
    def dump() -> str:
        """Return a lot."""
        return "y" * 3_000_000

    wf = Workflow("big", "1", "s", [AgentState("s", "i", (dump,), {"finish": "end"}), Terminal("end")])
    journal = open_journal(str(tmp_path / "j.db"))
    try:
        result = run(Runtime(journal).start(wf, ScriptedModel([call("dump"), {"kind": "finish"}])))
        row = step_rows(journal, result.run_id)[0]
    finally:
        journal.close()
    assert row["outcome"] == "executed"
    assert row["result"]["not_recorded"] == "3,000,000 bytes exceeds the limit of 1,000,000"
    assert (tmp_path / "j.db").stat().st_size < 1_000_000


def broken_adapter() -> FunctionModel:
    """An adapter with a bug: its reply is not what the protocol says (no usage object)."""

    def propose(ctx: ModelContext) -> ModelReply:
        return ModelReply.model_construct(output=call("read_order", order_id="A1"), usage=None, exchange=None)

    return FunctionModel(propose, name="broken")


def test_a_run_that_crashes_the_runtime_is_recorded_quarantined_then_failed(
    journal: Journal, shop: Shop
) -> None:
    first = Runtime(journal, worker_id="w1", crash_backoff_seconds=60)
    result = run(first.start(shop.workflow(), broken_adapter()))

    assert result.status == "running" and "AttributeError" in (result.message or "")
    assert f"(1 of {MAX_CRASHES}); retried after 60 s" in (result.message or "")
    # Quarantined: the lease is kept for the backoff, so no other process picks it up at once.
    with pytest.raises(LeaseHeld):
        run(Runtime(journal, worker_id="w2").resume(result.run_id, shop.workflow(), broken_adapter()))
    assert run(journal.claim("w2", lease_seconds=10, now=__import__("time").time())) is None

    for _ in range(MAX_CRASHES - 1):  # the same worker may retry at once; each crash is recorded
        result = run(first.resume(result.run_id, shop.workflow(), broken_adapter()))
    assert (result.status, result.reason_code) == ("failed", "runtime_error")
    crashed = [e for e in run(journal.read_entries(result.run_id)) if e.kind == "crashed"]
    assert [e.body.crashes for e in crashed] == list(range(1, MAX_CRASHES + 1))  # type: ignore[union-attr]


def test_resume_that_ends_paused_gives_the_lease_back(journal: Journal, shop: Shop) -> None:
    """On main before kernel v2 the run stayed leased ~30 s after `tether resume` exited."""
    paused = run(
        Runtime(journal).start(shop.workflow(), ScriptedModel([call("refund", order_id="A1", amount=70.0)]))
    )
    assert paused.status == "paused"

    again = run(Runtime(journal).resume(paused.run_id, shop.workflow(), ScriptedModel([])))

    assert again.status == "paused"
    record = run(journal.get_run(paused.run_id))
    assert (record.lease_owner, record.lease_expires_at) == (None, None)


def test_every_commit_leaves_the_run_row_small_whatever_the_data(journal: Journal, shop: Shop) -> None:
    """Data is written when it changes, not with every step's checkpoint."""
    seen: list[Any] = []
    journal_commit = journal.commit

    async def spy(commit: Any) -> Any:
        seen.append(commit.update.given() if commit.update is not None else {})
        return await journal_commit(commit)

    journal.commit = spy  # type: ignore[method-assign]
    script = [call("read_order", order_id="A1") for _ in range(3)] + [{"kind": "finish"}]
    result = run(
        Runtime(journal).start(shop.workflow(), ScriptedModel(script), input={"blob": "z" * 100_000})
    )
    assert result.status == "completed"
    assert [("data" in fields, "input" in fields) for fields in seen[:3]] == [(False, False)] * 3
