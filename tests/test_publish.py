"""Durable publish: batches, offsets, atomicity, dedup, delays, and exact value round-trips."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta
from typing import Any

import pytest

from tests.conftest import run_app, unique
from tests.helpers import JSON, assert_problem, create_topic, publish, topic_path


def messages_path(topic: str) -> str:
    return topic_path(topic) + "/messages"


async def post(client, topic: str, *messages: dict[str, Any]):
    # json.dumps escapes non-ASCII, so even a lone surrogate can be sent.
    body = json.dumps({"messages": list(messages)}).encode()
    return await client.post(messages_path(topic), content=body, headers=JSON)


async def browse_all(client, topic: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    offset = 0
    while True:
        r = await client.get(messages_path(topic), params={"from_offset": offset, "limit": 1000})
        assert r.status_code == 200, r.text
        page = r.json()
        out.extend(page["messages"])
        if not page["messages"]:
            return out
        offset = page["next_offset"]


async def head_offset(client, topic: str) -> int | None:
    r = await client.get(topic_path(topic))
    assert r.status_code == 200, r.text
    return r.json()["head_offset"]


def canon(value: Any) -> str:
    """Exact comparison: types (1 vs 1.0), key order and every character count."""
    return json.dumps(value, ensure_ascii=True)


# ---- basics ------------------------------------------------------------------------------


async def test_publish_one_message_returns_201_with_offset(client):
    topic = unique()
    await create_topic(client, topic)
    r = await post(client, topic, {"value": {"hello": "world"}})
    assert r.status_code == 201, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == {"messages": [{"offset": 0, "duplicate": False}]}
    r = await client.get(messages_path(topic) + "/0")
    assert r.status_code == 200
    assert r.json()["value"] == {"hello": "world"}


async def test_batch_offsets_are_in_request_order(client):
    topic = unique()
    await create_topic(client, topic)
    values = [{"i": i} for i in range(50)]
    r = await post(client, topic, *({"value": v} for v in values))
    assert r.status_code == 201, r.text
    offsets = [m["offset"] for m in r.json()["messages"]]
    assert offsets == list(range(50))
    assert all(m["duplicate"] is False for m in r.json()["messages"])
    stored = await browse_all(client, topic)
    assert [m["offset"] for m in stored] == offsets
    assert [m["value"] for m in stored] == values


async def test_offsets_continue_across_requests(client):
    topic = unique()
    await create_topic(client, topic)
    assert await publish(client, topic, "a", "b") == [0, 1]
    assert await publish(client, topic, "c") == [2]
    assert await publish(client, topic, "d", "e", "f") == [3, 4, 5]


async def test_offsets_are_per_topic(client):
    first, second = unique(), unique()
    await create_topic(client, first)
    await create_topic(client, second)
    assert await publish(client, first, 1, 2, 3) == [0, 1, 2]
    assert await publish(client, second, 1) == [0]
    assert [m["value"] for m in await browse_all(client, second)] == [1]


async def test_batch_of_1000_is_accepted(client):
    topic = unique()
    await create_topic(client, topic)
    r = await post(client, topic, *({"value": i} for i in range(1000)))
    assert r.status_code == 201, r.text
    assert [m["offset"] for m in r.json()["messages"]] == list(range(1000))
    body = (await client.get(topic_path(topic))).json()
    assert (body["oldest_offset"], body["head_offset"], body["message_count"]) == (0, 999, 1000)


async def test_concurrent_publishes_get_distinct_increasing_offsets(client):
    topic = unique()
    await create_topic(client, topic)

    async def one(n: int) -> list[int]:
        return await publish(client, topic, *[f"{n}-{i}" for i in range(5)])

    results = await asyncio.gather(*(one(n) for n in range(20)))
    for offsets in results:
        assert offsets == sorted(offsets) and len(set(offsets)) == 5
    every = sorted(o for offsets in results for o in offsets)
    assert every == list(range(100))
    stored = {m["offset"]: m["value"] for m in await browse_all(client, topic)}
    for n, offsets in enumerate(results):
        assert [stored[o] for o in offsets] == [f"{n}-{i}" for i in range(5)]


async def test_publish_to_missing_topic_is_404_and_creates_nothing(client):
    topic = unique()
    body = assert_problem(await post(client, topic, {"value": 1}), 404)
    assert topic in body["detail"]
    assert_problem(await client.get(topic_path(topic)), 404)
    names = [
        t["name"] for t in (await client.get("/v1/topics", params={"limit": 1000})).json()["topics"]
    ]
    assert topic not in names


async def test_commits_are_durable_before_the_201(harness):
    # The 201 is only as durable as the commit behind it: no asynchronous commit, no fsync off.
    async with harness.ctx.pool.acquire() as conn:
        assert await conn.fetchval("SHOW synchronous_commit") in (
            "on",
            "remote_write",
            "remote_apply",
        )
        assert await conn.fetchval("SHOW fsync") == "on"


async def test_published_at_is_server_time_and_ordered(client):
    topic = unique()
    await create_topic(client, topic)
    before = datetime.now().astimezone()
    await publish(client, topic, 1)
    await publish(client, topic, 2, 3)
    stored = await browse_all(client, topic)
    times = [datetime.fromisoformat(m["published_at"]) for m in stored]
    assert all(t.tzinfo is not None for t in times)
    assert times == sorted(times)
    assert abs(times[0] - before) < timedelta(seconds=30)


# ---- atomicity ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bad", "status"),
    [
        ({"value": 1, "key": "k" * 257}, 422),
        ({"value": 1, "delay_seconds": 901}, 422),
        ({"value": 1, "headers": {"a": 1}}, 422),
        ({"value": 1, "dedup_id": "d" * 129}, 422),
        ({"value": 1, "unknown": True}, 422),
        ({"key": "no value"}, 422),
        ({"value": "x" * 2000}, 413),
    ],
)
async def test_batch_with_one_invalid_message_stores_nothing(client, bad, status):
    topic = unique()
    await create_topic(client, topic, max_message_bytes=1024)
    good = [{"value": i, "dedup_id": f"ok-{i}"} for i in range(5)]
    r = await post(client, topic, *good[:3], bad, *good[3:])
    assert_problem(r, status)
    assert await head_offset(client, topic) is None
    assert await browse_all(client, topic) == []
    # The failed request consumed nothing: not the offsets, not the dedup ids.
    r = await post(client, topic, *good)
    assert r.status_code == 201, r.text
    assert r.json()["messages"] == [{"offset": i, "duplicate": False} for i in range(5)]


async def test_message_size_limit_counts_utf8_bytes(client):
    topic = unique()
    value = "\u00e9" * 5  # JSON text '"ééééé"' is 12 bytes (7 characters)
    await create_topic(client, topic, max_message_bytes=11)
    body = assert_problem(await post(client, topic, {"value": value}), 413)
    assert "11" in body["detail"]
    await create_topic(client, topic, max_message_bytes=12)
    r = await post(client, topic, {"value": value})
    assert r.status_code == 201, r.text
    assert (await client.get(messages_path(topic) + "/0")).json()["value"] == value


async def test_message_size_limit_includes_key_and_headers(client):
    topic = unique()
    await create_topic(client, topic, max_message_bytes=64)
    assert (await post(client, topic, {"value": 1, "key": "k" * 40})).status_code == 201
    assert_problem(await post(client, topic, {"value": 1, "key": "k" * 70}), 413)
    assert_problem(await post(client, topic, {"value": 1, "headers": {"h": "v" * 70}}), 413)
    assert await head_offset(client, topic) == 0


async def test_key_and_headers_count_in_utf8_bytes_too(client):
    topic = unique()
    await create_topic(client, topic, max_message_bytes=64)
    # 40 characters, but 80 bytes: over the limit.
    assert_problem(await post(client, topic, {"value": 1, "key": "\u00e9" * 40}), 413)
    assert_problem(await post(client, topic, {"value": 1, "headers": {"h": "\u4e2d" * 25}}), 413)
    assert (await post(client, topic, {"value": 1, "key": "\u00e9" * 20})).status_code == 201
    assert await head_offset(client, topic) == 0


# ---- dedup -------------------------------------------------------------------------------


async def test_dedup_returns_original_offset_marked_duplicate(client):
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, "before")
    r = await post(client, topic, {"value": "first", "dedup_id": "evt-1"})
    assert r.json()["messages"] == [{"offset": 1, "duplicate": False}]
    r = await post(client, topic, {"value": "second", "dedup_id": "evt-1"})
    assert r.status_code == 201, r.text
    assert r.json()["messages"] == [{"offset": 1, "duplicate": True}]
    stored = await browse_all(client, topic)
    assert [m["value"] for m in stored] == ["before", "first"]
    # A duplicate takes no offset.
    assert await publish(client, topic, "after") == [2]


async def test_duplicates_within_one_batch(client):
    topic = unique()
    await create_topic(client, topic)
    r = await post(
        client,
        topic,
        {"value": "a1", "dedup_id": "a"},
        {"value": "b1", "dedup_id": "b"},
        {"value": "a2", "dedup_id": "a"},
        {"value": "plain"},
        {"value": "b2", "dedup_id": "b"},
    )
    assert r.status_code == 201, r.text
    assert r.json()["messages"] == [
        {"offset": 0, "duplicate": False},
        {"offset": 1, "duplicate": False},
        {"offset": 0, "duplicate": True},
        {"offset": 2, "duplicate": False},
        {"offset": 1, "duplicate": True},
    ]
    assert [m["value"] for m in await browse_all(client, topic)] == ["a1", "b1", "plain"]


async def test_batch_mixing_new_messages_and_earlier_duplicates(client):
    topic = unique()
    await create_topic(client, topic)
    await post(client, topic, {"value": "x", "dedup_id": "x"})
    r = await post(
        client, topic, {"value": "y", "dedup_id": "y"}, {"value": "x again", "dedup_id": "x"}
    )
    assert r.json()["messages"] == [
        {"offset": 1, "duplicate": False},
        {"offset": 0, "duplicate": True},
    ]


async def test_a_batch_of_new_ids_is_stored_with_its_ids(client):
    """New distinct ids (some messages without one) take consecutive offsets, and each id
    is kept: a later message with it is a duplicate (the append's path for new ids)."""
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, "before")
    r = await post(
        client,
        topic,
        {"value": "p", "dedup_id": "p"},
        {"value": "no id"},
        {"value": "q", "dedup_id": "q"},
    )
    assert r.json()["messages"] == [
        {"offset": 1, "duplicate": False},
        {"offset": 2, "duplicate": False},
        {"offset": 3, "duplicate": False},
    ]
    r = await post(client, topic, {"value": "q again", "dedup_id": "q"}, {"value": "no id"})
    assert r.json()["messages"] == [
        {"offset": 3, "duplicate": True},
        {"offset": 4, "duplicate": False},
    ]
    assert [m["value"] for m in await browse_all(client, topic)] == [
        "before",
        "p",
        "no id",
        "q",
        "no id",
    ]


