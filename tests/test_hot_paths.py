"""The fast paths of publish and ack (app/api/hot_paths.py) answer exactly what the FastAPI
routes answer. A request with `Content-Type: application/json` takes the fast path; the same
request with `application/json; charset=utf-8` is handed to the FastAPI route (the
reference). Every body below is sent both ways and the answers, and what was stored, must
be the same."""

from __future__ import annotations

import json
from typing import Any

import orjson
import pytest

from sluice.api import hot_paths
from sluice.api.routes import topics as topic_routes
from tests.conftest import unique
from tests.helpers import create_subscription, create_topic, pull, topic_path

FAST = {"content-type": "application/json"}
REFERENCE = {"content-type": "application/json; charset=utf-8"}


@pytest.fixture
def taken(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Which requests the fast paths answered themselves."""
    seen: list[str] = []
    publish_messages, ack_receipts = hot_paths.publish_messages, hot_paths.ack_receipts
    pull_values = hot_paths.pull_values

    def spy_pull(body: Any) -> Any:
        result = pull_values(body)
        seen.append("pull")
        return result

    def spy_publish(body: Any) -> Any:
        result = publish_messages(body)
        seen.append("publish")
        return result

    def spy_ack(body: Any) -> Any:
        result = ack_receipts(body)
        seen.append("ack")
        return result

    monkeypatch.setattr(hot_paths, "publish_messages", spy_publish)
    monkeypatch.setattr(hot_paths, "ack_receipts", spy_ack)
    monkeypatch.setattr(hot_paths, "pull_values", spy_pull)
    return seen


def comparable(r: Any) -> tuple[int, Any]:
    body = r.json() if r.content else None
    if isinstance(body, dict):
        body.pop("instance", None)  # names the topic, which differs
    return r.status_code, body


VALID = [
    {"messages": [{"value": {"order": 1}}]},
    {"messages": [{"value": None}, {"value": [1, 2.5, "x", True]}, {"value": "é€😀"}]},
    {"messages": [{"value": 1, "key": "k", "headers": {"a": "b", "é": "ü"}}]},
    {"messages": [{"value": 12345678901234567890123}]},  # beyond 64 bits
    {"messages": [{"value": 1, "delay_seconds": 0}, {"value": 2, "delay_seconds": 900}]},
    {"messages": [{"value": 1, "dedup_id": "d1"}, {"value": 2, "dedup_id": "d1"}]},
    {"messages": [{"value": 1, "key": ""}]},
    {"messages": [{"value": 1, "dedup_id": None, "key": None, "headers": None}]},
    {"messages": [{"value": {"deep": [[[[{"x": 0.0}]]]]}}]},
]


@pytest.mark.parametrize("body", VALID, ids=range(len(VALID)))
async def test_valid_publishes_answer_and_store_the_same_both_ways(client, taken, body):
    stored = []
    answers = []
    for headers in (FAST, REFERENCE):
        topic = unique()
        await create_topic(client, topic)
        r = await client.post(
            topic_path(topic) + "/messages", content=json.dumps(body), headers=headers
        )
        answers.append(comparable(r))
        browse = await client.get(topic_path(topic) + "/messages")
        stored.append(
            [
                {k: v for k, v in m.items() if k not in ("published_at", "deliver_at")}
                | {"delayed": m.get("deliver_at") is not None}
                for m in browse.json()["messages"]
            ]
        )
    assert answers[0] == answers[1]
    assert answers[0][0] == 201
    assert stored[0] == stored[1]
    assert taken == ["publish"]  # the first went the fast way, the second did not


INVALID = [
    b'{"messages": []}',
    b'{"messages": [{"key": "no value"}]}',
    b'{"messages": [{"value": 1, "extra": true}]}',
    b'{"messages": [{"value": 1}], "more": 1}',
    b'{"messages": [{"value": 1, "key": 7}]}',
    b'{"messages": [{"value": 1, "key": "' + b"k" * 257 + b'"}]}',
    b'{"messages": [{"value": 1, "key": "a\\u0000b"}]}',
    b'{"messages": [{"value": 1, "key": "\\ud800"}]}',
    b'{"messages": [{"value": 1, "headers": {"": "x"}}]}',
    b'{"messages": [{"value": 1, "headers": {"a": 1}}]}',
    b'{"messages": [{"value": 1, "headers": []}]}',
    b'{"messages": [{"value": 1, "delay_seconds": 901}]}',
    b'{"messages": [{"value": 1, "delay_seconds": -1}]}',
    b'{"messages": [{"value": 1, "delay_seconds": 1.5}]}',
    b'{"messages": [{"value": 1, "delay_seconds": 10.0}]}',
    b'{"messages": [{"value": 1, "delay_seconds": true}]}',
    b'{"messages": [{"value": 1, "dedup_id": ""}]}',
    b'{"messages": [{"value": NaN}]}',
    b'{"messages": [{"value": 1e400}]}',
    b'{"messages": [{"value": 1e-400}]}',
    b'{"messages": [{"value": ' + b"[" * 100 + b"]" * 100 + b"}]}",
    b'{"messages": "nope"}',
    b"[1, 2]",
    b"not json",
    b"",
    b'{"messages": [' + b",".join([b'{"value": 1}'] * 1001) + b"]}",
]


@pytest.mark.parametrize("body", INVALID, ids=range(len(INVALID)))
async def test_what_the_fast_path_hands_over_gets_the_reference_answer(client, taken, body):
    """Refusals, and shapes the fast path leaves to the model (delay_seconds 10.0 is
    accepted as 10 there)."""
    answers = []
    for headers in (FAST, REFERENCE):
        topic = unique()
        await create_topic(client, topic)
        r = await client.post(topic_path(topic) + "/messages", content=body, headers=headers)
        answers.append((comparable(r), r.headers["content-type"]))
    assert answers[0] == answers[1]
    assert taken == []  # handed to the FastAPI route every time


async def test_answers_that_depend_on_the_topic_are_the_same(client, taken):
    """A missing topic (404), a message above the topic's limit (413), a bad topic name."""
    small = unique()
    await create_topic(client, small, max_message_bytes=1024)
    cases = [
        (topic_path(unique()) + "/messages", {"messages": [{"value": 1}]}),
        (topic_path(small) + "/messages", {"messages": [{"value": "x" * 2000}]}),
        ("/v1/topics/bad%20name/messages", {"messages": [{"value": 1}]}),
    ]
    for path, body in cases:
        fast = await client.post(path, content=orjson.dumps(body), headers=FAST)
        reference = await client.post(path, content=orjson.dumps(body), headers=REFERENCE)
        assert comparable(fast) == comparable(reference), path
        assert fast.status_code in (404, 413, 422), fast.text


async def test_acks_answer_the_same_both_ways(client, taken):
    topic = unique()
    await create_topic(client, topic)
    await create_subscription(client, topic, "s")
    await client.post(
        topic_path(topic) + "/messages", json={"messages": [{"value": i} for i in range(4)]}
    )
    messages = await pull(client, topic, "s", 4)
    receipts = [m["receipt"] for m in messages]
    path = topic_path(topic) + "/subscriptions/s/ack"
    taken.clear()
    fast = await client.post(
        path, content=orjson.dumps({"receipts": [*receipts[:2], "junk"]}), headers=FAST
    )
    reference = await client.post(
        path, content=orjson.dumps({"receipts": [*receipts[2:], "junk"]}), headers=REFERENCE
    )
    assert fast.json() == reference.json() == {"acked": 2, "stale": ["junk"]}
    assert taken == ["ack"]
    for body in (b'{"receipts": []}', b'{"receipts": [1]}', b'{"receipts": ["x"], "y": 1}',
                 b'{"receipts": ["' + b"r" * 65 + b'"]}'):  # fmt: skip
        assert comparable(await client.post(path, content=body, headers=FAST)) == comparable(
            await client.post(path, content=body, headers=REFERENCE)
        )
    missing = topic_path(topic) + "/subscriptions/nope/ack"
    body = orjson.dumps({"receipts": ["x"]})
    assert comparable(await client.post(missing, content=body, headers=FAST)) == comparable(
        await client.post(missing, content=body, headers=REFERENCE)
    )


async def test_other_methods_on_the_same_paths_reach_their_routes(client):
    topic = unique()
    await create_topic(client, topic)
    assert (await client.get(topic_path(topic) + "/messages")).status_code == 200
    r = await client.delete(topic_path(topic) + "/messages")
    assert r.status_code == 405 and "POST" in r.headers["allow"], r.headers


@pytest.mark.parametrize(
    ("exc", "status"),
    [(OSError("connection refused"), 503), (RuntimeError("secret detail"), 500)],
    ids=["unavailable", "unexpected"],
)
async def test_failures_on_the_fast_path_get_the_apps_problem_answers(
    db_url, monkeypatch, exc, status
):
    """Errors raised below the fast path reach the same exception handlers as the routes'."""
    import httpx

    from tests.conftest import run_app
    from tests.test_gaps_internal_errors import Raising

    async with run_app(db_url) as h:
        topic = unique()
        await create_topic(h.client, topic)
        # The fast path answers through the route module's publish_answer.
        monkeypatch.setattr(topic_routes, "topic_ops", Raising(exc))
        transport = httpx.ASGITransport(app=h.app, raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://sluice.test") as c:
            r = await c.post(
                topic_path(topic) + "/messages",
                content=b'{"messages": [{"value": 1}]}',
                headers={**FAST, "X-Request-ID": "fast-failure"},
            )
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    assert r.headers["x-request-id"] == "fast-failure"
    assert "secret detail" not in r.text
    if status == 503:
        assert r.headers["retry-after"] == "1"


PULLS = [
    {},
    {"max_messages": 2},
    {"max_messages": 3, "wait_seconds": 0, "ack_deadline_seconds": 60},
    {"max_messages": 1, "ack": []},
    {"max_messages": 1, "wait_seconds": 0.0},
]
PULLS_HANDED_OVER = [
    b'{"max_messages": 0}',
    b'{"max_messages": 1001}',
    b'{"max_messages": 2.0}',
    b'{"max_messages": true}',
    b'{"wait_seconds": 21}',
    b'{"wait_seconds": -1}',
    b'{"ack_deadline_seconds": 0}',
    b'{"ack_deadline_seconds": 30.0}',
    b'{"ack": "x"}',
    b'{"ack": [1]}',
    b'{"other": 1}',
    b"[]",
]


async def _two_subscriptions(client: Any) -> tuple[str, str]:
    topic = unique()
    await create_topic(client, topic)
    for sub in ("a", "b"):
        await create_subscription(client, topic, sub, ack_deadline_seconds=30)
    await client.post(
        topic_path(topic) + "/messages", json={"messages": [{"value": i} for i in range(5)]}
    )
    return topic, topic_path(topic) + "/subscriptions/{}/pull"


def _delivered(r: Any) -> tuple[int, Any]:
    status, body = comparable(r)
    for m in (body or {}).get("messages", ()):
        for varying in ("receipt", "ack_deadline", "published_at"):
            m.pop(varying)
    return status, body


@pytest.mark.parametrize("body", PULLS, ids=range(len(PULLS)))
async def test_pulls_answer_the_same_both_ways(client, taken, body):
    _, path = await _two_subscriptions(client)
    taken.clear()
    fast = await client.post(path.format("a"), content=orjson.dumps(body), headers=FAST)
    reference = await client.post(path.format("b"), content=orjson.dumps(body), headers=REFERENCE)
    assert _delivered(fast) == _delivered(reference)
    assert fast.status_code == 200 and fast.json()["messages"]
    assert taken == ["pull"]


@pytest.mark.parametrize("body", PULLS_HANDED_OVER, ids=range(len(PULLS_HANDED_OVER)))
async def test_pulls_the_fast_path_hands_over_get_the_reference_answer(client, taken, body):
    _, path = await _two_subscriptions(client)
    taken.clear()
    fast = await client.post(path.format("a"), content=body, headers=FAST)
    reference = await client.post(path.format("b"), content=body, headers=REFERENCE)
    assert _delivered(fast) == _delivered(reference)
    assert taken == []


async def test_a_pull_acking_its_previous_batch_on_the_fast_path(client, taken):
    _, path = await _two_subscriptions(client)
    taken.clear()
    first = (await client.post(path.format("a"), json={"max_messages": 2})).json()["messages"]
    receipts = [m["receipt"] for m in first]
    r = await client.post(path.format("a"), json={"max_messages": 2, "ack": [*receipts, "zz"]})
    answer = r.json()
    assert (answer["acked"], answer["stale"]) == (2, ["zz"])
    assert [m["offset"] for m in answer["messages"]] == [2, 3]
    assert taken == ["pull", "pull"]
