"""MCP servers an admin configures, and the tools they give chats and the Responses API.

The operator names the servers in a JSON file (`--mcp-config`), in the `mcpServers` shape Claude
Desktop, Cursor and VS Code use:

    {"mcpServers": {
        "vault": {"command": "python", "args": ["vault_server.py"], "env": {"TOKEN": "..."}},
        "docs":  {"url": "https://mcp.example.com/mcp", "headers": {"Authorization": "Bearer ..."}}}}

A stdio server is started once, as a child of Shoal, and kept; a Streamable HTTP URL is checked as a
remote model's is (loopback, link-local and cloud-metadata addresses refused unless
`--allow-private-remotes`). Commands, URLs, environments and headers are the operator's secrets:
nothing here shows them (`public()` has the name, the transport and the tools).

`McpHub` keeps one connection per server on a thread and an event loop of its own (the SDK's
streams live there, whichever loop or thread asks), lists the tools once connected and reconnects
after a failure. Each tool is offered to a model as a function named `<server>__<tool>`; a call runs
with the caller's identity in the request's `_meta` (`shoal/user`), within `--mcp-timeout`
seconds, and its text result is cut to `--mcp-max-result-chars`. Who may use them: any caller with
an identity (a key, a browser's signed id, the trusted local owner); a stranger on the API gets 401.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llm_pool.errors import InvalidParamsError, ShoalError

log = logging.getLogger("shoal.mcp")
SERVER_NAME = re.compile(r"^[A-Za-z0-9_-]{1,24}$")
CONNECT_SECONDS = 20.0
USER_META = "shoal/user"


class McpUnavailableError(ShoalError):
    status = 503
    type = "mcp_unavailable"


@dataclass(frozen=True)
class McpServerConfig:
    name: str
    command: str | None = None
    args: tuple[str, ...] = ()
    env: dict[str, str] = field(default_factory=dict, repr=False)
    url: str | None = field(default=None, repr=False)
    headers: dict[str, str] = field(default_factory=dict, repr=False)

    @property
    def transport(self) -> str:
        return "stdio" if self.command else "http"


def load_config(path: Path, check_url=None) -> list[McpServerConfig]:
    """The servers of an `mcpServers` JSON file; a ValueError names what is wrong (at start-up)."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"--mcp-config {path}: {exc}") from None
    servers = data.get("mcpServers") if isinstance(data, dict) else None
    if not isinstance(servers, dict):
        raise ValueError(f"--mcp-config {path}: expected {{\"mcpServers\": {{name: {{command|url: ...}}}}}}")
    out = []
    for name, entry in servers.items():
        where = f"--mcp-config {path}: server '{name}'"
        if not SERVER_NAME.match(name):
            raise ValueError(f"{where}: a name is 1-24 letters, digits, _ or -")
        if not isinstance(entry, dict) or bool(entry.get("command")) == bool(entry.get("url")):
            raise ValueError(f"{where}: give a command (stdio) or a url (Streamable HTTP)")
        args, env, headers = entry.get("args") or [], entry.get("env") or {}, entry.get("headers") or {}
        if not (isinstance(args, list) and all(isinstance(a, str) for a in args)):
            raise ValueError(f"{where}: args is a list of strings")
        for label, mapping in (("env", env), ("headers", headers)):
            if not (isinstance(mapping, dict) and all(isinstance(v, str) for v in mapping.values())):
                raise ValueError(f"{where}: {label} maps names to strings")
        if entry.get("url"):
            if check_url is not None:
                check_url(str(entry["url"]), f"mcpServers.{name}.url", ValueError)
        out.append(McpServerConfig(name, entry.get("command"), tuple(args), dict(env), entry.get("url"),
                                   dict(headers)))
    return out


@dataclass(frozen=True)
class McpTool:
    server: str
    name: str  # the tool's name on its server
    description: str
    schema: dict[str, Any]

    @property
    def function_name(self) -> str:
        return function_name(self.server, self.name)

    def function(self) -> dict[str, Any]:
        return {"name": self.function_name, "description": self.description or f"{self.name} ({self.server})",
                "parameters": self.schema or {"type": "object", "properties": {}}}


def function_name(server: str, tool: str) -> str:
    return f"{server}__{re.sub(r'[^A-Za-z0-9_-]', '_', tool)}"[:64]


@dataclass
class McpResult:
    server: str
    tool: str
    text: str
    error: bool = False


class _Link:
    """One server's connection, held open by a task on the hub's loop."""

    def __init__(self, config: McpServerConfig):
        self.config = config
        self.client = None
        self.tools: list[McpTool] = []
        self.error: str | None = None
        self.ready: asyncio.Event | None = None
        self.task: asyncio.Task | None = None
        self.closing: asyncio.Event | None = None

    def target(self):
        from mcp import StdioServerParameters

        if self.config.command:
            return StdioServerParameters(command=self.config.command, args=list(self.config.args),
                                         env=dict(self.config.env) or None)
        if self.config.headers:
            import httpx2
            from mcp.client.streamable_http import streamable_http_client

            return streamable_http_client(self.config.url, http_client=httpx2.AsyncClient(
                headers=self.config.headers, timeout=httpx2.Timeout(30.0, read=300.0)))
        return self.config.url