async def test_dedup_is_per_topic(client):
    first, second = unique(), unique()
    await create_topic(client, first)
    await create_topic(client, second)
    await publish(client, first, "a", "b")
    r1 = await post(client, first, {"value": 1, "dedup_id": "same"})
    r2 = await post(client, second, {"value": 1, "dedup_id": "same"})
    assert r1.json()["messages"] == [{"offset": 2, "duplicate": False}]
    assert r2.json()["messages"] == [{"offset": 0, "duplicate": False}]


async def test_dedup_ids_are_exact_strings(client):
    topic = unique()
    await create_topic(client, topic)
    ids = ["evt", "EVT", "evt ", "\u00e9vt", "e\u0301vt"]
    r = await post(client, topic, *({"value": i, "dedup_id": d} for i, d in enumerate(ids)))
    assert [m["duplicate"] for m in r.json()["messages"]] == [False] * len(ids)


async def test_after_the_dedup_window_the_message_is_stored_again(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, dedup_window_seconds=60)
    r = await post(client, topic, {"value": 1, "dedup_id": "d"})
    assert r.json()["messages"] == [{"offset": 0, "duplicate": False}]
    harness.clock.advance(30)
    r = await post(client, topic, {"value": 2, "dedup_id": "d"})
    assert r.json()["messages"] == [{"offset": 0, "duplicate": True}]
    harness.clock.advance(31)  # 61 s after the first publish
    r = await post(client, topic, {"value": 3, "dedup_id": "d"})
    assert r.json()["messages"] == [{"offset": 1, "duplicate": False}]
    # ... and the new copy opens a new window.
    r = await post(client, topic, {"value": 4, "dedup_id": "d"})
    assert r.json()["messages"] == [{"offset": 1, "duplicate": True}]
    assert [m["value"] for m in await browse_all(client, topic)] == [1, 3]


