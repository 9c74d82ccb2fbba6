"""Access control: API keys, their scopes, and the check in front of every /v1 request.

A key is `sk_` + 32 random bytes (urlsafe base64); only its SHA-256 is stored (the secret
is high-entropy, so an unsalted hash cannot be brute-forced and lets a request find its
key by hash). Each process caches the unrevoked keys (hash -> scopes) for at most
CACHE_SECONDS, so a key created or revoked with `sluice keys` takes effect everywhere
within a few seconds while the hot path stays one SHA-256 and one dict lookup.

While no key has ever been created the API is open (a warning is logged at start); once
one has been, revoked or not, every /v1 request and /metrics need `Authorization: Bearer
<key>`. Revoking every key leaves the API closed to everyone; only `sluice keys open`,
which deletes every key, opens it again.

Scopes: `admin` (everything), `publish:<glob>`, `consume:<glob>`, `read:<glob>`, with
shell-style globs over topic names (`orders-*`). RULES maps each operation to the scope
it needs; a protected path that no rule names needs `admin` (default deny).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import re
import secrets
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Any, Literal

import asyncpg
from fastapi import FastAPI, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from sluice.api.problems import PROBLEM_MEDIA_TYPE, problem
from sluice.storage import keys as keys_sql

log = logging.getLogger("sluice.auth")

# How long a process trusts its copy of the key table. Well under the 10 s promised for
# `sluice keys create/revoke` to reach every process.
CACHE_SECONDS = 2.0
# A refresh that takes longer than this fails the request (503) instead of hanging it.
REFRESH_TIMEOUT_SECONDS = 5.0
SECRET_PREFIX = "sk_"  # noqa: S105 - a prefix, not a secret
# Longer bearer tokens cannot be ours; they are refused before hashing.
MAX_TOKEN_LENGTH = 256

Kind = Literal["admin", "publish", "consume", "read"]
TOPIC_KINDS: tuple[Kind, ...] = ("publish", "consume", "read")
# Globs are topic names plus the shell wildcards * ? [ ] and ! (negated classes).
_GLOB = re.compile(r"[A-Za-z0-9_\-*?\[\]!]{1,200}")


# ---- scopes ------------------------------------------------------------------------------


@dataclass(frozen=True)
class KeyScope:
    """One granted scope: `admin`, or a kind with a topic glob."""

    kind: Kind
    glob: str | None = None

    def __str__(self) -> str:
        return self.kind if self.glob is None else f"{self.kind}:{self.glob}"


def parse_scope(text: str) -> KeyScope:
    """`admin`, `publish:<glob>`, `consume:<glob>` or `read:<glob>`; ValueError otherwise."""
    if text == "admin":
        return KeyScope("admin")
    kind, sep, glob = text.partition(":")
    if not sep or kind not in TOPIC_KINDS:
        raise ValueError(
            f"invalid scope {text!r}: use admin, publish:<glob>, consume:<glob> or read:<glob>"
        )
    if not _GLOB.fullmatch(glob):
        raise ValueError(
            f"invalid topic glob {glob!r} in scope {text!r}: "
            "use topic-name characters [A-Za-z0-9_-] and the wildcards * ? [ ] !"
        )
    return KeyScope(kind, glob)  # type: ignore[arg-type]


Reach = Literal["topic", "any", "all"]


@dataclass(frozen=True)
class Requirement:
    """The scope an operation needs.

    reach "topic": a scope of `kind` whose glob matches `topic`;
    reach "any": a scope of `kind` on any topic (listing topics; the list is filtered);
    reach "all": a scope of `kind` on every topic (glob `*`), e.g. /metrics.
    `admin` satisfies every requirement.
    """

    kind: Kind
    reach: Reach = "topic"
    topic: str | None = None

    def __str__(self) -> str:
        if self.kind == "admin":
            return "admin"
        target = {"topic": self.topic, "any": "<any glob>", "all": "*"}[self.reach]
        return f"{self.kind}:{target}"


ADMIN = Requirement("admin")


def satisfies(scopes: Iterable[KeyScope], need: Requirement) -> bool:
    for scope in scopes:
        if scope.kind == "admin":
            return True
        if scope.kind != need.kind or need.kind == "admin":
            continue
        assert scope.glob is not None
        if need.reach == "any":
            return True
        if need.reach == "all" and scope.glob == "*":
            return True
        if need.reach == "topic" and need.topic is not None and fnmatchcase(need.topic, scope.glob):
            return True
    return False


# ---- which operation needs which scope ----------------------------------------------------


@dataclass(frozen=True)
class Rule:
    method: str
    template: str
    kind: Kind
    reach: Reach = "topic"
    pattern: re.Pattern[str] = field(init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        regex = re.sub(r"\\\{(\w+)\\\}", r"(?P<\1>[^/]+)", re.escape(self.template))
        object.__setattr__(self, "pattern", re.compile(regex))


_SUB = "/v1/topics/{topic}/subscriptions/{subscription}"
RULES: tuple[Rule, ...] = (
    Rule("GET", "/v1/topics", "read", "any"),
    Rule("PUT", "/v1/topics/{topic}", "admin"),
    Rule("DELETE", "/v1/topics/{topic}", "admin"),
    Rule("GET", "/v1/topics/{topic}", "read"),
    Rule("POST", "/v1/topics/{topic}/messages", "publish"),
    Rule("GET", "/v1/topics/{topic}/messages", "read"),
    Rule("GET", "/v1/topics/{topic}/messages/{offset}", "read"),
    Rule("GET", "/v1/topics/{topic}/subscriptions", "read"),
    Rule("PUT", _SUB, "admin"),
    Rule("DELETE", _SUB, "admin"),
    Rule("GET", _SUB, "read"),
    *(Rule("POST", f"{_SUB}/{verb}", "consume") for verb in ("pull", "ack", "nack", "extend")),
    Rule("POST", f"{_SUB}/seek", "consume"),
    Rule("GET", f"{_SUB}/dead-letters", "consume"),
    Rule("POST", f"{_SUB}/dead-letters/redrive", "consume"),
    # Metrics name every topic and subscription: reading them needs read on all topics.
    Rule("GET", "/metrics", "read", "all"),
    Rule("GET", "/metrics/", "read", "all"),  # in case metrics are served by a mounted app
)
_RULES_BY_METHOD: dict[str, list[Rule]] = {}
for _rule in RULES:
    _RULES_BY_METHOD.setdefault(_rule.method, []).append(_rule)


def is_protected(path: str) -> bool:
    """/v1 and /metrics need a key; /healthz, /readyz, /docs and /openapi.json never do."""
    return path in ("/v1", "/metrics") or path.startswith(("/v1/", "/metrics/"))


def requirement_for(method: str, path: str) -> Requirement:
    """The scope a protected request needs; `admin` when no rule names it (default deny)."""
    method = "GET" if method == "HEAD" else method
    for rule in _RULES_BY_METHOD.get(method, ()):
        match = rule.pattern.fullmatch(path)
        if match is None:
            continue
        if rule.kind == "admin":
            return ADMIN
        return Requirement(rule.kind, rule.reach, match.groupdict().get("topic"))
    return ADMIN


# ---- keys and the per-process cache ------------------------------------------------------


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


async def issue_key(
    conn: asyncpg.Connection, scopes: Iterable[str], name: str | None = None
) -> tuple[asyncpg.Record, str]:
    """Store a new key with these scopes; returns (its row, the secret). The secret exists
    only in the return value: the database keeps its hash."""
    parsed = [parse_scope(s) for s in scopes]
    if not parsed:
        raise ValueError("a key needs at least one scope")
    unique = list(dict.fromkeys(str(s) for s in parsed))
    secret = new_secret()
    row = await keys_sql.create_key(conn, name, hash_secret(secret), unique)
    return row, secret


@dataclass(frozen=True)
class Principal:
    """The key a request authenticated with (never its secret)."""

    key_id: int
    secret_hash: str
    scopes: tuple[KeyScope, ...]


@dataclass(frozen=True)
class KeySnapshot:
    by_hash: Mapping[str, Principal]  # the active (unrevoked) keys
    any_key: bool  # whether a key was ever created (revoked keys count)
    loaded_at: float  # time.monotonic() when the query started

    @property
    def open(self) -> bool:
        """The API is open only while no key has ever been created."""
        return not self.any_key

    def authenticate(self, token: str) -> Principal | None:
        digest = hash_secret(token)
        principal = self.by_hash.get(digest)
        # The lookup is by a hash the caller cannot steer; the final comparison is constant
        # time anyway, so no branch here depends on how much of a secret was right.
        if principal is None or not hmac.compare_digest(principal.secret_hash, digest):
            return None
        return principal


def _snapshot(rows: Iterable[asyncpg.Record], any_key: bool, loaded_at: float) -> KeySnapshot:
    by_hash: dict[str, Principal] = {}
    for row in rows:
        scopes: list[KeyScope] = []
        for text in row["scopes"]:
            try:
                scopes.append(parse_scope(text))
            except ValueError:
                log.warning("ignoring an invalid scope of an API key", extra={"key_id": row["id"]})
        by_hash[row["secret_hash"]] = Principal(row["id"], row["secret_hash"], tuple(scopes))
    return KeySnapshot(by_hash, any_key or bool(by_hash), loaded_at)


class KeyCache:
    """The unrevoked keys of the database, re-read when older than `max_age` seconds.

    One request per expiry pays the (indexed, tiny) query; the others reuse the snapshot.
    """

    def __init__(
        self,
        pool: asyncpg.Pool,
        max_age: float = CACHE_SECONDS,
        now: Callable[[], float] = time.monotonic,
    ) -> None:
        self._pool = pool
        self._max_age = max_age
        self._now = now
        self._lock = asyncio.Lock()
        self._snapshot: KeySnapshot | None = None

    def _fresh(self) -> KeySnapshot | None:
        snap = self._snapshot
        if snap is not None and self._now() - snap.loaded_at < self._max_age:
            return snap
        return None

    async def current(self) -> KeySnapshot:
        snap = self._fresh()
        if snap is not None:
            return snap
        async with self._lock:
            snap = self._fresh()
            if snap is not None:
                return snap
            started = self._now()
            async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS), self._pool.acquire() as conn:
                rows = await keys_sql.active_keys(conn)
                any_key = bool(rows) or await keys_sql.any_key_exists(conn)
            snap = _snapshot(rows, any_key, started)
            previous, self._snapshot = self._snapshot, snap
            if previous is not None and _state(previous) != _state(snap):
                _log_state(snap)
            return snap

    def invalidate(self) -> None:
        """Re-read the keys on the next request."""
        self._snapshot = None


def _state(snapshot: KeySnapshot) -> str:
    if snapshot.open:
        return "open"
    return "keys" if snapshot.by_hash else "locked"


def _log_state(snapshot: KeySnapshot) -> None:
    state = _state(snapshot)
    if state == "open":
        log.warning(
            "no API keys exist: the API is open to anyone; "
            "create one with `sluice keys create --scope admin`"
        )
    elif state == "locked":
        log.warning(
            "every API key is revoked: every /v1 request and /metrics are refused (401) "
            "until a key is created with `sluice keys create`"
        )
    else:
        log.info("API keys exist: every /v1 request needs a key")


# ---- the check in front of the routes ----------------------------------------------------

_REALM = 'Bearer realm="sluice"'


def _bearer_token(scope: Scope) -> str | None:
    for name, value in scope.get("headers") or ():
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            token = token.strip()
            if scheme.lower() != "bearer" or not token:
                return None
            return token
    return None


class AuthMiddleware:
    """401 without a valid key, 403 with a key lacking the scope; open while no key was ever
    created.

    Runs before the body is read, so unauthenticated requests cost no parsing. The
    authenticated key is left in request.state.principal (None while the API is open).
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
            token = _bearer_token(scope)
            if token is None:
                response = problem(
                    401,
                    "this endpoint needs an API key: send `Authorization: Bearer <key>`",
                    headers={"WWW-Authenticate": _REALM},
                    instance=path,
                )
                await response(scope, receive, send)
                return
            if len(token) <= MAX_TOKEN_LENGTH:
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
            need = requirement_for(scope["method"], path)
            if not satisfies(principal.scopes, need):
                response = problem(
                    403,
                    f"the API key lacks the scope for this operation: it needs {need} or admin",
                    headers={"WWW-Authenticate": f'{_REALM}, error="insufficient_scope"'},
                    instance=path,
                )
                await response(scope, receive, send)
                return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


