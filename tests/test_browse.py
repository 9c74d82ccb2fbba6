"""Browsing a topic without consuming it: pages, next_offset, single messages."""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.conftest import unique
from tests.helpers import (
    assert_problem,
    create_topic,
    publish,
    pull,
    topic_path,
    topic_with_subscription,
)


def messages_path(topic: str) -> str:
    return topic_path(topic) + "/messages"


async def browse(client, topic: str, **params: object) -> dict:
    r = await client.get(messages_path(topic), params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def topic_with(client, count: int) -> str:
    topic = unique()
    await create_topic(client, topic)
    for start in range(0, count, 1000):
        await publish(client, topic, *range(start, min(count, start + 1000)))
    return topic


async def test_default_page_is_100_from_offset_0(client):
    topic = await topic_with(client, 150)
    page = await browse(client, topic)
    assert [m["offset"] for m in page["messages"]] == list(range(100))
    assert [m["value"] for m in page["messages"]] == list(range(100))
    assert page["next_offset"] == 100


async def test_paging_with_next_offset_reads_everything_once(client):
    topic = await topic_with(client, 250)
    seen: list[int] = []
    offset = 0
    for _ in range(10):
        page = await browse(client, topic, from_offset=offset, limit=100)
        seen.extend(m["offset"] for m in page["messages"])
        if not page["messages"]:
            break
        assert page["next_offset"] == page["messages"][-1]["offset"] + 1
        offset = page["next_offset"]
    assert seen == list(range(250))
    # At the end the page is empty and next_offset stays put: poll it for new messages.
    assert page == {"messages": [], "next_offset": 250}
    await publish(client, topic, "new")
    page = await browse(client, topic, from_offset=250)
    assert [(m["offset"], m["value"]) for m in page["messages"]] == [(250, "new")]
    assert page["next_offset"] == 251


async def test_from_offset_in_the_middle(client):
    topic = await topic_with(client, 20)
    page = await browse(client, topic, from_offset=7, limit=5)
    assert [m["offset"] for m in page["messages"]] == [7, 8, 9, 10, 11]
    assert page["next_offset"] == 12


async def test_limit_bounds(client):
    topic = await topic_with(client, 1200)
    page = await browse(client, topic, limit=1)
    assert [m["offset"] for m in page["messages"]] == [0]
    assert page["next_offset"] == 1
    page = await browse(client, topic, limit=1000)
    assert len(page["messages"]) == 1000
    assert page["next_offset"] == 1000
    page = await browse(client, topic, from_offset=1000, limit=1000)
    assert [m["offset"] for m in page["messages"]] == list(range(1000, 1200))
    assert page["next_offset"] == 1200


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": -5},
        {"limit": "many"},
        {"from_offset": -1},
        {"from_offset": "first"},
        {"from_offset": 1.5},
        {"from_offset": 2**63},
        {"from_offset": 10**30},
    ],
)
async def test_invalid_browse_parameters_are_422(client, params):
    topic = await topic_with(client, 1)
    assert_problem(await client.get(messages_path(topic), params=params), 422)


async def test_from_offset_beyond_head_is_empty_and_keeps_position(client):
    topic = await topic_with(client, 3)
    assert await browse(client, topic, from_offset=3) == {"messages": [], "next_offset": 3}
    assert await browse(client, topic, from_offset=1000) == {"messages": [], "next_offset": 1000}
    big = 2**63 - 1
    assert await browse(client, topic, from_offset=big) == {"messages": [], "next_offset": big}


async def test_empty_topic(client):
    topic = unique()
    await create_topic(client, topic)
    assert await browse(client, topic) == {"messages": [], "next_offset": 0}
    assert_problem(await client.get(messages_path(topic) + "/0"), 404)


async def test_browse_of_missing_topic_is_404(client):
    topic = unique()
    assert_problem(await client.get(messages_path(topic)), 404)
    assert_problem(await client.get(messages_path(topic) + "/0"), 404)


async def test_message_fields(client):
    topic = unique()
    await create_topic(client, topic)
    r = await client.post(
        messages_path(topic),
        json={
            "messages": [
                {"value": {"a": 1}, "key": "k", "headers": {"h": "v"}},
                {"value": None, "delay_seconds": 5},
            ]
        },
    )
    assert r.status_code == 201, r.text
    first, second = (await browse(client, topic))["messages"]
    assert set(first) == {"offset", "value", "key", "headers", "published_at", "deliver_at"}
    assert first["offset"] == 0
    assert first["value"] == {"a": 1}
    assert first["key"] == "k"
    assert first["headers"] == {"h": "v"}
    assert first["deliver_at"] is None
    assert datetime.fromisoformat(first["published_at"]).tzinfo is not None
    assert second["value"] is None
    assert second["key"] is None and second["headers"] is None
    assert datetime.fromisoformat(second["deliver_at"]) > datetime.fromisoformat(
        second["published_at"]
    )


async def test_get_one_message_matches_browse(client):
    topic = await topic_with(client, 5)
    page = await browse(client, topic)
    for message in page["messages"]:
        r = await client.get(messages_path(topic) + f"/{message['offset']}")
        assert r.status_code == 200, r.text
        assert r.json() == message


@pytest.mark.parametrize("offset", [5, 6, 1000, 2**63 - 1])
async def test_get_missing_offset_is_404(client, offset):
    topic = await topic_with(client, 5)
    body = assert_problem(await client.get(messages_path(topic) + f"/{offset}"), 404)
    assert str(offset) in body["detail"]


@pytest.mark.parametrize("offset", ["-1", "1.5", "abc", "0x10", str(2**63), "1e3", "1x"])
async def test_get_with_invalid_offset_is_422(client, offset):
    topic = await topic_with(client, 1)
    assert_problem(await client.get(messages_path(topic) + f"/{offset}"), 422)


async def test_browsing_does_not_consume(client):
    topic = await topic_with_subscription(client, start="earliest")
    await publish(client, topic, "a", "b", "c")
    for _ in range(2):
        page = await browse(client, topic)
        assert [m["value"] for m in page["messages"]] == ["a", "b", "c"]
    got = await pull(client, topic, "s", 10)
    assert [m["value"] for m in got] == ["a", "b", "c"]
    # Nor does consuming remove anything from the log.
    page = await browse(client, topic)
    assert [m["value"] for m in page["messages"]] == ["a", "b", "c"]


async def test_browse_shows_delayed_messages_right_away(client):
    topic = unique()
    await create_topic(client, topic)
    await client.post(
        messages_path(topic), json={"messages": [{"value": "later", "delay_seconds": 900}]}
    )
    page = await browse(client, topic)
    assert [m["value"] for m in page["messages"]] == ["later"]
    assert page["messages"][0]["deliver_at"] is not None


async def test_topics_are_isolated(client):
    first = await topic_with(client, 3)
    second = unique()
    await create_topic(client, second)
    await publish(client, second, "only")
    page = await browse(client, second)
    assert [(m["offset"], m["value"]) for m in page["messages"]] == [(0, "only")]
    assert_problem(await client.get(messages_path(second) + "/1"), 404)
    assert (await client.get(messages_path(first) + "/1")).json()["value"] == 1
