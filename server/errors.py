"""One mapping from errors to HTTP answers, with an OpenAI-shaped body.

`ShoalError` subclasses carry their status; request validation errors become 422 naming the
field; a malformed JSON body is a 400; anything unexpected is logged and answered as a 500
without a stack trace.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from llm_pool.errors import ShoalError

log = logging.getLogger("shoal.http")


# Known fields of the APIs Shoal speaks that it does not support (yet): refused by name, never ignored.
NOT_SUPPORTED = {
    "functions": "the deprecated form of tools: send tools", "function_call": "the deprecated form of tool_choice",
    "audio": "audio output is not supported", "modalities": "only text is supported",
    "prediction": "predicted outputs are not supported", "web_search_options": "web search is not supported",
    "reasoning_effort": "not a reasoning model", "verbosity": "not supported", "suffix": "not supported",
    "best_of": "only 1 is supported",
}


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def shoal_error_response(exc: ShoalError) -> JSONResponse:
    headers = {}
    if exc.retry_after is not None:
        headers["Retry-After"] = str(max(1, int(round(exc.retry_after))))
    return JSONResponse({"error": exc.to_dict()}, status_code=exc.status,
                        headers=headers)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None, int]:
    errors = exc.errors()
    if not errors:
        return "invalid request", None, 422
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
    return (f"{field}: {message}" if field else message), field, 422


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ShoalError)
    async def _shoal(_request: Request, exc: ShoalError) -> JSONResponse:
        return shoal_error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request: Request, exc: RequestValidationError) -> JSONResponse:
        message, field, status = validation_message(exc)
        return JSONResponse(error_body(message, "invalid_request_error", field), status_code=status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = {401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
                413: "invalid_request_error", 429: "rate_limit_error"}.get(exc.status_code, "error")
        return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return JSONResponse(error_body("internal error; see the server log", "server_error"),
                            status_code=500)
