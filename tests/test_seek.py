"""Seek: to an offset, a time, earliest or latest. Messages at or after the target are
pending again (replay), those before count as acknowledged; leases are dropped."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from sluice.queue.maintenance import run_pass
from tests.helpers import (
    ack,
    assert_problem,
    create_topic,
    drain,
    extend,
    nack,
    offsets_of,
    publish,
    pull,
    seek,
    stats,
    sub_path,
    topic_path,
    topic_with_subscription,
)


async def setup(client, **config) -> str:
    return await topic_with_subscription(client, start="earliest", **config)


async def test_seek_back_to_an_offset_replays(client):
    topic = await setup(client)
    offsets = await publish(client, topic, *range(10))
    assert offsets_of(await drain(client, topic, "s")) == offsets
    assert (await stats(client, topic, "s"))["committed_offset"] == offsets[-1] + 1

    assert await seek(client, topic, "s", offset=offsets[4]) == {"committed_offset": offsets[4]}
    s = await stats(client, topic, "s")
    assert (s["committed_offset"], s["backlog"], s["lag"]) == (offsets[4], 6, 6)
    replay = await drain(client, topic, "s")
    assert offsets_of(replay) == offsets[4:]
    assert {m["delivery_attempt"] for m in replay} == {1}
    assert [m["value"] for m in replay] == list(range(4, 10))


async def test_seek_forward_skips_as_acknowledged(client):
    topic = await setup(client)
    offsets = await publish(client, topic, *range(10))
    assert (await seek(client, topic, "s", offset=offsets[7]))["committed_offset"] == offsets[7]
    s = await stats(client, topic, "s")
    assert (s["committed_offset"], s["lag"]) == (offsets[7], 3)
    assert offsets_of(await drain(client, topic, "s")) == offsets[7:]


async def test_seek_drops_leases_and_their_receipts_go_stale(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=600)
    offsets = await publish(client, topic, *range(6))
    leased = await pull(client, topic, "s", 6)
    await ack(client, topic, "s", [leased[0]["receipt"]])
    receipts = [m["receipt"] for m in leased[1:]]

    await seek(client, topic, "s", offset=offsets[3])
    s = await stats(client, topic, "s")
    assert (s["in_flight"], s["backlog"], s["committed_offset"]) == (0, 3, offsets[3])
    assert await ack(client, topic, "s", receipts) == {"acked": 0, "stale": receipts}
    assert await nack(client, topic, "s", receipts) == {"nacked": 0, "stale": receipts}
    assert await extend(client, topic, "s", receipts, 60) == {"extended": 0, "stale": receipts}
    again = await pull(client, topic, "s", 10)
    assert offsets_of(again) == offsets[3:]
    assert {m["delivery_attempt"] for m in again} == {1}
    # The old leases do not come back by expiry either.
    await ack(client, topic, "s", [m["receipt"] for m in again])
    clock.advance(3600)
    assert await pull(client, topic, "s", 10) == []


async def test_seek_earliest_and_latest(client):
    topic = await setup(client)
    offsets = await publish(client, topic, *range(5))
    await drain(client, topic, "s")
    assert (await seek(client, topic, "s", to="earliest"))["committed_offset"] == offsets[0]
    assert offsets_of(await drain(client, topic, "s")) == offsets

    more = await publish(client, topic, *range(5))
    await pull(client, topic, "s", 2)
    r = await seek(client, topic, "s", to="latest")
    assert r["committed_offset"] == more[-1] + 1
    s = await stats(client, topic, "s")
    assert (s["lag"], s["in_flight"], s["committed_offset"]) == (0, 0, more[-1] + 1)
    assert await pull(client, topic, "s", 10) == []
    newer = await publish(client, topic, "after")
    assert offsets_of(await pull(client, topic, "s", 10)) == newer


async def test_seek_past_the_head_never_skips_future_messages(client):
    topic = await setup(client)
    offsets = await publish(client, topic, *range(3))
    assert (await seek(client, topic, "s", offset=10**12))["committed_offset"] == offsets[-1] + 1
    s = await stats(client, topic, "s")
    assert (s["committed_offset"], s["lag"]) == (offsets[-1] + 1, 0)
    assert await pull(client, topic, "s", 10) == []
    later = await publish(client, topic, *range(3))
    assert offsets_of(await drain(client, topic, "s")) == later


async def test_seek_below_the_oldest_retained_message_starts_at_the_oldest(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client)
    await create_topic(client, topic, retention_seconds=60)  # the shortest allowed
    await publish(client, topic, *range(3))
    clock.advance(40)
    kept = await publish(client, topic, *range(3, 6))
    clock.advance(40)  # the first three are 80 s old, 20 s past retention; the rest 40 s
    assert len(await drain(client, topic, "s")) == 6
    await run_pass(harness.ctx)
    r = await client.get(topic_path(topic))
    assert (r.json()["oldest_offset"], r.json()["message_count"]) == (kept[0], 3)

    assert await seek(client, topic, "s", offset=0) == {"committed_offset": kept[0]}
    s = await stats(client, topic, "s")
    assert (s["committed_offset"], s["backlog"], s["lag"]) == (kept[0], 3, 3)
    replay = await drain(client, topic, "s")
    assert offsets_of(replay) == kept
    assert [m["value"] for m in replay] == [3, 4, 5]


async def test_seek_on_an_empty_topic(client):
    topic = await setup(client)
    assert (await seek(client, topic, "s", to="earliest"))["committed_offset"] == 0
    assert (await seek(client, topic, "s", to="latest"))["committed_offset"] == 0
    offsets = await publish(client, topic, "x")
    assert offsets_of(await pull(client, topic, "s")) == offsets


async def _stamp(client, topic: str, offset: int) -> datetime:
    r = await client.get(f"/v1/topics/{topic}/messages/{offset}")
    return datetime.fromisoformat(r.json()["published_at"])


async def test_seek_to_a_time_selects_the_first_message_published_at_or_after_it(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client)
    early = await publish(client, topic, "e1", "e2")
    clock.advance(100)
    late = await publish(client, topic, "l1", "l2")
    await drain(client, topic, "s")
    published = await _stamp(client, topic, late[0])

    # A time between the two batches, written with a non-UTC offset.
    between = (published - timedelta(seconds=50)).astimezone(
        timezone(timedelta(hours=5, minutes=30))
    )
    assert (await seek(client, topic, "s", time=between.isoformat()))["committed_offset"] == late[0]
    assert offsets_of(await drain(client, topic, "s")) == late

    # Exactly the publish time: at or after, so included.
    exact = published.astimezone(timezone(timedelta(hours=-7))).isoformat()
    assert (await seek(client, topic, "s", time=exact))["committed_offset"] == late[0]
    # A microsecond later: the late batch (one publish, one timestamp) is excluded.
    just_after = (published + timedelta(microseconds=1)).isoformat()
    assert (await seek(client, topic, "s", time=just_after))["committed_offset"] == late[-1] + 1

    # Long before everything: the whole log; after everything: nothing.
    assert (await seek(client, topic, "s", time="2000-01-01T00:00:00Z"))[
        "committed_offset"
    ] == early[0]
    assert offsets_of(await drain(client, topic, "s")) == early + late
    future = (published + timedelta(days=1)).isoformat()
    assert (await seek(client, topic, "s", time=future))["committed_offset"] == late[-1] + 1
    assert await pull(client, topic, "s", 10) == []
    assert (await stats(client, topic, "s"))["lag"] == 0


async def test_a_clock_stepped_back_by_a_minute_never_stamps_a_message_earlier(harness):
    """While the wall clock is stepped back (by up to 5 minutes), a message carries the time
    of the newest message before it (revision 0020): published_at never decreases with the
    offset, so a seek by time into the step never lands past a message stamped at or after
    the time sought. A delay still counts from the clock."""
    client, clock = harness.client, harness.clock
    topic = await setup(client)
    before = await publish(client, topic, "before")
    clock.advance(-60)  # stepped a minute back
    first_in_step = await publish(client, topic, "d1")
    clock.advance(20)
    second_in_step = await publish(client, topic, "d2")
    stamps = [await _stamp(client, topic, o) for o in before + first_in_step + second_in_step]
    assert stamps == [stamps[0]] * 3

    # Stamped from the clock, d2 would be the first message at or after this time, and a seek
    # would count "before" and d1 as acknowledged though "before" is stamped after it.
    inside_the_step = stamps[0] - timedelta(seconds=50)
    committed = await seek(client, topic, "s", time=inside_the_step.isoformat())
    assert committed == {"committed_offset": before[0]}
    assert offsets_of(await drain(client, topic, "s")) == before + first_in_step + second_in_step

    delayed = await publish(client, topic, "delayed", delay_seconds=5)
    assert await pull(client, topic, "s") == []
    clock.advance(6)  # five seconds of the stepped clock, not of the newest message's time
    assert offsets_of(await drain(client, topic, "s")) == delayed
    assert await _stamp(client, topic, delayed[0]) == stamps[0]


async def test_stamps_follow_a_clock_stepped_back_by_more_than_five_minutes(harness):
    """A newest message more than 5 minutes ahead of the clock was stamped by a clock that
    ran fast: the next ones take the clock's time again, so the topic's retention (its first
    message stamped within retention) and its dedup window are not held at that time."""
    client, clock = harness.client, harness.clock
    topic = await setup(client)
    first = await publish(client, topic, "first")
    clock.advance(-240)  # four minutes back: within the bound, held at the newest time
    held = await publish(client, topic, "held")
    clock.advance(-120)  # six minutes behind the newest message: the clock is followed
    followed = await publish(client, topic, "followed")
    first_at, held_at, followed_at = [
        await _stamp(client, topic, o) for o in first + held + followed
    ]
    assert held_at == first_at
    assert first_at - timedelta(seconds=370) < followed_at < first_at - timedelta(seconds=350)


async def test_delivery_and_browsing_follow_offsets_where_stamps_go_back(harness):
    """Time is never the order: once a clock stepped back by more than the 5-minute bound has
    stamped later messages earlier than the one before them, browsing and delivery still go
    by offset. (A seek by time into such a step can land up to the step late: docs/design.md,
    "Commit-ordered offsets".)"""
    client, clock = harness.client, harness.clock
    topic = await setup(client)
    early = await publish(client, topic, "early")
    clock.advance(-600)  # ten minutes back: followed, so stamped before "early"
    late = await publish(client, topic, "late", "later")
    stamps = [await _stamp(client, topic, o) for o in early + late]
    assert stamps[1] < stamps[0], stamps

    r = await client.get(f"/v1/topics/{topic}/messages")
    assert [m["offset"] for m in r.json()["messages"]] == early + late
    r = await client.get(f"/v1/topics/{topic}/messages", params={"from_offset": late[0]})
    assert [m["offset"] for m in r.json()["messages"]] == late
    assert offsets_of(await drain(client, topic, "s")) == early + late


async def test_seek_keeps_key_order(client):
    topic = await topic_with_subscription(
        client, start="earliest", ordered_by_key=True, ack_deadline_seconds=600
    )
    r = await client.post(
        f"/v1/topics/{topic}/messages",
        json={"messages": [{"value": i, "key": "A"} for i in range(3)]},
    )
    offsets = [m["offset"] for m in r.json()["messages"]]
    [m] = await pull(client, topic, "s", 10)
    assert m["offset"] == offsets[0]
    assert await pull(client, topic, "s", 10) == []  # the rest are held back
    await seek(client, topic, "s", to="earliest")
    # after the seek the key is replayed one at a time, in order
    for offset in offsets:
        [m] = await pull(client, topic, "s", 10)
        assert m["offset"] == offset
        assert await pull(client, topic, "s", 10) == []
        await ack(client, topic, "s", [m["receipt"]])


async def test_seek_and_dead_letters(harness):
    client = harness.client
    topic = await setup(client, max_deliveries=1)
    offsets = await publish(client, topic, *range(6))
    got = await pull(client, topic, "s", 10)
    await nack(client, topic, "s", [m["receipt"] for m in got])
    assert (await stats(client, topic, "s"))["dead_lettered"] == 6
    # Dead letters at or after the target become pending again; those before stay parked.
    await seek(client, topic, "s", offset=offsets[4])
    s = await stats(client, topic, "s")
    assert (s["dead_lettered"], s["backlog"]) == (4, 2)
    again = await pull(client, topic, "s", 10)
    assert offsets_of(again) == offsets[4:]
    assert {m["delivery_attempt"] for m in again} == {1}
    r = await client.get(sub_path(topic, "s") + "/dead-letters")
    assert offsets_of(r.json()["messages"]) == offsets[:4]


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"offset": 1, "to": "earliest"},
        {"offset": 1, "time": "2026-01-01T00:00:00Z"},
        {"time": "2026-01-01T00:00:00Z", "to": "latest"},
        {"offset": None, "time": None, "to": None},
        {"time": "2026-01-01T00:00:00"},  # no offset: ambiguous
        {"time": "2026-01-01 00:00:00"},
        {"time": "yesterday"},
        {"time": 1700000000.5 * 10**20},
        {"to": "middle"},
        {"to": "EARLIEST"},
        {"offset": -1},
        {"offset": "ten"},
        {"offset": 2**63},
        {"offset": 1, "extra": True},
    ],
)
async def test_seek_validation(client, body):
    topic = await setup(client)
    offsets = await publish(client, topic, "a", "b")
    r = await client.post(sub_path(topic, "s") + "/seek", json=body)
    assert_problem(r, 422)
    # nothing moved
    assert (await stats(client, topic, "s"))["committed_offset"] == offsets[0]
