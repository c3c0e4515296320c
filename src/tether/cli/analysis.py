"""`tether check | diff | graph`: govern before running. Each reads definitions (and a
journal, for `diff --journal` and `graph --run`); none writes anything.

Exit codes: `check` 1 when there are unacknowledged findings; every command 2 for bad
input (a workflow that does not load, an unknown revision, run or journal).
"""

from __future__ import annotations

import sys
import tempfile
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from tether.analysis.check import Report, acknowledgements, arrow
from tether.analysis.check import check as check_workflow
from tether.analysis.diff import CHANGED, LESS, MORE, Diff, Redecision, identity, redecide
from tether.analysis.diff import diff as diff_workflows
from tether.analysis.graph import mermaid, run_path, svg
from tether.analysis.sources import checkout, load_version, revision_name
from tether.cli.common import (
    DbOption,
    JsonOption,
    fail,
    fail_with,
    open_store,
    out,
    print_json,
    run_command,
    short,
)
from tether.errors import TetherError
from tether.journal import Entry, RunRecord
from tether.loader import load_workflow
from tether.workflow import Workflow

app = typer.Typer()
WorkflowArgument = Annotated[str, typer.Argument(help="Directory, workflow YAML file, or module:attr.")]
# Every run of a workflow (the journal's listing takes a limit).
ALL_RUNS = 2**31 - 1


def _load(target: str) -> Workflow:
    try:
        return load_workflow(target)
    except TetherError as exc:
        fail_with(exc)


# -- check --------------------------------------------------------------------------------------------


@app.command()
def check(workflow: WorkflowArgument, as_json: JsonOption = False) -> None:
    """Check a workflow and its policy over every path: unguarded effects, unbounded budgets
    and cycles, unreachable terminals, dead ends, unknown names, unverified writes, undeclared
    effects. Exit 1 when a finding is not acknowledged in the workflow file."""
    wf = _load(workflow)
    try:
        acknowledged = acknowledgements(workflow)
    except TetherError as exc:
        fail_with(exc)
    report = check_workflow(wf, acknowledged)
    if as_json:
        print_json(report.as_dict())
    else:
        _print_report(report)
    if report.unacknowledged:
        raise typer.Exit(1)


def _print_report(report: Report) -> None:
    wf = report.workflow
    open_count = len(report.unacknowledged)
    acknowledged = len(report.findings) - open_count
    out.print(
        f"[bold]{escape(wf.name)} {escape(wf.version)}[/]: {len(report.findings)} finding(s), "
        f"{acknowledged} acknowledged"
    )
    for finding in report.findings:
        mark = "[green]acknowledged[/]" if finding.acknowledged is not None else "[red]finding[/]"
        out.print(f"\n{mark} [bold]{finding.code}[/] at {escape(finding.at)}")
        out.print(f"  {escape(finding.message)}")
        if finding.path:
            out.print(f"  path: {escape(arrow(finding.path))}")
        for line in finding.detail:
            out.print(f"  {escape(line)}")
        if finding.acknowledged is not None:
            out.print(f"  acknowledged: {escape(finding.acknowledged)}")
    for ack in report.stale:
        out.print(
            f"\n[yellow]stale acknowledgement[/]: {ack.finding} at {escape(ack.at)} matches no finding "
            "(remove it)"
        )
    out.print(
        "\nno unacknowledged findings" if not open_count else f"\n{open_count} unacknowledged finding(s)"
    )


# -- diff ---------------------------------------------------------------------------------------------