async def test_window_change_applies_to_later_publishes(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, dedup_window_seconds=600)
    await post(client, topic, {"value": 1, "dedup_id": "d"})
    harness.clock.advance(120)
    r = await post(client, topic, {"value": 2, "dedup_id": "d"})
    assert r.json()["messages"][0]["duplicate"] is True
    await create_topic(client, topic, dedup_window_seconds=60)
    r = await post(client, topic, {"value": 3, "dedup_id": "d"})
    assert r.json()["messages"] == [{"offset": 1, "duplicate": False}]


async def test_dedup_window_zero_disables_dedup(client):
    topic = unique()
    await create_topic(client, topic, dedup_window_seconds=0)
    r = await post(client, topic, {"value": 1, "dedup_id": "d"}, {"value": 2, "dedup_id": "d"})
    # Within one request the id is still one event; across requests it is forgotten.
    first = r.json()["messages"]
    assert first == [{"offset": 0, "duplicate": False}, {"offset": 0, "duplicate": True}]
    r = await post(client, topic, {"value": 3, "dedup_id": "d"})
    assert r.json()["messages"] == [{"offset": 1, "duplicate": False}]


async def test_concurrent_duplicates_across_processes_store_one_copy(db_url):
    """Two app instances (own pools, own publishers) race on the same dedup ids."""
    topic = unique()
    async with run_app(db_url) as a, run_app(db_url) as b:
        await create_topic(a.client, topic)

        async def send(client, n: int) -> list[dict[str, Any]]:
            r = await post(
                client,
                topic,
                {"value": n, "dedup_id": "shared"},
                {"value": n, "dedup_id": f"own-{n}"},
            )
            assert r.status_code == 201, r.text
            return r.json()["messages"]

        results = await asyncio.gather(*(send((a, b)[n % 2].client, n) for n in range(30)))
        shared = [r[0] for r in results]
        assert len({m["offset"] for m in shared}) == 1
        assert sum(not m["duplicate"] for m in shared) == 1
        assert all(not r[1]["duplicate"] for r in results)
        stored = await browse_all(a.client, topic)
        assert len(stored) == 31
        assert len({m["offset"] for m in stored}) == 31


