"""Commands that run, inspect, approve and resume governed runs.

Exit codes: 0 when a run completes, pauses or is handed off (a normal stop); 1 when it
fails, escalates or has an effect in doubt; 2 for bad input (nothing was changed).
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from pathlib import Path
from typing import Annotated, Any, get_args

import typer
from rich.markup import escape

from tether.cli import remote
from tether.cli.common import (
    FAILED_STATUSES,
    DbOption,
    JsonOption,
    ModelOption,
    NoteByOption,
    WaitOption,
    db_hint,
    err,
    fail,
    local_principal,
    open_store,
    out,
    print_json,
    ready_model,
    run_command,
    short,
)
from tether.journal import FINISHED, Entry, RunRecord, RunStatus, Ticket, bodies
from tether.journal.common import SELF_DRIVEN
from tether.journal.integrity import run_findings
from tether.loader import load_workflow_async, workflow_ref
from tether.models import Model, close_model
from tether.operations import stuck_reason
from tether.provenance import summary
from tether.runtime import RunResult, Runtime
from tether.timeline import timeline
from tether.worker import is_set_aside, note

app = typer.Typer()

QuietOption = Annotated[
    bool, typer.Option("--quiet", "-q", help="No line per step on stderr while the run is driven.")
]
STATUSES: tuple[str, ...] = get_args(RunStatus)


def _report(
    result: RunResult, as_json: bool, db: str | None, steps: list[dict[str, Any]] | None = None
) -> None:
    """Print where the run stands; with --json from `run`, every step's decision too."""
    if as_json:
        print_json({**result.__dict__, **({"steps": steps} if steps is not None else {})})
    else:
        colour = {"completed": "green", "paused": "yellow"}.get(result.status, "red")
        out.print(
            f"run [bold]{result.run_id}[/] is [bold {colour}]{result.status}[/] in state {result.state}"
        )
        hint = db_hint(db)
        if result.status == "paused" and result.ticket_id:
            tkt, deny = result.ticket_id, f"--reason TEXT{hint}"
            if result.ticket_kind == "question":
                out.print(f"  waiting on question [bold]{tkt}[/] for {result.owner}")
                out.print(f"  answer:   tether answer {tkt} TEXT{hint}   or   tether deny {tkt} {deny}")
            else:
                out.print(f"  waiting on ticket [bold]{tkt}[/] ({result.owner})")
                out.print(f"  decide:   tether approve {tkt}{hint}   or   tether deny {tkt} {deny}")
            out.print(f"  continue: tether resume {result.run_id}{hint}")
        elif result.message:
            out.print(f"  {result.reason_code}: {escape(result.message)}")
    if result.status in FAILED_STATUSES:
        raise typer.Exit(1)


async def _answer_all(
    runtime: Runtime, result: RunResult, workflow: Any, model: Model | None, *, approve: bool
) -> RunResult:
    # The local admin decides, with the script named as the display name (never trusted).
    by = local_principal("script:approve-all" if approve else "script:deny-all")
    while result.status == "paused" and result.ticket_id:
        ticket = await runtime.journal.get_ticket(result.ticket_id)
        await runtime.decide(
            ticket.ticket_id,
            approve=approve,
            by=by,
            reason="" if approve else "denied by the scripted answer",
            answer="yes" if ticket.kind == "question" and approve else None,
        )
        result = await runtime.resume(result.run_id, workflow, model)
    return result


