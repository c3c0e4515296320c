"""The pytest plugin (entry point `tether.testing`): journal fixtures and governance coverage.

Fixtures:
- `tether_journal`: a SQLite journal in the test's `tmp_path`;
- `tether_journal_postgres`: a PostgreSQL journal in a schema of its own, dropped afterwards,
  on `$TETHER_TEST_PG` (default postgresql://postgres@127.0.0.1:5432/test). Without a server
  the test is skipped, saying why; with CI=true it fails instead.

`pytest --tether-coverage` collects governance coverage from every run `run_to_end` drives
and every run left in those journals, and prints a table per workflow at the end;
`--tether-fail-under N` fails the session below N percent.
"""

from __future__ import annotations

import asyncio
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tether.cli.common import without_password
from tether.journal import Entry, Journal, RunRecord, open_journal
from tether.testing import coverage

PG_ENV = "TETHER_TEST_PG"
PG_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
_collector_key = pytest.StashKey[coverage.Collector]()
# The collector active before this session's (a pytest run inside a test keeps its caller's).
_previous_key = pytest.StashKey["coverage.Collector | None"]()


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tether", "tether governance coverage")
    group.addoption(
        "--tether-coverage",
        action="store_true",
        help="Report the states, exits, rules (both branches) and decisions the runs exercised.",
    )
    group.addoption(
        "--tether-fail-under",
        type=float,
        metavar="PERCENT",
        help="Fail the session when governance coverage is below PERCENT (implies --tether-coverage).",
    )


def pytest_configure(config: pytest.Config) -> None:
    if config.getoption("tether_coverage") or config.getoption("tether_fail_under") is not None:
        collector = coverage.Collector()
        config.stash[_collector_key] = collector
        config.stash[_previous_key] = coverage.active()
        coverage.activate(collector)


def pytest_unconfigure(config: pytest.Config) -> None:
    if _collector_key in config.stash:
        coverage.activate(config.stash[_previous_key])


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    collector = session.config.stash.get(_collector_key, None)
    threshold = session.config.getoption("tether_fail_under")
    if collector is not None and exitstatus == pytest.ExitCode.OK and collector.report().below(threshold):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    collector = config.stash.get(_collector_key, None)
    if collector is None:
        return
    report = collector.report()
    terminalreporter.section("tether governance coverage")
    for line in report.lines():
        terminalreporter.write_line(line)
    threshold = config.getoption("tether_fail_under")
    if report.below(threshold):
        terminalreporter.write_line(
            f"FAIL: governance coverage {report.display()} is below --tether-fail-under {threshold:g}%",
            red=True,
        )


@pytest.fixture
def tether_journal(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Journal]:
    """A SQLite journal of the test's own, in `tmp_path`."""
    journal = open_journal(str(tmp_path / "tether.db"))
    try:
        yield journal
    finally:
        _harvest(request.config, journal)
        journal.close()


@pytest.fixture
def tether_journal_postgres(request: pytest.FixtureRequest) -> Iterator[Journal]:
    """A PostgreSQL journal in a fresh schema, dropped after the test."""
    url = os.environ.get(PG_ENV, PG_DEFAULT)
    try:
        import psycopg

        admin = psycopg.connect(url, autocommit=True, connect_timeout=3)
    except Exception as exc:  # the driver is not installed, or no server answers
        said = " ".join(str(exc).split())  # psycopg's message spans lines
        where = without_password(url)
        message = f"PostgreSQL not reachable at {where} ({said}); set {PG_ENV} to a server URL"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{message} (CI=true: this must not be skipped)")
        pytest.skip(message)
    schema = "tether_test_" + secrets.token_hex(6)
    with admin:
        admin.execute(f"CREATE SCHEMA {schema}")
        journal = open_journal(f"{url}{'&' if '?' in url else '?'}options=-csearch_path%3D{schema}")
        try:
            yield journal
        finally:
            _harvest(request.config, journal)
            journal.close()
            admin.execute(f"DROP SCHEMA {schema} CASCADE")


def _harvest(config: pytest.Config, journal: Journal) -> None:
    """Give the collector every run of a journal a test is done with."""
    collector = config.stash.get(_collector_key, None)
    if collector is None:
        return
    for record, entries in asyncio.run(_every_run(journal)):
        collector.observe(entries, workflow_ref=record.workflow_ref, policy_ref=record.policy_ref)


async def _every_run(journal: Journal) -> list[tuple[RunRecord, list[Entry]]]:
    runs = await journal.list_runs(limit=1_000_000)
    return [(r, await journal.read_entries(r.run_id)) for r in runs]
