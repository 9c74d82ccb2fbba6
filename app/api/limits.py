"""Request guards applied before any parsing: body size, content type, JSON depth.

Starlette reads bodies of any size and Python's json recurses without a limit of its own,
so both are bounded here (PITFALLS: HTTP service).
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request
from fastapi.routing import APIRoute
from pydantic_core import from_json
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice.api.access import Access, access_of
from sluice.api.problems import problem


class BodyTooLarge(Exception):
    pass


# A refused body is still read (and dropped) up to this size before the 413 is sent:
# closing a connection with unread data makes TCP reset it, and the client would lose the
# answer (it sees "connection reset" instead of a 413 problem).
DRAIN_BYTES = 64 * 1024 * 1024
DRAIN_SECONDS = 10.0


async def _drain(receive: Receive, budget: int) -> None:
    try:
        async with asyncio.timeout(DRAIN_SECONDS):
            while budget > 0:
                message = await receive()
                if message["type"] != "http.request":
                    return
                budget -= len(message.get("body", b""))
                if not message.get("more_body", False):
                    return
    except TimeoutError:
        return


class LimitBodyMiddleware:
    """413 for bodies above `max_bytes`, by Content-Length or by counting the stream."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
            if length.isdigit() and int(length) <= DRAIN_BYTES:
                await _drain(receive, DRAIN_BYTES)
            await self._reject(scope, receive, send)
            return
        received = 0
        response_started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal response_started
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge:
            if not response_started:
                await _drain(receive, DRAIN_BYTES)
                await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = problem(
            413,
            f"request body exceeds {self.max_bytes} bytes",
            headers={"Connection": "close"},
        )
        await response(scope, receive, send)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 would silently become infinity (and then null or invalid JSON when stored), and
    # 1e-400 zero: a double holds neither, so both are refused rather than changed. Zero
    # written any way (0.0, -0e-400) is zero.
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    if value == 0.0 and text.lower().partition("e")[0].strip("-.0"):
        raise ValueError(f"number {text[:40]} is out of range (too close to zero)")
    return value


