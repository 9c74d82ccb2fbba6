"""Domain errors. The HTTP layer maps each to an RFC 9457 problem (api/problems.py)."""

from __future__ import annotations


class SluiceError(Exception):
    status = 400
    type_slug = "bad-request"
    title = "Bad request"

    def __init__(self, detail: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        # Extension members of the problem document (RFC 9457 section 3.2).
        self.extra: dict[str, object] = {}


class NotFound(SluiceError):
    status = 404
    type_slug = "not-found"
    title = "Not found"


class Conflict(SluiceError):
    status = 409
    type_slug = "conflict"
    title = "Conflict"


class PayloadTooLarge(SluiceError):
    status = 413
    type_slug = "payload-too-large"
    title = "Payload too large"


class InvalidInput(SluiceError):
    status = 422
    type_slug = "invalid-input"
    title = "Invalid input"


class RateLimited(SluiceError):
    status = 429
    type_slug = "rate-limited"
    title = "Rate limit exceeded"


class Unavailable(SluiceError):
    status = 503
    type_slug = "unavailable"
    title = "Service unavailable"


def topic_not_found(topic: str) -> NotFound:
    return NotFound(f"topic '{topic}' does not exist")


def subscription_not_found(topic: str, subscription: str) -> NotFound:
    return NotFound(f"subscription '{subscription}' does not exist on topic '{topic}'")
