"""Typed errors of the model pool and generation.

Every error a user can cause or meet derives from `ShoalError` and carries the HTTP status an
adapter should answer with, an OpenAI-style `type`, and (for bad parameters) the `param` it is
about. Adapters map these with one handler; nothing here knows about HTTP frameworks.
"""

from __future__ import annotations


class ShoalError(Exception):
    """Base of every error Shoal reports to a client."""

    status: int = 500
    type: str = "server_error"
    retry_after: float | None = None

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code

    def to_dict(self) -> dict:
        return {"message": self.message, "type": self.type, "param": self.param, "code": self.code}


class InvalidParamsError(ShoalError):
    """A request parameter is missing, of the wrong type or out of range."""

    status = 422
    type = "invalid_request_error"


class InvalidRequestError(ShoalError):
    """A well-formed request that cannot be served as asked (e.g. chat on a completion model)."""

    status = 400
    type = "invalid_request_error"


class ContextOverflowError(InvalidRequestError):
    """The prompt (plus the tokens asked for) does not fit the model's context window."""

    def __init__(self, prompt_tokens: int, max_new_tokens: int, context_length: int):
        super().__init__(
            f"This model's context window is {context_length} tokens; the prompt has "
            f"{prompt_tokens} tokens and {max_new_tokens} new tokens were asked for "
            f"({prompt_tokens + max_new_tokens} in all). Shorten the prompt or lower max_new_tokens.",
            param="messages",
            code="context_length_exceeded",
        )
        self.prompt_tokens = prompt_tokens
        self.max_new_tokens = max_new_tokens
        self.context_length = context_length


class NotFoundError(ShoalError):
    status = 404
    type = "not_found_error"


class ModelNotFoundError(NotFoundError):
    def __init__(self, name: str, version: str | None = None):
        what = f"model '{name}'" + (f" version '{version}'" if version else "")
        super().__init__(f"The {what} does not exist in the catalog.", param="model",
                         code="model_not_found")
        self.name = name


class MethodNotAllowedError(ShoalError):
    status = 405
    type = "invalid_request_error"
    headers: dict[str, str] | None = None


class ConflictError(ShoalError):
    status = 409
    type = "conflict_error"


class ModelLoadError(ShoalError):
    """A model could not be loaded (missing file, corrupt weights, over budget, timeout)."""

    status = 503
    type = "model_load_error"


class InsufficientMemoryError(ModelLoadError):
    code_name = "insufficient_memory"


class ServiceUnavailableError(ShoalError):
    status = 503
    type = "service_unavailable"

    def __init__(self, message: str, *, retry_after: float | None = None, code: str | None = None):
        super().__init__(message, code=code)
        self.retry_after = retry_after


class QueueFullError(ServiceUnavailableError):
    def __init__(self, model: str, depth: int, retry_after: float = 1.0):
        super().__init__(
            f"The queue for model '{model}' is full ({depth} requests waiting); retry later.",
            retry_after=retry_after, code="queue_full",
        )


class QueueTimeoutError(ServiceUnavailableError):
    def __init__(self, model: str, waited: float):
        super().__init__(
            f"The request waited {waited:.1f} s in the queue for model '{model}' and timed out.",
            retry_after=1.0, code="queue_timeout",
        )


class RateLimitedError(ShoalError):
    status = 429
    type = "rate_limit_error"

    def __init__(self, message: str, retry_after: float):
        super().__init__(message, code="rate_limited")
        self.retry_after = retry_after


class AuthenticationError(ShoalError):
    status = 401
    type = "authentication_error"


class PermissionDeniedError(ShoalError):
    status = 403
    type = "permission_error"


class MisdirectedRequestError(ShoalError):
    """A request for a host name this server does not answer to (421): what DNS rebinding sends."""

    status = 421
    type = "invalid_request_error"


class PayloadTooLargeError(ShoalError):
    status = 413
    type = "invalid_request_error"


class QuotaExceededError(ShoalError):
    """A user's quota (sessions, messages in a session, files, uploads per minute) is used up: 429,
    with Retry-After when waiting helps (a per-minute quota)."""

    status = 429
    type = "quota_exceeded_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message, param=param, code=code)
        self.retry_after = retry_after


class InsufficientStorageError(ShoalError):
    """The server's disk is full, or below the free space Shoal keeps (507): nothing was stored."""

    status = 507
    type = "insufficient_storage"


class GenerationError(ShoalError):
    """A generation that failed on the serving side (the engine's forward pass fell over)."""

    status = 500
    type = "server_error"


class UpstreamError(ShoalError):
    """A remote replica failed after its stream had begun, so the request could not move elsewhere."""

    status = 502
    type = "upstream_error"


class GenerationCancelled(Exception):
    """Raised inside a consumer when its generation was cancelled (not a client error)."""
