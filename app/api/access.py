"""The key check in front of the routes: who is calling (AuthMiddleware: 401, or 503 when
the keys cannot be read) and whether the key may do what the route does (each route's
`require(...)` dependency: 403).

Every /v1 route and /metrics declares the scope it needs next to its path, e.g.
`@router.post("/{topic}/messages", dependencies=[require(Kind.publish)])`. There is no
default: install_auth refuses to start an app with a protected route that declares
nothing, so an operation cannot be added without saying who may call it. The same
declarations document the scopes in the OpenAPI schema.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import asyncpg
from fastapi import Depends, FastAPI, Request
from fastapi.params import Depends as DependsParam
from starlette.types import ASGIApp, Receive, Scope, Send

from sluice.access.keys import KeyCache, Lock, Principal, log_lock
from sluice.access.scopes import Kind, Reach, Requirement, satisfies
from sluice.api.observability import flat_routes
from sluice.api.problems import PROBLEM_MEDIA_TYPE, problem
from sluice.errors import SluiceError

log = logging.getLogger("sluice.auth")

_REALM = 'Bearer realm="sluice"'


def is_protected(path: str) -> bool:
    """/v1 and /metrics need a key; /healthz, /readyz, /docs and /openapi.json never do."""
    return path in ("/v1", "/metrics") or path.startswith(("/v1/", "/metrics/"))


# ---- who is calling ---------------------------------------------------------------------


def bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None
            return token
    return None


class AuthMiddleware:
    """401 without a valid key on a protected path; open while no key was ever created.

    Runs before routing and before the body is read, so unauthenticated requests cost no
    parsing. The authenticated key is left in the request state as `principal` (None while
    the API is open), for the routes' `require(...)` to check.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not is_protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        cache: KeyCache = scope["app"].state.keys
        try:
            snapshot = await cache.current()
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("cannot read API keys", extra={"error": type(exc).__name__})
            response = problem(
                503,
                "the database is unavailable; retry shortly",
                headers={"Retry-After": "1"},
                instance=path,
            )
            await response(scope, receive, send)
            return
        principal: Principal | None = None
        if not snapshot.open:
            token = bearer_token(scope)
            if token is None:
                response = problem(
                    401,
                    "this endpoint needs an API key: send `Authorization: Bearer <key>`",
                    headers={"WWW-Authenticate": _REALM},
                    instance=path,
                )
                await response(scope, receive, send)
                return
            principal = snapshot.authenticate(token)
            if principal is None:
                response = problem(
                    401,
                    "the API key is not valid (unknown or revoked)",
                    headers={"WWW-Authenticate": f'{_REALM}, error="invalid_token"'},
                    instance=path,
                )
                await response(scope, receive, send)
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


# ---- what the key may do ------------------------------------------------------------------


class Forbidden(SluiceError):
    status = 403
    type_slug = "forbidden"
    title = "Forbidden"


class Access:
    """A route's declared requirement, checked against the request's key.

    A FastAPI dependency: on any route, FastAPI calls it (before path and query values are
    checked, after a body is parsed). Routes of StrictJSONRoute (every /v1 route) take it
    out of their dependencies and call `check` themselves, before the body is read.
    """

    def __init__(self, need: Requirement) -> None:
        self.need = need

    def check(self, scope: Scope) -> None:
        principal: Principal | None = scope["state"]["principal"]
        if principal is None:  # the API is open
            return
        need = self.need
        if need.per_topic:
            need = Requirement(need.kind, Reach.topic, scope["path_params"]["topic"])
        if not satisfies(principal.scopes, need):
            raise Forbidden(
                f"the API key lacks the scope for this operation: it needs {need} or admin",
                headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope"'},
            )

    async def __call__(self, request: Request) -> None:
        self.check(request.scope)


def require(kind: Kind, reach: Reach = Reach.topic) -> DependsParam:
    """The scope a route needs, for its `dependencies`: a scope of `kind` on the topic of
    the path (reach `topic`), on any topic (`any`) or on every topic (`all`)."""
    return Depends(Access(Requirement(kind, reach)))


def access_of(dependencies: Any) -> Access | None:
    """The Access among a route's `dependencies`, if it declares one."""
    for depends in dependencies or ():
        if isinstance(depends.dependency, Access):
            return depends.dependency
    return None


