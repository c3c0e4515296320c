"""The MCP servers a workflow file declares (`mcp_servers:`), listed once when it loads.

The loader hands every `mcp:SERVER/TOOL` reference of an agent state to the catalog, which
checks it against what the server listed and builds the tool. Each server's tools share
one lazily connected `McpServer`; nothing stays connected after the listing.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mcp.types
from pydantic import ValidationError

from tether.errors import DefinitionError
from tether.mcp.client import McpError, McpServer, McpServerSpec, McpTool, McpToolRef, list_tools_now
from tether.tools import Effect, Verifier

PREFIX = "mcp:"


class McpCatalog:
    def __init__(self, declared: Mapping[str, Any], base: Path, where: str) -> None:
        """Validate each server's spec and list its tools; `where` names the workflow file."""
        self.where = where
        self.servers = {name: McpServer(_spec(name, value, base, where)) for name, value in declared.items()}
        self.listed: dict[str, dict[str, mcp.types.Tool]] = {}
        for name, listed in list_tools_now(self.servers.values()).items():
            if isinstance(listed, McpError):
                raise DefinitionError(f"{where}: mcp_servers.{name}: cannot list its tools: {listed}")
            self.listed[name] = {t.name: t for t in listed}
        # One stand-in function per server tool: two states naming it name the same tool.
        self._refs: dict[tuple[str, str], McpToolRef] = {}

    def tool(
        self,
        ref: str,
        where: str,
        *,
        name: str | None = None,
        effect: Effect | None = None,
        idempotent: bool | None = None,
        verify: Verifier | None = None,
    ) -> McpTool:
        """The tool `ref` (`mcp:SERVER/TOOL`) names, with what the author declared over it."""
        server, tool = split_ref(ref, where)
        if server not in self.servers:
            declared = ", ".join(sorted(self.servers)) or "none"
            raise DefinitionError(
                f"{where}: {ref!r} names MCP server {server!r}, which mcp_servers does not declare "
                f"(declared: {declared})"
            )
        listed = self.listed[server].get(tool)
        if listed is None:
            offers = ", ".join(sorted(self.listed[server])) or "no tools"
            raise DefinitionError(
                f"{where}: MCP server {server!r} has no tool {tool!r} (it offers: {offers})"
            )
        fn = self._refs.setdefault((server, tool), McpToolRef(server, tool))
        try:
            return McpTool(
                self.servers[server],
                listed,
                name=name,
                effect=effect,
                idempotent=idempotent,
                verify=verify,
                fn=fn,
            )
        except McpError as exc:
            raise DefinitionError(f"{where}: {exc}") from None


def split_ref(ref: str, where: str) -> tuple[str, str]:
    server, _, tool = ref.removeprefix(PREFIX).partition("/")
    if not ref.startswith(PREFIX) or not server or not tool:
        raise DefinitionError(f"{where}: {ref!r} is not an MCP tool reference of the form mcp:SERVER/TOOL")
    return server, tool


def no_servers_declared(ref: str, where: str) -> DefinitionError:
    split_ref(ref, where)
    return DefinitionError(f"{where}: {ref!r} names an MCP server, but the workflow declares no mcp_servers")


def _spec(name: str, value: Any, base: Path, where: str) -> McpServerSpec:
    place = f"{where}: mcp_servers.{name}"
    if "/" in name:
        raise DefinitionError(f"{place}: a server name cannot contain '/' (tools are named mcp:SERVER/TOOL)")
    if not isinstance(value, dict):
        raise DefinitionError(f"{place}: expected a mapping with 'command' or 'url', got {value!r}")
    try:
        spec = McpServerSpec.model_validate({**value, "name": name})
    except ValidationError as exc:
        problems = [
            f"{'.'.join(str(p) for p in e['loc']) or '(server)'}: {e['msg'].removeprefix('Value error, ')}"
            for e in exc.errors()
        ]
        raise DefinitionError(f"{place}: " + "; ".join(problems)) from None
    if spec.command is not None:
        # Relative paths in a workflow mean relative to its folder, as for tool import paths.
        spec.cwd = str((base / spec.cwd).resolve()) if spec.cwd else str(base)
    return spec
