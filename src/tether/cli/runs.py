"""Commands that run, inspect, approve and resume governed runs.

Exit codes: 0 when a run completes, pauses or is handed off (a normal stop); 1 when it
fails, escalates or has an effect in doubt; 2 for bad input (nothing was changed).
"""

from __future__ import annotations

import asyncio
import getpass
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from tether.cli.common import (
    FAILED_STATUSES,
    ByOption,
    DbOption,
    JsonOption,
    ModelOption,
    WaitOption,
    err,
    fail,
    open_store,
    out,
    pinned_model_spec,
    print_json,
    run_async,
    short,
)
from tether.errors import TetherError
from tether.journal import Entry, Journal, verify_chain
from tether.journal.common import SELF_DRIVEN
from tether.loader import load_workflow, workflow_ref
from tether.models import Model, close_model, resolve_model
from tether.runtime import RunResult, Runtime
from tether.timeline import timeline

app = typer.Typer()

QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No line per step on stderr while the run is driven.")
]


def _model(spec: str | None, journal: Journal) -> tuple[Model | None, str | None]:
    spec = pinned_model_spec(spec)  # so that `resume` works from any folder
    if spec is None:
        return None, None
    try:
        return resolve_model(spec, journal=journal), spec
    except TetherError as exc:
        fail(str(exc))


def _report(result: RunResult, as_json: bool, journal: Journal | None = None) -> None:
    """Print where the run stands; with --json from `run`, every step's decision too."""
    if as_json:
        steps = timeline(run_async(journal.read_entries(result.run_id))) if journal else None
        print_json({**result.__dict__, **({"steps": steps} if steps is not None else {})})
    else:
        colour = {"completed": "green", "paused": "yellow"}.get(result.status, "red")
        out.print(
            f"run [bold]{result.run_id}[/] is [bold {colour}]{result.status}[/] in state {result.state}"
        )
        if result.status == "paused" and result.ticket_id:
            out.print(f"  waiting on ticket [bold]{result.ticket_id}[/] ({result.owner})")
            out.print(
                f"  decide:   tether approve {result.ticket_id}   or   tether deny "
                f"{result.ticket_id} --reason TEXT"
            )
            out.print(f"  continue: tether resume {result.run_id}")
        elif result.message:
            out.print(f"  {result.reason_code}: {result.message}")
    if result.status in FAILED_STATUSES:
        raise typer.Exit(1)


async def _answer_all(
    runtime: Runtime, result: RunResult, workflow: Any, model: Model | None, *, approve: bool
) -> RunResult:
    by = "script:approve-all" if approve else "script:deny-all"
    while result.status == "paused" and result.ticket_id:
        ticket = await runtime.journal.get_ticket(result.ticket_id)
        await runtime.journal.decide_ticket(
            ticket.ticket_id,
            approve=approve,
            by=by,
            reason="" if approve else "denied by the scripted answer",
            answer="yes" if ticket.kind == "question" and approve else None,
            now=runtime.clock(),
        )
        result = await runtime.resume(result.run_id, workflow, model)
    return result


async def _wait_and_resume(
    runtime: Runtime, result: RunResult, workflow: Any, model: Model | None, quiet: bool
) -> RunResult:
    while result.status == "paused" and result.ticket_id:
        if not quiet:
            err.print(
                f"waiting for a decision on ticket {result.ticket_id} "
                f"({result.owner}); decide from another shell: tether approve "
                f"{result.ticket_id}"
            )
        while (await runtime.journal.get_ticket(result.ticket_id)).status == "pending":
            ticket = await runtime.journal.get_ticket(result.ticket_id)
            if ticket.expires_at <= runtime.clock():
                break
            await asyncio.sleep(0.2)
        result = await runtime.resume(result.run_id, workflow, model)
    return result


