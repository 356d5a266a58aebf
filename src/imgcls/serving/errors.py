"""How the server refuses a request: :class:`ServingError`, and the JSON that every error is answered with.

Every error is ``{"error": {"code", "message"}}`` with its HTTP status: a 4xx for a bad request, a 500 only for
a bug in this server (whose traceback goes to the server log, not to the client).  :func:`add_error_handlers`
makes an app answer so; the guard (:mod:`imgcls.serving.guard`) answers with :func:`error_response` itself,
before any route runs.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger("imgcls.serving")

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
               413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 501: "not_implemented",
               503: "not_ready"}


class ServingError(HTTPException):
    """A request the server refuses: answered as ``{"error": {"code", "message"}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status_code=status, detail=message, headers=headers)
        self.code = code


def error_response(status: int, code: str, message: str, headers: dict | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


async def _serving_error(request: Request, exc: ServingError) -> JSONResponse:
    return error_response(exc.status_code, exc.code, str(exc.detail), exc.headers)


async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    status, detail = exc.status_code, str(exc.detail)
    if status == 400 and detail.startswith("Too many files"):  # Starlette's multipart limit (form_limits)
        return error_response(413, "too_many_files", detail)
    return error_response(status, _HTTP_CODES.get(status, "http_error"), detail, getattr(exc, "headers", None))


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    """FastAPI's request validation: a missing field is 422, a bad query parameter 400."""
    errors = exc.errors()
    first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
    loc = [str(part) for part in first.get("loc", ())]
    where, field = (loc[0], ".".join(loc[1:])) if loc else ("request", "")
    if where == "body":
        if first.get("type") == "missing":
            return error_response(422, "missing_field", f"missing field {field!r}: send the image(s) as "
                                  f"multipart/form-data in the field {field!r}")
        return error_response(422, "invalid_field", f"field {field!r}: {first.get('msg')}")
    return error_response(400, "bad_parameter", f"{where} parameter {field!r}: {first.get('msg')}")


async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error answering %s %s", request.method, request.url.path)
    return error_response(500, "internal_error", "internal server error; the server log has the details")


def add_error_handlers(app: FastAPI) -> None:
    """Answer a ServingError, Starlette's HTTP errors, FastAPI's validation errors and any other exception as
    ``{"error": {"code", "message"}}``."""
    app.add_exception_handler(ServingError, _serving_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected_error)