def strict_loads(body: bytes) -> Any:
    """The reference parser (the standard library's): no NaN/Infinity, no number that
    overflows to infinity or underflows to zero. Every refusal is a JSONDecodeError naming
    the problem."""
    try:
        return json.loads(body, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError as exc:
        raise json.JSONDecodeError("nesting too deep", "", 0) from exc
    except ValueError as exc:
        if isinstance(exc, json.JSONDecodeError):
            raise
        raise json.JSONDecodeError(str(exc), "", 0) from exc


# Verdicts of inspect_json. TOO_DEEP and NOT_FINITE end the walk; ZERO (a float zero: the
# fast parser turns a number that underflows into one) is a flag the walk goes on past.
FITS, TOO_DEEP, NOT_FINITE, ZERO = 0, 1, 2, 4
REFUSED = TOO_DEEP | NOT_FINITE

# Where a float zero came from a literal that is not zero, the body has a negative exponent
# or a run of zeros: a literal below the smallest double (~2.5e-324) needs one of them
# (with no exponent or a positive one, over 300 zeros after the point). Either makes the
# reference parser look at the literals themselves.
_ZERO_RUN = b"0" * 300
_E = (ord("e"), ord("E"))
_DIGITS = range(ord("0"), ord("9") + 1)


def _may_underflow(body: bytes) -> bool:
    """A run of 300 zeros, or a digit, e or E, and a minus sign in a row. Searched with
    bytes.find (C, memchr): a regex over a 100 KiB publish body took 1.2 ms, this a few
    microseconds unless the body is full of minus signs."""
    if _ZERO_RUN in body:
        return True
    at = body.find(b"-", 2)
    while at != -1:
        if body[at - 1] in _E and body[at - 2] in _DIGITS:
            return True
        at = body.find(b"-", at + 1)
    return False


def inspect_json(value: Any, max_depth: int) -> int:
    """TOO_DEEP (containers nested more than `max_depth` levels) or NOT_FINITE (an
    infinite float: a number that overflowed), whichever is found first; else ZERO if the
    document holds a float zero, else FITS. One pass; the recursion stops at `max_depth`,
    however deep the document."""
    if type(value) is dict:
        children: Any = value.values()
    elif type(value) is list:
        children = value
    elif type(value) is float:
        if value - value != 0.0:
            return NOT_FINITE
        return ZERO if value == 0.0 else FITS
    else:
        return FITS
    if max_depth <= 0:
        return TOO_DEEP
    found = FITS
    for child in children:
        kind = type(child)
        if kind is dict or kind is list:
            verdict = inspect_json(child, max_depth - 1)
            if verdict & REFUSED:
                return verdict
            found |= verdict
        elif kind is float:
            if child - child != 0.0:
                return NOT_FINITE
            if child == 0.0:
                found = ZERO
    return found


def parse_json(body: bytes, max_depth: int) -> Any:
    """Parse a request body strictly (what strict_loads accepts, nested at most
    `max_depth` levels), fast.

    pydantic-core's parser builds the objects about 2.5x faster than the standard library
    (publish bodies: 27 vs 67 us per 100 KiB), which matters on the publish path. It refuses
    some documents the reference accepts (a lone surrogate escape such as "\\ud800", nesting
    beyond 200, UTF-16 text), takes numbers that overflow as infinity and numbers that
    underflow as zero; any refusal, infinity, or zero where a literal may have underflowed
    hands the body to strict_loads, so what is accepted, and every error message, is
    exactly the reference's.
    """
    try:
        parsed = from_json(body, allow_inf_nan=False)
    except ValueError:
        parsed, by_reference = strict_loads(body), True
    else:
        by_reference = False
    verdict = inspect_json(parsed, max_depth)
    if not by_reference and (verdict & REFUSED or (verdict & ZERO and _may_underflow(body))):
        # Refused, or maybe a number that underflowed. The reference says which: an
        # out-of-range number anywhere comes first.
        parsed = strict_loads(body)
        verdict = inspect_json(parsed, max_depth)
    if verdict & TOO_DEEP:
        raise json.JSONDecodeError(f"nesting deeper than {max_depth} levels", "", 0)
    return parsed


class StrictJSONRequest(Request):
    """Parses JSON strictly (no NaN/Infinity) and refuses documents nested too deep."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            self._json = parse_json(body, self.app.state.settings.max_json_depth)
        return self._json


class StrictJSONRoute(APIRoute):
    """Route class of every /v1 router: the route's access check, content-type check, then
    strict JSON parsing.

    The access check declared in the route's dependencies (`require(...)`) is run here,
    first, instead of by FastAPI: FastAPI reads and parses a body before it runs any
    dependency, and a key lacking the scope should get 403 whatever it sent, and cost no
    parsing; and FastAPI's dependency machinery costs more per request than the check
    itself (about 12 us against 2 us, measured), on the publish and consume hot paths.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        dependencies = list(kwargs.pop("dependencies", None) or ())
        self.access = access_of(dependencies)
        kept = [d for d in dependencies if not isinstance(d.dependency, Access)]
        super().__init__(path, endpoint, dependencies=kept, **kwargs)

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        wants_body = bool((self.methods or set()) & {"POST", "PUT", "PATCH"})
        access = self.access

        async def route_handler(request: Request) -> Response:
            if access is not None:
                access.check(request.scope)
            content_type = request.headers.get("content-type", "")
            media = content_type.split(";", 1)[0].strip().lower()
            if wants_body and not media:
                # No Content-Type at all is read as JSON. Say so explicitly: FastAPI's
                # strict_content_type would otherwise leave such a body unparsed (422).
                request.scope["headers"] = [
                    *(h for h in request.scope["headers"] if h[0].lower() != b"content-type"),
                    (b"content-type", b"application/json"),
                ]
            strict = StrictJSONRequest(request.scope, request.receive)
            if wants_body:
                body = await strict.body()
                # Anything but JSON (or no Content-Type) is refused.
                is_json = media in ("", "application/json") or (
                    media.startswith("application/") and media.endswith("+json")
                )
                if body and not is_json:
                    return problem(
                        415,
                        f"expected Content-Type application/json, got '{content_type}'",
                        instance=request.url.path,
                    )
            return await handler(strict)

        return route_handler
