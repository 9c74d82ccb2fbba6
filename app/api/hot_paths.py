"""Fast paths for the hottest requests: publish, pull and ack, answered in front of the app.

FastAPI's per-request work (dependency solving, validating the body through the pydantic
model, building the endpoint's arguments) and the ten middleware layers around it cost
several times what the HTTP server itself needs (bench/wrk, bench/RESULTS.md). A request
in the common shape needs none of it: HotFront, the outermost ASGI layer, checks its key
and scope, parses the body with the same strict parser and checks it with plain code, then
calls the same queue operation and answers the same JSON, with the same request id,
metrics and access log as the middleware would have given it.

Anything else (a Content-Type other than exactly application/json, a body that does not
parse, a field out of bounds or of another type, an unknown field, a bad name in the path,
a key that is missing or lacks the scope) is handed, body and all, to the app's middleware
stack and FastAPI route, so that every refusal is exactly the documented one. The FastAPI
routes stay the documentation (OpenAPI) and the reference; the tests send every request
both ways (tests/test_hot_paths.py).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice import metrics
from sluice.api.access import Access, Forbidden, bearer_token
from sluice.api.limits import StrictJSONRoute, parse_json
from sluice.api.models import MAX_BATCH, MAX_HEADERS
from sluice.api.observability import REQUEST_ID_HEADER, flat_routes, record, request_id_of
from sluice.api.routes.consuming import ack_answer, pull_answer
from sluice.api.routes.topics import publish_answer, serialise_value
from sluice.records import NewMessage

_MESSAGE_FIELDS = frozenset({"value", "key", "headers", "delay_seconds", "dedup_id"})


class _Slow(Exception):
    """Not the common shape: the FastAPI route answers."""


def _clean(value: Any, low: int, high: int) -> str:
    if type(value) is not str or not low <= len(value) <= high or "\x00" in value:
        raise _Slow
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise _Slow from None
    return value


def publish_messages(body: Any) -> list[NewMessage]:
    if type(body) is not dict or body.keys() != {"messages"}:
        raise _Slow
    items = body["messages"]
    if type(items) is not list or not 1 <= len(items) <= MAX_BATCH:
        raise _Slow
    messages = []
    for item in items:
        if type(item) is not dict or "value" not in item or not item.keys() <= _MESSAGE_FIELDS:
            raise _Slow
        key = item.get("key")
        if key is not None:
            _clean(key, 0, 256)
        headers = item.get("headers")
        if headers is not None:
            if type(headers) is not dict or len(headers) > MAX_HEADERS:
                raise _Slow
            for name, text in headers.items():
                _clean(name, 1, 256)
                _clean(text, 0, 4096)
        delay = item.get("delay_seconds", 0)
        if type(delay) is not int or not 0 <= delay <= 900:
            raise _Slow
        dedup_id = item.get("dedup_id")
        if dedup_id is not None:
            _clean(dedup_id, 1, 128)
        messages.append(
            NewMessage(
                value=serialise_value(item["value"]),
                key=key,
                headers=None if headers is None else orjson.dumps(headers).decode(),
                delay_seconds=delay,
                dedup_id=dedup_id,
            )
        )
    return messages


def ack_receipts(body: Any) -> list[str]:
    if type(body) is not dict or body.keys() != {"receipts"}:
        raise _Slow
    receipts = body["receipts"]
    if type(receipts) is not list or not 1 <= len(receipts) <= MAX_BATCH:
        raise _Slow
    for receipt in receipts:
        if type(receipt) is not str or len(receipt) > 64:
            raise _Slow
    return receipts


def _replay(body: bytes, receive: Receive) -> Receive:
    """The request's receive, with the body already read given again first."""
    given = False

    async def again() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


Shape = Callable[[Any], Any]
Handler = Callable[[Request, dict[str, str], Any], Awaitable[Response]]

