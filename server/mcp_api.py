"""GET /v1/mcp/servers: the MCP servers the operator configured, as a user may see them.

Owner: a user (a key, or the trusted local owner); a stranger gets 401. Only each server's name,
transport, state and tools are shown: never its command, URL, environment or headers.
"""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request

from service.identity import Caller

from .auth import user_caller
from .context import services_of

router = APIRouter(tags=["MCP"])


@router.get("/v1/mcp/servers", summary="The MCP servers chats and responses may call, with their tools")
def list_mcp_servers(request: Request, caller: Caller = Depends(user_caller)) -> dict:
    return {"object": "list", "data": services_of(request).mcp.public()}