# ---- delay, key, headers -------------------------------------------------------------------


async def test_delay_seconds_is_stored_as_deliver_at(client):
    topic = unique()
    await create_topic(client, topic)
    r = await post(
        client,
        topic,
        {"value": "now"},
        {"value": "later", "delay_seconds": 30},
        {"value": "max", "delay_seconds": 900},
        {"value": "zero", "delay_seconds": 0},
    )
    assert r.status_code == 201, r.text
    stored = await browse_all(client, topic)
    assert stored[0]["deliver_at"] is None
    assert stored[3]["deliver_at"] is None
    for message, delay in ((stored[1], 30), (stored[2], 900)):
        published = datetime.fromisoformat(message["published_at"])
        deliver = datetime.fromisoformat(message["deliver_at"])
        assert deliver - published == timedelta(seconds=delay)
    one = (await client.get(messages_path(topic) + "/1")).json()
    assert one["deliver_at"] == stored[1]["deliver_at"]


async def test_key_and_headers_round_trip(client):
    topic = unique()
    await create_topic(client, topic)
    headers = {f"h-{i}": f"v\u00e9-{i}" for i in range(64)}
    headers["Content-Type"] = "x"  # case is kept
    headers.pop("h-0")
    messages = [
        {"value": 1, "key": "customer-7", "headers": {"source": "web", "trace": ""}},
        {"value": 2, "key": "\u4e2d\u6587-\U0001f600", "headers": headers},
        {"value": 3, "key": "k" * 256},
        {"value": 4, "key": ""},
        {"value": 5, "headers": {}},
        {"value": 6, "key": None, "headers": None},
        {"value": 7, "headers": {"n" * 256: "v" * 4096}},
    ]
    r = await post(client, topic, *messages)
    assert r.status_code == 201, r.text
    stored = await browse_all(client, topic)
    for sent, got in zip(messages, stored, strict=True):
        assert got["key"] == sent.get("key")
        assert got["headers"] == sent.get("headers")
        assert list((got["headers"] or {}).items()) == list((sent.get("headers") or {}).items())
        one = (await client.get(messages_path(topic) + f"/{got['offset']}")).json()
        assert one == got