@app.command()
def diff(
    old: Annotated[str, typer.Argument(help="The old workflow folder (or the only one, with --from).")],
    new: Annotated[str | None, typer.Argument(help="The new workflow folder.")] = None,
    from_rev: Annotated[
        str | None, typer.Option("--from", metavar="REV", help="Compare OLD as it is at this git revision…")
    ] = None,
    to_rev: Annotated[
        str | None,
        typer.Option("--to", metavar="REV", help="…with OLD at this revision (default: the working tree)."),
    ] = None,
    journal: Annotated[
        str | None,
        typer.Option(
            "--journal",
            metavar="PATH|URL",
            help="Also decide every recorded proposal of this workflow's runs again under the new version.",
        ),
    ] = None,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print Markdown, for a pull request.")] = False,
    as_json: JsonOption = False,
) -> None:
    """The change in autonomy surface between two versions: tools, effects, exits, budgets,
    verifiers, escalation, rules, and the decisions that became more or less permissive."""
    if as_json and markdown:
        fail("give --json or --markdown, not both")
    if (new is None) == (from_rev is None):
        fail("give two workflows (OLD NEW), or one with --from REV [--to REV]")
    if new is not None and to_rev is not None:
        fail("--to goes with --from, comparing two revisions of one workflow")
    with tempfile.TemporaryDirectory(prefix="tether-diff-") as scratch:
        try:
            labels, (before, after) = _versions(old, new, from_rev, to_rev, Path(scratch))
            result = diff_workflows(before, after)
        except TetherError as exc:
            fail_with(exc)
    decided = _redecide_journal(journal, before, after) if journal is not None else None
    if as_json:
        value: dict[str, Any] = result.as_dict()
        value["old"]["source"], value["new"]["source"] = labels
        if decided is not None:
            value["journal"] = _journal_json(decided)
        print_json(value)
    elif markdown:
        sys.stdout.write(_markdown(result, labels, decided))
    else:
        _print_diff(result, labels, decided)


def _versions(
    old: str, new: str | None, from_rev: str | None, to_rev: str | None, scratch: Path
) -> tuple[tuple[str, str], tuple[Workflow, Workflow]]:
    if new is not None:
        return (old, new), (load_version(old), load_version(new))
    assert from_rev is not None
    before = checkout(old, from_rev, scratch / "from")
    labels = (
        f"{old} at {revision_name(old, from_rev)}",
        f"{old} at {revision_name(old, to_rev)}" if to_rev else old,
    )
    after = checkout(old, to_rev, scratch / "to") if to_rev else Path(old)
    return labels, (load_version(before), load_version(after))


def _redecide_journal(db: str, old: Workflow, new: Workflow) -> list[Redecision]:
    names = sorted({old.name, new.name})

    async def main() -> list[tuple[RunRecord, list[Entry]]]:
        async with open_store(db) as store:
            runs = [r for name in names for r in await store.list_runs(limit=ALL_RUNS, workflow=name)]
            runs.sort(key=lambda r: (r.created_at, r.run_id))
            return [(r, await store.read_entries(r.run_id)) for r in runs]

    return [d for record, entries in run_command(main) for d in redecide(record.run_id, entries, new)]


_HEADINGS = ((MORE, "More permissive"), (LESS, "Less permissive"), (CHANGED, "Changed"))


def _title(result: Diff, labels: tuple[str, str]) -> str:
    old, new = identity(result.old), identity(result.new)
    return (
        f"{old['name']} {old['version']} ({labels[0]}, {old['hash'][:19]}…) → "
        f"{new['name']} {new['version']} ({labels[1]}, {new['hash'][:19]}…)"
    )


def _print_diff(result: Diff, labels: tuple[str, str], decided: list[Redecision] | None) -> None:
    out.print(f"[bold]{escape(_title(result, labels))}[/]")
    if not result.changes:
        out.print("no change in autonomy surface")
    for direction, heading in _HEADINGS:
        changes = result.by_direction(direction)
        if changes:
            out.print(f"\n[bold]{heading}[/] ({len(changes)}):")
            for change in changes:
                out.print(f"  {escape(change.text)}")
    if decided is not None:
        out.print()
        for line in _journal_lines(decided):
            out.print(escape(line))


def _proposal_text(proposal: dict[str, Any]) -> str:
    if proposal.get("kind") == "tool_call":
        args = ", ".join(f"{k}={v!r}" for k, v in proposal.get("args", {}).items())
        return f"{proposal['tool']}({short(args, 80)})"
    return f"exit {proposal.get('exit', 'finish')}"


def _decision_text(decided: Redecision) -> str:
    recorded = f"{decided.recorded.decision} by {decided.recorded.rule_id}"
    if decided.decision is None:
        return f"{recorded} → not decidable: {decided.note}"
    return f"{recorded} → {decided.decision.decision} by {decided.decision.rule_id}"


