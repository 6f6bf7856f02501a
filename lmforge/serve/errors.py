"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with their HTTP status.

Every failure the server answers goes through `as_api_error`, so a client never sees a bare traceback or a
different shape: user errors become 4xx with a message naming the field, anything unexpected a logged 500.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi.responses import JSONResponse
from pydantic import ValidationError

from lmforge.errors import LmforgeError
from lmforge.serve.requests import Overloaded, ShuttingDown

log = logging.getLogger("lmforge.serve")

TYPES = {429: "rate_limit_error", 500: "server_error", 503: "server_error"}  # every other status: invalid_request


class ApiError(LmforgeError):
    """An error answered in OpenAI's shape with its HTTP status (and optional headers, e.g. Retry-After)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        message, param = _printable(message), None if param is None else _printable(param)
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.headers = status, message, param, code, headers

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def _printable(s: str) -> str:
    """Messages quote user input; a lone surrogate in it would make the error itself unencodable (a 500)."""
    return s.encode("utf-8", "backslashreplace").decode("utf-8")


def as_api_error(e: BaseException) -> ApiError:
    """Any exception -> ApiError: lmforge's user errors are 4xx, anything else is a logged 500."""
    if isinstance(e, ApiError):
        return e
    if isinstance(e, Overloaded):
        return ApiError(429, str(e), code="rate_limit_exceeded", headers={"Retry-After": str(e.retry_after)})
    if isinstance(e, ShuttingDown):
        return ApiError(503, str(e), code="shutting_down")
    if isinstance(e, LmforgeError):
        return ApiError(400, str(e), code="invalid_value")
    log.error("internal error: %r", e, exc_info=e)
    return ApiError(500, f"internal error ({type(e).__name__}); see the server log", code="internal_error")


def error_response(e: BaseException) -> JSONResponse:
    err = as_api_error(e)
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def validation_error(e: ValidationError) -> ApiError:
    """Pydantic's first error -> one line naming the field: `'max_tokens': Input should be a valid integer`."""
    errors = e.errors(include_url=False)
    first = errors[0]
    param = ".".join(str(p) for p in first["loc"]) or None
    more = f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
    if first["type"] == "missing":
        return ApiError(400, f"missing required field '{param}'{more}", param=param, code="missing_field")
    if first["type"] == "extra_forbidden":  # a nested object's undeclared field (top-level ones: schemas.py)
        return ApiError(400, f"unknown parameter '{param}'{more}", param=param, code="unknown_parameter")
    where = f"'{param}'" if param else "request body"
    kind = "invalid_type" if first["type"].endswith(("_type", "_parsing")) else "invalid_value"
    return ApiError(400, f"{where}: {first['msg']}{more}", param=param, code=kind)
