"""The error format of every non-2xx response: {"error": {"message", "type", "param", "code"}} (OpenAI style), and
how errors from `accel` and the scheduler map to it."""

from __future__ import annotations

import json
import logging
import traceback
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from accel.errors import AccelError, SpecError, validation_errors

from server.scheduler import DeadlineExceeded, OutOfMemory

log = logging.getLogger("accel.server")


class APIError(Exception):
    """An error with its HTTP status, OpenAI error type, the offending field and extra headers."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}


def error_body(message: str, type: str, param: str | None = None, code: str | None = None, **extra: Any) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code, **extra}}


def bad_request(message: str, param: str | None = None) -> APIError:
    return APIError(400, message, param=param)


def param_of(exc: AccelError) -> str | None:
    """The request field an `accel` error is about: the spec is `acceleration`, height and width are `size`."""
    if isinstance(exc, SpecError):
        return "acceleration"
    return {"width": "size", "height": "size"}.get(exc.field, exc.field)


def failure(exc: BaseException, request_id: str) -> APIError:
    """The response for work that failed after admission; unexpected errors are logged with a traceback."""
    if isinstance(exc, DeadlineExceeded):
        return APIError(504, "the request did not finish before its deadline (timeout); its work was stopped",
                        type="timeout_error")
    if isinstance(exc, OutOfMemory):
        return APIError(503, "the device ran out of memory for this batch; retry with a smaller request",
                        type="server_error", code="out_of_memory")
    if isinstance(exc, AccelError):
        return bad_request(str(exc), param_of(exc))
    log.error('{"event": "internal_error", "request_id": "%s", "error": %s, "traceback": %s}', request_id,
              json.dumps(str(exc)), json.dumps("".join(traceback.format_exception(exc))))
    return APIError(500, f"internal error (request id {request_id})", type="server_error")


def job_error(exc: BaseException, job_id: str) -> dict:
    """A failed video job's `error` field: the code and message its request would have answered with."""
    error = failure(exc, job_id)
    return {"code": error.code or error.type, "message": error.message}


async def api_error_handler(request: Request, exc: APIError) -> JSONResponse:
    return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                        headers=exc.headers)


async def validation_error_handler(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 for bad bodies becomes a 400 naming the first bad field."""
    errors = exc.errors()
    if errors and errors[0].get("type") == "json_invalid":
        return JSONResponse(error_body(f"malformed JSON body: {errors[0].get('msg')}", "invalid_request_error"), 400)
    message, first = validation_errors(errors or [{"loc": (), "msg": "invalid request"}])
    return JSONResponse(error_body(message, "invalid_request_error", None if first == "body" else first), 400)


async def http_error_handler(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    headers = dict(getattr(exc, "headers", None) or {})
    if exc.status_code == 405:  # Starlette names the methods of the first route on the path only
        headers["Allow"] = ", ".join(allowed_methods(request))
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method the API documents on the request's path (GET with its HEAD)."""
    methods = set()
    for template, operations in request.app.openapi()["paths"].items():
        if compile_path(template)[0].match(request.url.path):
            methods |= {method.upper() for method in operations}
    return sorted(methods | ({"HEAD"} if "GET" in methods else set()))
