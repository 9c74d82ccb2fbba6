"""Exceptions: every error answer of the API (RFC 9457 problem+json) becomes one of these."""

from __future__ import annotations

import json
from typing import Any

import httpx


class SluiceError(Exception):
    """An error answer of the API (or, for `ConnectionFailed`, no answer at all)."""

    def __init__(
        self,
        status: int | None,
        title: str,
        detail: str,
        type: str = "about:blank",
        *,
        instance: str | None = None,
        errors: list[dict[str, Any]] | None = None,
        acked: int | None = None,
        stale: list[str] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status} {title}: {detail}" if status else f"{title}: {detail}")
        self.status = status
        self.title = title
        self.detail = detail
        self.type = type
        self.instance = instance
        self.errors = errors
        #: receipts applied by the `ack` field of a pull that then failed (e.g. 429)
        self.acked = acked
        self.stale = stale
        self.headers = headers or {}


class BadRequest(SluiceError):
    """400, 413, 415 or 422: the request was refused as it is; do not retry it unchanged."""


class Unauthorized(SluiceError):
    """401: no valid API key."""


class Forbidden(SluiceError):
    """403: the API key lacks the scope."""


class NotFound(SluiceError):
    """404: the topic, subscription or message does not exist."""


class Conflict(SluiceError):
    """409."""


class RateLimited(SluiceError):
    """429: the subscription's rate limit; `retry_after` is in seconds (Retry-After)."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class Unavailable(SluiceError):
    """503 (or another 5xx): retry later; `retry_after` from Retry-After when sent."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class ConnectionFailed(SluiceError):
    """No answer: connection refused or reset, or a timeout. `status` is None. Whether a
    request that was sent took effect is unknown (publish with dedup ids to retry safely)."""


_BY_STATUS: dict[int, type[SluiceError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: BadRequest,
    415: BadRequest,
    422: BadRequest,
    429: RateLimited,
}


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


def error_from_response(response: httpx.Response) -> SluiceError:
    """The exception for an error answer (status >= 400)."""
    status = response.status_code
    body: dict[str, Any] = {}
    try:
        parsed = json.loads(response.content) if response.content else {}
        if isinstance(parsed, dict):
            body = parsed
    except ValueError:
        pass
    title = str(body.get("title") or response.reason_phrase or "Error")
    detail = str(body.get("detail") or response.text[:500] or title)
    cls = _BY_STATUS.get(status)
    if cls is None:
        cls = Unavailable if status >= 500 else BadRequest
    kwargs: dict[str, Any] = {
        "instance": body.get("instance"),
        "errors": body.get("errors"),
        "acked": body.get("acked"),
        "stale": body.get("stale"),
        "headers": dict(response.headers),
    }
    if cls in (RateLimited, Unavailable):
        kwargs["retry_after"] = _retry_after(response.headers.get("retry-after"))
    return cls(status, title, detail, str(body.get("type") or "about:blank"), **kwargs)


def connection_error(exc: Exception) -> ConnectionFailed:
    return ConnectionFailed(None, type(exc).__name__, str(exc) or repr(exc))


def is_retryable(exc: BaseException) -> bool:
    """Worth retrying unchanged later: 429, 5xx, no answer."""
    return isinstance(exc, RateLimited | Unavailable | ConnectionFailed)
