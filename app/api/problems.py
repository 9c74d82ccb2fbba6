"""RFC 9457 problem details for every error the API can answer."""

from __future__ import annotations

import logging
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response

from sluice.api.responses import JSONBody
from sluice.errors import SluiceError

log = logging.getLogger("sluice.api")

PROBLEM_MEDIA_TYPE = "application/problem+json"
TYPE_BASE = "https://sluice.dev/problems/"

_HTTP_TITLES = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    403: ("forbidden", "Forbidden"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    409: ("conflict", "Conflict"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("invalid-input", "Invalid input"),
    429: ("rate-limited", "Rate limit exceeded"),
    500: ("internal-error", "Internal server error"),
    503: ("unavailable", "Service unavailable"),
}


class ProblemResponse(JSONBody):
    media_type = PROBLEM_MEDIA_TYPE


def problem(
    status: int,
    detail: str,
    *,
    slug: str | None = None,
    title: str | None = None,
    headers: dict[str, str] | None = None,
    instance: str | None = None,
    extra: dict[str, Any] | None = None,
) -> Response:
    default_slug, default_title = _HTTP_TITLES.get(status, ("error", "Error"))
    body: dict[str, Any] = {
        "type": TYPE_BASE + (slug or default_slug),
        "title": title or default_title,
        "status": status,
        "detail": detail,
    }
    if instance:
        body["instance"] = instance
    if extra:
        body.update(extra)
    return ProblemResponse(body, status_code=status, headers=headers)


def _validation_errors(exc: RequestValidationError) -> list[dict[str, Any]]:
    errors = []
    for error in exc.errors():
        errors.append(
            {
                "location": [str(part) for part in error.get("loc", ())],
                "message": str(error.get("msg", "")),
                "type": str(error.get("type", "")),
            }
        )
    return errors


def install_problem_handlers(app: FastAPI) -> None:
    @app.exception_handler(SluiceError)
    async def sluice_error(request: Request, exc: SluiceError) -> Response:
        return problem(
            exc.status,
            exc.detail,
            slug=exc.type_slug,
            title=exc.title,
            headers=exc.headers,
            instance=request.url.path,
            extra=exc.extra,
        )

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Response:
        errors = _validation_errors(exc)
        if any(e["type"] == "json_invalid" for e in errors):
            # The parser's own reason ("Expecting ',' delimiter", "nesting deeper than 64
            # levels", ...) and where; FastAPI's message alone says only "JSON decode error".
            raw = next(e for e in exc.errors() if e.get("type") == "json_invalid")
            reason = str((raw.get("ctx") or {}).get("error") or raw.get("msg") or "")
            position = next((p for p in raw.get("loc", ())[1:] if isinstance(p, int)), None)
            detail = reason if not position else f"{reason} (at character {position})"
            return problem(
                400,
                f"request body is not valid JSON: {detail}",
                slug="malformed-json",
                title="Malformed JSON",
                instance=request.url.path,
            )
        summary = "; ".join(f"{'.'.join(e['location'])}: {e['message']}" for e in errors[:5])
        return problem(
            422,
            summary or "invalid request",
            instance=request.url.path,
            extra={"errors": errors},
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Response:
        detail = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and detail == "Not Found":
            detail = f"no such resource: {request.method} {request.url.path}"
        return problem(
            exc.status_code,
            detail,
            headers=getattr(exc, "headers", None),
            instance=request.url.path,
        )

    @app.exception_handler(asyncpg.DataError)
    async def data_error(request: Request, exc: asyncpg.DataError) -> Response:
        # Input Postgres refused to store (e.g. a NUL character in text).
        return problem(422, f"value rejected by storage: {exc}", instance=request.url.path)

    @app.exception_handler(OSError)
    @app.exception_handler(asyncpg.PostgresConnectionError)
    @app.exception_handler(asyncpg.CannotConnectNowError)
    async def unavailable(request: Request, exc: Exception) -> Response:
        log.warning("database unavailable", extra={"error": repr(exc)[:200]})
        return problem(
            503,
            "the database is unavailable; retry shortly",
            headers={"Retry-After": "1"},
            instance=request.url.path,
        )

    @app.exception_handler(asyncpg.TransactionRollbackError)
    @app.exception_handler(asyncpg.LockNotAvailableError)
    async def contention(request: Request, exc: Exception) -> Response:
        # A deadlock or lock timeout against a concurrent request on the same rows:
        # nothing was applied, and the client may simply retry.
        return problem(
            503,
            f"conflicted with a concurrent request ({type(exc).__name__}); retry",
            headers={"Retry-After": "1"},
            instance=request.url.path,
        )

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception) -> Response:
        # Starlette answers with this handler from its outermost middleware, outside the
        # one that echoes the request id: the answer carries the id itself, so that a
        # client's report can be matched with the logged traceback. The exception's text
        # stays in the log (it may hold anything: SQL, values, paths).
        request_id = (request.scope.get("state") or {}).get("request_id")
        if isinstance(exc, asyncpg.InterfaceError | asyncpg.InternalClientError):
            response = await unavailable(request, exc)
        else:
            log.exception(
                "unhandled error", extra={"path": request.url.path, "request_id": request_id}
            )
            response = problem(500, "an unexpected error occurred", instance=request.url.path)
        if request_id:
            response.headers["X-Request-ID"] = request_id
        return response