def _journal_lines(decided: list[Redecision]) -> list[str]:
    changed = [d for d in decided if d.status == "changed"]
    undecidable = [d for d in decided if d.status == "not decidable"]
    same = sum(1 for d in decided if d.status == "same")
    skipped = sum(1 for d in decided if d.status == "not re-decided")
    runs = len({d.run_id for d in decided})
    lines = [
        f"Recorded proposals decided again: {len(decided)} in {runs} run(s): {len(changed)} would change, "
        f"{len(undecidable)} not decidable, {same} unchanged, {skipped} refused before policy (kept)"
    ]
    for d in changed:
        where = f"{d.run_id} {d.step_id} ({d.state})"
        lines.append(f"  {d.direction}: {where} {_proposal_text(d.proposal)}: {_decision_text(d)}")
    for d in undecidable:
        lines.append(
            f"  not decidable: {d.run_id} {d.step_id} ({d.state}) {_proposal_text(d.proposal)}: {d.note}"
        )
    return lines


def _journal_json(decided: list[Redecision]) -> dict[str, Any]:
    return {
        "runs": len({d.run_id for d in decided}),
        "proposals": len(decided),
        "summary": {
            s: sum(1 for d in decided if d.status == s)
            for s in ("changed", "same", "not decidable", "not re-decided")
        },
        "changed": [d.as_dict() for d in decided if d.status == "changed"],
        "not_decidable": [d.as_dict() for d in decided if d.status == "not decidable"],
    }


def _markdown(result: Diff, labels: tuple[str, str], decided: list[Redecision] | None) -> str:
    lines = [f"### Autonomy diff: {_title(result, labels)}", ""]
    counts = ", ".join(f"{len(result.by_direction(d))} {d}" for d, _ in _HEADINGS)
    lines.append(f"**{counts}**" if result.changes else "No change in autonomy surface.")
    for direction, heading in _HEADINGS:
        changes = result.by_direction(direction)
        if changes:
            lines += ["", f"#### {heading}", ""]
            lines += [f"- {_md(change.text)}" for change in changes]
    if decided is not None:
        lines += ["", "#### Recorded decisions", "", _md(_journal_lines(decided)[0])]
        rows = [d for d in decided if d.status in ("changed", "not decidable")]
        if rows:
            lines += ["", "| run | step | state | proposal | recorded → new |", "|---|---|---|---|---|"]
            for d in rows:
                cells = [d.run_id, d.step_id, d.state, _proposal_text(d.proposal), _decision_text(d)]
                lines.append("| " + " | ".join(_md(c).replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def _md(text: str) -> str:
    """Text with Markdown's emphasis and code characters taken literally."""
    return "".join(f"\\{c}" if c in "*_`<>" else c for c in text)


# -- graph --------------------------------------------------------------------------------------------


class GraphFormat(StrEnum):
    mermaid = "mermaid"
    svg = "svg"


@app.command()
def graph(
    workflow: WorkflowArgument,
    run: Annotated[
        str | None, typer.Option("--run", metavar="RUN", help="Highlight the path this run took.")
    ] = None,
    db: DbOption = None,
    fmt: Annotated[
        GraphFormat, typer.Option("--format", help="mermaid (text) or svg.")
    ] = GraphFormat.mermaid,
) -> None:
    """Draw a workflow: states, envelopes, gates on exits, escalation owners; Mermaid or SVG."""
    wf = _load(workflow)
    path = None
    if run is not None:

        async def main() -> tuple[RunRecord, list[Entry]]:
            async with open_store(db) as journal:
                return await journal.get_run(run), await journal.read_entries(run)

        record, entries = run_command(main)
        if record.workflow_name != wf.name:
            fail(f"run {run} is a run of workflow {record.workflow_name}, not {wf.name}")
        path = run_path(run, entries)
        missing = sorted(set(path.visited) - set(wf.states))
        if missing:
            fail(
                f"run {run} visited state(s) {', '.join(missing)}, which {wf.name} {wf.version} does not "
                f"have (the run is pinned to version {record.workflow_version})"
            )
    text = mermaid(wf, path) if fmt is GraphFormat.mermaid else svg(wf, path)
    sys.stdout.write(text)
