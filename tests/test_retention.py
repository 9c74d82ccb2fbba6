"""Retention: expired messages are removed in bounded batches; deleted topics are purged."""

from __future__ import annotations

import asyncpg
import pytest

from sluice.queue.maintenance import run_pass
from sluice.storage.db import plain_url
from tests.conftest import run_app, unique
from tests.helpers import (
    ack,
    assert_problem,
    create_subscription,
    create_topic,
    publish,
    pull,
    topic_path,
)


async def details(client, topic: str) -> dict:
    r = await client.get(topic_path(topic))
    assert r.status_code == 200, r.text
    return r.json()


async def browse_values(client, topic: str, from_offset: int = 0) -> list[tuple[int, object]]:
    r = await client.get(
        topic_path(topic) + "/messages", params={"from_offset": from_offset, "limit": 1000}
    )
    assert r.status_code == 200, r.text
    return [(m["offset"], m["value"]) for m in r.json()["messages"]]


async def stored_rows(db_url: str, topic_id: int) -> int:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        return await conn.fetchval("SELECT count(*) FROM messages WHERE topic_id = $1", topic_id)
    finally:
        await conn.close()


async def still_to_purge(db_url: str, topic_id: int) -> bool:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        return await conn.fetchval(
            "SELECT EXISTS (SELECT 1 FROM deleted_topics WHERE topic_id = $1)", topic_id
        )
    finally:
        await conn.close()


async def topic_id_of(db_url: str, name: str) -> int:
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        topic_id = await conn.fetchval("SELECT topic_id FROM topics WHERE name = $1", name)
    finally:
        await conn.close()
    assert topic_id is not None
    return topic_id


