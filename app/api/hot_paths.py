"""Fast paths for the hottest requests: publish, pull and ack, as plain Starlette routes.

FastAPI's per-request work (dependency solving, validating the body through the pydantic
model, building the endpoint's arguments) costs about 70 us of CPU per request on this
machine, several times what the HTTP server itself needs (bench/wrk, bench/RESULTS.md). A
request in the common shape does not need it: these routes sit in front of the FastAPI
routes of the same path, check the key's scope, parse the body with the same strict parser
and check it with plain code, then call the same queue operation and answer the same JSON.

Anything else (a Content-Type other than exactly application/json, a body that does not
parse, a field out of bounds or of another type, an unknown field, a bad name in the path)
is handed, body and all, to the FastAPI route, so that every refusal is exactly the
documented one. The FastAPI routes stay the documentation (OpenAPI) and the reference; the
tests send every request both ways (tests/test_hot_paths.py).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Match, Route
from starlette.types import Message, Receive, Scope, Send

from sluice.api.access import Access
from sluice.api.limits import StrictJSONRoute, parse_json
from sluice.api.models import MAX_BATCH, MAX_HEADERS
from sluice.api.routes.consuming import ack_answer, pull_answer
from sluice.api.routes.topics import publish_answer, serialise_value
from sluice.records import NewMessage

_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}")
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


Handler = Callable[[Request, dict[str, str], Any], Awaitable[Response]]


class HotRoute(Route):
    """A Starlette route in front of the FastAPI route of the same path and method: answers
    `handle(request, path_params, parsed_body)` for requests of the common shape, and hands
    everything else to the router again, which then passes this route by (SLOW_PATH)."""

    def __init__(self, path: str, access: Access | None, handle: Handler) -> None:
        self.access = access
        self._handle = handle
        super().__init__(path, self._endpoint, methods=["POST"])

    async def _endpoint(self, request: Request) -> Response:
        raise NotImplementedError  # never called: handle() below answers

    def matches(self, scope: Scope) -> tuple[Match, Scope]:
        if scope.get(SLOW_PATH):
            return Match.NONE, {}
        match, child = super().matches(scope)
        if match is not Match.NONE:
            child["route"] = self  # what the observability middleware labels requests by
        return match, child

    async def handle(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["method"] != "POST" or not _common_request(scope):
            await _slow(scope, receive, send)
            return
        if self.access is not None:
            self.access.check(scope)  # 403 as a problem, through the app's handlers
        request = Request(scope, receive)
        body = await request.body()
        try:
            parsed = parse_json(body, scope["app"].state.settings.max_json_depth)
            response = await self._handle(request, scope["path_params"], parsed)
        except (_Slow, json.JSONDecodeError):
            await _slow(scope, _replay(body, receive), send)
            return
        await response(scope, receive, send)


# Set in the scope of a request handed over: the router passes the HotRoutes by.
SLOW_PATH = "sluice.slow_path"


async def _slow(scope: Scope, receive: Receive, send: Send) -> None:
    scope[SLOW_PATH] = True
    await scope["app"].router(scope, receive, send)


def _common_request(scope: Scope) -> bool:
    if not all(_NAME.fullmatch(value) for value in scope["path_params"].values()):
        return False
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value == b"application/json"
    return False


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


async def _publish(request: Request, params: dict[str, str], body: Any) -> Response:
    return await publish_answer(request, params["topic"], publish_messages(body))


async def _ack(request: Request, params: dict[str, str], body: Any) -> Response:
    receipts = ack_receipts(body)
    return await ack_answer(request, params["topic"], params["subscription"], receipts)


async def _pull(request: Request, params: dict[str, str], body: Any) -> Response:
    values = pull_values(body)
    return await pull_answer(request, params["topic"], params["subscription"], *values)


HOT = {
    "/v1/topics/{topic}/messages": _publish,
    "/v1/topics/{topic}/subscriptions/{subscription}/ack": _ack,
    "/v1/topics/{topic}/subscriptions/{subscription}/pull": _pull,
}


def install_hot_paths(app: FastAPI) -> None:
    """Put a HotRoute in front of each hot FastAPI route (first in the router: matched
    before anything else), with the scope that route requires."""
    from sluice.api.observability import flat_routes

    found = {}
    for context in flat_routes(app):
        if "POST" in (context.methods or set()) and context.path in HOT:
            original = getattr(context, "original_route", context)
            assert isinstance(original, StrictJSONRoute), context.path
            found[context.path] = (context.path_format, original.access)
    for path, handle in HOT.items():
        path_format, access = found[path]
        app.router.routes.insert(0, HotRoute(path_format, access, handle))