# The hot paths, names included (names of another shape go the slow way and get its 422).
_HOT_PATH = re.compile(
    r"/v1/topics/([A-Za-z0-9_-]{1,80})/(?:messages|subscriptions/([A-Za-z0-9_-]{1,80})/(pull|ack))"
)


@dataclass(frozen=True, slots=True)
class _Hot:
    template: str
    access: Access | None
    shape: Shape
    answer: Handler


class HotFront:
    """The outermost ASGI layer: answers the hot requests of the common shape itself, and
    hands everything else, unchanged, to the app's middleware stack.

    What the middleware stack does for every request is done here in one place for these:
    the request id, metrics and access log (observability), the key (auth), the body size
    limit, the route's scope check, and the app's exception handlers for errors of the
    operation. Any doubt (no or another Content-Type, no Content-Length, a body over the
    limit, a missing, unknown or insufficient key, a root path, a body that does not parse
    or is not of the common shape) hands the request to the stack, body and all, before
    anything was done, so every refusal is the stack's own. A profile under wrk showed the
    ten middleware layers and send wrappers of the stack costing a fifth of a
    single-message publish (bench/RESULTS.md).
    """

    def __init__(self, app: FastAPI, stack: ASGIApp, hot: dict[str, _Hot]) -> None:
        self.app = app
        self.stack = stack
        self.publish = hot["/v1/topics/{topic}/messages"]
        self.pull = hot["/v1/topics/{topic}/subscriptions/{subscription}/pull"]
        self.ack = hot["/v1/topics/{topic}/subscriptions/{subscription}/ack"]
        self.max_body = app.state.settings.max_body_bytes
        self.max_depth = app.state.settings.max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        hot = self._hot_route(scope)
        if hot is None or not await self._admitted(scope, hot):
            await self.stack(scope, receive, send)
            return
        chunks = []
        while True:
            message = await receive()
            if message["type"] != "http.request":
                return  # the client went away before sending its body
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        if len(body) > self.max_body:  # more than its Content-Length said: the stack's 413
            await self.stack(scope, _replay(body, receive), send)
            return
        await self._answer(scope, receive, send, hot, body)

    def _hot_route(self, scope: Scope) -> _Hot | None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope.get("root_path"):
            return None
        match = _HOT_PATH.fullmatch(scope["path"])
        if match is None:
            return None
        topic, subscription, action = match.groups()
        if subscription is None:
            hot, params = self.publish, {"topic": topic}
        else:
            hot = self.pull if action == "pull" else self.ack
            params = {"topic": topic, "subscription": subscription}
        content_type = length = None
        for name, value in scope["headers"]:
            if name == b"content-type":
                content_type = value
            elif name == b"content-length":
                length = value
        if content_type != b"application/json" or length is None or not length.isdigit():
            return None
        if int(length) > self.max_body:
            return None
        scope["path_params"] = params
        return hot

    async def _admitted(self, scope: Scope, hot: _Hot) -> bool:
        """The key is known and has the route's scope (the stack answers 401/403/503)."""
        cache = self.app.state.keys
        keys = cache.fresh()  # nearly always: no coroutine to run
        if keys is None:
            try:
                keys = await cache.current()
            except Exception:  # the stack's auth layer answers 503 and logs it
                return False
        principal = None
        if not keys.open:
            token = bearer_token(scope)
            principal = keys.authenticate(token) if token is not None else None
            if principal is None:
                return False
        scope.setdefault("state", {})["principal"] = principal
        if hot.access is not None:
            try:
                hot.access.check(scope)
            except Forbidden:
                return False
        return True

    async def _answer(
        self, scope: Scope, receive: Receive, send: Send, hot: _Hot, body: bytes
    ) -> None:
        start = time.perf_counter()
        request = Request(scope, receive)
        try:
            values = hot.shape(parse_json(body, self.max_depth))
        except (_Slow, json.JSONDecodeError):
            await self.stack(scope, _replay(body, receive), send)
            return
        request_id = request_id_of(scope)
        scope["state"]["request_id"] = request_id
        status = 500
        metrics.request_started()
        try:
            try:
                response = await hot.answer(request, scope["path_params"], values)
            except Exception as exc:
                response = await self._problem(request, exc)
            headers = response.raw_headers
            status = response.status_code
            # Only the app's last-resort handler (500, or 503 for a lost connection) has
            # put the id on its answer already.
            if status < 500 or not any(name == REQUEST_ID_HEADER for name, _ in headers):
                headers.append((REQUEST_ID_HEADER, request_id.encode("ascii")))
            await response(scope, receive, send)
        finally:
            metrics.request_finished()
            record(scope, request_id, hot.template, status, start)

    async def _problem(self, request: Request, exc: Exception) -> Response:
        """The app's own answer to an exception: its handler for the nearest class."""
        handlers = self.app.exception_handlers
        for cls in type(exc).__mro__:
            handler = handlers.get(cls)
            if handler is not None:
                return await handler(request, exc)  # type: ignore[no-any-return]
        raise exc


