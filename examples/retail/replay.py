"""Replay a list of tool calls through the governed retail workflow, confirmations approved.

Used by the conformance tests and `bench/retail_conformance.py` to check the policy
against tau2-bench's ground truth: each task's actions become scripted proposals, every
confirmation is answered "yes" (the customer approves), and the database after the run is
compared with the database after applying the same actions directly, without the runtime.

Ground-truth action lists assume a conversation that authenticated the customer; some
omit the lookup. For those, the replay authenticates first by the order owner's email
(a read with no effect on the database) and says so in its result.
"""

from __future__ import annotations

import json
import pickle
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import retail_tools  # noqa: E402  (the example folder is not a package)

from tether import Runtime, ScriptedModel, Workflow, load_workflow  # noqa: E402
from tether.journal import Journal  # noqa: E402
from tether.timeline import timeline  # noqa: E402

AUTH_TOOLS = ("find_user_id_by_email", "find_user_id_by_name_zip")
USER_ARGS = ("user_id",)


@dataclass
class StepDecision:
    tool: str
    args: dict[str, Any]
    decision: str
    rule_id: str
    outcome: str
    reason_code: str | None


@dataclass
class TaskReplay:
    task_id: str
    status: str
    steps: list[StepDecision]
    synthetic_auth: bool
    db_matches: bool
    decision_seconds: list[float] = field(default_factory=list)
    run_id: str = ""
    lookup_seconds: list[float] = field(default_factory=list)

    @property
    def ground_truth_denied(self) -> list[StepDecision]:
        return [s for s in self.steps if s.decision == "deny"]


def proposals(actions: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"kind": "tool_call", "tool": a["name"], "args": a["arguments"]} for a in actions]


def split_authentication(
    actions: list[dict[str, Any]], db: dict[str, Any]
) -> tuple[list[Any], list[Any], bool]:
    """(authentication calls, the rest, whether the authentication was added by the replay)."""
    lead = 0
    while lead < len(actions) and actions[lead]["name"] in AUTH_TOOLS:
        lead += 1
    if lead:
        return actions[:lead], actions[lead:], False
    user_id = owner_of(actions, db)
    if user_id is None:
        return [], actions, False
    email = db["users"][user_id]["email"]
    return [{"name": "find_user_id_by_email", "arguments": {"email": email}}], actions, True


def owner_of(actions: list[dict[str, Any]], db: dict[str, Any]) -> str | None:
    for a in actions:
        args = a["arguments"]
        if "user_id" in args and args["user_id"] in db["users"]:
            return str(args["user_id"])
        if "order_id" in args and args["order_id"] in db["orders"]:
            return str(db["orders"][args["order_id"]]["user_id"])
    return None


def scripted_model(actions: list[dict[str, Any]], db: dict[str, Any]) -> tuple[ScriptedModel, bool]:
    auth, rest, synthetic = split_authentication(actions, db)
    if not auth:  # nobody to authenticate (e.g. a transfer only): everything happens before
        auth, rest = rest, []
    script = {
        "authenticate": [*proposals(auth), {"kind": "exit", "exit": "authenticated"}],
        "assist": [*proposals(rest), {"kind": "exit", "exit": "done"}],
    }
    return ScriptedModel(script, name="ground-truth"), synthetic


def timed(workflow: Workflow, decisions: list[float], lookups: list[float]) -> None:
    """Record each policy decision's time, and how much of it went to resolver lookups.

    Wraps this workflow object's policy and resolvers (once; later calls reuse the wrappers).
    """
    policy = workflow.policy
    assert policy is not None
    if getattr(policy, "_timed", False):
        policy._sinks = (decisions, lookups)  # type: ignore[attr-defined]
        return
    policy._timed, policy._sinks = True, (decisions, lookups)  # type: ignore[attr-defined]
    assert workflow.hash  # fix the recorded hash to the real resolvers before wrapping them
    decide = policy.decide

    def measured(**kwargs: Any) -> Any:
        start = time.perf_counter()
        try:
            return decide(**kwargs)
        finally:
            policy._sinks[0].append(time.perf_counter() - start)  # type: ignore[attr-defined]

    def timed_lookup(fn: Any) -> Any:
        def lookup(*args: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args)
            finally:
                policy._sinks[1].append(time.perf_counter() - start)  # type: ignore[attr-defined]

        return lookup

    policy.decide = measured  # type: ignore[method-assign]
    workflow.resolvers = {name: timed_lookup(fn) for name, fn in workflow.resolvers.items()}


async def replay(
    task_id: str,
    actions: list[dict[str, Any]],
    source_db: dict[str, Any],
    workdir: Path,
    journal: Journal,
    workflow: Workflow | None = None,
) -> TaskReplay:
    """Run the actions through the workflow on a copy of `source_db`; compare with direct application."""
    workflow = workflow or load_workflow(HERE)
    db_file = workdir / f"db-{task_id}.json"
    db_file.write_text(json.dumps(source_db))
    model, synthetic = scripted_model(actions, source_db)
    times: list[float] = []
    lookups: list[float] = []
    timed(workflow, times, lookups)
    runtime = Runtime(journal)
    result = await runtime.start(workflow, model, input={"db": str(db_file)}, workflow_ref=str(HERE))
    while result.status == "paused" and result.ticket_id:
        await journal.decide_ticket(result.ticket_id, approve=True, by="customer (replay)")
        result = await runtime.resume(result.run_id, workflow, model)
    steps = []
    for row in timeline(await journal.read_entries(result.run_id)):
        proposal = row["proposal"] or {}
        if row["kind"] not in ("step", "handoff") or proposal.get("kind") != "tool_call":
            continue
        if row["outcome"] == "awaiting_approval":
            continue
        steps.append(
            StepDecision(
                proposal["tool"],
                proposal["args"],
                row["decision"],
                row["rule_id"],
                row["outcome"],
                None if row["outcome"] == "executed" else row["reason_code"],
            )
        )
    expected = pickle.loads(pickle.dumps(source_db))  # a deep copy, ten times faster
    retail_tools.apply_actions(expected, actions)
    actual = json.loads(db_file.read_text())
    return TaskReplay(
        task_id, result.status, steps, synthetic, actual == expected, times, result.run_id, lookups
    )
