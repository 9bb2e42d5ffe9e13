"""The interface between `RemoteBackend` and the wire protocol of the servers it attaches to.

A `ProtocolAdapter` owns what differs between protocols: building one client per replica, the URL a
health check asks, turning a `GenerationRequest` into the upstream call and its stream into
`(text, finish_reason or None, (prompt_tokens, completion_tokens) or None)` pieces, and telling the
request's own faults (upstream 4xx) from the ones worth retrying elsewhere. Replicas, picking,
retries and the `GenerationHandle` stay in `remote.py`; each protocol lives in its own module
(`openai_protocol.py`, `tgi_protocol.py`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import AsyncIterator
from typing import Any

from ..errors import InvalidRequestError
from ..stream import GenerationRequest

Piece = tuple[str, str | None, tuple[int, int] | None]


class ProtocolAdapter(ABC):
    """One wire protocol; RemoteBackend holds one, picked by the spec's source."""

    name: str

    def __init__(
        self, *, upstream_model: str, api_key: str, timeout: float, connect_timeout: float, max_connections: int
    ):
        self.upstream_model = upstream_model
        self.api_key = api_key  # "unused" when the spec names none
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_connections = max_connections

    @abstractmethod
    async def open_client(self, url: str) -> Any:
        """The client for the replica at `url`; called on the backend's event loop."""

    @abstractmethod
    def health_url(self, url: str) -> str:
        """What a health check of the replica at `url` asks for (any 2xx answer is healthy)."""

    @abstractmethod
    def pieces(self, client: Any, request: GenerationRequest) -> AsyncIterator[Piece]:
        """Start the request on `client` and yield one piece per upstream event.

        A failure to start goes through `translate`; a failure while streaming passes as it is.
        """

    def translate(self, exc: Exception) -> Exception:
        """Upstream 4xx answers are the request's fault: pass them on as they are; the rest may retry."""
        status = getattr(exc, "status_code", None) or getattr(getattr(exc, "response", None), "status_code", None)
        if status and 400 <= status < 500 and status not in (408, 429):
            error = InvalidRequestError(f"the upstream server refused the request ({status}): {describe(exc)}")
            error.status = status if status in (400, 404, 413, 422) else 400
            return error
        return exc


def describe(exc: BaseException | None) -> str:
    """A short, one-line account of an upstream failure for logs, replica status and error messages."""
    if exc is None:
        return "unknown error"
    return f"{type(exc).__name__}: {str(exc)[:200]}" if str(exc) else type(exc).__name__
