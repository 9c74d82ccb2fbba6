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
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.problems import problem


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


def json_depth_exceeds(value: Any, limit: int) -> bool:
    """Iterative, so a hostile document cannot exhaust the stack here either. Only
    containers are pushed: scalars cannot deepen the document."""
    if not isinstance(value, dict | list):
        return False
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        for child in item.values() if type(item) is dict else item:
            if isinstance(child, dict | list):
                stack.append((child, depth + 1))
    return False


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    # 1e400 would silently become infinity (and then null or invalid JSON when stored).
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text[:40]} is out of range")
    return value


class StrictJSONRequest(Request):
    """Parses JSON strictly (no NaN/Infinity) and refuses documents nested too deep."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            max_depth = self.app.state.settings.max_json_depth
            body = await self.body()
            try:
                parsed = json.loads(
                    body, parse_constant=_reject_constant, parse_float=_finite_float
                )
            except RecursionError as exc:
                raise json.JSONDecodeError("nesting too deep", "", 0) from exc
            except ValueError as exc:
                if isinstance(exc, json.JSONDecodeError):
                    raise
                raise json.JSONDecodeError(str(exc), "", 0) from exc
            if json_depth_exceeds(parsed, max_depth):
                raise json.JSONDecodeError(f"nesting deeper than {max_depth} levels", "", 0)
            self._json = parsed
        return self._json


class StrictJSONRoute(APIRoute):
    """Route class of every /v1 router: content-type check, then strict JSON parsing."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()
        wants_body = bool((self.methods or set()) & {"POST", "PUT", "PATCH"})

        async def route_handler(request: Request) -> Response:
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
