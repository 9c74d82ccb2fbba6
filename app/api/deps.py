"""Shared pieces of the routers: the queue context, path parameters, documented errors."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import Path, Query, Request

from sluice.api.models import NAME_PATTERN, Problem
from sluice.api.problems import PROBLEM_MEDIA_TYPE
from sluice.queue.context import QueueContext

TopicName = Annotated[
    str, Path(pattern=NAME_PATTERN, description="[A-Za-z0-9_-]{1,80}", examples=["orders"])
]
SubscriptionName = Annotated[
    str, Path(pattern=NAME_PATTERN, description="[A-Za-z0-9_-]{1,80}", examples=["billing"])
]

_DESCRIPTIONS = {
    400: "Malformed JSON",
    401: "Missing or invalid API key",
    403: "The API key lacks the scope for this operation",
    404: "Topic, subscription or message not found",
    409: "Conflict",
    413: "Body or message too large",
    415: "Content-Type is not application/json",
    422: "Invalid input",
    429: "Rate limit exceeded (Retry-After and RateLimit-* headers)",
    503: "Database unavailable",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI entries for the problem+json answers an operation can give."""
    return {
        code: {
            "model": Problem,
            "description": _DESCRIPTIONS[code],
            "content": {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}},
        }
        for code in codes
    }


# Every /v1 operation can meet these.
COMMON = (401, 403, 422, 503)
WITH_BODY = (*COMMON, 400, 413, 415)


def ctx_of(request: Request) -> QueueContext:
    return request.app.state.ctx


MAX_OFFSET = 2**63 - 1
Offset = Annotated[int, Path(ge=0, le=MAX_OFFSET, description="message offset")]

# Query parameters of the listings.
NameAfter = Annotated[
    str | None, Query(max_length=80, pattern=NAME_PATTERN, description="name to start after")
]
OffsetFrom = Annotated[int, Query(ge=0, le=MAX_OFFSET, description="first offset to list")]
PageLimit = Annotated[int, Query(ge=1, le=1000, description="at most this many")]