def pull_values(body: Any) -> tuple[int, float, int | None, list[str] | None]:
    """(max_messages, wait_seconds, ack_deadline_seconds, ack) of a pull body."""
    if type(body) is not dict or not body.keys() <= _PULL_FIELDS:
        raise _Slow
    max_messages = body.get("max_messages", 1)
    if type(max_messages) is not int or not 1 <= max_messages <= MAX_BATCH:
        raise _Slow
    wait_seconds = body.get("wait_seconds", 0)
    if type(wait_seconds) not in (int, float) or not 0 <= wait_seconds <= 20:
        raise _Slow
    deadline = body.get("ack_deadline_seconds")
    if deadline is not None and (type(deadline) is not int or not 1 <= deadline <= 43200):
        raise _Slow
    ack = body.get("ack")
    if ack is not None:
        if type(ack) is not list or len(ack) > MAX_BATCH:
            raise _Slow
        for receipt in ack:
            if type(receipt) is not str or len(receipt) > 64:
                raise _Slow
    return max_messages, float(wait_seconds), deadline, ack


_PULL_FIELDS = frozenset({"max_messages", "wait_seconds", "ack_deadline_seconds", "ack"})


async def _publish(request: Request, params: dict[str, str], messages: Any) -> Response:
    return await publish_answer(request, params["topic"], messages)


async def _ack(request: Request, params: dict[str, str], receipts: Any) -> Response:
    return await ack_answer(request, params["topic"], params["subscription"], receipts)


async def _pull(request: Request, params: dict[str, str], values: Any) -> Response:
    return await pull_answer(request, params["topic"], params["subscription"], *values)


# Per hot route: the check of the body's shape (raises _Slow), then the operation. The
# checks are looked up when called, so that tests can watch which requests they see.
HANDLERS: dict[str, tuple[Shape, Handler]] = {
    "/v1/topics/{topic}/messages": (lambda body: publish_messages(body), _publish),
    "/v1/topics/{topic}/subscriptions/{subscription}/ack": (lambda body: ack_receipts(body), _ack),
    "/v1/topics/{topic}/subscriptions/{subscription}/pull": (
        lambda body: pull_values(body),
        _pull,
    ),
}


def install_hot_paths(app: FastAPI) -> None:
    """Put a HotFront outside the app's middleware stack (built on the first request), for
    the hot routes with the scopes their FastAPI routes require."""
    hot = {}
    for context in flat_routes(app):
        if "POST" in (context.methods or set()) and context.path in HANDLERS:
            original = getattr(context, "original_route", context)
            assert isinstance(original, StrictJSONRoute), context.path
            hot[context.path] = _Hot(context.path, original.access, *HANDLERS[context.path])
    assert hot.keys() == HANDLERS.keys(), hot.keys()
    build_stack = app.build_middleware_stack

    def build() -> ASGIApp:
        return HotFront(app, build_stack(), hot)

    app.build_middleware_stack = build  # type: ignore[method-assign]
