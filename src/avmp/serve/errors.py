"""Errors in OpenAI's JSON shape (``{"error": {"message", "type", "param", "code"}}``)
with the HTTP status each class of mistake gets: a bad request 400, a wrong key 401, an
unknown model 404, a full queue 429 with Retry-After, an engine that stopped 503."""

from __future__ import annotations

import math
import re
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from avmp.engine.engine import RequestTooLarge
from avmp.engine.loop import EngineClosed, EngineDead, QueueFull
from avmp.serve.metrics import ServerMetrics
from avmp.serve.protocol import ErrorBody, ErrorResponse


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind = status, message, kind
        self.param, self.code, self.headers = param, code, headers

    def body(self) -> dict[str, Any]:
        error = ErrorBody(message=self.message, type=self.kind, param=self.param, code=self.code)
        return ErrorResponse(error=error).model_dump()


def add_error_handlers(app: FastAPI, metrics: ServerMetrics) -> None:
    def answer(error: APIError) -> JSONResponse:
        metrics.errors.labels(str(error.status)).inc()
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    async def api_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, APIError)
        return answer(error)

    async def invalid(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        return answer(validation_error(error))

    async def http_error(_: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, StarletteHTTPException)
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return answer(APIError(error.status_code, str(error.detail), kind))

    app.add_exception_handler(APIError, api_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(StarletteHTTPException, http_error)


_UNION_BRANCH = re.compile(r"^(str|int|float|bool|none|\w+\[.*\]|function-\w+\[.*)$")


def validation_error(error: RequestValidationError) -> APIError:
    """The first thing wrong with a request body, as one 400 naming the field. Where a
    field's union failed, the branch that got deepest says why (a content part's error,
    not "Input should be a valid string")."""
    errors = error.errors()
    first = errors[0] if errors else {}
    field = tuple(first.get("loc", ()))[:2]
    same = [e for e in errors if tuple(e.get("loc", ()))[:2] == field]
    first = max(same, key=lambda e: len(e.get("loc", ())), default=first)
    if first.get("type") == "json_invalid":
        return APIError(400, f"the body is not valid JSON: {first.get('ctx', {}).get('error')}")
    loc = [str(part) for part in first.get("loc", ()) if part != "body"]
    # a union's failed branch shows as a type name in the path (prompt.list[int].0)
    param = ".".join(p for p in loc if not _UNION_BRANCH.match(p)) or None
    if first.get("type") == "extra_forbidden":
        return APIError(400, f"unknown field {param!r}", param=param)
    message = str(first.get("msg", "invalid")).removeprefix("Value error, ")
    return APIError(400, f"{param or 'body'}: {message}", param=param)


def engine_error(error: Exception) -> APIError:
    """An error the engine loop raised for a request, as its HTTP answer."""
    if isinstance(error, RequestTooLarge):
        return APIError(400, str(error), param="prompt", code="context_length_exceeded")
    if isinstance(error, EngineClosed):
        return APIError(503, f"the server is shutting down: {error}", "server_error")
    if isinstance(error, QueueFull):
        retry = max(1, math.ceil(error.retry_after_s))
        return APIError(
            429,
            f"too many requests waiting: {error}",
            "rate_limit_error",
            code="rate_limit_exceeded",
            headers={"Retry-After": str(retry)},
        )
    if isinstance(error, EngineDead):
        return APIError(503, f"the engine stopped: {error}", "server_error")
    if isinstance(error, ValueError):
        return APIError(400, str(error))
    raise error


class Rejected(ValueError):
    """The scheduler could never fit a request (finish reason ``rejected``)."""
