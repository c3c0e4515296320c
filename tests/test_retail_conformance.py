"""The retail policy against tau2-bench's ground truth: every task's actions, replayed.

For each of the 114 tasks, its ground-truth actions run as scripted proposals through the
governed retail workflow with every confirmation approved. Expected: no ground-truth action
denied (except the two below, explained), and the database after the run equal to the
database after applying the same actions directly, without the runtime.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]
TAU2 = ROOT / "examples" / "retail" / "tau2"  # tau2-bench's retail data, vendored
sys.path.insert(0, str(ROOT / "examples" / "retail"))

import replay  # noqa: E402

from tether import Workflow, load_workflow, open_journal  # noqa: E402
from tether.journal import Journal  # noqa: E402

TASKS = {t["id"]: t for t in json.loads((TAU2 / "tasks.json").read_text())}

# Ground-truth actions the policy refuses, each with the sentence of policy.md it breaks. In
# both, tau2's own tool refuses the call as well (the ground truth records a failed attempt
# the agent made before doing the right thing), so the expected database is unchanged by it.
EXPECTED_DENIALS = {
    "64": [
        (
            "exchange_delivered_order_items",
            "exchange-only-delivered",
            "An order can only be exchanged if its status is 'delivered' (order #W7464385 is pending; "
            "the task's next action modifies the pending order's items instead)",
        )
    ],
    "105": [
        (
            "exchange_delivered_order_items",
            "gift-card-covers-price-difference",
            "If the user provides a gift card, it must have enough balance to cover the price difference "
            "(the gift card holds 17.00; the exchange costs 21.10 more)",
        )
    ],
}
# Tasks whose ground truth has no action at all: the conversation changes nothing and the
# scripted replay has nothing to propose, so the run ends escalated for want of a proposal.
NO_ACTIONS = {tid for tid, t in TASKS.items() if not t["evaluation_criteria"]["actions"]}


@pytest.fixture(scope="module")
def source_db() -> dict[str, Any]:
    return json.loads((TAU2 / "db.json").read_text())


@pytest.fixture(scope="module")
def workflow() -> Workflow:
    return load_workflow(ROOT / "examples" / "retail")


@pytest.fixture(scope="module")
def journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Journal]:
    j = open_journal(str(tmp_path_factory.mktemp("retail") / "journal.db"))
    yield j
    j.close()


@pytest.mark.parametrize("task_id", sorted(TASKS, key=int))
def test_ground_truth_is_allowed_and_leaves_the_same_database(
    task_id: str, source_db: dict[str, Any], workflow: Workflow, journal: Journal, tmp_path: Path
) -> None:
    actions = TASKS[task_id]["evaluation_criteria"]["actions"] or []
    result = asyncio.run(replay.replay(task_id, actions, source_db, tmp_path, journal, workflow))

    denied = [(s.tool, s.rule_id) for s in result.ground_truth_denied]
    assert denied == [(tool, rule) for tool, rule, _ in EXPECTED_DENIALS.get(task_id, [])]
    assert result.db_matches, "the database differs from applying the same actions directly"
    transfers = any(a["name"] == "transfer_to_human_agents" for a in actions)
    expected = "handed_off" if transfers else ("escalated" if task_id in NO_ACTIONS else "completed")
    assert result.status == expected
    # Every ground-truth action was proposed and decided, in order, none silently dropped.
    decided = iter([(s.tool, s.args) for s in result.steps])
    missing = [
        (a["name"], a["arguments"])
        for a in actions
        if not any(d == (a["name"], a["arguments"]) for d in decided)
    ]
    assert missing == []