async def _wait_and_resume(
    runtime: Runtime, result: RunResult, workflow: Any, model: Model | None, quiet: bool, db: str | None
) -> RunResult:
    while result.status == "paused" and result.ticket_id:
        if not quiet:
            verb = "tether answer {} TEXT" if result.ticket_kind == "question" else "tether approve {}"
            err.print(
                f"waiting for a decision on ticket {result.ticket_id} "
                f"({result.owner}); decide from another shell: {verb.format(result.ticket_id)}{db_hint(db)}"
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
            "(recorded as decided by the local admin, shown as script:approve-all / script:deny-all)."
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

    async def main() -> tuple[RunResult, list[dict[str, Any]] | None]:
        # Loaded in this loop: the MCP connections opened to list tools serve the run.
        wf = await load_workflow_async(workflow, policy=policy)
        async with open_store(db, create=True) as journal:
            proposer, spec = await ready_model(model, journal)
            runtime = Runtime(journal, on_commit=None if as_json or quiet else _progress)
            try:
                result = await runtime.start(
                    wf,
                    proposer,
                    input=data,
                    workflow_ref=workflow_ref(workflow),
                    policy_ref=str(policy.resolve()) if policy else None,
                    model_spec=spec,
                    by=local_principal(),
                )
                if answer:
                    result = await _answer_all(runtime, result, wf, proposer, approve=answer == "approve-all")
                if wait:
                    result = await _wait_and_resume(runtime, result, wf, proposer, as_json, db)
            finally:
                await close_model(proposer)
            steps = timeline(await journal.read_entries(result.run_id)) if as_json else None
            return result, steps

    result, steps = run_command(main)
    _report(result, as_json, db, steps)


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

    async def main() -> RunResult:
        async with open_store(db) as journal:
            runtime = Runtime(journal, on_commit=None if as_json or quiet else _progress)
            record = await journal.get_run(run_id)
            if is_set_aside(record):  # a worker's note that it could not drive the run
                await note(journal, record, None)
            wf = await load_workflow_async(
                record.workflow_ref, policy=record.policy_ref, pinned=record.workflow_hash
            )
            proposer, _ = await ready_model(model or record.model_spec, journal)
            try:
                result = await runtime.resume(run_id, wf, proposer)
                if wait:
                    result = await _wait_and_resume(runtime, result, wf, proposer, as_json, db)
                return result
            finally:
                await close_model(proposer)

    _report(run_command(main), as_json, db)


def lease_of(record: RunRecord, now: float) -> dict[str, Any] | None:
    """Who holds an unfinished run's lease, and whether that process can still be driving it:
    checked by pid on this host; on another host, only the lease's expiry tells."""
    holder = record.lease_owner
    if record.status in FINISHED:
        return None
    if holder is None:
        if record.status != "running":
            return None
        return {"holder": None, "alive": False, "note": "no process holds its lease"}
    expires = record.lease_expires_at or 0.0
    host, _, rest = holder.partition(":")
    pid = rest.partition(":")[0]
    alive: bool | None
    if host == socket.gethostname() and pid.isdigit():
        alive = _process_exists(int(pid))
        note = f"leased to {holder}: " + (
            "its process is alive" if alive else "its process has exited (tether resume takes the run over)"
        )
    elif expires <= now:
        alive = False
        note = f"leased to {holder}: lease expired {now - expires:.0f} s ago"
    else:
        alive = None  # another host's process: its lease says it renewed recently
        note = f"leased to {holder} (another host), lease renewed, {expires - now:.0f} s left"
    return {"holder": holder, "expires_at": record.lease_expires_at, "alive": alive, "note": note}


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _stuck(record: RunRecord, now: float) -> dict[str, str] | None:
    stuck = stuck_reason(record, now)
    return {"reason_code": stuck[0], "message": stuck[1]} if stuck else None


def _aligned(rows: list[list[str]]) -> list[str]:
    """Columns padded to their widest cell; nothing is ever cut, whatever the terminal width."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    return ["  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows]


@app.command()
def runs(
    status: Annotated[
        str | None, typer.Option(metavar="STATUS", help=f"Only runs with this status: {', '.join(STATUSES)}.")
    ] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs.")] = 50,
    db: DbOption = None,
    as_json: JsonOption = False,
    server: remote.ServerOption = None,
) -> None:
    """List runs, newest first: status, owner, reason, and for unfinished runs their lease."""
    if status is not None and status not in STATUSES:
        fail(f"--status {status!r} is not a run status (valid: {', '.join(STATUSES)})")
    if server:
        return remote.runs(server, status, limit, as_json)

    async def main() -> list[RunRecord]:
        async with open_store(db) as journal:
            return await journal.list_runs(status, limit)

    records = run_command(main)
    now = time.time()
    if as_json:
        print_json(
            [
                {**r.model_dump(exclude={"checkpoint"}), "lease": lease_of(r, now), "stuck": _stuck(r, now)}
                for r in records
            ]
        )
        return
    if not records:
        out.print(f"no runs{f' with status {status}' if status else ''}")
        return
    rows = [["run", "workflow", "status", "state", "owner", "reason", "updated", "note"]]
    for r in records:
        lease = lease_of(r, now)
        stuck = stuck_reason(r, now)  # a run that should be moving says why it is not
        reason = r.reason_code or (stuck[0] if stuck else "")
        message = r.message or (stuck[1] if stuck else None)
        note = " — ".join(n for n in (message, lease and lease["note"]) if n)
        rows.append(
            [
                r.run_id,
                f"{r.workflow_name} {r.workflow_version}",
                r.status,
                r.state,
                r.owner or "",
                reason,
                time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.updated_at)),
                short(note, 120),
            ]
        )
    for line in _aligned(rows):
        out.print(line, markup=False)


@app.command()
def show(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    db: DbOption = None,
    as_json: JsonOption = False,
    server: remote.ServerOption = None,
) -> None:
    """A run's timeline: each step's proposal, decision and rule, result and verification."""
    if server:
        for row in remote.show(server, run_id, as_json) or []:
            out.print(_timeline_row(row), soft_wrap=True)
        return

    async def main() -> tuple[RunRecord, list[Entry], list[str]]:
        async with open_store(db) as journal:
            record, entries = await journal.get_run(run_id), await journal.read_entries(run_id)
            # Intact only if the chain holds, the rows agree with it and the triggers are there.
            found = [
                *journal.trigger_problems,
                *run_findings(record, entries, await journal.run_tickets(run_id)),
            ]
            return record, entries, [str(f) for f in found]

    record, entries, problems = run_command(main)
    steps = timeline(entries)
    lease = lease_of(record, time.time())
    if as_json:
        print_json(
            {
                "run": record.model_dump(),
                "lease": lease,
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
    started = entries[0].body if entries else None
    if isinstance(started, bodies.RunStarted) and started.workflow.skills:
        skills = ", ".join(f"{ref} {h[:23]}…" for ref, h in started.workflow.skills.items())
        out.print(f"  skills {escape(skills)}")
    out.print(
        f"  model {record.model_spec or '-'}  journal "
        f"{'intact' if not problems else '[red]BROKEN[/]: ' + '; '.join(problems)}"
    )
    if lease is not None:
        out.print(f"  {escape(lease['note'])}")
    traced: set[str] = set()  # steps whose provenance is shown (a step's later rows repeat it)
    for row in steps:
        out.print(_timeline_row(row, with_provenance=row["step_id"] not in traced), soft_wrap=True)
        if row.get("provenance"):
            traced.add(row["step_id"])
    if record.message:
        out.print(f"[bold]{record.reason_code or 'note'}[/]: {escape(record.message)}")


@app.command()
def exchanges(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """A run's model calls: what was asked and answered, tokens, attempts and failures."""

    async def main() -> list[Any]:
        async with open_store(db) as journal:
            await journal.get_run(run_id)  # an unknown run is an error, not an empty list
            return await journal.read_exchanges(run_id)

    recorded = run_command(main)
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


def _timeline_row(row: dict[str, Any], *, with_provenance: bool = True) -> str:
    """Two or three lines per entry: what was proposed, what was decided (and where the
    values it traced came from), what happened."""
    head = f"\n[bold]{row['seq']:>3}[/] {row['step_id'] or '--':<4} {row['state'] or '':<10} "
    lines = [head + _proposed(row)]
    if row.get("decision"):
        colour = {"allow": "green", "ask": "yellow", "defer": "yellow"}.get(row["decision"], "red")
        reason = f" — {escape(short(row['reason'], 70))}" if row.get("reason") else ""
        lines.append(f"               [{colour}]{row['decision']}[/] by {row['rule_id']}{reason}")
    for name, traced in (row.get("provenance") or {}).items() if with_provenance else ():
        lines.append(f"               [dim]{escape(name)}:[/] {escape(summary(traced))}")
    outcome = f"               → {row['outcome']}"
    if (row.get("source") or {}).get("trust") == "untrusted":
        outcome += " [yellow](untrusted content)[/]"
    if row.get("reason_code") and row["reason_code"] not in ("policy_allowed", "approval_required"):
        outcome += f" ({row['reason_code']})"
    if row.get("ticket_id") and row["kind"] == "step":
        outcome += f" (ticket {row['ticket_id']})"
    shown = row.get("result") if row.get("result") is not None else row.get("detail")
    if shown is not None:
        outcome += f": {escape(short(shown, 80))}"
    lines.append(outcome)
    if row.get("verification"):
        v = row["verification"]
        mark = {True: "[green]verified[/]", False: "[red]verification failed[/]"}.get(
            v.get("ok"), "[yellow]unverified[/]"
        )
        lines.append(f"               {mark}: {escape(short(v.get('detail') or v.get('error'), 80))}")
    return "\n".join(lines)


@app.command()
def approvals(
    all_: Annotated[bool, typer.Option("--all", help="Include decided and used tickets.")] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """List approval and question tickets (pending ones by default)."""

    async def main() -> list[Ticket]:
        async with open_store(db) as journal:
            return await journal.list_tickets(None if all_ else "pending")

    tickets = run_command(main)
    if as_json:
        print_json([t.model_dump() for t in tickets])
        return
    if not tickets:
        out.print("no pending tickets" if not all_ else "no tickets")
    for t in tickets:
        what = t.question or ", ".join(f"{k}={json.dumps(v)}" for k, v in t.args.items())
        expires = time.strftime("%Y-%m-%d %H:%M", time.localtime(t.expires_at))
        duties = f"  approvals {t.approvals}/{t.approvals_required}" if t.approvals_required > 1 else ""
        duties += "  not by the run's starter" if t.forbid_self_approval else ""
        duties += f"  edited (was {t.original_args_hash})" if t.original_args_hash else ""
        line = f"{t.kind}: [cyan]{escape(t.subject)}[/]({escape(what)})"
        if t.kind == "question":
            line = f"question: [cyan]{escape(what)}[/]  (tether answer {t.ticket_id} TEXT{db_hint(db)})"
        out.print(
            f"[bold]{t.ticket_id}[/]  {t.status}  run {t.run_id}  for {t.approver}  "
            f"expires {expires}{duties}\n    {line}"
        )


def _decide(
    ticket_id: str,
    *,
    approve: bool,
    by: str | None,
    reason: str,
    answer: str | None,
    db: str | None,
    as_json: bool,
    edited: str | None = None,
    server: str | None = None,
) -> None:
    if server:
        verb = "answer" if answer is not None else "approve" if approve else "deny"
        body: dict[str, Any] = {"answer": answer} if answer is not None else {"reason": reason}
        if edited is not None:
            body["args"] = _edited_args(edited)
        return remote.decide(server, ticket_id, verb, body, as_json)
    edited_args = _edited_args(edited) if edited is not None else None

    async def main() -> tuple[Ticket, RunRecord]:
        async with open_store(db) as journal:
            ticket = await journal.get_ticket(ticket_id)
            if ticket.kind == "question" and approve and answer is None:
                fail(
                    f"ticket {ticket_id} is a question ({ticket.question!r}), not an approval: answer it "
                    f"with tether answer {ticket_id} TEXT{db_hint(db)} (or decline it: tether deny "
                    f"{ticket_id} --reason TEXT{db_hint(db)})",
                    "ticket_error",
                )
            if ticket.kind == "approval" and answer is not None:
                fail(
                    f"ticket {ticket_id} is an approval, not a question: "
                    f"tether approve {ticket_id}{db_hint(db)} or "
                    f"tether deny {ticket_id} --reason TEXT{db_hint(db)}",
                    "ticket_error",
                )
            record = await journal.get_run(ticket.run_id)
            workflow = None
            # Checked against the definition the run is pinned to (the kernel refuses an edit
            # for a run whose workflow lives in the process driving it).
            if edited_args is not None and not record.workflow_ref.startswith(SELF_DRIVEN):
                workflow = await load_workflow_async(
                    record.workflow_ref, policy=record.policy_ref, pinned=record.workflow_hash
                )
            ticket = await Runtime(journal).decide(
                ticket_id,
                approve=approve,
                by=local_principal(by),
                reason=reason,
                answer=answer,
                edited_args=edited_args,
                workflow=workflow,
            )
            return ticket, await journal.get_run(ticket.run_id)

    ticket, record = run_command(main)
    # A workflow built in code by the process that drives it (an MCP gateway's) cannot be
    # resumed from here: that process picks the decision up itself.
    hint = (
        f"the process driving it ({record.workflow_ref}) continues it"
        if record.workflow_ref.startswith(SELF_DRIVEN)
        else f"tether resume {ticket.run_id}{db_hint(db)}"
    )
    if as_json:
        print_json({"ticket": ticket.model_dump(), "run": {"run_id": record.run_id, "status": record.status}})
        return
    if ticket.status == "pending":  # one of several approvals it needs
        out.print(
            f"ticket {ticket.ticket_id}: approval {ticket.approvals} of {ticket.approvals_required} "
            "recorded; it needs another approver"
        )
        return
    edit = f" with edited arguments ({ticket.args_hash})" if ticket.original_args_hash else ""
    out.print(f"ticket {ticket.ticket_id} {ticket.status}{edit}; run {ticket.run_id} can continue: {hint}")


def _edited_args(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        fail(f"--args is not JSON: {exc}")
    if not isinstance(value, dict):
        fail("--args must be a JSON object: the call's full arguments as the approver sets them")
    return value


@app.command()
def approve(
    ticket_id: Annotated[str, typer.Argument(metavar="TICKET")],
    by: NoteByOption = None,
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    args: Annotated[
        str | None,
        typer.Option(
            "--args",
            metavar="JSON",
            help="Edit-and-approve: the call's full arguments as you set them, checked again by the "
            "tool's schema, its scope and the policy; the run executes exactly these, once.",
        ),
    ] = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    server: remote.ServerOption = None,
) -> None:
    """Approve a pending ticket: exactly the arguments it shows (or those of --args), once."""
    _decide(
        ticket_id,
        approve=True,
        by=by,
        reason=reason,
        answer=None,
        db=db,
        as_json=as_json,
        edited=args,
        server=server,
    )


@app.command()
def deny(
    ticket_id: Annotated[str, typer.Argument(metavar="TICKET")],
    reason: Annotated[str, typer.Option(help="Why (recorded and shown to the model).")],
    by: NoteByOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    server: remote.ServerOption = None,
) -> None:
    """Deny a pending ticket (or decline a question); the model is told why."""
    _decide(
        ticket_id, approve=False, by=by, reason=reason, answer=None, db=db, as_json=as_json, server=server
    )


@app.command()
def answer(
    ticket_id: Annotated[str, typer.Argument(metavar="TICKET")],
    text: Annotated[str, typer.Argument(help="The answer given to the model.")],
    by: NoteByOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
    server: remote.ServerOption = None,
) -> None:
    """Answer a question a model asked."""
    _decide(ticket_id, approve=True, by=by, reason="", answer=text, db=db, as_json=as_json, server=server)


@app.command()
def resolve(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    done: Annotated[bool, typer.Option("--done/--not-done", help="Whether the in-doubt effect happened.")],
    by: NoteByOption = None,
    note: Annotated[str, typer.Option(help="What was checked (recorded).")] = "",
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Settle an effect in doubt after checking the real system; then resume the run."""

    async def main() -> RunResult:
        async with open_store(db) as journal:
            who = local_principal(by)  # recorded by principal id; --by is a display name only
            return await Runtime(journal).resolve(run_id, done=done, by=who.principal_id, note=note)

    result = run_command(main)
    if as_json:
        print_json(result.__dict__)
        return
    out.print(f"run {result.run_id} is {result.status}: tether resume {result.run_id}{db_hint(db)}")
