"""`tether test SCENARIOS.yaml…`: run scenario files, optionally with governance coverage.

Exit codes: 0 when every scenario passes (and coverage is not below `--fail-under`); 1 when
a scenario fails or coverage is below the threshold; 2 when a file cannot be run as written
(nothing is run then).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape

from tether.cli.common import JsonOption, out, print_json, run_command
from tether.testing.coverage import Collector
from tether.testing.scenarios import ScenarioResult, Suite, load_suite, run_suite

app = typer.Typer()


@app.command(name="test")
def test_scenarios(
    files: Annotated[list[Path], typer.Argument(metavar="SCENARIOS.yaml", help="Scenario files (YAML).")],
    show_coverage: Annotated[
        bool, typer.Option("--coverage", help="Report the governance coverage of the workflows run.")
    ] = False,
    fail_under: Annotated[
        float | None,
        typer.Option(
            "--fail-under",
            metavar="PERCENT",
            min=0,
            max=100,
            help="Exit 1 below this coverage (implies --coverage).",
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run scenario files: check each run's decisions, states visited and end status."""
    collector = Collector()

    async def main() -> list[tuple[Suite, list[ScenarioResult]]]:
        suites = [await load_suite(path, collector) for path in files]  # every file checked before any runs
        return [(suite, await run_suite(suite, collector)) for suite in suites]

    results = run_command(main)
    report = collector.report() if show_coverage or fail_under is not None else None
    failed = sum(not r.passed for _, rs in results for r in rs)
    passed = sum(len(rs) for _, rs in results) - failed
    if as_json:
        document: dict[str, Any] = {
            "passed": passed,
            "failed": failed,
            "files": [
                {"file": str(suite.path), "scenarios": [r.as_dict() for r in rs]} for suite, rs in results
            ],
        }
        if report is not None:
            document["coverage"] = report.as_dict() | {"fail_under": fail_under}
        print_json(document)
    else:
        for suite, rs in results:
            out.print(f"[bold]{escape(str(suite.path))}[/]", soft_wrap=True)
            for r in rs:
                mark = "[green]pass[/]" if r.passed else "[red]FAIL[/]"
                out.print(f"  {mark}  {escape(r.name)}", soft_wrap=True)
                for line in r.report() if not r.passed else []:
                    out.print(f"        {escape(line)}", soft_wrap=True)
        out.print(f"{passed} passed, {failed} failed")
        if report is not None:
            out.print()
            for line in report.lines():
                out.print(escape(line), soft_wrap=True)
            if report.below(fail_under):
                out.print(
                    f"[red]governance coverage {report.display()} is below --fail-under {fail_under:g}%[/]"
                )
    if failed or (report is not None and report.below(fail_under)):
        raise typer.Exit(1)