@app.command()
def run(
    workflow: Annotated[str, typer.Argument(help="Directory, workflow YAML file, or module:attr.")],
    input: Annotated[str, typer.Option("--input", help="Run input as a JSON object.")] = "{}",
    model: ModelOption = None,
    policy: Annotated[Path | None, typer.Option(help="Policy file overriding the workflow's.")] = None,
    db: DbOption = None,
    wait: WaitOption = False,
    answer: Annotated[
        str | None,
        typer.Option(
            help="Scripted replays: answer every ticket of this run at once, approve-all or deny-all "
            "(recorded as decided by script:approve-all / script:deny-all)."
        ),
    ] = None,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Start a run and drive it until it completes, pauses or stops."""
    if answer not in (None, "approve-all", "deny-all"):
        fail(f"--answer must be approve-all or deny-all, not {answer!r}")
    try:
        data = json.loads(input)
    except json.JSONDecodeError as exc:
        fail(f"--input is not JSON: {exc}")
    if not isinstance(data, dict):
        fail("--input must be a JSON object")
    try:
        wf = load_workflow(workflow, policy=policy)
    except TetherError as exc:
        fail(str(exc))
    runtime = Runtime(open_store(db), on_commit=None if as_json or quiet else _progress)
    proposer, spec = _model(model, runtime.journal)

    async def go() -> RunResult:
        try:
            result = await runtime.start(
                wf,
                proposer,
                input=data,
                workflow_ref=workflow_ref(workflow),
                policy_ref=str(policy.resolve()) if policy else None,
                model_spec=spec,
            )
            if answer:
                result = await _answer_all(runtime, result, wf, proposer, approve=answer == "approve-all")
            return await _wait_and_resume(runtime, result, wf, proposer, as_json) if wait else result
        finally:
            await close_model(proposer)

    result = run_async(go())
    _report(result, as_json, runtime.journal if as_json else None)


@app.command()
def resume(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    model: ModelOption = None,
    db: DbOption = None,
    wait: WaitOption = False,
    as_json: JsonOption = False,
    quiet: QuietOption = False,
) -> None:
    """Continue a paused or interrupted run from its last committed step."""
    journal = open_store(db)
    runtime = Runtime(journal, on_commit=None if as_json or quiet else _progress)

    async def go() -> RunResult:
        record = await journal.get_run(run_id)
        wf = load_workflow(record.workflow_ref, policy=record.policy_ref, pinned=record.workflow_hash)
        proposer, _ = _model(model or record.model_spec, journal)
        try:
            result = await runtime.resume(run_id, wf, proposer)
            return await _wait_and_resume(runtime, result, wf, proposer, as_json) if wait else result
        finally:
            await close_model(proposer)

    _report(run_async(go()), as_json)


@app.command()
def runs(
    status: Annotated[str | None, typer.Option(help="Only runs with this status.")] = None,
    limit: int = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List runs, newest first."""
    records = run_async(open_store(db).list_runs(status, limit))
    if as_json:
        print_json([r.model_dump(exclude={"checkpoint"}) for r in records])
        return
    table = Table("run", "workflow", "status", "state", "owner", "reason", "updated")
    for r in records:
        table.add_row(
            r.run_id,
            f"{r.workflow_name} {r.workflow_version}",
            r.status,
            r.state,
            r.owner or "",
            r.reason_code or "",
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.updated_at)),
        )
    out.print(table)


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A run's timeline: each step's proposal, decision and rule, result and verification."""
    journal = open_store(db)
    record = run_async(journal.get_run(run_id))
    entries = run_async(journal.read_entries(run_id))
    steps = timeline(entries)
    problems = verify_chain(entries)
    if as_json:
        print_json(
            {
                "run": record.model_dump(),
                "steps": steps,
                "chain": {"intact": not problems, "problems": problems},
                "entries": [e.as_dict() for e in entries],
            }
        )
        return
    out.print(
        f"[bold]{record.run_id}[/]  {record.workflow_name} {record.workflow_version}  "
        f"status [bold]{record.status}[/]  state {record.state}"
    )
    out.print(f"  workflow {record.workflow_hash[:23]}…  policy {record.policy_hash[:23]}…")
    out.print(
        f"  model {record.model_spec or '-'}  journal "
        f"{'intact' if not problems else '[red]BROKEN[/]: ' + '; '.join(problems)}"
    )
    for row in steps:
        out.print(_timeline_row(row), soft_wrap=True)
    if record.message:
        out.print(f"[bold]{record.reason_code}[/]: {record.message}")


@app.command()
def exchanges(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A run's model calls: what was asked and answered, tokens, attempts and failures."""
    journal = open_store(db)
    run_async(journal.get_run(run_id))  # an unknown run is an error, not an empty list
    recorded = run_async(journal.read_exchanges(run_id))
    if as_json:
        print_json([x.model_dump() for x in recorded])
        return
    if not recorded:
        out.print(f"run {run_id} has no recorded model exchanges (none made, or pruned)")
    for x in recorded:
        tokens = x.usage.get("input_tokens", 0), x.usage.get("output_tokens", 0)
        retries = f"  {len(x.attempts)} attempts" if len(x.attempts) > 1 else ""
        out.print(
            f"[bold]{x.seq:>3}[/] {x.step_id or '--':<4} {x.state:<10} {x.model}  {x.seconds:.2f}s  "
            f"tokens {tokens[0]}+{tokens[1]}{retries}",
            soft_wrap=True,
        )
        if x.error:
            out.print(f"      [red]{x.reason_code}[/]: {short(x.error, 100)}", soft_wrap=True)
        else:
            out.print(f"      → {short(x.output, 100)}", soft_wrap=True)