# ---- exact values --------------------------------------------------------------------------


def nested(depth: int) -> Any:
    """A value of `depth` nesting levels, alternating objects and arrays."""
    value: Any = "leaf"
    for level in range(depth):
        value = {"k": value} if level % 2 else [value]
    return value


VALUES: list[Any] = [
    None,
    True,
    False,
    0,
    -1,
    2**53 + 1,
    2**63 - 1,
    2**63,
    2**64 - 1,
    2**64,
    -(2**63) - 1,
    -(2**64) - 1,
    10**40,
    -(10**60) + 7,
    0.1,
    -0.0,
    1.0,
    1.5e300,
    -2.5e-300,
    5e-324,
    1.7976931348623157e308,
    3.141592653589793,
    "",
    "plain",
    "emoji \U0001f600\U0001f389\U0001f468\u200d\U0001f469\u200d\U0001f467",
    "CJK \u4e2d\u6587\u6f22\u5b57 \u65e5\u672c\u8a9e \ud55c\uad6d\uc5b4",
    'escapes " \\ / \b \f \n \r \t \u0001 \u001f \u007f',
    "\u0000 NUL inside a value is fine",
    "\u2028\u2029 line separators",
    "combining e\u0301 and \ufeff BOM",
    "\ud800 lone surrogate",
    [],
    {},
    [1, "two", 3.0, None, True, {"x": []}],
    {"z": 1, "a": 2, "m": {"b": 1, "a": 0}},
    {"": "empty key", "\U0001f511": "emoji key"},
    {"big": 2**70, "text": "\u00fc\U0001f600", "float": 0.5, "list": [2**65, -(2**65)]},
    nested(61),  # with {"messages":[{"value": ...}]} around it: exactly the 64-level limit
    "x" * 100_000,
]