class McpHub:
    def __init__(self, servers: list[McpServerConfig], timeout: float = 30.0, max_result_chars: int = 16_000):
        self.timeout = timeout
        self.max_result_chars = max_result_chars
        self._links = {s.name: _Link(s) for s in servers}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        if self._links:
            self._loop = asyncio.new_event_loop()
            self._thread = threading.Thread(target=self._loop.run_forever, name="mcp", daemon=True)
            self._thread.start()
            for link in self._links.values():
                self._submit(self._connect(link))

    # ------------------------------------------------------------------ what there is
    @property
    def names(self) -> list[str]:
        return list(self._links)

    def public(self) -> list[dict[str, Any]]:
        """What a user may see of each server: never its command, URL, environment or headers."""
        return [{"name": name, "transport": link.config.transport,
                 "state": "ready" if link.client is not None else ("failed" if link.error else "connecting"),
                 "error": link.error, "tools": [{"name": t.name, "description": t.description} for t in link.tools]}
                for name, link in self._links.items()]

    def check(self, servers: list[str], param: str) -> list[str]:
        for i, name in enumerate(servers):
            if name not in self._links:
                known = ", ".join(self._links) or "none is configured (--mcp-config)"
                raise InvalidParamsError(f"{param}: no MCP server '{str(name)[:40]}' (servers: {known})",
                                         param=f"{param}.{i}" if len(servers) > 1 else param,
                                         code="unknown_mcp_server")
        return list(dict.fromkeys(servers))

    async def tools(self, servers: list[str], allowed: set[str] | None = None) -> list[McpTool]:
        """The tools of these servers (connected first if need be), those in `allowed` if given."""
        out = []
        for name in self.check(servers, "mcp_servers"):
            link = self._links[name]
            await self._wrap(self._ensure(link), CONNECT_SECONDS + 1)
            out += [t for t in link.tools if allowed is None or t.name in allowed]
        return out

    def tool(self, servers: list[str], function: str) -> McpTool | None:
        for name in servers:
            link = self._links.get(name)
            for tool in link.tools if link else ():
                if tool.function_name == function:
                    return tool
        return None

    # ------------------------------------------------------------------ calls
    async def call(self, tool: McpTool, arguments: str, user: str | None) -> McpResult:
        """Run one call; a failure of the tool or its server is a result the model reads, not an error."""
        try:
            args = json.loads(arguments or "{}")
            if not isinstance(args, dict):
                raise ValueError("the arguments are not a JSON object")
        except ValueError as exc:
            return McpResult(tool.server, tool.name, f"error: {exc}", True)
        try:
            return await self._wrap(self._call(tool, args, user), self.timeout + 2)
        except TimeoutError:
            return McpResult(tool.server, tool.name, f"error: the tool did not answer within {self.timeout:g} s", True)
        except Exception as exc:  # the server died or refused: the model (and the user) see why
            return McpResult(tool.server, tool.name, f"error: {type(exc).__name__}: {str(exc)[:500]}", True)

    async def _call(self, tool: McpTool, args: dict, user: str | None) -> McpResult:
        link = self._links[tool.server]
        await self._ensure(link)
        try:
            result = await asyncio.wait_for(link.client.call_tool(tool.name, args, meta={USER_META: user or ""}),
                                            self.timeout)
        except TimeoutError:
            raise
        except Exception:
            self._drop(link)  # reconnect on the next call
            raise
        parts = []
        for item in result.content or ():
            text = getattr(item, "text", None)
            parts.append(text if isinstance(text, str) else f"[{getattr(item, 'type', 'content')}]")
        text = "\n".join(parts)
        if not text and result.structured_content is not None:
            text = json.dumps(result.structured_content, ensure_ascii=False)
        if len(text) > self.max_result_chars:
            text = text[: self.max_result_chars] + f"\n[cut at {self.max_result_chars} characters]"
        return McpResult(tool.server, tool.name, text, bool(result.is_error))

    # ------------------------------------------------------------------ connections (the hub's loop)
    def _submit(self, coro) -> Future:
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def _wrap(self, coro, seconds: float):
        if self._loop is None:
            coro.close()
            raise McpUnavailableError("no MCP server is configured (--mcp-config)")
        return await asyncio.wait_for(asyncio.wrap_future(self._submit(coro)), seconds)

    async def _ensure(self, link: _Link) -> None:
        if link.client is None and (link.task is None or link.task.done()):
            await self._connect(link)
        if link.ready is not None and not link.ready.is_set():
            try:
                await asyncio.wait_for(link.ready.wait(), CONNECT_SECONDS)
            except TimeoutError:
                pass
        if link.client is None:
            raise McpUnavailableError(f"MCP server '{link.config.name}' is not available: "
                                      f"{link.error or 'not connected'}", param="mcp_servers")

    async def _connect(self, link: _Link) -> None:
        if link.task is not None and not link.task.done():
            return
        link.ready, link.closing, link.error = asyncio.Event(), asyncio.Event(), None
        link.task = asyncio.get_running_loop().create_task(self._hold(link))

    async def _hold(self, link: _Link) -> None:
        from mcp import Client

        try:
            async with Client(link.target(), read_timeout_seconds=self.timeout) as client:
                listed = await client.list_tools()
                link.tools = [McpTool(link.config.name, t.name, (t.description or "")[:4096],
                                      dict(t.input_schema or {})) for t in listed.tools]
                link.client = client
                link.ready.set()
                log.info("MCP server %s: %d tools", link.config.name, len(link.tools))
                await link.closing.wait()
        except Exception as exc:
            link.error = f"{type(exc).__name__}: {str(exc)[:300]}"
            log.warning("MCP server %s: %s", link.config.name, link.error)
        finally:
            link.client = None
            link.ready.set()

    def _drop(self, link: _Link) -> None:
        if link.closing is not None:
            link.closing.set()

    def close(self) -> None:
        if self._loop is None:
            return

        async def stop():
            tasks = [link.task for link in self._links.values() if link.task is not None]
            for link in self._links.values():
                self._drop(link)
            if tasks:
                await asyncio.wait(tasks, timeout=5)

        try:
            self._submit(stop()).result(timeout=8)
        except Exception:
            pass
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._loop = None
