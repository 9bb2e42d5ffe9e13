"""One mapping from errors to HTTP answers, shaped as the protocol of the route asked for.

`ShoalError` subclasses carry their status; a bad field is a 400 naming it, as OpenAI, llama.cpp,
vLLM and Anthropic answer (TGI's routes keep TGI's 422); a malformed JSON body is a 400; anything
unexpected is logged and answered as a 500 without a stack trace. The body is OpenAI's
`{"error": {message, type, param, code}}`, or Anthropic's `{"type": "error", "error": {type,
message}}` under /v1/messages.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_pool.errors import InvalidParamsError, ShoalError

log = logging.getLogger("shoal.http")


# Known fields of the APIs Shoal speaks that it does not support (yet): refused by name, never ignored.
NOT_SUPPORTED = {
    "functions": "the deprecated form of tools: send tools", "function_call": "the deprecated form of tool_choice",
    "audio": "audio output is not supported", "modalities": "only text is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "verbosity": "not supported", "suffix": "not supported",
    "best_of": "only 1 is supported",
}


ANTHROPIC_PREFIX = "/v1/messages"
TGI_PATHS = frozenset({"/generate", "/generate_stream", "/"})
ANTHROPIC_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                   404: "not_found_error", 405: "invalid_request_error", 413: "request_too_large",
                   429: "rate_limit_error", 503: "overloaded_error", 529: "overloaded_error"}


def is_anthropic(path: str) -> bool:
    return path == ANTHROPIC_PREFIX or path.startswith(ANTHROPIC_PREFIX + "/")


def api_status(status: int, path: str) -> int:
    """422 is TGI's word for a bad parameter; OpenAI, llama.cpp, vLLM and Anthropic say 400."""
    return 400 if status == 422 and path not in TGI_PATHS else status


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None,
               path: str = "", status: int = 400) -> dict:
    if is_anthropic(path):
        return {"type": "error", "error": {"type": ANTHROPIC_TYPES.get(status, "api_error"), "message": message}}
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def shaped(exc: ShoalError, path: str) -> tuple[int, dict, dict]:
    """(status, body, headers) of this error for a request to `path`."""
    status = api_status(exc.status, path)
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    return status, error_body(exc.message, exc.type, exc.param, exc.code, path, status), headers


def shoal_error_response(exc: ShoalError, path: str = "") -> JSONResponse:
    status, body, headers = shaped(exc, path)
    return JSONResponse(body, status_code=status, headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, int]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None, 400
    first = errors[0]
    loc = [str(part) for part in first.get("loc", ()) if part not in ("body", "query", "path")]
    field = ".".join(loc) or None
    if first.get("type") == "json_invalid":
        return f"request body is not valid JSON: {first.get('msg')}", None, 400
    if first.get("type") == "missing" and not loc:
        return "request body is missing", None, 400
    if first.get("type") == "extra_forbidden" and field:
        reason = NOT_SUPPORTED.get(loc[-1], "unknown field")
        return f"{field}: {reason} (see the README's compatibility table)", field, 400
    message = first.get("msg", "invalid value")
    return (f"{field}: {message}" if field else message), field, 400


def from_client(where: str, build):
    """`build()`, which turns a client's items into the shared request models: a value those
    models refuse (a name, an id too long) is the client's error (400 naming it), never a 500."""
    try:
        return build()
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first.get("loc", ()))
        raise InvalidParamsError(f"{where}: {field + ': ' if field else ''}{first.get('msg')}", param=where) from None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ShoalError)
    async def _shoal(request: Request, exc: ShoalError) -> JSONResponse:
        return shoal_error_response(exc, request.url.path)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field, status = validation_message(exc)
        path = request.url.path
        status = 422 if path in TGI_PATHS and status == 400 and field else status
        return JSONResponse(error_body(message, "invalid_request_error", field, None, path, status),
                            status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error"}.get(exc.status_code, "error")
        return JSONResponse(error_body(str(exc.detail), kind, None, None, request.url.path, exc.status_code),
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error; see the server log", "server_error", None, None,
                                       request.url.path, 500), status_code=500)
