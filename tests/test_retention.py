"""Retention: a topic's floor moves past expired messages at each maintenance pass (they are
gone for readers at once); their storage goes by whole segments (tests/test_segments.py)."""

from __future__ import annotations

from sluice.queue.maintenance import run_pass
from tests.conftest import unique
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


async def test_messages_older_than_retention_are_removed(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await publish(client, topic, "old-0", "old-1", "old-2")
    harness.clock.advance(45)
    await publish(client, topic, "new-3", "new-4")
    harness.clock.advance(30)  # the old ones are 75 s old, the new ones 30 s

    await run_pass(harness.ctx)

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


async def test_a_lease_on_the_first_kept_message_survives_retention(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await create_subscription(client, topic, "s", start="earliest", ack_deadline_seconds=600)
    await publish(client, topic, "expires")
    harness.clock.advance(45)
    await publish(client, topic, "kept")
    got = await pull(client, topic, "s", 10)
    assert [m["value"] for m in got] == ["expires", "kept"]
    harness.clock.advance(30)  # the first is 75 s old, the second 30 s
    await run_pass(harness.ctx)
    # The lease of the kept message is intact: its receipt acks it, nothing comes back.
    assert await ack(client, topic, "s", [got[1]["receipt"]]) == {"acked": 1, "stale": []}
    assert (await ack(client, topic, "s", [got[0]["receipt"]]))["acked"] == 0
    harness.clock.advance(700)  # past the lease deadline: nothing is redelivered
    await publish(client, topic, "later")
    assert [m["value"] for m in await pull(client, topic, "s", 10)] == ["later"]


async def test_retention_of_a_keys_head_releases_the_next_message_of_the_key(harness):
    """An ordered subscription whose key's head expires while leased: the next message of
    the key is delivered (it was held back behind the head), and so are later ones."""
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await create_subscription(
        client, topic, "s", start="earliest", ordered_by_key=True, ack_deadline_seconds=600
    )
    r = await client.post(
        topic_path(topic) + "/messages", json={"messages": [{"value": 0, "key": "K"}]}
    )
    assert r.status_code == 201
    harness.clock.advance(45)
    r = await client.post(
        topic_path(topic) + "/messages", json={"messages": [{"value": 1, "key": "K"}]}
    )
    assert r.status_code == 201
    assert [m["value"] for m in await pull(client, topic, "s", 10)] == [0]  # 1 waits for 0
    harness.clock.advance(30)  # 0 expires (75 s old), 1 is kept (30 s)
    await run_pass(harness.ctx)
    r = await client.post(
        topic_path(topic) + "/messages", json={"messages": [{"value": 2, "key": "K"}]}
    )
    assert r.status_code == 201
    got = await pull(client, topic, "s", 10)
    assert [m["value"] for m in got] == [1]  # 2 still waits behind 1
    s = (await client.get(topic_path(topic) + "/subscriptions/s")).json()
    assert (s["in_flight"], s["delayed"], s["lag"]) == (1, 1, 2)
    await ack(client, topic, "s", [got[0]["receipt"]])
    assert [m["value"] for m in await pull(client, topic, "s", 10)] == [2]


async def test_leases_of_expired_messages_do_not_count_in_flight(harness):
    """Retention takes messages with their leases: they leave in_flight, free room under
    max_in_flight, and are never handed out again."""
    client = harness.client
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await create_subscription(
        client, topic, "s", start="earliest", max_in_flight=2, ack_deadline_seconds=600
    )
    await publish(client, topic, "a", "b")
    assert len(await pull(client, topic, "s", 10)) == 2
    harness.clock.advance(61)
    await publish(client, topic, "c", "d")
    await run_pass(harness.ctx)
    s = (await client.get(topic_path(topic) + "/subscriptions/s")).json()
    assert (s["in_flight"], s["backlog"]) == (0, 2)
    got = await pull(client, topic, "s", 10)
    assert [m["value"] for m in got] == ["c", "d"]
    s = (await client.get(topic_path(topic) + "/subscriptions/s")).json()
    assert s["in_flight"] == 2
