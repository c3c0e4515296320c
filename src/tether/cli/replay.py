"""`tether replay RUN` and `tether whatif`: decisions evaluated again from the journal alone.

Neither acts: no model is asked, no tool or resolver is called, no workflow code is
imported (see `tether.replay`). `replay` exits 1 when a decision diverges from its record;
`whatif` reports what a new policy would change and exits 0 (1 only with `--fail-on-change`).
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from tether.cli.common import DbOption, JsonOption, err, fail, open_store, out, print_json, run_command, short
from tether.policy import Policy
from tether.replay import Redecided, ReplayReport, WhatIf, replay_run, what_if

app = typer.Typer()

PolicyOption = Annotated[
    Path | None,
    typer.Option(
        "--policy",
        help="Decide every recorded proposal under this policy file instead (what-if); nothing is changed.",
    ),
]


@app.command()
def replay(
    run_id: Annotated[str, typer.Argument(metavar="RUN")],
    policy: PolicyOption = None,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Rebuild a run from its journal and evaluate every decision again, never acting.

    Without --policy each decision is evaluated under the policy recorded with it, with the
    resolver values recorded with it; a decision that comes out otherwise is a divergence
    (a bug, or a record changed after it was written) and the exit code is 1. With --policy
    it is a what-if: the decisions the new policy would change.
    """

    async def main() -> ReplayReport:
        new = Policy.from_file(policy) if policy is not None else None
        async with open_store(db) as journal:
            return await replay_run(journal, run_id, policy=new)

    report = run_command(main)
    if as_json:
        print_json(report.as_dict())
    else:
        _print_report(report)
    if not report.ok:
        raise typer.Exit(1)


def _print_report(report: ReplayReport) -> None:
    counts = report.summary()
    mode = (
        f"what-if under policy {report.policy[:23]}…" if report.policy else "replay under the recorded policy"
    )
    out.print(f"[bold]{report.run_id}[/]  {escape(report.workflow)}  {mode}")
    rows = [
        ["step", "state", "proposal", "recorded", "replayed" if not report.policy else "would be", "status"]
    ]
    for d in report.decisions:
        status = d.status + (f": {d.note}" if d.note else "")
        rows.append([d.step_id, d.state, _proposal(d), _said(d.recorded), _now(d), status])
    _print_rows(rows)
    for problem in report.problems:
        out.print(f"[red]problem:[/] {escape(problem)}")
    for note in report.notes:
        out.print(f"note: {escape(note)}")
    shown = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
    verdict = "[green]reproduced[/]" if report.ok else "[red]DIVERGED[/]"
    if report.policy:
        verdict = f"{len(report.changed)} decision(s) would change"
    out.print(f"{len(report.decisions)} decision(s): {shown or 'none'} — {verdict}")


@app.command()
def whatif(
    policy: Annotated[Path, typer.Option("--policy", help="The policy file to try against history.")],
    workflow: Annotated[
        str | None, typer.Option("--workflow", help="Only runs of this workflow (by name).")
    ] = None,
    since: Annotated[
        str | None,
        typer.Option("--since", help="Only runs created at or after this date (ISO 8601, UTC unless given)."),
    ] = None,
    fail_on_change: Annotated[
        bool, typer.Option("--fail-on-change", help="Exit 1 when any decision would change (for CI).")
    ] = False,
    db: DbOption = None,
    as_json: JsonOption = False,
) -> None:
    """Try a policy change against recorded history: every recorded proposal decided under
    the new policy, with the values of its time, and each decision that would change
    (allowed → denied, asked or deferred, and the reverse) listed with the rules involved.
    A resolver value the new policy needs that was not recorded makes the decision
    `unknown`, never a guess. Nothing is executed and nothing is written."""
    after = _since(since) if since is not None else None

    async def main() -> WhatIf:
        new = Policy.from_file(policy)
        async with open_store(db) as journal:
            with Progress(
                TextColumn("replaying runs"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
                console=err,
                transient=True,
                disable=not err.is_terminal,
            ) as progress:
                task = progress.add_task("runs", total=None)

                def advance(done: int, total: int) -> None:
                    progress.update(task, completed=done, total=total)

                return await what_if(journal, new, workflow=workflow, since=after, progress=advance)

    found = run_command(main)
    if as_json:
        print_json(found.as_dict())
    else:
        _print_whatif(found)
    if fail_on_change and found.changed:
        raise typer.Exit(1)


def _print_whatif(found: WhatIf) -> None:
    summary = found.as_dict()["summary"]
    if found.changed:
        rows = [["run", "step", "state", "proposal", "recorded", "would be", "", "rules"]]
        for d in found.changed:
            rows.append(
                [
                    d.run_id,
                    d.step_id,
                    d.state,
                    _proposal(d),
                    _said(d.recorded),
                    _now(d),
                    d.direction or "",
                    ", ".join(d.rules),
                ]
            )
        _print_rows(rows)
    for d in found.unknown:
        out.print(f"unknown: {d.run_id} {d.step_id} {escape(_proposal(d))}: {escape(d.note)}")
    for note in found.notes:
        out.print(f"note: {escape(note)}")
    out.print(
        f"policy {found.policy[:23]}… against {found.runs} run(s), {found.decisions} decision(s): "
        f"{summary['changed']} would change ({summary['stricter']} stricter, {summary['looser']} looser), "
        f"{summary['same']} the same, {summary['unknown']} unknown, "
        f"{summary['not re-evaluated']} not re-evaluated (decided by the runtime)"
    )


def _print_rows(rows: list[list[str]]) -> None:
    """Columns padded to their widest cell; nothing is cut, whatever the terminal width."""
    widths = [max(len(cell) for cell in column) for column in zip(*rows, strict=True)]
    for i, row in enumerate(rows):
        line = "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        out.print(f"[bold]{escape(line)}[/]" if i == 0 else line, markup=i == 0, soft_wrap=True)


def _proposal(d: Redecided) -> str:
    args: Any = d.proposal.get("args")
    if d.subject.startswith("exit"):
        return d.subject
    return f"{d.subject.removeprefix('tool ')}({short(args, 40)})"


def _said(decision: Any) -> str:
    return f"{decision.decision} by {decision.rule_id}"


def _now(d: Redecided) -> str:
    return _said(d.decision) if d.decision is not None else "-"


def _since(value: str) -> float:
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        fail(f"--since {value!r} is not an ISO 8601 date or time (e.g. 2026-11-01 or 2026-11-01T09:00)")
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()
