"""MCP (Model Context Protocol) servers as tool sources, through the official `mcp` SDK.

Needs the extra: `pip install 'tether[mcp]'`.
"""

from tether.mcp.client import (
    McpClient,
    McpError,
    McpServer,
    McpServerSpec,
    McpTool,
    McpToolError,
    McpToolRef,
    ToolOverride,
    ToolSource,
    close_servers,
    effect_from_annotations,
    list_tools_now,
)

__all__ = [
    "McpClient",
    "McpError",
    "McpServer",
    "McpServerSpec",
    "McpTool",
    "McpToolError",
    "McpToolRef",
    "ToolOverride",
    "ToolSource",
    "close_servers",
    "effect_from_annotations",
    "list_tools_now",
]