def declared_access(route: Any) -> Access | None:
    """A route's Access: run by its route class (`route.access`, StrictJSONRoute) or by
    FastAPI, as one of its dependencies."""
    original = getattr(route, "original_route", route)  # FastAPI's view of an included route
    access = getattr(original, "access", None)
    if isinstance(access, Access):
        return access
    return access_of(getattr(route, "dependencies", None))


def readable_topics(request: Request) -> Callable[[str], bool] | None:
    """Which topics the request's key may read: None for all of them (the API is open, or
    the key has `admin` or `read:*`), else a test of a topic name."""
    principal: Principal | None = request.scope["state"]["principal"]
    if principal is None or satisfies(principal.scopes, Requirement(Kind.read, Reach.all)):
        return None
    scopes = principal.scopes
    return lambda topic: satisfies(scopes, Requirement(Kind.read, Reach.topic, topic))


# ---- wiring -------------------------------------------------------------------------------


async def start_auth(app: FastAPI, pool: asyncpg.Pool) -> None:
    """At startup: load the keys, and warn when the API is open or nobody can get in."""
    cache = KeyCache(pool)
    app.state.keys = cache
    lock = (await cache.current()).lock
    if lock != Lock.keys:
        log_lock(lock)


def _declared(app: FastAPI) -> dict[tuple[str, str], Requirement]:
    """(path template, method) -> requirement of every route. Raises when a protected route
    declares none (no operation is reachable without a decision about who may call it), or
    an open one declares one (it would never be checked: only protected paths are
    authenticated)."""
    declared: dict[tuple[str, str], Requirement] = {}
    for route in flat_routes(app):
        path = getattr(route, "path_format", None)
        methods = getattr(route, "methods", None)
        if path is None or methods is None:
            continue
        access = declared_access(route)
        if access is None:
            if is_protected(path):
                raise RuntimeError(f"route {sorted(methods)} {path} declares no require(...)")
            continue
        if not is_protected(path):
            raise RuntimeError(f"route {sorted(methods)} {path} is never authenticated")
        if access.need.per_topic and "{topic}" not in path:
            raise RuntimeError(f"route {path} needs a topic scope but names no topic")
        for method in methods:
            declared[(path, method)] = access.need
    return declared


def install_auth(app: FastAPI) -> None:
    """Put the key check in front of the routes (call it once every router is included)
    and document each route's scope in the OpenAPI schema."""
    declared = _declared(app)
    app.add_middleware(AuthMiddleware)
    generate = app.openapi
    documented: list[bool] = []

    def openapi() -> dict[str, Any]:
        schema = generate()
        if not documented:  # the schema is generated once and cached by FastAPI
            _document_security(schema, declared)
            documented.append(True)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


# ---- the OpenAPI schema -------------------------------------------------------------------

_SCHEME = "bearerAuth"


def _scope_text(need: Requirement) -> str:
    if need.kind == Kind.admin:
        return "`admin`"
    if need.reach == Reach.all:
        return f"`{need.kind}:*` or `admin`"
    if need.reach == Reach.any:
        return f"`{need.kind}:<glob>` or `admin` (lists only what the globs match)"
    return f"`{need.kind}:<glob>` whose glob matches the topic, or `admin`"


def _document_security(
    schema: dict[str, Any], declared: dict[tuple[str, str], Requirement]
) -> None:
    components = schema.setdefault("components", {})
    components.setdefault("securitySchemes", {})[_SCHEME] = {
        "type": "http",
        "scheme": "bearer",
        "description": (
            "An API key from `sluice keys create`. Required on every /v1 operation and "
            "/metrics once a key has been created (revoked or not); the API is open only "
            "while none ever was."
        ),
    }
    problem_content = {PROBLEM_MEDIA_TYPE: {"schema": {"$ref": "#/components/schemas/Problem"}}}
    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            need = declared.get((path, method.upper()))
            if need is None:
                continue
            operation["security"] = [{_SCHEME: []}]
            note = f"**Required scope:** {_scope_text(need)}."
            description = operation.get("description")
            operation["description"] = f"{description}\n\n{note}" if description else note
            responses = operation.setdefault("responses", {})
            responses.setdefault(
                "401", {"description": "Missing or invalid API key", "content": problem_content}
            )
            responses.setdefault(
                "403",
                {
                    "description": "The API key lacks the scope for this operation",
                    "content": problem_content,
                },
            )
            responses["401"]["headers"] = {
                "WWW-Authenticate": {
                    "description": 'Bearer realm="sluice" (with error="invalid_token")',
                    "schema": {"type": "string"},
                }
            }
