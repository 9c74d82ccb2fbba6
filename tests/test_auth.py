"""Access control (SPEC 5): API keys, scopes, globs, the CLI and revocation on live servers.

The suite shares one database (`db_url`) where the API must stay open, so every test here
that creates a key does it in a database of its own.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import httpx
import pytest
from fastapi import APIRouter, FastAPI

from sluice.access.keys import CACHE_SECONDS, KeyCache, hash_secret, issue_key, new_secret
from sluice.access.scopes import ADMIN, Kind, Reach, Requirement, parse_scope, satisfies
from sluice.api.access import install_auth, require
from sluice.storage import migrate
from sluice.storage.db import plain_url
from sluice.storage.keys import revoke_key
from tests.conftest import ROOT, Harness, create_database, run_app, unique, wait_until
from tests.helpers import assert_problem, sub_path, topic_path

# ---- scopes and globs (pure) --------------------------------------------------------------


@pytest.mark.parametrize(
    "text", ["admin", "publish:orders-*", "consume:orders", "read:*", "read:[ab]-?", "read:[!x]*"]
)
def test_valid_scopes_parse_and_print_back(text: str) -> None:
    assert str(parse_scope(text)) == text


@pytest.mark.parametrize(
    "text",
    ["", "admin:*", "write:orders", "publish", "publish:", "read:a b", "read:a/b", "Admin"],
)
def test_invalid_scopes_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_scope(text)


@pytest.mark.parametrize(
    ("glob", "topic", "matches"),
    [
        ("orders-*", "orders-eu", True),
        ("orders-*", "orders-", True),
        ("orders-*", "orders", False),
        ("orders-*", "my-orders-eu", False),
        ("orders-*", "ORDERS-eu", False),  # case-sensitive, like topic names
        ("orders-?", "orders-1", True),
        ("orders-?", "orders-12", False),
        ("[ab]-*", "b-x", True),
        ("[ab]-*", "c-x", False),
        ("[!a]*", "billing", True),
        ("[!a]*", "audit", False),
        ("*", "anything_at-all", True),
        ("orders", "orders", True),
        ("orders", "orders-eu", False),
    ],
)
def test_topic_globs_are_shell_style(glob: str, topic: str, matches: bool) -> None:
    scopes = [parse_scope(f"publish:{glob}")]
    assert satisfies(scopes, Requirement("publish", "topic", topic)) is matches


def test_a_scope_grants_only_its_own_kind_and_admin_grants_everything() -> None:
    publish = [parse_scope("publish:*")]
    assert not satisfies(publish, Requirement("consume", "topic", "t"))
    assert not satisfies(publish, Requirement("read", "topic", "t"))
    assert not satisfies(publish, ADMIN)
    admin = [parse_scope("admin")]
    for need in (ADMIN, Requirement("read", "all"), Requirement("consume", "topic", "t")):
        assert satisfies(admin, need)


def test_reading_all_topics_needs_the_star_glob() -> None:
    assert satisfies([parse_scope("read:*")], Requirement("read", "all"))
    assert not satisfies([parse_scope("read:orders-*")], Requirement("read", "all"))
    assert satisfies([parse_scope("read:orders-*")], Requirement("read", "any"))


def _app_with(path: str, *dependencies: Any) -> FastAPI:
    router = APIRouter()

    @router.get(path, dependencies=list(dependencies))
    async def endpoint() -> dict[str, str]:
        return {}

    app = FastAPI()
    app.include_router(router)
    return app


@pytest.mark.parametrize("path", ["/v1/forgotten", "/v1/topics/{topic}/forgotten", "/metrics"])
def test_an_app_with_a_protected_route_that_declares_no_scope_does_not_start(path: str) -> None:
    # No default: who may call an operation is decided where it is declared, or it is not
    # served at all.
    with pytest.raises(RuntimeError, match="declares no require"):
        install_auth(_app_with(path))
    install_auth(_app_with(path.replace("{topic}", "x"), require(Kind.admin)))


def test_a_scope_declared_where_keys_are_never_checked_is_refused() -> None:
    with pytest.raises(RuntimeError, match="never authenticated"):
        install_auth(_app_with("/healthz2", require(Kind.read, Reach.all)))
    with pytest.raises(RuntimeError, match="names no topic"):
        install_auth(_app_with("/v1/everything", require(Kind.read)))


def test_v1_routes_check_their_scope_themselves_not_as_a_fastapi_dependency() -> None:
    # FastAPI's dependency machinery would cost more per request than the check itself
    # (publish, pull and ack are hot paths), and would run only after the body is parsed.
    from sluice.api.access import Access
    from sluice.api.limits import StrictJSONRoute
    from sluice.api.observability import flat_routes
    from sluice.main import create_app

    checked = 0
    for route in flat_routes(create_app()):
        original = getattr(route, "original_route", route)
        if not isinstance(original, StrictJSONRoute):
            continue
        assert isinstance(original.access, Access), route.path_format
        calls = [d.call for d in original.dependant.dependencies]
        assert not any(isinstance(c, Access) for c in calls), route.path_format
        checked += 1
    assert checked == len(OPS)


def test_every_operation_of_the_app_declares_its_scope() -> None:
    from sluice.cli import openapi_document

    doc = openapi_document()
    protected = [
        (method, path)
        for path, item in doc["paths"].items()
        if path.startswith("/v1") or path == "/metrics"
        for method in item
    ]
    assert len(protected) == len(OPS) + 1  # every /v1 operation and /metrics
    for method, path in protected:
        assert "**Required scope:**" in doc["paths"][path][method]["description"], path


def test_secrets_are_random_and_only_their_hash_is_derived() -> None:
    a, b = new_secret(), new_secret()
    assert a != b and a.startswith("sk_") and len(a) >= 40
    assert hash_secret(a) == hashlib.sha256(a.encode()).hexdigest()


# ---- the API with keys, in-process against a database of its own ------------------------


@pytest.fixture(scope="module")
async def auth_db(pg_server: str) -> str:
    url = await create_database(pg_server, f"auth_{uuid.uuid4().hex[:10]}")
    await migrate.upgrade(url)
    return url


async def _issue(url: str, *scopes: str, name: str | None = None) -> tuple[int, str]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        key, secret = await issue_key(conn, scopes, name)
    finally:
        await conn.close()
    return key.id, secret


async def _revoke(url: str, key_id: int) -> None:
    conn = await asyncpg.connect(plain_url(url))
    try:
        assert await revoke_key(conn, key_id) is not None
    finally:
        await conn.close()


def bearer(secret: str) -> dict[str, str]:
    return {"authorization": f"Bearer {secret}"}


@dataclass
class Secured:
    """A running app whose database has keys; `keys` maps a role name to its secret."""

    h: Harness
    keys: dict[str, str]
    topic: str
    sub: str
    offset: int

    def as_(self, role: str) -> dict[str, str]:
        return bearer(self.keys[role])


ROLES = {
    "admin": ("admin",),
    "publisher": ("publish:orders-*",),
    "consumer": ("consume:orders-*",),
    "reader": ("read:orders-*",),
    # Every kind, but on topics that do not match: grants nothing on orders-*.
    "elsewhere": ("publish:billing-*", "consume:billing-*", "read:billing-*"),
}


@pytest.fixture(scope="module")
async def secured(auth_db: str) -> AsyncIterator[Secured]:
    keys = {role: (await _issue(auth_db, *scopes, name=role))[1] for role, scopes in ROLES.items()}
    async with run_app(auth_db) as h:
        admin = bearer(keys["admin"])
        topic, sub = unique("orders"), "workers"
        r = await h.client.put(topic_path(topic), json={}, headers=admin)
        assert r.status_code == 201, r.text
        r = await h.client.put(sub_path(topic, sub), json={"start": "earliest"}, headers=admin)
        assert r.status_code == 201, r.text
        r = await h.client.post(
            topic_path(topic) + "/messages", json={"messages": [{"value": 1}]}, headers=admin
        )
        assert r.status_code == 201, r.text
        offset = r.json()["messages"][0]["offset"]
        yield Secured(h, keys, topic, sub, offset)


FAKE_RECEIPT = "AAAAAAAAAAC7JjI0aF2HRbqv1pSe3Q0e"


@dataclass(frozen=True)
class Op:
    name: str
    method: str
    path: str  # {t}: topic, {s}: subscription, {o}: offset of a stored message
    body: Any
    allowed: frozenset[str]  # roles besides admin that may call it
    disposable: bool = False  # acts on a topic/subscription created for this call


def _roles(*roles: str) -> frozenset[str]:
    return frozenset(("admin", *roles))


OPS = [
    Op("list-topics", "GET", "/v1/topics", None, _roles("reader", "elsewhere")),
    Op("put-topic", "PUT", "/v1/topics/{t}", {}, _roles()),
    Op("get-topic", "GET", "/v1/topics/{t}", None, _roles("reader")),
    Op("delete-topic", "DELETE", "/v1/topics/{t}", None, _roles(), disposable=True),
    Op("publish", "POST", "/v1/topics/{t}/messages", {"messages": [{"value": 2}]},
       _roles("publisher")),
    Op("browse", "GET", "/v1/topics/{t}/messages", None, _roles("reader")),
    Op("get-message", "GET", "/v1/topics/{t}/messages/{o}", None, _roles("reader")),
    Op("list-subscriptions", "GET", "/v1/topics/{t}/subscriptions", None, _roles("reader")),
    Op("put-subscription", "PUT", "/v1/topics/{t}/subscriptions/{s}", {}, _roles()),
    Op("get-subscription", "GET", "/v1/topics/{t}/subscriptions/{s}", None, _roles("reader")),
    Op("delete-subscription", "DELETE", "/v1/topics/{t}/subscriptions/{s}", None, _roles(),
       disposable=True),
    Op("pull", "POST", "/v1/topics/{t}/subscriptions/{s}/pull",
       {"max_messages": 1, "wait_seconds": 0}, _roles("consumer")),
    Op("ack", "POST", "/v1/topics/{t}/subscriptions/{s}/ack",
       {"receipts": [FAKE_RECEIPT]}, _roles("consumer")),
    Op("nack", "POST", "/v1/topics/{t}/subscriptions/{s}/nack",
       {"receipts": [FAKE_RECEIPT]}, _roles("consumer")),
    Op("extend", "POST", "/v1/topics/{t}/subscriptions/{s}/extend",
       {"receipts": [FAKE_RECEIPT], "ack_deadline_seconds": 30}, _roles("consumer")),
    Op("seek", "POST", "/v1/topics/{t}/subscriptions/{s}/seek", {"to": "earliest"},
       _roles("consumer")),
    Op("dead-letters", "GET", "/v1/topics/{t}/subscriptions/{s}/dead-letters", None,
       _roles("consumer")),
    Op("redrive", "POST", "/v1/topics/{t}/subscriptions/{s}/dead-letters/redrive", {},
       _roles("consumer")),
]  # fmt: skip


def test_the_table_covers_every_v1_operation_of_the_api() -> None:
    from sluice.cli import openapi_document

    documented = {
        (method.upper(), path)
        for path, item in openapi_document()["paths"].items()
        if path.startswith("/v1")
        for method in item
    }
    tested = {
        (op.method, op.path.replace("{t}", "{topic}").replace("{s}", "{subscription}")
         .replace("{o}", "{offset}"))
        for op in OPS
    }  # fmt: skip
    assert documented <= tested, f"operations without an access test: {documented - tested}"


@pytest.mark.parametrize("role", list(ROLES))
@pytest.mark.parametrize("op", OPS, ids=[op.name for op in OPS])
async def test_each_scope_allows_exactly_its_operations(
    secured: Secured, op: Op, role: str
) -> None:
    client = secured.h.client
    topic, sub = secured.topic, secured.sub
    if op.disposable:
        # Its own topic and subscription, so an allowed delete leaves the shared ones alone.
        topic, sub = unique("orders"), "doomed"
        admin = secured.as_("admin")
        assert (await client.put(topic_path(topic), json={}, headers=admin)).status_code == 201
        r = await client.put(sub_path(topic, sub), json={}, headers=admin)
        assert r.status_code == 201
    path = op.path.format(t=topic, s=sub, o=secured.offset)
    r = await client.request(op.method, path, json=op.body, headers=secured.as_(role))
    if role in op.allowed:
        assert r.status_code < 400, (op.name, role, r.status_code, r.text)
    else:
        body = assert_problem(r, 403)
        assert "admin" in body["detail"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    if op.disposable and role in op.allowed:
        r = await client.get(path, headers=secured.as_("admin"))
        assert r.status_code == 404  # really deleted


async def test_a_reader_lists_only_the_topics_its_globs_match(secured: Secured) -> None:
    client = secured.h.client
    other = unique("billing")
    r = await client.put(topic_path(other), json={}, headers=secured.as_("admin"))
    assert r.status_code == 201
    r = await client.get("/v1/topics", params={"limit": 1000}, headers=secured.as_("reader"))
    names = {t["name"] for t in r.json()["topics"]}
    assert secured.topic in names and other not in names
    r = await client.get("/v1/topics", params={"limit": 1000}, headers=secured.as_("admin"))
    assert {secured.topic, other} <= {t["name"] for t in r.json()["topics"]}


async def _walk_topics(client: httpx.AsyncClient, headers: dict[str, str], limit: int) -> Any:
    """Every page of GET /v1/topics: (names listed, cursors handed out, pages)."""
    names: list[str] = []
    cursors: list[str] = []
    after: str | None = None
    for pages in range(1, 1000):
        params: dict[str, Any] = {"limit": limit, **({"after": after} if after else {})}
        r = await client.get("/v1/topics", params=params, headers=headers)
        assert r.status_code == 200, r.text
        names += [t["name"] for t in r.json()["topics"]]
        after = r.json()["next_after"]
        if after is None:
            return names, cursors, pages
        cursors.append(after)
    raise AssertionError("paging did not end")


@pytest.mark.parametrize("batch", [2, 1000], ids=["many-batches", "one-batch"])
async def test_a_scoped_key_learns_no_topic_outside_its_globs_even_from_the_cursor(
    secured: Secured, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    from sluice.queue import topics as topic_ops

    monkeypatch.setattr(topic_ops, "VISIBLE_SCAN_BATCH", batch)
    client, admin = secured.h.client, secured.as_("admin")
    # Unreadable names on both sides of the readable ones, so pages would end on them.
    mark = uuid.uuid4().hex[:6]
    created = [f"{p}-{mark}" for p in ("aaa", "orders", "orders-a", "ordersz", "zzz")]
    created += [f"orders-{mark}-{i}" for i in range(3)]
    for name in created:
        assert (await client.put(topic_path(name), json={}, headers=admin)).status_code == 201
    everything, _, _ = await _walk_topics(client, admin, 1000)
    readable = [n for n in everything if n.startswith("orders-")]
    assert len(readable) >= 5 and len(readable) < len(everything)

    for limit in (1, 2, 1000):
        names, cursors, pages = await _walk_topics(client, secured.as_("reader"), limit)
        assert names == readable, limit  # every readable topic, in order, once
        leaked = [c for c in cursors if not c.startswith("orders-")]
        assert not leaked, f"limit={limit}: the cursor named {leaked}"
        # Pages are full until the last: unreadable topics are skipped, not handed out.
        assert pages == len(readable) // limit + 1


async def test_globs_decide_per_topic(secured: Secured) -> None:
    client = secured.h.client
    admin = secured.as_("admin")
    match, miss = unique("orders"), unique("order")  # "order-…" is not "orders-*"
    for topic in (match, miss):
        assert (await client.put(topic_path(topic), json={}, headers=admin)).status_code == 201
    body = {"messages": [{"value": "x"}]}
    publisher = secured.as_("publisher")
    r = await client.post(topic_path(match) + "/messages", json=body, headers=publisher)
    assert r.status_code == 201
    r = await client.post(topic_path(miss) + "/messages", json=body, headers=publisher)
    assert_problem(r, 403)
    r = await client.post(topic_path(miss) + "/messages", json=body, headers=admin)
    assert r.status_code == 201


@pytest.mark.parametrize(
    ("content", "content_type", "status_with_scope"),
    [
        (b'{"messages": [', "application/json", 400),
        (b"hello", "text/plain", 415),
        (b'{"messages": []}', "application/json", 422),
    ],
    ids=["malformed", "not-json", "invalid"],
)
async def test_a_key_lacking_the_scope_gets_403_whatever_body_it_sends(
    secured: Secured, content: bytes, content_type: str, status_with_scope: int
) -> None:
    """The scope is checked before the body is read: 403, not 400/415/422."""
    path = topic_path(secured.topic) + "/messages"
    for role, status in (("reader", 403), ("publisher", status_with_scope)):
        headers = {**secured.as_(role), "content-type": content_type}
        r = await secured.h.client.post(path, content=content, headers=headers)
        assert_problem(r, status)


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [
        ("GET", "/v1/admin/anything", 404),
        ("GET", "/v1/topics/orders-x/subscriptions/s/unknown", 404),
        ("PATCH", "/v1/topics/orders-x", 405),
    ],
)
async def test_an_operation_that_does_not_exist_is_answered_alike_for_every_key(
    secured: Secured, method: str, path: str, status: int
) -> None:
    """A valid key learns only that no such operation exists (the OpenAPI document says as
    much to anyone); without a key it is 401 like every /v1 path."""
    for role in ("admin", "reader", "elsewhere"):
        r = await secured.h.client.request(method, path, headers=secured.as_(role))
        assert_problem(r, status)
    assert_problem(await secured.h.client.request(method, path), 401)


async def test_a_key_may_hold_several_scopes(auth_db: str, secured: Secured) -> None:
    _, secret = await _issue(auth_db, "publish:orders-*", "read:orders-*")
    secured.h.app.state.keys.invalidate()
    client, headers = secured.h.client, bearer(secret)
    path = topic_path(secured.topic) + "/messages"
    assert (await client.post(path, json={"messages": [{"value": 3}]}, headers=headers)).is_success
    assert (await client.get(path, headers=headers)).is_success
    r = await client.post(sub_path(secured.topic, secured.sub) + "/pull", json={}, headers=headers)
    assert_problem(r, 403)


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"authorization": "Bearer sk_not-a-key"},
        {"authorization": "Bearer "},
        {"authorization": "Basic YWRtaW46YWRtaW4="},
        {"authorization": "Bearer " + "x" * 5000},
    ],
    ids=["missing", "unknown", "empty", "basic", "oversized"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [("GET", "/v1/topics"), ("PUT", "/v1/topics/orders-x"), ("GET", "/metrics"),
     ("GET", "/v1/no-such-thing")],
)  # fmt: skip
async def test_requests_without_a_valid_key_get_401(
    secured: Secured, headers: dict[str, str], method: str, path: str
) -> None:
    r = await secured.h.client.request(method, path, headers=headers, json={})
    body = assert_problem(r, 401)
    assert r.headers["www-authenticate"].startswith("Bearer")
    assert "sk_not-a-key" not in body["detail"]


async def test_the_scheme_name_is_case_insensitive(secured: Secured) -> None:
    headers = {"authorization": f"bearer {secured.keys['admin']}"}
    assert (await secured.h.client.get("/v1/topics", headers=headers)).status_code == 200


async def test_metrics_need_read_on_all_topics(auth_db: str, secured: Secured) -> None:
    _, all_reader = await _issue(auth_db, "read:*")
    secured.h.app.state.keys.invalidate()
    client = secured.h.client
    assert_problem(await client.get("/metrics", headers=secured.as_("reader")), 403)
    assert_problem(await client.get("/metrics", headers=secured.as_("publisher")), 403)
    for headers in (bearer(all_reader), secured.as_("admin")):
        r = await client.get("/metrics", headers=headers)
        assert r.status_code not in (401, 403), r.text


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/docs", "/openapi.json"])
async def test_health_and_docs_stay_open(secured: Secured, path: str) -> None:
    r = await secured.h.client.get(path)
    assert r.status_code == 200, r.text


async def test_a_revoked_key_is_refused_within_the_cache_lifetime(
    auth_db: str, secured: Secured
) -> None:
    key_id, secret = await _issue(auth_db, "read:*")
    client = secured.h.client

    async def status() -> int:
        return (await client.get("/v1/topics", headers=bearer(secret))).status_code

    await wait_until(lambda: _equals(status, 200), timeout=CACHE_SECONDS + 3)
    await _revoke(auth_db, key_id)
    started = time.monotonic()
    await wait_until(lambda: _equals(status, 401), timeout=10)
    assert time.monotonic() - started <= CACHE_SECONDS + 1
    # No cache refresh brings it back.
    secured.h.app.state.keys.invalidate()
    assert_problem(await client.get("/v1/topics", headers=bearer(secret)), 401)


async def _equals(probe: Any, expected: int) -> bool:
    return await probe() == expected


async def test_openapi_documents_the_bearer_scheme_and_scopes() -> None:
    from sluice.cli import openapi_document

    doc = openapi_document()
    assert doc["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith("/v1/") or path == "/metrics":
                assert op["security"] == [{"bearerAuth": []}], (method, path)
                assert {"401", "403"} <= set(op["responses"]), (method, path)
                assert "Required scope" in op["description"], (method, path)
            else:
                assert "security" not in op, (method, path)
    assert "`read:*` or `admin`" in doc["paths"]["/metrics"]["get"]["description"]
    publish = doc["paths"]["/v1/topics/{topic}/messages"]["post"]["description"]
    assert "`publish:<glob>`" in publish
    assert "`admin`." in doc["paths"]["/v1/topics/{topic}"]["put"]["description"]


# ---- open while no key exists ---------------------------------------------------------------


async def test_api_is_open_without_keys_and_closes_once_one_exists(
    fresh_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="sluice.auth"):
        async with run_app(fresh_db_url) as h:
            assert any(
                "no API keys exist" in r.getMessage() and r.levelno == logging.WARNING
                for r in caplog.records
            )
            topic = unique("open")
            r = await h.client.put(topic_path(topic), json={})
            assert r.status_code == 201
            r = await h.client.post(
                topic_path(topic) + "/messages", json={"messages": [{"value": 1}]}
            )
            assert r.status_code == 201

            _, secret = await _issue(fresh_db_url, "admin")

            async def anonymous() -> int:
                return (await h.client.get(topic_path(topic))).status_code

            await wait_until(lambda: _equals(anonymous, 401), timeout=10)
            r = await h.client.get(topic_path(topic), headers=bearer(secret))
            assert r.status_code == 200
    assert secret not in caplog.text


async def test_revoking_every_key_keeps_the_api_closed(
    fresh_db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    await migrate.upgrade(fresh_db_url)
    key_id, secret = await _issue(fresh_db_url, "admin")
    with caplog.at_level(logging.INFO, logger="sluice.auth"):
        async with run_app(fresh_db_url) as h:
            assert (await h.client.get("/v1/topics", headers=bearer(secret))).status_code == 200
            await _revoke(fresh_db_url, key_id)  # the only key: a compromised admin key
            h.app.state.keys.invalidate()
            for headers in ({}, bearer(secret)):
                for method, path in (("GET", "/v1/topics"), ("PUT", "/v1/topics/x"),
                                     ("GET", "/metrics")):  # fmt: skip
                    r = await h.client.request(method, path, headers=headers, json={})
                    assert_problem(r, 401)
            assert not any("open to anyone" in r.getMessage() for r in caplog.records)
        # A server started now, with revoked keys only, is closed too (and says so).
        caplog.clear()
        async with run_app(fresh_db_url) as h:
            assert_problem(await h.client.get("/v1/topics"), 401)
            assert (await h.client.get("/healthz")).status_code == 200
        assert not any("open to anyone" in r.getMessage() for r in caplog.records)
        assert any(
            "every API key is revoked" in r.getMessage() and r.levelno == logging.WARNING
            for r in caplog.records
        )


# ---- the CLI and a real server process ------------------------------------------------------


def sluice(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "DATABASE_URL": url, "SLUICE_LOG_LEVEL": "WARNING"}
    return subprocess.run(
        [sys.executable, "-m", "sluice.cli", *args],
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,  # it must never prompt
        capture_output=True,
        text=True,
        timeout=60,
    )


async def _stored_keys(url: str) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        return await conn.fetch("SELECT * FROM sluice.api_keys ORDER BY id")
    finally:
        await conn.close()


async def test_cli_creates_lists_and_revokes_keys(fresh_db_url: str) -> None:
    created = sluice(
        fresh_db_url, "keys", "create", "--scope", "publish:orders-*", "--scope", "read:*",
        "--name", "ingest",
    )  # fmt: skip
    assert created.returncode == 0, created.stderr
    secret = created.stdout.strip()
    assert created.stdout == secret + "\n"  # only the secret on stdout: scriptable
    assert secret.startswith("sk_") and len(secret) >= 40
    assert secret not in created.stderr

    [row] = await _stored_keys(fresh_db_url)
    assert row["secret_hash"] == hashlib.sha256(secret.encode()).hexdigest()
    assert secret not in json.dumps([str(v) for v in row.values()])
    assert list(row["scopes"]) == ["publish:orders-*", "read:*"]
    assert row["name"] == "ingest" and row["revoked_at"] is None

    listed = sluice(fresh_db_url, "keys", "list")
    assert listed.returncode == 0, listed.stderr
    assert "ingest" in listed.stdout and "publish:orders-*" in listed.stdout
    assert "active" in listed.stdout
    for output in (listed.stdout, listed.stderr):
        assert secret not in output and row["secret_hash"] not in output

    revoked = sluice(fresh_db_url, "keys", "revoke", str(row["id"]))
    assert revoked.returncode == 0, revoked.stderr
    # It was the last active key: the API stays closed, and the CLI says how to get in.
    assert "open to anyone" not in revoked.stderr
    assert "no active API keys remain" in revoked.stderr
    assert "sluice keys create" in revoked.stderr

    as_json = sluice(fresh_db_url, "keys", "list", "--json")
    [entry] = json.loads(as_json.stdout)
    assert entry["id"] == row["id"] and entry["revoked_at"] is not None
    assert set(entry) == {"id", "name", "scopes", "created_at", "revoked_at"}

    missing = sluice(fresh_db_url, "keys", "revoke", str(row["id"] + 1000))
    assert missing.returncode == 1 and "no API key" in missing.stderr


async def test_cli_opens_the_api_again_only_when_told_explicitly(fresh_db_url: str) -> None:
    created = sluice(fresh_db_url, "keys", "create", "--scope", "admin", "--name", "ops")
    assert created.returncode == 0, created.stderr
    [row] = await _stored_keys(fresh_db_url)
    assert sluice(fresh_db_url, "keys", "revoke", str(row["id"])).returncode == 0

    refused = sluice(fresh_db_url, "keys", "open")
    assert refused.returncode == 2, (refused.stdout, refused.stderr)
    assert "--yes-i-mean-it" in refused.stderr and refused.stdout == ""
    assert len(await _stored_keys(fresh_db_url)) == 1  # nothing changed

    opened = sluice(fresh_db_url, "keys", "open", "--yes-i-mean-it")
    assert opened.returncode == 0, opened.stderr
    assert "deleted 1 API key" in opened.stderr and "open to anyone" in opened.stderr
    assert await _stored_keys(fresh_db_url) == []
    async with run_app(fresh_db_url) as h:
        assert (await h.client.get("/v1/topics")).status_code == 200  # open again

    # Opening an API that is already open changes nothing and says so.
    again = sluice(fresh_db_url, "keys", "open", "--yes-i-mean-it")
    assert again.returncode == 0, again.stderr
    assert "already open" in again.stderr


async def test_cli_refuses_bad_scopes_and_stores_nothing(fresh_db_url: str) -> None:
    await migrate.upgrade(fresh_db_url)
    for args in (["--scope", "write:orders"], ["--scope", "read:a b"], []):
        result = sluice(fresh_db_url, "keys", "create", *args)
        assert result.returncode == 2, (args, result.stdout, result.stderr)
        assert result.stdout == ""
    assert await _stored_keys(fresh_db_url) == []


async def test_keys_take_effect_on_a_running_server_within_10_seconds(
    fresh_db_url: str, server_factory: Any
) -> None:
    server = server_factory(url=fresh_db_url)
    topics = server.base_url + "/v1/topics"
    async with httpx.AsyncClient(timeout=5) as http:
        assert (await http.get(topics)).status_code == 200  # open: no key yet

        created = sluice(fresh_db_url, "keys", "create", "--scope", "admin")
        assert created.returncode == 0, created.stderr
        secret = created.stdout.strip()
        started = time.monotonic()

        async def anonymous() -> int:
            return (await http.get(topics)).status_code

        await wait_until(lambda: _equals(anonymous, 401), timeout=10, interval=0.2)
        assert time.monotonic() - started < 10
        assert (await http.get(topics, headers=bearer(secret))).status_code == 200
        assert (await http.get(server.base_url + "/healthz")).status_code == 200

        # A second key keeps the API closed once the first is revoked.
        _, other = await _issue(fresh_db_url, "read:*")
        [row, _] = await _stored_keys(fresh_db_url)
        revoked = sluice(fresh_db_url, "keys", "revoke", str(row["id"]))
        assert revoked.returncode == 0, revoked.stderr
        assert "open to anyone" not in revoked.stderr
        started = time.monotonic()

        async def with_key() -> int:
            return (await http.get(topics, headers=bearer(secret))).status_code

        await wait_until(lambda: _equals(with_key, 401), timeout=10, interval=0.2)
        assert time.monotonic() - started < 10
        assert (await http.get(topics, headers=bearer(other))).status_code == 200

    server.stop()
    log = server.log_path.read_text()
    assert "no API keys exist" in log  # the warning at start
    assert secret not in log and other not in log


async def test_keys_that_cannot_be_read_fail_closed_with_503(auth_db: str) -> None:
    broken = await asyncpg.create_pool(plain_url(auth_db), min_size=1, max_size=1)
    await broken.close()  # every query on it now fails
    async with run_app(auth_db) as h:
        h.app.state.keys = KeyCache(broken)
        r = await h.client.get("/v1/topics")
        assert_problem(r, 503)
        assert r.headers["retry-after"] == "1"
        assert (await h.client.get("/healthz")).status_code == 200
