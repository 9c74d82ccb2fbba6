"""Handlers of errors no other test reaches. The catch-all: an unexpected exception answers
500 as application/problem+json with a stable type and title, never the exception's text or
a stack trace; and the database's failures answer their 422/503 problems.

The in-process client of the other tests re-raises application exceptions, so none of them
reaches this handler: these tests use a transport that hands back the answer instead."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from sluice.api.routes import consuming as consuming_routes
from sluice.api.routes import topics as topic_routes
from tests.conftest import Harness, run_app, unique
from tests.helpers import create_topic, sub_path, topic_path

SECRET = "secret detail"


class Exploding:
    """Stands in for a queue module: every operation raises an unexpected exception when it
    is called (a plain function: an awaited operation raises before anything is awaited,
    and calling a class such as PullParams leaves no coroutine behind unawaited)."""

    def __getattr__(self, name: str) -> Any:
        def fail(*args: object, **kwargs: object) -> None:
            raise RuntimeError(f"{SECRET} in {name}")

        return fail


@pytest.fixture
async def app_harness(db_url: str) -> AsyncIterator[Harness]:
    async with run_app(db_url) as h:
        yield h


@pytest.fixture
async def answering(app_harness: Harness) -> AsyncIterator[httpx.AsyncClient]:
    """A client that gets the app's 500 answers instead of the exceptions behind them."""
    transport = httpx.ASGITransport(app=app_harness.app, raise_app_exceptions=False)
    async with httpx.AsyncClient(transport=transport, base_url="http://sluice.test") as client:
        yield client


class Captured(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def assert_internal_error(r: httpx.Response) -> dict[str, Any]:
    assert r.status_code == 500, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body = r.json()
    assert body["type"] == "https://sluice.dev/problems/internal-error", body
    assert body["title"] == "Internal server error", body
    assert body["status"] == 500
    assert body["detail"] == "an unexpected error occurred"
    for leak in (SECRET, "RuntimeError", "Traceback", ".py"):
        assert leak not in r.text, r.text
    return body


async def test_unexpected_exception_answers_problem_json_without_its_text(
    app_harness, answering, monkeypatch
):
    topic = unique()
    await create_topic(app_harness.client, topic)
    captured = Captured()
    logger = logging.getLogger("sluice.api")
    logger.addHandler(captured)
    try:
        monkeypatch.setattr(topic_routes, "topic_ops", Exploding())
        monkeypatch.setattr(consuming_routes, "consuming", Exploding())
        requests = [
            ("GET", topic_path(topic), None),
            ("PUT", topic_path(topic), {}),
            ("POST", topic_path(topic) + "/messages", {"messages": [{"value": 1}]}),
            ("POST", sub_path(topic, "s") + "/pull", {"max_messages": 1}),
            ("POST", sub_path(topic, "s") + "/ack", {"receipts": ["x"]}),
        ]
        for method, path, body in requests:
            r = await answering.request(
                method, path, json=body, headers={"X-Request-ID": "req-500-check"}
            )
            problem = assert_internal_error(r)
            assert problem["instance"] == path
            # The one id that ties the answer to the logged traceback.
            assert r.headers["x-request-id"] == "req-500-check", r.headers
    finally:
        logger.removeHandler(captured)
    # The exception is logged, with its text and traceback, on the server side only.
    logged = [rec for rec in captured.records if rec.getMessage() == "unhandled error"]
    assert len(logged) == len(requests)
    assert all(rec.exc_info and SECRET in str(rec.exc_info[1]) for rec in logged)
    assert {getattr(rec, "request_id", None) for rec in logged} == {"req-500-check"}


async def test_unexpected_exception_gets_a_generated_request_id(
    app_harness, answering, monkeypatch
):
    monkeypatch.setattr(topic_routes, "topic_ops", Exploding())
    r = await answering.get(topic_path(unique()))
    assert_internal_error(r)
    assert len(r.headers["x-request-id"]) == 32, r.headers


class Raising:
    """Stands in for a queue module: every operation raises `exc`."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def __getattr__(self, name: str) -> Any:
        async def fail(*args: object, **kwargs: object) -> None:
            raise self.exc

        return fail


UNAVAILABLE = ("unavailable", "the database is unavailable; retry shortly")
CONFLICT = ("unavailable", "conflicted with a concurrent request")


@pytest.mark.parametrize(
    ("exc", "status", "slug", "detail"),
    [
        (asyncpg.DataError("invalid byte sequence"), 422, "invalid-input", "value rejected"),
        (OSError("connection refused"), 503, *UNAVAILABLE),
        (ConnectionResetError("reset by peer"), 503, *UNAVAILABLE),
        (asyncpg.PostgresConnectionError("gone"), 503, *UNAVAILABLE),
        (asyncpg.CannotConnectNowError("starting up"), 503, *UNAVAILABLE),
        # Not handled on their own: the catch-all hands them to the 503 handler.
        (asyncpg.InterfaceError("connection is closed"), 503, *UNAVAILABLE),
        (asyncpg.InternalClientError("lost"), 503, *UNAVAILABLE),
        (asyncpg.DeadlockDetectedError("deadlock detected"), 503, *CONFLICT),
        (asyncpg.SerializationError("could not serialize"), 503, *CONFLICT),
        (asyncpg.LockNotAvailableError("lock timeout"), 503, *CONFLICT),
    ],
    ids=lambda v: type(v).__name__ if isinstance(v, BaseException) else None,
)
async def test_database_errors_answer_their_problem(
    app_harness, answering, monkeypatch, exc, status, slug, detail
):
    """Each handler for the database's failures, reached through a real route."""
    monkeypatch.setattr(topic_routes, "topic_ops", Raising(exc))
    path = topic_path(unique())
    r = await answering.get(path, headers={"X-Request-ID": "req-db-check"})
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json", r.headers
    body = r.json()
    assert body["type"] == f"https://sluice.dev/problems/{slug}", body
    assert (body["status"], body["instance"]) == (status, path)
    assert body["detail"].startswith(detail), body
    assert r.headers["x-request-id"] == "req-db-check"
    if status == 503:
        assert r.headers["retry-after"] == "1", r.headers  # nothing applied: retry