def readable_topics(request: Request) -> Callable[[str], bool] | None:
    """Which topics the request's key may read: None for all of them (the API is open, or
    the key has `admin` or `read:*`), else a test of a topic name."""
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None or satisfies(principal.scopes, Requirement("read", "all")):
        return None
    scopes = principal.scopes
    return lambda topic: satisfies(scopes, Requirement("read", "topic", topic))


# ---- wiring -------------------------------------------------------------------------------


async def start_auth(app: FastAPI, pool: asyncpg.Pool) -> None:
    """At startup: load the keys, and warn when the API is open or nobody can get in."""
    cache = KeyCache(pool)
    app.state.keys = cache
    snapshot = await cache.current()
    if _state(snapshot) != "keys":
        _log_state(snapshot)


def install_auth(app: FastAPI) -> None:
    """Put the key check in front of the routes and document it in the OpenAPI schema."""
    app.add_middleware(AuthMiddleware)
    generate = app.openapi
    documented: list[bool] = []

    def openapi() -> dict[str, Any]:
        schema = generate()
        if not documented:  # the schema is generated once and cached by FastAPI
            _document_security(schema)
            documented.append(True)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


_SCHEME = "bearerAuth"


def _scope_text(need: Requirement) -> str:
    if need.kind == "admin":
        return "`admin`"
    if need.reach == "all":
        return f"`{need.kind}:*` or `admin`"
    if need.reach == "any":
        return f"`{need.kind}:<glob>` or `admin` (lists only what the globs match)"
    return f"`{need.kind}:<glob>` whose glob matches the topic, or `admin`"


def _document_security(schema: dict[str, Any]) -> None:
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
        if not is_protected(path):
            continue
        for method, operation in item.items():
            placeholder = re.sub(r"\{(\w+)\}", r"\1", path)
            need = requirement_for(method.upper(), placeholder)
            if need.reach == "topic" and need.kind != "admin":
                # requirement_for saw a literal name; describe the rule, not that name.
                need = Requirement(need.kind, "topic")
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
