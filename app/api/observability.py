"""Per-request observability: a request id, one JSON log line, and the HTTP metrics.

Installed outermost, so answers given by other middleware (413, 401, ...) are seen too.
Metrics are labelled by the route *template* (`/v1/topics/{topic}/messages`), never by
the raw path, so their number of series stays bounded whatever clients send. Nothing of
the request or response bodies is logged.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import time
from typing import Any

from starlette.routing import Match
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from sluice import metrics
from sluice.logs import READY_PROBE_ID, access_line_writer

log = logging.getLogger("sluice.access")

REQUEST_ID_HEADER = b"x-request-id"
# A caller's id is kept when it is short and made of safe characters (it ends up in logs).
_SANE_ID = re.compile(rb"[A-Za-z0-9._:@/+=-]{1,128}")
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "<unmatched>"


# Generated ids: 16 random hex digits per process, then a counter (32 hex digits in all).
# Unique across processes and restarts without a random draw per request (uuid4 was 5% of
# the CPU of a single-message publish); they only tie log lines together, nothing more.
# Drawn again in a forked child, which must not share its parent's ids (at the fork, not by
# comparing os.getpid() per request: a system call, 1% of a single-message consume's server
# samples under wrk, bench/RESULTS.md run 32).
def _fresh_ids() -> tuple[str, itertools.count[int]]:
    return os.urandom(8).hex(), itertools.count()


_ids = _fresh_ids()


def _after_fork() -> None:
    global _ids
    _ids = _fresh_ids()


os.register_at_fork(after_in_child=_after_fork)


def _new_request_id() -> str:
    prefix, counter = _ids
    return f"{prefix}{next(counter):016x}"


def request_id_of(scope: Scope) -> str:
    for name, value in scope.get("headers") or ():
        if name == REQUEST_ID_HEADER:
            if _SANE_ID.fullmatch(value):
                return value.decode("ascii")
            break
    return _new_request_id()


def _path_of(route: object) -> str | None:
    path = getattr(route, "path_format", None) or getattr(route, "path", None)
    return path if isinstance(path, str) else None


def route_template(scope: Scope) -> str:
    """The path template of the route that handled the request (set by the router), or,
    for answers given before routing (401, 413, ...), of the route the path matches."""
    path = _path_of(scope.get("route"))
    if path is not None:
        return path
    partial = None
    for route in flat_routes(scope.get("app")):
        match, _ = route.matches(scope)
        if match == Match.FULL:
            return _path_of(route) or UNMATCHED
        if match == Match.PARTIAL and partial is None:  # e.g. a method the route lacks
            partial = _path_of(route)
    return partial or UNMATCHED


def flat_routes(app: object) -> list[Any]:
    """The app's routes with included routers expanded (FastAPI >= 0.13x keeps included
    routers as single entries of app.routes)."""
    routes = list(getattr(app, "routes", ()))
    try:
        from fastapi.routing import iter_route_contexts
    except ImportError:  # older FastAPI: app.routes is already flat
        return routes
    return list(iter_route_contexts(routes))


class ObservabilityMiddleware:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        request_id = request_id_of(scope)
        scope.setdefault("state", {})["request_id"] = request_id
        status = 500  # what the client gets if the app fails before answering
        header = (REQUEST_ID_HEADER, request_id.encode("ascii"))

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", ()) if h[0] != REQUEST_ID_HEADER]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        metrics.request_started()
        try:
            await self.app(scope, receive, send_with_id)
        finally:
            metrics.request_finished()
            record(scope, request_id, route_template(scope), status, start)


def record(scope: Scope, request_id: str, route: str, status: int, start: float) -> None:
    """The request's metrics and access log line, once it is answered."""
    elapsed = time.perf_counter() - start
    method = scope["method"] if scope["method"] in _METHODS else "OTHER"
    metrics.observe_request(method, route, status, elapsed)
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {
        "request_id": request_id,
        "method": method,
        "route": route,
        "path": scope["path"][:512],
        "status": status,
        "duration_ms": round(elapsed * 1000, 2),
    }
    writer = access_line_writer() if request_id != READY_PROBE_ID else None
    if writer is None:
        log.info("request", extra=fields)
    else:
        writer.write_info(log.name, "request", fields)
