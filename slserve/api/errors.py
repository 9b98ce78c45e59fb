"""Every error leaves the server as OpenAI's error object, with the status that fits it:

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

Handlers cover our own APIError, the engine's and adapter store's exceptions, FastAPI's request
validation (422 instead of FastAPI's own shape), Starlette's HTTP exceptions (unknown route, wrong
method) and anything unexpected (500, logged with its traceback).
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from slserve.adapters.peft_format import AdapterError
from slserve.async_engine import EngineNotReady, QueueFull
from slserve.engine import RequestError
from slserve.memory.adapter_store import AdapterExistsError, AdapterNotFoundError

logger = logging.getLogger(__name__)

# status -> (OpenAI error type, default code)
ERROR_KINDS: dict[int, tuple[str, str | None]] = {
    400: ("invalid_request_error", None),
    401: ("authentication_error", "invalid_api_key"),
    403: ("permission_error", "insufficient_permissions"),
    404: ("not_found_error", "not_found"),
    405: ("invalid_request_error", "method_not_allowed"),
    409: ("conflict_error", "already_exists"),
    413: ("invalid_request_error", "request_too_large"),
    422: ("invalid_request_error", "invalid_body"),
    429: ("rate_limit_error", "queue_full"),
    500: ("server_error", "internal_error"),
    503: ("service_unavailable_error", "not_ready"),
}

RETRY_AFTER_SECONDS = 1


class APIError(Exception):
    """An error response. `code` defaults to the status's usual code (ERROR_KINDS)."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code if code is not None else ERROR_KINDS.get(status, ("", None))[1]
        self.headers = headers


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    kind, default_code = ERROR_KINDS.get(status, ("server_error", None))
    return {"error": {"message": message, "type": kind, "param": param, "code": code or default_code}}


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(error_body(err.status, err.message, err.param, err.code), err.status,
                        headers=err.headers)


def to_api_error(exc: BaseException) -> APIError:
    """The APIError for an exception raised below the HTTP layer."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, RequestError):
        code = "model_not_found" if exc.status == 404 else None
        return APIError(exc.status, str(exc), exc.param, code)
    if isinstance(exc, QueueFull):
        return APIError(429, str(exc), headers={"Retry-After": str(RETRY_AFTER_SECONDS)})
    if isinstance(exc, EngineNotReady):
        return APIError(503, str(exc))
    # Order matters: both are AdapterErrors.
    if isinstance(exc, AdapterNotFoundError):
        return APIError(404, str(exc), "name", "adapter_not_found")
    if isinstance(exc, AdapterExistsError):
        return APIError(409, str(exc), "name", "adapter_exists")
    if isinstance(exc, AdapterError):
        return APIError(400, str(exc), code="invalid_adapter")
    logger.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}")


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    parts, param = [], None
    for e in exc.errors():
        loc = [str(x) for x in e.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        param = param or (where or None)
        parts.append(f"{where}: {e.get('msg')}" if where else str(e.get("msg")))
    return "; ".join(parts) or "invalid request body", param


def install_error_handlers(app: FastAPI) -> None:
    async def on_api_error(_: Request, exc: Exception) -> JSONResponse:
        return error_response(to_api_error(exc))

    async def on_validation(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = _validation_message(exc)
        return error_response(APIError(422, message, param))

    async def on_http(_: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        return error_response(APIError(exc.status_code, str(exc.detail), headers=exc.headers))

    for cls in (APIError, RequestError, QueueFull, EngineNotReady, AdapterError):
        app.add_exception_handler(cls, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_api_error)