def _proposed(row: dict[str, Any]) -> str:
    """What an entry's proposal asked for, in one short line."""
    proposal = row.get("proposal")
    if isinstance(proposal, dict) and proposal.get("kind") == "tool_call":
        args = ", ".join(f"{k}={json.dumps(v)}" for k, v in (proposal.get("args") or {}).items())
        return f"[cyan]{escape(str(proposal['tool']))}[/]({escape(short(args, 60))})"
    if isinstance(proposal, dict):
        label = proposal.get("exit") or proposal.get("question") or proposal.get("to") or ""
        return f"[cyan]{proposal.get('kind')}[/] {escape(short(label, 60))}"
    if proposal is not None:
        return f"[red]unparseable[/] {escape(short(proposal, 60))}"
    return f"[dim]{'deterministic step' if row['kind'] == 'step' else row['kind']}[/]"


def _progress(entries: list[Entry]) -> None:
    """One line on stderr per entry as it is committed: a long run shows where it is."""
    for row in timeline(entries):
        decided = f" {row['decision']} by {row['rule_id']} →" if row.get("decision") else ""
        went_on = row["outcome"] in ("executed", "transition", "intent recorded, effect starting")
        code = f" ({row['reason_code']})" if row.get("reason_code") and not went_on else ""
        err.print(
            f"  {row['step_id'] or '--':<4} {row['state'] or '':<10} {_proposed(row)} →{decided} "
            f"{row['outcome']}{code}",
            soft_wrap=True,
            highlight=False,
        )


def _timeline_row(row: dict[str, Any]) -> str:
    """Two or three lines per entry: what was proposed, what was decided, what happened."""
    head = f"\n[bold]{row['seq']:>3}[/] {row['step_id'] or '--':<4} {row['state'] or '':<10} "
    lines = [head + _proposed(row)]
    if row.get("decision"):
        colour = {"allow": "green", "ask": "yellow", "defer": "yellow"}.get(row["decision"], "red")
        reason = f" — {short(row['reason'], 70)}" if row.get("reason") else ""
        lines.append(f"               [{colour}]{row['decision']}[/] by {row['rule_id']}{reason}")
    outcome = f"               → {row['outcome']}"
    if row.get("reason_code") and row["reason_code"] not in ("policy_allowed", "approval_required"):
        outcome += f" ({row['reason_code']})"
    shown = row.get("result") if row.get("result") is not None else row.get("detail")
    if shown is not None:
        outcome += f": {short(shown, 80)}"
    lines.append(outcome)
    if row.get("verification"):
        v = row["verification"]
        mark = {True: "[green]verified[/]", False: "[red]verification failed[/]"}.get(
            v.get("ok"), "[yellow]unverified[/]"
        )
        lines.append(f"               {mark}: {short(v.get('detail') or v.get('error'), 80)}")
    return "\n".join(lines)