async def test_values_round_trip_exactly(client):
    topic = unique()
    await create_topic(client, topic)
    r = await post(client, topic, *({"value": v} for v in VALUES))
    assert r.status_code == 201, r.text
    offsets = [m["offset"] for m in r.json()["messages"]]

    stored = await browse_all(client, topic)
    assert [m["offset"] for m in stored] == offsets
    for sent, got in zip(VALUES, stored, strict=True):
        assert canon(got["value"]) == canon(sent)
    for sent, offset in zip(VALUES, offsets, strict=True):
        r = await client.get(messages_path(topic) + f"/{offset}")
        assert r.status_code == 200, r.text
        assert canon(r.json()["value"]) == canon(sent)


@pytest.mark.parametrize("value", VALUES[:22], ids=lambda v: repr(v)[:30])
async def test_each_value_round_trips_alone_and_with_dedup(client, value):
    # With a dedup id the publish takes the transactional path: same result.
    topic = unique()
    await create_topic(client, topic)
    r = await post(client, topic, {"value": value}, {"value": value, "dedup_id": "d"})
    assert r.status_code == 201, r.text
    for m in r.json()["messages"]:
        got = (await client.get(messages_path(topic) + f"/{m['offset']}")).json()["value"]
        assert canon(got) == canon(value)


async def test_value_text_is_written_verbatim_in_json_responses(client):
    """The raw body (not only the parsed result) keeps big numbers and unicode exact."""
    topic = unique()
    await create_topic(client, topic)
    body = '{"messages":[{"value":{"n":123456789012345678901234567890,"s":"\u00e9\U0001f600"}}]}'
    r = await client.post(messages_path(topic), content=body.encode(), headers=JSON)
    assert r.status_code == 201, r.text
    raw = (await client.get(messages_path(topic) + "/0")).content
    assert b"123456789012345678901234567890" in raw
    assert json.loads(raw)["value"] == {
        "n": 123456789012345678901234567890,
        "s": "\u00e9\U0001f600",
    }


async def test_zero_in_any_form_is_a_value_and_underflow_is_refused(client):
    """A double cannot hold 1e-400: it is refused (400), not stored as 0.0. Zero itself,
    however written, is zero."""
    topic = unique()
    await create_topic(client, topic)
    for literal in (b"1e-400", b"-1e-400", b"0.1e-330", b"[1,0.0,1e-999]"):
        body = b'{"messages":[{"value":0},{"value":' + literal + b"}]}"
        r = await client.post(messages_path(topic), content=body, headers=JSON)
        assert "out of range" in assert_problem(r, 400)["detail"], literal
    assert await head_offset(client, topic) is None  # nothing stored
    body = b'{"messages":[{"value":[0e-400,-0e-400,0.0,-0.0,0.000,5e-324,1e-300]}]}'
    r = await client.post(messages_path(topic), content=body, headers=JSON)
    assert r.status_code == 201, r.text
    got = (await client.get(messages_path(topic) + "/0")).json()["value"]
    assert repr(got) == repr([0.0, -0.0, 0.0, -0.0, 0.0, 5e-324, 1e-300])


async def test_null_is_a_value_but_missing_value_is_not(client):
    topic = unique()
    await create_topic(client, topic)
    r = await client.post(
        messages_path(topic), content=b'{"messages":[{"value":null}]}', headers=JSON
    )
    assert r.status_code == 201, r.text
    got = (await client.get(messages_path(topic) + "/0")).json()
    assert "value" in got and got["value"] is None
    body = assert_problem(await post(client, topic, {"key": "k"}), 422)
    assert "value" in body["detail"]


async def test_publish_without_content_type_is_read_as_json(client):
    topic = unique()
    await create_topic(client, topic)
    r = await client.post(messages_path(topic), content=b'{"messages":[{"value":"x"}]}')
    assert r.status_code == 201, r.text
    for content_type in ("application/json; charset=utf-8", "application/vnd.sluice+json"):
        r = await client.post(
            messages_path(topic),
            content=b'{"messages":[{"value":"y"}]}',
            headers={"content-type": content_type},
        )
        assert r.status_code == 201, (content_type, r.text)
    assert [m["value"] for m in await browse_all(client, topic)] == ["x", "y", "y"]
