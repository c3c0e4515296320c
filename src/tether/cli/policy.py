"""`tether policy check | explain | test`: what a policy author needs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from tether.cli.common import DbOption, JsonOption, fail, open_store, out, print_json, run_async, short
from tether.errors import TetherError
from tether.loader import WORKFLOW_FILE, load_workflow
from tether.policy import Policy
from tether.policy_tooling import explain, lint, run_cases
from tether.provenance import summary

app = typer.Typer(no_args_is_help=True)
NO_WORKFLOW = (
    " (no workflow to check against: the names of tools, exits and resolvers, and int/double "
    "arithmetic over arguments, are not checked)"
)


@app.command()
def check(
    file: Annotated[Path, typer.Argument(help="The policy YAML file.")],
    workflow: Annotated[
        str | None, typer.Option(help="Workflow to check against (default: workflow.yaml beside the policy).")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Lint a policy: load errors, unknown tools/exits/resolvers, rules that can never match or decide."""
    try:
        policy = Policy.from_file(file)
        beside = file.parent / WORKFLOW_FILE
        target = workflow or (str(file.parent) if beside.exists() else None)
        wf = load_workflow(target, policy=file) if target else None
        findings = lint(policy, wf)
    except TetherError as exc:
        fail(str(exc))
    if as_json:
        print_json(
            {
                "policy": str(file),
                "hash": policy.hash,
                "workflow": wf.name if wf else None,
                "findings": [f.__dict__ for f in findings],
            }
        )
    else:
        against = f" against workflow {wf.name} {wf.version}" if wf else NO_WORKFLOW
        out.print(f"{file}: {len(policy.rules)} rules, {policy.hash[:23]}…{against}")
        for f in findings:
            out.print(f"  [yellow]{f.rule_id}[/]: {f.problem}")
        out.print("  no problems found" if not findings else f"  {len(findings)} problem(s)")
    if findings:
        raise typer.Exit(1)


@app.command(name="explain")
def explain_step(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    step_id: Annotated[str, typer.Argument(metavar="STEP", help="A step id such as s4 (see tether show).")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Why a step got its decision: every rule that governed it, its result, and the values used."""
    store = open_store(db)
    record = run_async(store.get_run(run_id))
    entries = run_async(store.read_entries(run_id))
    policy = _recorded_policy(record.workflow_ref, record.policy_ref, record.policy_hash)
    try:
        explanation = explain(entries, step_id, policy)
    except LookupError as exc:
        fail(str(exc))
    if as_json:
        print_json(explanation.as_dict())
        return
    d = explanation.decision
    out.print(f"[bold]{run_id} {step_id}[/] in state {explanation.state}: {_proposal(explanation.proposal)}")
    out.print(
        f"policy {d.policy_hash[:23]}…"
        + ("" if policy else " (its file has changed since: rule texts unavailable)")
    )
    for row in explanation.rules:
        mark = {True: "[green]holds[/]", False: "[dim]does not hold[/]"}.get(
            row["result"], f"[red]{row['result']}[/]"
        )
        star = " ←" if row["winner"] else ""
        when = f"when {row['when']}" if row["when"] else "(always)"
        out.print(f"  {row['rule']:<34} {row['decision'] or '':<6} {when}\n      → {mark}{star}")
    if not explanation.rules:
        out.print("  no rule governs this tool or exit")
    for call, value in d.resolved.items():
        out.print(f"  resolved {call} = {short(value, 100)}")
    for name, traced in d.provenance.items():
        out.print(f"  provenance of {escape(name)}: {escape(summary(traced))}", soft_wrap=True)
    if explanation.facts:
        out.print(f"  facts at the time: {short(explanation.facts, 100)}")
    out.print(f"[bold]{d.decision}[/] by {d.rule_id} ({d.reason_code}): {explanation.why}")


@app.command(name="test")
def test_cases(
    file: Annotated[Path, typer.Argument(help="A policy test file (YAML with policy, workflow and cases).")],
    as_json: JsonOption = False,
) -> None:
    """Run policy test cases: each proposal and context against its expected decision."""
    try:
        results = run_cases(file)
    except TetherError as exc:
        fail(str(exc))
    failed = [r for r in results if not r.passed]
    if as_json:
        print_json(
            {
                "passed": len(results) - len(failed),
                "failed": len(failed),
                "cases": [{"name": r.name, "passed": r.passed, "detail": r.summary} for r in results],
            }
        )
    else:
        for r in results:
            mark = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
            out.print(f"{mark}  {r.name}: {r.summary}")
        out.print(f"{len(results) - len(failed)} passed, {len(failed)} failed")
    if failed:
        raise typer.Exit(1)


def _recorded_policy(workflow_ref: str, policy_ref: str | None, policy_hash: str) -> Policy | None:
    """The policy the run used, if its file still has the recorded content."""
    try:
        policy = load_workflow(workflow_ref, policy=policy_ref).policy
    except TetherError:
        # A workflow built in code (an MCP gateway's) cannot be loaded, but its policy file can.
        try:
            policy = Policy.from_file(policy_ref) if policy_ref else None
        except TetherError:
            return None
    return policy if policy is not None and policy.hash == policy_hash else None


def _proposal(proposal: Any) -> str:
    if isinstance(proposal, dict) and proposal.get("kind") == "tool_call":
        args = ", ".join(f"{k}={v!r}" for k, v in proposal.get("args", {}).items())
        return f"{proposal['tool']}({short(args, 100)})"
    if isinstance(proposal, dict):
        return f"{proposal.get('kind')} {proposal.get('exit') or ''}".strip()
    return short(proposal, 100)
