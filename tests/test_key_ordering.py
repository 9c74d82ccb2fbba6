"""ordered_by_key: one message in flight per key, in offset order; later messages of a key
wait while an earlier one is leased, backing off or delayed; keyless messages flow freely;
a batch hands out the heads of many keys; a stuck key does not slow down the others."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections import defaultdict

import httpx

from tests.helpers import (
    ack,
    create_subscription,
    nack,
    offsets_of,
    publish,
    pull,
    stats,
    sub_path,
    topic_with_subscription,
)


async def ordered(client, **config) -> str:
    defaults = {"retry_min_seconds": 1, "retry_max_seconds": 1, "ack_deadline_seconds": 60}
    return await topic_with_subscription(client, ordered_by_key=True, **{**defaults, **config})


async def publish_keyed(client, topic, *keys, **fields) -> list[int]:
    """One message per key given (None: no key); value is (key, index)."""
    messages = [{"value": [k, i], "key": k, **fields} for i, k in enumerate(keys)]
    r = await client.post(f"/v1/topics/{topic}/messages", json={"messages": messages})
    assert r.status_code == 201, r.text
    return [m["offset"] for m in r.json()["messages"]]


async def test_one_in_flight_per_key_in_offset_order(client):
    topic = await ordered(client)
    a1, b1, a2, n1, a3, b2, n2 = await publish_keyed(
        client, topic, "A", "B", "A", None, "A", "B", None
    )
    first = await pull(client, topic, "s", 10)
    # heads of A and B, plus every keyless message
    assert offsets_of(first) == [a1, b1, n1, n2]
    assert await pull(client, topic, "s", 10) == []
    s = await stats(client, topic, "s")
    assert (s["in_flight"], s["delayed"], s["backlog"]) == (4, 3, 0)

    by_offset = {m["offset"]: m for m in first}
    await ack(client, topic, "s", [by_offset[a1]["receipt"]])
    [m] = await pull(client, topic, "s", 10)
    assert m["offset"] == a2
    await ack(client, topic, "s", [m["receipt"], by_offset[b1]["receipt"]])
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == [a3, b2]
    await ack(client, topic, "s", [g["receipt"] for g in got])
    assert await pull(client, topic, "s", 10) == []
    await ack(client, topic, "s", [by_offset[n1]["receipt"], by_offset[n2]["receipt"]])
    assert (await stats(client, topic, "s"))["lag"] == 0


async def test_next_of_key_waits_while_earlier_is_backing_off_after_nack(harness):
    client, clock = harness.client, harness.clock
    topic = await ordered(client, retry_min_seconds=5, retry_max_seconds=5)
    a1, a2, b1 = await publish_keyed(client, topic, "A", "A", "B")
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == [a1, b1]
    await nack(client, topic, "s", [got[0]["receipt"]], delay_seconds=30)
    # a2 is not delivered while a1 waits for its retry
    assert await pull(client, topic, "s", 10) == []
    clock.advance(27)  # 3 s before the delay ends
    assert await pull(client, topic, "s", 10) == []
    clock.advance(6)
    [again] = await pull(client, topic, "s", 10)
    assert (again["offset"], again["delivery_attempt"]) == (a1, 2)
    # default backoff after nack (5 s) holds a2 back too
    await nack(client, topic, "s", [again["receipt"]])
    assert await pull(client, topic, "s", 10) == []
    clock.advance(8)
    [again] = await pull(client, topic, "s", 10)
    assert (again["offset"], again["delivery_attempt"]) == (a1, 3)
    await ack(client, topic, "s", [again["receipt"]])
    [nxt] = await pull(client, topic, "s", 10)
    assert (nxt["offset"], nxt["delivery_attempt"]) == (a2, 1)


async def test_next_of_key_waits_while_earlier_lease_expires_and_is_redelivered(harness):
    client, clock = harness.client, harness.clock
    topic = await ordered(client, retry_min_seconds=5, retry_max_seconds=5)
    a1, a2 = await publish_keyed(client, topic, "A", "A")
    [m] = await pull(client, topic, "s", 10, ack_deadline_seconds=5)
    assert m["offset"] == a1
    clock.advance(7)  # expired; 3 s of its backoff (5 s) still to run
    assert await pull(client, topic, "s", 10) == []
    clock.advance(6)
    [m] = await pull(client, topic, "s", 10)
    assert (m["offset"], m["delivery_attempt"]) == (a1, 2)
    await ack(client, topic, "s", [m["receipt"]])
    assert offsets_of(await pull(client, topic, "s", 10)) == [a2]


async def test_next_of_key_waits_while_earlier_is_delayed(harness):
    client, clock = harness.client, harness.clock
    topic = await ordered(client)
    [a1] = await publish_keyed(client, topic, "A", delay_seconds=60)
    a2, b1, n1 = await publish_keyed(client, topic, "A", "B", None)
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == [b1, n1]
    await ack(client, topic, "s", [m["receipt"] for m in got])
    clock.advance(30)
    assert await pull(client, topic, "s", 10) == []
    clock.advance(31)
    [m] = await pull(client, topic, "s", 10)
    assert m["offset"] == a1
    await ack(client, topic, "s", [m["receipt"]])
    assert offsets_of(await pull(client, topic, "s", 10)) == [a2]


async def test_delayed_later_message_of_a_busy_key_waits_for_the_earlier_one(harness):
    client, clock = harness.client, harness.clock
    topic = await ordered(client)
    [a1] = await publish_keyed(client, topic, "A")
    [m1] = await pull(client, topic, "s", 10)
    assert m1["offset"] == a1
    # a2 is delayed; its delay ends while a1 is still leased: it must keep waiting.
    [a2] = await publish_keyed(client, topic, "A", delay_seconds=10)
    assert await pull(client, topic, "s", 10) == []
    clock.advance(11)
    assert await pull(client, topic, "s", 10) == []
    await ack(client, topic, "s", [m1["receipt"]])
    assert offsets_of(await pull(client, topic, "s", 10)) == [a2]


async def test_delay_of_a_held_back_message_still_counts_after_release(harness):
    client, clock = harness.client, harness.clock
    topic = await ordered(client)
    [a1] = await publish_keyed(client, topic, "A")
    [m1] = await pull(client, topic, "s", 10)
    [a2] = await publish_keyed(client, topic, "A", delay_seconds=60)
    assert await pull(client, topic, "s", 10) == []  # a2 taken from the log, held back
    await ack(client, topic, "s", [m1["receipt"]])
    # a1 is done, but a2's own delay has not ended yet
    assert await pull(client, topic, "s", 10) == []
    clock.advance(61)
    assert offsets_of(await pull(client, topic, "s", 10)) == [a2]
    assert a1 < a2


async def test_dead_lettered_head_releases_the_next_of_its_key(client):
    topic = await ordered(client, max_deliveries=2)
    a1, a2 = await publish_keyed(client, topic, "A", "A")
    for attempt in (1, 2):
        [m] = await pull(client, topic, "s", 10)
        assert (m["offset"], m["delivery_attempt"]) == (a1, attempt)
        await nack(client, topic, "s", [m["receipt"]], delay_seconds=0)
    [m] = await pull(client, topic, "s", 10)
    assert (m["offset"], m["delivery_attempt"]) == (a2, 1)
    # A redriven head waits behind the message of its key now in flight.
    r = await client.post(sub_path(topic, "s") + "/dead-letters/redrive", json={})
    assert r.json()["redriven"] == 1
    assert await pull(client, topic, "s", 10) == []
    await ack(client, topic, "s", [m["receipt"]])
    [m] = await pull(client, topic, "s", 10)
    assert (m["offset"], m["delivery_attempt"]) == (a1, 1)


async def test_head_parked_by_lease_expiry_releases_the_next_of_its_key(harness):
    client, clock = harness.client, harness.clock
    topic = await ordered(client, max_deliveries=1)
    a1, a2 = await publish_keyed(client, topic, "A", "A")
    [m] = await pull(client, topic, "s", 10, ack_deadline_seconds=5)
    assert m["offset"] == a1
    clock.advance(6)  # the only attempt expired: parked, and a2 is next
    [m] = await pull(client, topic, "s", 10)
    assert (m["offset"], m["delivery_attempt"]) == (a2, 1)
    r = await client.get(sub_path(topic, "s") + "/dead-letters")
    assert offsets_of(r.json()["messages"]) == [a1]


async def test_keys_do_not_mix_between_subscriptions_or_unordered_ones(client):
    topic = await ordered(client)
    await create_subscription(client, topic, "plain")
    offsets = await publish_keyed(client, topic, "A", "A", "A")
    assert offsets_of(await pull(client, topic, "plain", 10)) == offsets  # not ordered
    assert offsets_of(await pull(client, topic, "s", 10)) == offsets[:1]


async def test_turning_ordering_off_releases_held_back_messages(client):
    topic = await ordered(client)
    a1, a2, a3 = await publish_keyed(client, topic, "A", "A", "A")
    [m] = await pull(client, topic, "s", 10)
    assert m["offset"] == a1
    await create_subscription(client, topic, "s", ordered_by_key=False)
    await ack(client, topic, "s", [m["receipt"]])
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == [a2, a3]


async def test_turning_ordering_on_holds_back_behind_leases_taken_before(client):
    topic = await topic_with_subscription(client, start="earliest")
    await publish(client, topic, "k0", "k1", "k2", key="k")
    (first,) = await pull(client, topic, "s", 1)  # leased while ordering was off
    r = await client.put(sub_path(topic, "s"), json={"ordered_by_key": True})
    assert r.status_code == 200, r.text
    assert await pull(client, topic, "s", 10) == []  # "k1" waits behind the lease
    await ack(client, topic, "s", [first["receipt"]])
    got = await pull(client, topic, "s", 10)
    assert [m["value"] for m in got] == ["k1"]


async def test_batch_hands_out_heads_of_many_keys(client):
    topic = await ordered(client)
    keys = [f"k{i}" for i in range(30)]
    # Grouped by key: all of k0 first, then all of k1, ... (the hard case for fairness)
    offsets_by_key: dict[str, list[int]] = {}
    for k in keys:
        offsets_by_key[k] = await publish_keyed(client, topic, *[k] * 8)
    got = await pull(client, topic, "s", 30)
    assert sorted(offsets_of(got)) == sorted(v[0] for v in offsets_by_key.values())
    assert {m["key"] for m in got} == set(keys)
    # Next round: the second message of every key.
    await ack(client, topic, "s", [m["receipt"] for m in got])
    got = await pull(client, topic, "s", 100)
    assert sorted(offsets_of(got)) == sorted(v[1] for v in offsets_by_key.values())


async def test_key_order_under_concurrent_consumers_with_random_nacks(harness):
    client = harness.client
    topic = await ordered(client, max_deliveries=0)
    rng = random.Random(11)
    keys = [f"k{i}" for i in range(12)] + [None]
    plan = [rng.choice(keys) for _ in range(600)]
    offsets = []
    for start in range(0, len(plan), 200):
        offsets += await publish_keyed(client, topic, *plan[start : start + 200])
    key_of = dict(zip(offsets, plan, strict=True))
    acked_by_key: dict[str | None, list[int]] = defaultdict(list)
    holds: dict[str, list[tuple[float, float, int]]] = defaultdict(list)
    transport = httpx.ASGITransport(app=harness.app)

    async def consumer() -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://sluice.test") as c:
            idle = 0
            while idle < 4:
                batch = await pull(c, topic, "s", rng.choice([1, 5, 20]))
                received = time.monotonic()
                if not batch:
                    idle += 1
                    await asyncio.sleep(0.02)
                    continue
                idle = 0
                await asyncio.sleep(rng.random() * 0.005)
                failed = [m for m in batch if rng.random() < 0.2]
                done = [m for m in batch if m not in failed]
                released = time.monotonic()
                for m in batch:
                    if m["key"] is not None:
                        holds[m["key"]].append((received, released, m["offset"]))
                if failed:
                    r = await nack(c, topic, "s", [m["receipt"] for m in failed], delay_seconds=0)
                    assert r["nacked"] == len(failed), r
                if done:
                    r = await ack(c, topic, "s", [m["receipt"] for m in done])
                    assert r == {"acked": len(done), "stale": []}, r
                    for m in done:
                        acked_by_key[m["key"]].append(m["offset"])

    await asyncio.wait_for(asyncio.gather(*(consumer() for _ in range(4))), 240)

    for k in keys:
        expected = [o for o in offsets if key_of[o] == k]
        if k is None:
            assert sorted(acked_by_key[k]) == expected
        else:
            # strictly increasing and complete
            assert acked_by_key[k] == expected, k
    for k, leases in holds.items():
        leases.sort()
        for (_, released, off1), (received, _, off2) in itertools.pairwise(leases):
            assert received >= released, (k, off1, off2)
    assert (await stats(client, topic, "s"))["lag"] == 0


async def test_a_stuck_key_does_not_slow_down_other_keys(harness):
    client = harness.client
    topic = await ordered(client)
    [head] = await publish_keyed(client, topic, "A")
    [m] = await pull(client, topic, "s", 10)
    assert m["offset"] == head
    for _ in range(3):
        await publish_keyed(client, topic, *["A"] * 1000)
    others = await publish_keyed(client, topic, *[f"o{i}" for i in range(50)])

    # The first pulls walk past A's backlog (bounded read-ahead per claim)...
    started = time.monotonic()
    got = await pull(client, topic, "s", 100, wait_seconds=5)
    got += await pull(client, topic, "s", 100)
    first = time.monotonic() - started
    print(f"\nfirst pulls past 3000 held-back messages: {first * 1000:.0f} ms")
    assert sorted(offsets_of(got)) == others
    assert first < 5
    await ack(client, topic, "s", [g["receipt"] for g in got])

    # ...after which claims never touch them again.
    timings = []
    for round_ in range(10):
        fresh = await publish_keyed(client, topic, *[f"r{round_}-{i}" for i in range(20)])
        started = time.monotonic()
        got = await pull(client, topic, "s", 100)
        timings.append(time.monotonic() - started)
        assert offsets_of(got) == fresh
        await ack(client, topic, "s", [g["receipt"] for g in got])
    timings.sort()
    print(f"claims with one key stuck behind 3000: median {timings[5] * 1000:.1f} ms")
    assert timings[5] < 0.25, timings

    # The held-back messages wait in their key's FIFO: claims step past them once, as
    # the cursor reaches them, and never look at them again.
    async with harness.ctx.pool.acquire() as conn:
        ids = await conn.fetchrow(
            "SELECT s.topic_id, s.sub_id FROM sluice.subscriptions s "
            "JOIN sluice.topics t USING (topic_id) WHERE t.name = $1 AND s.name = 's'",
            topic,
        )
        blocked = await conn.fetchval(
            "SELECT count(*) - 1 FROM sluice.key_waits WHERE topic_id = $1 AND sub_id = $2 "
            "AND key = 'A'",
            ids["topic_id"],
            ids["sub_id"],
        )
    assert blocked == 3000
    s = await stats(client, topic, "s")
    assert (s["in_flight"], s["delayed"], s["backlog"]) == (1, 3000, 0)
    # Releasing A hands its next message out.
    await ack(client, topic, "s", [m["receipt"]])
    [nxt] = await pull(client, topic, "s", 10)
    assert nxt["offset"] == head + 1
