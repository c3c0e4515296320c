"""The MCP servers a workflow file declares (`mcp_servers:`), listed once when it loads.

The loader hands every `mcp:SERVER/TOOL` reference of an agent state to the catalog, which
checks it against what the server listed and builds the tool. Each server's tools share
one `McpServer`. The listing runs in the loader's event loop over that loop's connection
of each server, which stays open: the runs the loop drives use it, so a server process is
started once per loop, not once to list and again to call.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import mcp.types
from pydantic import ValidationError

from tether.errors import DefinitionError
from tether.mcp.client import McpError, McpServer, McpServerSpec, McpTool, McpToolRef
from tether.tools import Effect, Verifier

PREFIX = "mcp:"


class McpCatalog:
    def __init__(self, declared: Mapping[str, Any], base: Path, where: str) -> None:
        """Validate each server's spec; `where` names the workflow file; `list_tools()` lists them."""
        self.where = where
        self.servers = {name: McpServer(_spec(name, value, base, where)) for name, value in declared.items()}
        self.listed: dict[str, dict[str, mcp.types.Tool]] = {}
        # One stand-in function per server tool: two states naming it name the same tool.
        self._refs: dict[tuple[str, str], McpToolRef] = {}

    async def list_tools(self) -> None:
        """List every server's tools, in parallel, over the running loop's connections."""
        names = list(self.servers)
        listings = await asyncio.gather(*(_listing(self.servers[n]) for n in names))
        failures = [(n, x) for n, x in zip(names, listings, strict=True) if isinstance(x, McpError)]
        if failures:
            await asyncio.gather(*(s.aclose() for s in self.servers.values()), return_exceptions=True)
            name, failure = failures[0]
            raise DefinitionError(f"{self.where}: mcp_servers.{name}: cannot list its tools: {failure}")
        for name, listed in zip(names, listings, strict=True):
            assert not isinstance(listed, McpError)
            self.listed[name] = {t.name: t for t in listed}

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


async def _listing(server: McpServer) -> list[mcp.types.Tool] | McpError:
    try:
        return await server.client().list_tools()
    except McpError as exc:
        return exc
    except Exception as exc:  # a protocol-level refusal of tools/list
        return McpError(f"{server.spec.where()}: {exc}")


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
