"""schemathesis against `/openapi.json` of a real `tether serve`, authenticated as each role:
every check it has (no 5xx, responses and events as the document says, status codes and
headers documented, schema-valid requests accepted and invalid ones refused, 401 without
the token), on generated requests to every operation, stateful sequences included.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from servers import Served, env_for, serve
from tether import identity
from tether.journal import open_journal

pytest.importorskip("schemathesis")

ROLES = {
    "viewer": {"role": "viewer"},
    "operator": {"role": "operator"},
    "approver": {"role": "approver", "approver_for": ["supervisor"]},
    "admin": {"role": "admin"},
}


async def _tokens(db: Path) -> dict[str, str]:
    journal = open_journal(str(db))
    try:
        made = {}
        for name, spec in ROLES.items():
            made[name], _ = await identity.create_token(journal, name=name, expires_in=None, **spec)
        return made
    finally:
        await journal.aclose()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str], Path]]:
    workdir = tmp_path_factory.mktemp("schema")
    db = workdir / "journal.db"
    tokens = asyncio.run(_tokens(db))
    served = serve(str(db), workdir)
    try:
        yield served, tokens, workdir
    finally:
        served.stop()


@pytest.mark.parametrize("role", list(ROLES))
def test_schemathesis_finds_no_server_error_and_no_response_contradicting_the_document(
    server: tuple[Served, dict[str, str], Path], role: str
) -> None:
    served, tokens, workdir = server
    argv = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{served.url}/openapi.json",
        "--header",
        f"Authorization: Bearer {tokens[role]}",
        "--checks",
        "all",
        "--max-examples",
        "20",
        "--seed",
        "1",
        "--workers",
        "1",
        "--no-color",
        "--report-dir",
        str(workdir / f"report-{role}"),
    ]
    found = subprocess.run(
        argv, cwd=workdir, env=env_for(workdir), capture_output=True, text=True, timeout=600
    )
    assert found.returncode == 0, found.stdout[-6000:] + found.stderr[-2000:]