async def test_messages_older_than_retention_are_removed(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await publish(client, topic, "old-0", "old-1", "old-2")
    harness.clock.advance(45)
    await publish(client, topic, "new-3", "new-4")
    harness.clock.advance(30)  # the old ones are 75 s old, the new ones 30 s

    done = await run_pass(harness.ctx)
    assert done["expired_messages"] >= 3

    assert await browse_values(client, topic) == [(3, "new-3"), (4, "new-4")]
    body = await details(client, topic)
    assert (body["oldest_offset"], body["head_offset"], body["message_count"]) == (3, 4, 2)
    for offset in (0, 1, 2):
        assert_problem(await client.get(topic_path(topic) + f"/messages/{offset}"), 404)
    assert (await client.get(topic_path(topic) + "/messages/3")).json()["value"] == "new-3"
    # Offsets go on from where they were; nothing is reused.
    assert await publish(client, topic, "next") == [5]

    # A second pass with nothing newly expired removes nothing more.
    await run_pass(harness.ctx)
    assert [o for o, _ in await browse_values(client, topic)] == [3, 4, 5]


async def test_nothing_is_removed_before_retention(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await publish(client, topic, *range(5))
    harness.clock.advance(55)
    await run_pass(harness.ctx)
    assert [o for o, _ in await browse_values(client, topic)] == [0, 1, 2, 3, 4]
    assert (await details(client, topic))["message_count"] == 5


async def test_a_fully_expired_topic_is_empty_and_keeps_counting(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await publish(client, topic, "a", "b")
    harness.clock.advance(61)
    await run_pass(harness.ctx)
    assert await browse_values(client, topic) == []
    body = await details(client, topic)
    assert body["head_offset"] is None
    assert body["oldest_offset"] is None
    assert body["message_count"] == 0
    assert await publish(client, topic, "c") == [2]
    assert await browse_values(client, topic) == [(2, "c")]


async def test_retention_is_per_topic(harness):
    client = harness.client
    short, long = unique(), unique()
    await create_topic(client, short, retention_seconds=60)
    await create_topic(client, long, retention_seconds=3600)
    await publish(client, short, 1, 2)
    await publish(client, long, 1, 2)
    harness.clock.advance(120)
    await run_pass(harness.ctx)
    assert await browse_values(client, short) == []
    assert await browse_values(client, long) == [(0, 1), (1, 2)]


async def test_shortening_retention_applies_on_the_next_pass(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=3600)
    await publish(client, topic, "x", "y")
    harness.clock.advance(120)
    await run_pass(harness.ctx)
    assert len(await browse_values(client, topic)) == 2
    await create_topic(client, topic, retention_seconds=60)
    await run_pass(harness.ctx)
    assert await browse_values(client, topic) == []


async def test_expiry_removes_pending_and_leased_messages_from_subscriptions(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await create_subscription(client, topic, "s", start="earliest", ack_deadline_seconds=600)
    await publish(client, topic, "old-leased", "old-pending")
    leased = await pull(client, topic, "s", 1)
    assert [m["value"] for m in leased] == ["old-leased"]
    harness.clock.advance(61)
    await publish(client, topic, "fresh")
    await run_pass(harness.ctx)

    got = await pull(client, topic, "s", 10)
    assert [m["value"] for m in got] == ["fresh"]
    # The lease on the expired message is gone with it.
    result = await ack(client, topic, "s", [leased[0]["receipt"]])
    assert result["acked"] == 0 and result["stale"] == [leased[0]["receipt"]]
    assert (await ack(client, topic, "s", [m["receipt"] for m in got]))["acked"] == 1


async def test_dedup_ids_are_forgotten_with_their_expired_message(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60, dedup_window_seconds=600)
    r = await client.post(
        topic_path(topic) + "/messages", json={"messages": [{"value": 1, "dedup_id": "d"}]}
    )
    assert r.json()["messages"] == [{"offset": 0, "duplicate": False}]
    harness.clock.advance(61)
    r = await client.post(
        topic_path(topic) + "/messages", json={"messages": [{"value": 2, "dedup_id": "d"}]}
    )
    assert r.json()["messages"] == [{"offset": 0, "duplicate": True}]  # still retained
    await run_pass(harness.ctx)
    r = await client.post(
        topic_path(topic) + "/messages", json={"messages": [{"value": 3, "dedup_id": "d"}]}
    )
    assert r.json()["messages"] == [{"offset": 1, "duplicate": False}]


@pytest.mark.parametrize("batch", [7, 5000])
async def test_retention_deletes_in_batches_within_one_pass(db_url, batch):
    async with run_app(db_url, retention_batch_size=batch) as h:
        topic = unique()
        await create_topic(h.client, topic, retention_seconds=60)
        await publish(h.client, topic, *range(30))
        h.clock.advance(30)
        await publish(h.client, topic, "kept")
        h.clock.advance(31)
        done = await run_pass(h.ctx)
        assert done["expired_messages"] >= 30
        assert await browse_values(h.client, topic) == [(30, "kept")]
        assert await stored_rows(db_url, await topic_id_of(db_url, topic)) == 1


async def test_deleted_topics_messages_are_purged(harness, db_url):
    client = harness.client
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, *range(25))
    topic_id = await topic_id_of(db_url, topic)
    assert await stored_rows(db_url, topic_id) == 25

    assert (await client.delete(topic_path(topic))).status_code == 204
    # A new topic of the same name is a different log, untouched by the purge.
    await create_topic(client, topic)
    await publish(client, topic, "new")
    new_id = await topic_id_of(db_url, topic)
    assert new_id != topic_id

    done = await run_pass(harness.ctx)
    assert done["purged_messages"] >= 25
    assert await stored_rows(db_url, topic_id) == 0
    assert await stored_rows(db_url, new_id) == 1
    assert await browse_values(client, topic) == [(0, "new")]

    assert not await still_to_purge(db_url, topic_id)


async def test_purge_of_a_large_deleted_topic_is_bounded_per_pass(db_url):
    async with run_app(db_url, retention_batch_size=10) as h:
        topic = unique()
        await create_topic(h.client, topic)
        await publish(h.client, topic, *range(25))
        topic_id = await topic_id_of(db_url, topic)
        assert (await h.client.delete(topic_path(topic))).status_code == 204

        remaining = []
        for _ in range(5):
            await run_pass(h.ctx)
            remaining.append(await stored_rows(db_url, topic_id))
            # The topic stays on the to-purge list until its last row is gone.
            assert await still_to_purge(db_url, topic_id) == (remaining[-1] > 0)
            if remaining[-1] == 0:
                break
        assert remaining[-1] == 0, remaining
        assert remaining == sorted(remaining, reverse=True)


async def test_messages_of_a_deleted_topic_are_never_visible(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, "secret")
    assert (await client.delete(topic_path(topic))).status_code == 204
    await create_topic(client, topic)  # before any purge ran
    assert await browse_values(client, topic) == []
    assert_problem(await client.get(topic_path(topic) + "/messages/0"), 404)
    assert (await details(client, topic))["message_count"] == 0
