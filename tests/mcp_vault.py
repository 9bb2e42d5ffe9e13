"""A real MCP server, written with the official `mcp` SDK, that the MCP tests have Shoal start over
stdio: `vault_code` answers what no model can know, `whoami` says which user Shoal called it for."""

from __future__ import annotations

import os
import sys

from mcp.server.mcpserver import Context, MCPServer

app = MCPServer("vault")
ONLY = set(filter(None, os.environ.get("VAULT_TOOLS", "").split(",")))  # a test may offer fewer tools


def tool(function):
    return app.tool()(function) if not ONLY or function.__name__ in ONLY else function


@tool
def vault_code(city: str) -> str:
    """The code of the vault in a city's branch."""
    return f"The vault code for {city} is ZQ-{sum(map(ord, city.lower())) % 9000 + 1000}."


@tool
def whoami(ctx: Context) -> str:
    """Which Shoal user this call is made for."""
    return f"user={(ctx.request_context.meta or {}).get('shoal/user', '')}"


@tool
def secret_seen(ctx: Context) -> str:
    """Whether the operator's secret reached the server (its environment over stdio, a header over HTTP)."""
    request = getattr(ctx.request_context, "request", None)
    header = request.headers.get("authorization", "") if request is not None else ""
    return "yes" if os.environ.get("VAULT_SECRET") or header.startswith("Bearer vault-") else "no"


if __name__ == "__main__":
    if sys.argv[1:2] == ["--http"]:  # Streamable HTTP on a loopback port
        app.run("streamable-http", host="127.0.0.1", port=int(sys.argv[2]))
    else:
        app.run("stdio")
