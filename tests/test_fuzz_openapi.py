"""Property tests generated from the OpenAPI document (schemathesis), against the app in-process.

Every operation of the served document is exercised with valid and invalid inputs (explicit
examples, coverage of boundaries, and random fuzzing). Whatever comes in:
- the answer is never a 5xx (bad input gets 4xx, SPEC 4);
- every error is RFC 9457 problem+json with type/title/status/detail;
- the status code, content type, headers and body are the ones the document declares;
- invalid input is rejected, valid input is accepted (or answered with a documented
  not-found/conflict/too-large/rate-limited).

Path parameters hit existing resources part of the time: a seeded topic `orders` (the
documented example) with a subscription `billing` and a few messages; the seed is restored
after operations that delete or reconfigure it. An admin API key exists, so the API is
closed: generated requests carry the key, and the cases built without it must get 401.
The run is derandomized (fixed seed) and bounded (max-examples per operation).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import re
import uuid
from collections.abc import Iterator
from typing import Any

import asyncpg
import hypothesis.strategies as st
import pytest
import schemathesis
from schemathesis.checks import not_a_server_error
from schemathesis.config import SchemathesisConfig
from schemathesis.python import asgi as schemathesis_asgi
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    missing_required_header,
    negative_data_rejection,
    positive_data_acceptance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
    unsupported_method,
)

from sluice.access.keys import hash_secret, new_secret
from sluice.main import create_app
from sluice.queue.clock import Clock
from sluice.storage import keys as keys_sql
from sluice.storage import migrate
from tests.conftest import create_database, make_settings

TOPIC = "orders"
SUBSCRIPTION = "billing"
DEAD_LETTER_TOPIC = "orders-dlq"
NAME = re.compile(r"^[A-Za-z0-9_-]{1,80}$")
# Fuzzed long-polls would wait up to 20 s each on an empty subscription: valid waits are
# shortened (invalid ones are left alone so they are still rejected).
MAX_FUZZ_WAIT = 0.05

# An admin key exists, so the API is closed: generated requests carry this key (the
# security scheme of the document), and the cases built without it must get 401.
ADMIN_SECRET = new_secret()

CONFIG = SchemathesisConfig.from_dict(
    {
        "auth": {"openapi": {"bearerAuth": {"bearer": ADMIN_SECRET}}},
        "seed": 20260522,
        "generation": {
            "mode": "all",
            "max-examples": 25,
            "deterministic": True,
            "database": "none",
        },
        "phases": {
            "examples": {"enabled": True},
            "coverage": {"enabled": True},
            "fuzzing": {"enabled": True},
            "stateful": {"enabled": False},
        },
        "checks": {
            # Valid input may still meet a missing resource, a conflict, a size limit of the
            # topic (max_message_bytes is configurable) or a rate limit: all documented.
            "positive_data_acceptance": {
                "expected-statuses": ["2xx", "404", "409", "413", "429"],
            },
        },
    }
)


def _document() -> dict[str, Any]:
    # The document needs no database: only the lifespan does.
    app = create_app(make_settings("postgresql://unused@localhost:1/unused"), clock=Clock())
    return app.openapi()


schema = schemathesis.openapi.from_dict(_document(), config=CONFIG)


@schema.hook
def flatmap_path_parameters(context: Any, path_parameters: dict[str, Any]) -> Any:
    """Half of the time, point valid names/offsets at the seeded resources."""
    known: dict[str, Any] = {}
    for key, value in (path_parameters or {}).items():
        if key == "topic" and isinstance(value, str) and NAME.match(value):
            known[key] = TOPIC
        elif key == "subscription" and isinstance(value, str) and NAME.match(value):
            known[key] = SUBSCRIPTION
        elif key == "offset" and type(value) is int and value >= 0:
            known[key] = value % 4
    if not known:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, **known}])


def _bounded_wait(path: str, body: Any) -> Any:
    """A valid long-poll wait shortened to MAX_FUZZ_WAIT (invalid ones stay invalid)."""
    if path.endswith("/pull") and isinstance(body, dict):
        wait = body.get("wait_seconds")
        is_number = isinstance(wait, int | float) and not isinstance(wait, bool)
        if is_number and 0 <= wait <= 20:
            return {**body, "wait_seconds": min(wait, MAX_FUZZ_WAIT)}
    return body


@schema.hook
def map_body(context: Any, body: Any) -> Any:
    """Keep valid bodies valid, but bounded in time and pointing at existing topics."""
    path = context.operation.path if context.operation is not None else ""
    if not isinstance(body, dict):
        return body
    if path.endswith("/pull"):
        return _bounded_wait(path, body)
    if path.endswith("/subscriptions/{subscription}"):
        # A dead-letter topic must exist (422 otherwise, tested elsewhere): use the seeded one.
        dlq = body.get("dead_letter_topic")
        if isinstance(dlq, str) and NAME.match(dlq):
            return {**body, "dead_letter_topic": DEAD_LETTER_TOPIC}
    return body


# 422s that valid-looking input rightly gets, because the rule involves the stored
# configuration (a PUT changes only the fields it gives), which no schema can state.
CONFIG_CONFLICTS = (
    "retry_min_seconds must not exceed retry_max_seconds",
    "rate_limit_burst needs rate_limit_per_second",
    "cannot be its own dead_letter_topic",
)
INT64_MAX = 2**63 - 1


def _ints_beyond_int64(value: Any) -> bool:
    if isinstance(value, dict):
        return any(_ints_beyond_int64(v) for v in value.values())
    if isinstance(value, list):
        return any(_ints_beyond_int64(v) for v in value)
    if isinstance(value, str) and value.isdigit():
        return int(value) > INT64_MAX
    return isinstance(value, int) and value > INT64_MAX


@schema.hook
def filter_failure(context: Any, failure: Any, case: Any, response: Any) -> bool:
    """Keep every failure except two rejections of "valid" input that are not bugs."""
    if getattr(failure, "code", None) != "ST202" or response.status_code != 422:
        return True
    detail = str(response.json().get("detail", ""))
    if any(conflict in detail for conflict in CONFIG_CONFLICTS):
        return False
    # The generator compares with `maximum: 9223372036854775807` as a float (2**63 after
    # rounding), so it may produce integers just above int64; those are invalid.
    parts = (case.body, case.query, case.path_parameters)
    return not any(_ints_beyond_int64(part) for part in parts)


def problem_details(ctx: Any, response: Any, case: Any) -> bool | None:
    """Every 4xx/5xx is application/problem+json with type, title, status and detail."""
    if response.status_code < 400:
        return None
    content_type = (response.headers.get("content-type") or [""])[0]
    assert content_type.startswith("application/problem+json"), (
        f"{response.status_code} answered with Content-Type {content_type!r}"
    )
    body = response.json()
    assert isinstance(body, dict), body
    for field, kind in (("type", str), ("title", str), ("status", int), ("detail", str)):
        assert isinstance(body.get(field), kind), f"problem field {field!r} missing: {body}"
        assert body[field] != "", f"problem field {field!r} empty: {body}"
    assert body["status"] == response.status_code, body
    assert body["type"].startswith("https://"), body
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    response_headers_conformance,
    negative_data_rejection,
    positive_data_acceptance,
    unsupported_method,
    missing_required_header,
    problem_details,
]


def _run_sync(coro: Any) -> Any:
    # A thread of its own, so no event loop of the test session is touched.
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class Seed:
    """The seeded topic/subscription, re-created when a fuzzed request removed them."""

    def __init__(self, app: Any) -> None:
        self.app = app

    def restore(self) -> None:
        with schemathesis_asgi.get_client(self.app) as client:
            client.headers["Authorization"] = f"Bearer {ADMIN_SECRET}"
            r = client.put(f"/v1/topics/{DEAD_LETTER_TOPIC}", json={})
            assert r.status_code in (200, 201), r.text
            r = client.put(f"/v1/topics/{TOPIC}", json={"max_message_bytes": 1048576})
            assert r.status_code in (200, 201), r.text
            if r.json()["message_count"] < 4:
                messages = [{"value": i, "key": f"k{i % 2}"} for i in range(4)]
                r = client.post(f"/v1/topics/{TOPIC}/messages", json={"messages": messages})
                assert r.status_code == 201, r.text
            r = client.put(
                f"/v1/topics/{TOPIC}/subscriptions/{SUBSCRIPTION}",
                json={"start": "earliest", "rate_limit_per_second": 1000, "max_in_flight": 100},
            )
            assert r.status_code in (200, 201), r.text


async def _admin_database(pg_server: str) -> str:
    url = await create_database(pg_server, f"fuzz_{uuid.uuid4().hex[:10]}")
    await migrate.upgrade(url)
    conn = await asyncpg.connect(url)
    try:
        await keys_sql.create_key(conn, "fuzz-admin", hash_secret(ADMIN_SECRET), ["admin"])
    finally:
        await conn.close()
    return url


@pytest.fixture(scope="module")
def seed(pg_server: str) -> Iterator[Seed]:
    url = _run_sync(_admin_database(pg_server))
    app = create_app(make_settings(url), clock=Clock())
    seeded = Seed(app)
    seeded.restore()  # starts the app's lifespan (pool, listener, migrations) on first use
    yield seeded
    schemathesis_asgi.shutdown_lifespans()


@schema.parametrize()
def test_api_conforms_to_openapi(case: Any, seed: Seed) -> None:
    # The documented examples (`wait_seconds: 20`) do not pass through map_body: bound them
    # here too, or a pull of the seeded subscription after its messages were leased waits
    # out the client's 10 s read timeout.
    if case.operation.path.endswith("/pull") and isinstance(case.body, dict):
        case.body = _bounded_wait(case.operation.path, case.body)
    try:
        case.call_and_validate(app=seed.app, checks=CHECKS)
    finally:
        if case.method.upper() in ("DELETE", "PUT"):
            seed.restore()
