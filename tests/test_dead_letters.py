"""Dead letters: parked after max_deliveries (by nack and by expiry), listed, copied to the
dead-letter topic with origin headers, and re-driven."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from tests.conftest import unique
from tests.helpers import (
    ack,
    assert_problem,
    create_subscription,
    create_topic,
    nack,
    offsets_of,
    publish,
    pull,
    stats,
    sub_path,
    topic_lock_held,
    topic_with_subscription,
)


async def dead_letters(client, topic, sub, **params) -> dict:
    r = await client.get(sub_path(topic, sub) + "/dead-letters", params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def redrive(client, topic, sub, body=None) -> int:
    r = await client.post(sub_path(topic, sub) + "/dead-letters/redrive", json=body or {})
    assert r.status_code == 200, r.text
    return r.json()["redriven"]


async def nack_until_dead(client, clock, topic, sub, count: int, attempts: int) -> None:
    """Deliver `count` messages `attempts` times, nacking each time."""
    for attempt in range(1, attempts + 1):
        got = await pull(client, topic, sub, count)
        assert len(got) == count, (attempt, got)
        assert {m["delivery_attempt"] for m in got} == {attempt}
        result = await nack(client, topic, sub, [m["receipt"] for m in got])
        assert result == {"nacked": count, "stale": []}
        clock.advance(2)  # past the backoff (retry 1 s)


async def test_parked_after_max_deliveries_of_nacks(harness):
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(
        client, max_deliveries=3, retry_min_seconds=1, retry_max_seconds=1
    )
    [bad] = await publish(client, topic, {"poison": True}, key="k", headers={"a": "b"})
    [good] = await publish(client, topic, "fine")

    # the good message is consumed normally alongside
    for attempt in (1, 2, 3):
        got = await pull(client, topic, "s", 10)
        assert offsets_of(got)[0] == bad
        assert got[0]["delivery_attempt"] == attempt
        for m in got:
            if m["offset"] == good:
                await ack(client, topic, "s", [m["receipt"]])
        await nack(client, topic, "s", [got[0]["receipt"]])
        clock.advance(2)

    # parked: never delivered again, however long we wait
    clock.advance(3600)
    assert await pull(client, topic, "s", 10) == []
    s = await stats(client, topic, "s")
    assert (s["dead_lettered"], s["lag"], s["backlog"], s["delayed"]) == (1, 0, 0, 0)
    assert s["committed_offset"] == good + 1

    listing = await dead_letters(client, topic, "s")
    assert len(listing["messages"]) == 1
    parked = listing["messages"][0]
    assert parked["offset"] == bad
    assert parked["value"] == {"poison": True}
    assert parked["key"] == "k"
    assert parked["headers"] == {"a": "b"}
    assert parked["delivery_attempts"] == 3
    assert datetime.fromisoformat(parked["published_at"]).tzinfo is not None
    assert datetime.fromisoformat(parked["dead_lettered_at"]) > datetime.fromisoformat(
        parked["published_at"]
    )
    assert listing["next_offset"] == bad + 1

    await harness.ctx.rates.flush(harness.ctx.pool, clock.skew)
    rates = (await stats(client, topic, "s"))["rates_per_second"]
    assert rates["dead_lettered"] == pytest.approx(1 / 60, abs=0.002)  # one in the last minute


async def test_parked_after_max_deliveries_of_expired_leases(harness):
    client, clock = harness.client, harness.clock
    topic = unique()
    await create_topic(client, topic)
    await create_subscription(
        client,
        topic,
        "s",
        max_deliveries=2,
        ack_deadline_seconds=10,
        retry_min_seconds=5,
        retry_max_seconds=5,
    )
    [offset] = await publish(client, topic, "slow")
    [first] = await pull(client, topic, "s")
    clock.advance(10.5 + 5)
    [second] = await pull(client, topic, "s")
    assert (second["offset"], second["delivery_attempt"]) == (offset, 2)
    # The last attempt's lease expires: parked at once, no backoff and no third delivery.
    clock.advance(10.5)
    assert await pull(client, topic, "s") == []
    listing = await dead_letters(client, topic, "s")
    assert [(m["offset"], m["delivery_attempts"]) for m in listing["messages"]] == [(offset, 2)]
    s = await stats(client, topic, "s")
    assert (s["dead_lettered"], s["lag"], s["in_flight"]) == (1, 0, 0)
    # The receipts of a parked message are stale.
    both = [first["receipt"], second["receipt"]]
    assert await ack(client, topic, "s", both) == {"acked": 0, "stale": both}
    clock.advance(3600)
    assert await pull(client, topic, "s") == []


async def test_ack_on_the_last_attempt_is_not_dead_lettered(harness):
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(
        client, max_deliveries=2, retry_min_seconds=1, retry_max_seconds=1
    )
    await publish(client, topic, "m")
    [m] = await pull(client, topic, "s")
    await nack(client, topic, "s", [m["receipt"]])
    clock.advance(2)
    [m] = await pull(client, topic, "s")
    assert m["delivery_attempt"] == 2
    assert (await ack(client, topic, "s", [m["receipt"]]))["acked"] == 1
    clock.advance(100)
    assert await pull(client, topic, "s") == []
    assert (await dead_letters(client, topic, "s"))["messages"] == []
    assert (await stats(client, topic, "s"))["dead_lettered"] == 0


async def test_max_deliveries_one_and_zero(harness):
    client, clock = harness.client, harness.clock
    topic = unique()
    await create_topic(client, topic)
    await create_subscription(client, topic, "once", max_deliveries=1, retry_min_seconds=1)
    await create_subscription(
        client, topic, "forever", max_deliveries=0, retry_min_seconds=1, retry_max_seconds=1
    )
    [offset] = await publish(client, topic, "m")
    [m] = await pull(client, topic, "once")
    await nack(client, topic, "once", [m["receipt"]], delay_seconds=0)
    assert await pull(client, topic, "once") == []
    assert offsets_of((await dead_letters(client, topic, "once"))["messages"]) == [offset]

    for attempt in range(1, 26):
        [m] = await pull(client, topic, "forever")
        assert m["delivery_attempt"] == attempt
        await nack(client, topic, "forever", [m["receipt"]], delay_seconds=0)
    clock.advance(40)  # and expiry with unlimited deliveries: redelivered too
    [m] = await pull(client, topic, "forever", ack_deadline_seconds=1)
    clock.advance(3)
    [m] = await pull(client, topic, "forever")
    assert m["delivery_attempt"] == 27
    assert (await dead_letters(client, topic, "forever"))["messages"] == []


async def test_copied_to_dead_letter_topic_with_origin_headers(harness):
    client, clock = harness.client, harness.clock
    topic, dlq = unique(), unique("dlq")
    await create_topic(client, topic)
    await create_topic(client, dlq)
    await create_subscription(client, dlq, "inspect", start="earliest")
    await create_subscription(
        client,
        topic,
        "billing",
        max_deliveries=2,
        dead_letter_topic=dlq,
        retry_min_seconds=1,
        retry_max_seconds=1,
    )
    offsets = await publish(client, topic, {"id": 1}, key="cust-1", headers={"trace": "t1"})
    offsets += await publish(client, topic, [1, 2, 3])
    await nack_until_dead(client, clock, topic, "billing", 2, 2)

    r = await client.get(f"/v1/topics/{dlq}/messages")
    assert r.status_code == 200, r.text
    copies = r.json()["messages"]
    assert len(copies) == 2
    by_origin = {int(c["headers"]["sluice-origin-offset"]): c for c in copies}
    assert set(by_origin) == set(offsets)
    first = by_origin[offsets[0]]
    assert first["value"] == {"id": 1}
    assert first["key"] == "cust-1"
    assert first["headers"] == {
        "trace": "t1",
        "sluice-origin-topic": topic,
        "sluice-origin-offset": str(offsets[0]),
        "sluice-origin-subscription": "billing",
        "sluice-delivery-attempts": "2",
    }
    second = by_origin[offsets[1]]
    assert second["value"] == [1, 2, 3]
    assert second["key"] is None
    assert second["headers"]["sluice-origin-topic"] == topic
    assert second["headers"]["sluice-delivery-attempts"] == "2"
    # The copies are ordinary messages of the dead-letter topic, delivered to its consumers.
    got = await pull(client, dlq, "inspect", 10)
    assert sorted(int(m["headers"]["sluice-origin-offset"]) for m in got) == offsets
    # ...and they are parked on the origin subscription too.
    assert offsets_of((await dead_letters(client, topic, "billing"))["messages"]) == offsets
    # Parking by expiry copies as well.
    [third] = await publish(client, topic, "late")
    await pull(client, topic, "billing", ack_deadline_seconds=1)
    clock.advance(2.5)
    await pull(client, topic, "billing", ack_deadline_seconds=1)
    clock.advance(1.5)
    assert await pull(client, topic, "billing") == []
    got = await pull(client, dlq, "inspect", 10)
    assert [m["headers"]["sluice-origin-offset"] for m in got] == [str(third)]
    assert got[0]["headers"]["sluice-delivery-attempts"] == "2"


async def test_a_dead_letter_copy_is_never_older_than_its_topics_newest_message(harness):
    """A nack at the last attempt reads its time when it starts; its copy waits for the
    dead-letter topic's lock behind another publish of that topic, which stamps a later time.
    The copy, appended after it, is stamped no earlier (revision 0016): published_at grows
    with the offset, which a seek by time relies on."""
    client = harness.client
    topic, dlq = unique(), unique("dlq")
    await create_topic(client, topic)
    await create_topic(client, dlq)
    await create_subscription(client, topic, "s", max_deliveries=1, dead_letter_topic=dlq)
    await publish(client, topic, "doomed")
    [message] = await pull(client, topic, "s")
    async with topic_lock_held(harness.ctx.pool, dlq) as holder:
        nacking = asyncio.create_task(nack(client, topic, "s", [message["receipt"]]))
        await asyncio.sleep(0.3)
        assert not nacking.done()  # its copy waits for the lock
        row = await holder.fetchrow(
            "SELECT * FROM sluice.publish_batch($1, ARRAY['\"meanwhile\"'], NULL, NULL, NULL, "
            "NULL, 100, $2)",
            dlq,
            harness.clock.skew,
        )
        assert row["status"] == "ok"
    assert (await asyncio.wait_for(nacking, 10))["nacked"] == 1
    r = await client.get(f"/v1/topics/{dlq}/messages")
    meanwhile, copy = r.json()["messages"]
    assert (meanwhile["value"], copy["value"]) == ("meanwhile", "doomed")
    assert copy["offset"] > meanwhile["offset"]
    published = [datetime.fromisoformat(m["published_at"]) for m in (meanwhile, copy)]
    assert published[1] >= published[0], published


async def test_dead_lettering_still_parks_when_the_dead_letter_topic_is_gone(client):
    topic, dlq = unique(), unique("dlq")
    await create_topic(client, topic)
    await create_topic(client, dlq)
    await create_subscription(
        client, topic, "s", max_deliveries=1, dead_letter_topic=dlq, retry_min_seconds=1
    )
    assert (await client.delete(f"/v1/topics/{dlq}")).status_code == 204
    [offset] = await publish(client, topic, "m")
    [m] = await pull(client, topic, "s")
    assert (await nack(client, topic, "s", [m["receipt"]]))["nacked"] == 1
    assert offsets_of((await dead_letters(client, topic, "s"))["messages"]) == [offset]


async def test_redrive_all_makes_them_deliverable_again_from_attempt_one(harness):
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(
        client, max_deliveries=2, retry_min_seconds=1, retry_max_seconds=1
    )
    offsets = await publish(client, topic, *range(5))
    await nack_until_dead(client, clock, topic, "s", 5, 2)
    assert (await stats(client, topic, "s"))["dead_lettered"] == 5
    assert await pull(client, topic, "s", 10) == []

    assert await redrive(client, topic, "s") == 5
    s = await stats(client, topic, "s")
    assert (s["dead_lettered"], s["backlog"], s["lag"]) == (0, 5, 5)
    assert s["committed_offset"] == offsets[0]
    assert (await dead_letters(client, topic, "s"))["messages"] == []
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == offsets
    assert {m["delivery_attempt"] for m in got} == {1}
    # The attempt count starts afresh: two more failures park them again.
    await nack(client, topic, "s", [m["receipt"] for m in got])
    clock.advance(2)
    got = await pull(client, topic, "s", 10)
    assert {m["delivery_attempt"] for m in got} == {2}
    await nack(client, topic, "s", [m["receipt"] for m in got])
    assert (await stats(client, topic, "s"))["dead_lettered"] == 5
    # Nothing left to re-drive twice.
    assert await redrive(client, topic, "s") == 5
    assert await redrive(client, topic, "s") == 0


async def test_redrive_by_offsets(client):
    topic = await topic_with_subscription(client, max_deliveries=1)
    offsets = await publish(client, topic, *range(4))
    got = await pull(client, topic, "s", 10)
    await nack(client, topic, "s", [m["receipt"] for m in got])
    assert (await stats(client, topic, "s"))["dead_lettered"] == 4

    chosen = [offsets[1], offsets[3]]
    # unknown offsets (never parked, or not existing) are ignored
    assert await redrive(client, topic, "s", {"offsets": [*chosen, 10**9]}) == 2
    listing = await dead_letters(client, topic, "s")
    assert offsets_of(listing["messages"]) == [offsets[0], offsets[2]]
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == chosen
    assert {m["delivery_attempt"] for m in got} == {1}
    assert (await ack(client, topic, "s", [m["receipt"] for m in got]))["acked"] == 2
    s = await stats(client, topic, "s")
    assert (s["dead_lettered"], s["lag"]) == (2, 0)
    assert await redrive(client, topic, "s", {"offsets": []}) == 0
    for bad in ({"offsets": [-1]}, {"offsets": "all"}, {"offsets": [1], "x": 1}):
        r = await client.post(sub_path(topic, "s") + "/dead-letters/redrive", json=bad)
        assert_problem(r, 422)


async def test_dead_letter_listing_pages(harness):
    client = harness.client
    topic = await topic_with_subscription(client, max_deliveries=1)
    offsets = await publish(client, topic, *range(7))
    got = await pull(client, topic, "s", 10)
    await nack(client, topic, "s", [m["receipt"] for m in got])
    seen = []
    cursor = 0
    while True:
        page = await dead_letters(client, topic, "s", from_offset=cursor, limit=3)
        if not page["messages"]:
            break
        assert len(page["messages"]) <= 3
        seen += offsets_of(page["messages"])
        cursor = page["next_offset"]
    assert seen == offsets
    page = await dead_letters(client, topic, "s", from_offset=offsets[5])
    assert offsets_of(page["messages"]) == offsets[5:]
    for bad in ({"limit": 0}, {"limit": 1001}, {"from_offset": -1}):
        r = await client.get(sub_path(topic, "s") + "/dead-letters", params=bad)
        assert_problem(r, 422)


async def test_a_lapsed_last_attempt_counts_as_dead_lettered_before_it_is_parked(harness):
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(
        client, start="earliest", max_deliveries=1, ack_deadline_seconds=5
    )
    await publish(client, topic, "only", "other")
    assert len(await pull(client, topic, "s", 1)) == 1
    clock.advance(6)  # the only allowed lease lapsed; nobody has claimed since
    numbers = await stats(client, topic, "s")
    assert numbers["dead_lettered"] == 1
    assert numbers["backlog"] == 1  # "other" only
    assert numbers["committed_offset"] == 1
    assert numbers["lag"] == 1


# ---- dead letters asked for: nack with dead_letter (revision 0006) ------------------------


async def test_nack_with_dead_letter_parks_at_once_and_copies(harness):
    client, clock = harness.client, harness.clock
    topic, dlq = unique(), unique("dlq")
    await create_topic(client, topic)
    await create_topic(client, dlq)
    await create_subscription(client, dlq, "inspect", start="earliest")
    # max_deliveries 0: unlimited retries, yet a dead letter asked for is parked.
    await create_subscription(
        client, topic, "s", max_deliveries=0, dead_letter_topic=dlq, retry_min_seconds=1
    )
    bad, good, other = await publish(client, topic, {"poison": 1}, "fine", "other")
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == [bad, good, other]
    by_offset = {m["offset"]: m["receipt"] for m in got}

    result = await nack(client, topic, "s", [by_offset[bad]], dead_letter=True)
    assert result == {"nacked": 1, "stale": []}
    await ack(client, topic, "s", [by_offset[good]])
    await nack(client, topic, "s", [by_offset[other]])  # an ordinary nack beside it
    # Its receipt is settled: neither an ack nor another nack applies.
    r = await client.post(sub_path(topic, "s") + "/ack", json={"receipts": [by_offset[bad]]})
    assert r.json() == {"acked": 0, "stale": [by_offset[bad]]}
    await harness.ctx.rates.flush(harness.ctx.pool, clock.skew)
    rates = (await stats(client, topic, "s"))["rates_per_second"]
    # Counted as a dead letter, not as a nack (the nack of `other` is the one nack).
    assert rates["dead_lettered"] == pytest.approx(1 / 60, abs=0.002)
    assert rates["nacked"] == pytest.approx(1 / 60, abs=0.002)

    clock.advance(3600)
    again = await pull(client, topic, "s", 10)
    assert offsets_of(again) == [other]  # the parked one never comes back
    assert again[0]["delivery_attempt"] == 2
    await ack(client, topic, "s", [again[0]["receipt"]])
    s = await stats(client, topic, "s")
    assert (s["dead_lettered"], s["lag"], s["backlog"], s["delayed"]) == (1, 0, 0, 0)

    [parked] = (await dead_letters(client, topic, "s"))["messages"]
    assert (parked["offset"], parked["value"], parked["delivery_attempts"]) == (
        bad,
        {"poison": 1},
        1,
    )
    [copy] = await pull(client, dlq, "inspect", 10)
    assert copy["value"] == {"poison": 1}
    assert copy["headers"]["sluice-origin-offset"] == str(bad)
    assert copy["headers"]["sluice-delivery-attempts"] == "1"

    # Re-driven, it is delivered again from attempt 1.
    assert await redrive(client, topic, "s") == 1
    [back] = await pull(client, topic, "s", 10)
    assert (back["offset"], back["delivery_attempt"]) == (bad, 1)


async def test_nack_with_dead_letter_releases_the_next_message_of_its_key(client):
    topic = await topic_with_subscription(client, ordered_by_key=True)
    first, second = await publish(client, topic, "a1", "a2", key="a")
    [m] = await pull(client, topic, "s", 10)
    assert m["offset"] == first
    await nack(client, topic, "s", [m["receipt"]], dead_letter=True)
    [n] = await pull(client, topic, "s", 10)
    assert n["offset"] == second


async def test_nack_with_dead_letter_and_a_delay_is_refused(client):
    topic = await topic_with_subscription(client)
    await publish(client, topic, "m")
    [m] = await pull(client, topic, "s")
    r = await client.post(
        sub_path(topic, "s") + "/nack",
        json={"receipts": [m["receipt"]], "dead_letter": True, "delay_seconds": 5},
    )
    assert_problem(r, 422)
    r = await client.post(
        sub_path(topic, "s") + "/nack", json={"receipts": [m["receipt"]], "dead_letter": 1}
    )
    assert_problem(r, 422)  # strict: a boolean, not a number
    # Nothing was applied: the receipt still parks it.
    assert (await nack(client, topic, "s", [m["receipt"]], dead_letter=True))["nacked"] == 1
    assert (await stats(client, topic, "s"))["dead_lettered"] == 1