@app.command()
def approvals(
    all_: Annotated[bool, typer.Option("--all", help="Include decided and used tickets.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List approval and question tickets (pending ones by default)."""
    tickets = run_async(open_store(db).list_tickets(None if all_ else "pending"))
    if as_json:
        print_json([t.model_dump() for t in tickets])
        return
    if not tickets:
        out.print("no pending tickets" if not all_ else "no tickets")
    for t in tickets:
        what = t.question or ", ".join(f"{k}={json.dumps(v)}" for k, v in t.args.items())
        expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(t.expires_at))
        out.print(
            f"[bold]{t.ticket_id}[/]  {t.status}  run {t.run_id}  for {t.approver}  "
            f"expires {expires}\n    {t.kind}: [cyan]{t.subject}[/]({what})"
        )


def _decide(
    ticket_id: str, *, approve: bool, by: str | None, reason: str, answer: str | None, db: str | None
) -> None:
    journal = open_store(db)
    ticket = run_async(
        journal.decide_ticket(
            ticket_id,
            approve=approve,
            by=by or getpass.getuser(),
            reason=reason,
            answer=answer,
            now=time.time(),
        )
    )
    record = run_async(journal.get_run(ticket.run_id))
    # A workflow built in code by the process that drives it (an MCP gateway's) cannot be
    # resumed from here: that process picks the decision up itself.
    hint = (
        f"the process driving it ({record.workflow_ref}) continues it"
        if record.workflow_ref.startswith(SELF_DRIVEN)
        else f"tether resume {ticket.run_id}"
    )
    out.print(f"ticket {ticket.ticket_id} {ticket.status}; run {ticket.run_id} can continue: {hint}")


@app.command()
def approve(
    ticket_id: Annotated[str, typer.Argument(metavar="TICKET")],
    by: ByOption = None,
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    db: DbOption = None,
) -> None:
    """Approve a pending ticket: exactly the arguments it shows, once."""
    _decide(ticket_id, approve=True, by=by, reason=reason, answer=None, db=db)


@app.command()
def deny(
    ticket_id: Annotated[str, typer.Argument(metavar="TICKET")],
    reason: Annotated[str, typer.Option(help="Why (recorded and shown to the model).")],
    by: ByOption = None,
    db: DbOption = None,
) -> None:
    """Deny a pending ticket; the model is told why."""
    _decide(ticket_id, approve=False, by=by, reason=reason, answer=None, db=db)


@app.command()
def answer(
    ticket_id: Annotated[str, typer.Argument(metavar="TICKET")],
    text: Annotated[str, typer.Argument(help="The answer given to the model.")],
    by: ByOption = None,
    db: DbOption = None,
) -> None:
    """Answer a question a model asked."""
    _decide(ticket_id, approve=True, by=by, reason="", answer=text, db=db)


@app.command()
def resolve(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    done: Annotated[bool, typer.Option("--done/--not-done", help="Whether the in-doubt effect happened.")],
    by: ByOption = None,
    note: str = "",
    db: DbOption = None,
) -> None:
    """Settle an effect in doubt after checking the real system; then resume the run."""
    runtime = Runtime(open_store(db))
    result = run_async(runtime.resolve(run_id, done=done, by=by or getpass.getuser(), note=note))
    out.print(f"run {result.run_id} is {result.status}: tether resume {result.run_id}")
