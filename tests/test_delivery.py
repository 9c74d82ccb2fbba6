"""Reliable delivery: pull/ack lifecycle, leases and their expiry, stale receipts, extend,
nack with delay and backoff, delayed messages, and competing consumers."""

from __future__ import annotations

import asyncio
import base64
import itertools
import os
import random
import time
import uuid
from datetime import UTC, datetime, timedelta

import httpx

from sluice.queue import receipts
from sluice.records import Delivery
from tests.helpers import (
    ack,
    assert_problem,
    create_subscription,
    extend,
    nack,
    offsets_of,
    publish,
    pull,
    stats,
    sub_path,
    topic_with_subscription,
)


async def setup(client, **config) -> str:
    return await topic_with_subscription(client, **config)


# ---- the basic lifecycle -----------------------------------------------------------------------


async def test_pull_returns_every_field(client):
    topic = await setup(client)
    values = [{"n": 1, "nested": [1, {"a": None}]}, "text", None, 12345678901234567890]
    r = await client.post(
        f"/v1/topics/{topic}/messages",
        json={
            "messages": [
                {"value": values[0], "key": "k1", "headers": {"h": "v", "trace": "abc"}},
                {"value": values[1]},
                {"value": values[2], "key": "k2"},
                {"value": values[3]},
            ]
        },
    )
    assert r.status_code == 201, r.text
    offsets = [m["offset"] for m in r.json()["messages"]]
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == offsets
    assert [m["value"] for m in got] == values
    assert [m["key"] for m in got] == ["k1", None, "k2", None]
    assert got[0]["headers"] == {"h": "v", "trace": "abc"}
    assert got[1]["headers"] is None
    receipts = [m["receipt"] for m in got]
    assert len(set(receipts)) == 4
    for m in got:
        assert isinstance(m["receipt"], str) and m["receipt"]
        assert m["delivery_attempt"] == 1
        published = datetime.fromisoformat(m["published_at"])
        deadline = datetime.fromisoformat(m["ack_deadline"])
        assert published.tzinfo is not None and deadline.tzinfo is not None
        # default ack deadline: 30 s after the lease was taken (just after publishing)
        assert timedelta(seconds=29.9) <= deadline - published <= timedelta(seconds=35)
    assert (await ack(client, topic, "s", receipts)) == {"acked": 4, "stale": []}
    assert await pull(client, topic, "s", 10) == []


async def test_pull_ack_deadline_override(client):
    topic = await setup(client, ack_deadline_seconds=10)
    await publish(client, topic, 1, 2)
    [a] = await pull(client, topic, "s", 1)
    [b] = await pull(client, topic, "s", 1, ack_deadline_seconds=600)
    da = datetime.fromisoformat(a["ack_deadline"]) - datetime.fromisoformat(a["published_at"])
    db = datetime.fromisoformat(b["ack_deadline"]) - datetime.fromisoformat(b["published_at"])
    assert timedelta(seconds=9.9) <= da <= timedelta(seconds=15)
    assert timedelta(seconds=599.9) <= db <= timedelta(seconds=605)


async def test_offsets_come_in_order_across_batches(client):
    topic = await setup(client)
    offsets = []
    for chunk in range(5):
        offsets += await publish(client, topic, *[f"{chunk}-{i}" for i in range(10)])
    got = []
    while batch := await pull(client, topic, "s", 7):
        assert len(batch) <= 7
        got += batch
    assert offsets_of(got) == offsets
    assert offsets == sorted(offsets)
    assert (await stats(client, topic, "s"))["in_flight"] == 50


async def test_max_messages_is_respected_and_validated(client):
    topic = await setup(client)
    await publish(client, topic, *range(30))
    assert len(await pull(client, topic, "s", 1)) == 1
    assert len(await pull(client, topic, "s", 25)) == 25
    assert len(await pull(client, topic, "s", 1000)) == 4
    r = await client.post(sub_path(topic, "s") + "/pull", json={})
    assert r.status_code == 200  # defaults: one message, no wait
    for body in (
        {"max_messages": 0},
        {"max_messages": 1001},
        {"wait_seconds": 21},
        {"wait_seconds": -1},
        {"ack_deadline_seconds": 0},
        {"ack_deadline_seconds": 43201},
        {"max_message": 5},
    ):
        assert_problem(await client.post(sub_path(topic, "s") + "/pull", json=body), 422)


async def test_settle_requests_are_validated(client):
    topic = await setup(client)
    base = sub_path(topic, "s")
    for path, body in (
        ("/ack", {}),
        ("/ack", {"receipts": []}),
        ("/ack", {"receipts": "abc"}),
        ("/ack", {"receipts": ["x" * 65]}),
        ("/ack", {"receipts": ["x"] * 1001}),
        ("/ack", {"receipts": ["x"], "extra": 1}),
        ("/nack", {"receipts": ["x"], "delay_seconds": -1}),
        ("/nack", {"receipts": ["x"], "delay_seconds": 43201}),
        ("/extend", {"receipts": ["x"]}),
        ("/extend", {"receipts": ["x"], "ack_deadline_seconds": 0}),
        ("/extend", {"receipts": ["x"], "ack_deadline_seconds": 43201}),
    ):
        assert_problem(await client.post(base + path, json=body), 422)


async def test_delayed_message_is_not_delivered_before_its_time(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client)
    [later] = await publish(client, topic, "later", delay_seconds=30)
    now = await publish(client, topic, "now")
    # A delayed message does not hold back the ones after it.
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == now
    await ack(client, topic, "s", [got[0]["receipt"]])
    clock.advance(27)  # 3 s before the delay ends
    assert await pull(client, topic, "s", 10) == []
    s = await stats(client, topic, "s")
    assert (s["delayed"], s["backlog"]) == (1, 0)
    clock.advance(6)  # 3 s after
    got = await pull(client, topic, "s", 10)
    assert offsets_of(got) == [later]
    assert got[0]["delivery_attempt"] == 1


# ---- expiry and stale receipts -------------------------------------------------------------


async def test_expired_lease_is_redelivered_and_old_receipt_is_stale(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=10, retry_min_seconds=5, retry_max_seconds=5)
    [offset] = await publish(client, topic, "m")
    [first] = await pull(client, topic, "s")
    assert first["delivery_attempt"] == 1

    clock.advance(12)  # lease over, 3 s of its backoff of 5 s still to run
    assert await pull(client, topic, "s") == []
    # The expired lease cannot be acked any more, even before it is redelivered.
    assert await ack(client, topic, "s", [first["receipt"]]) == {
        "acked": 0,
        "stale": [first["receipt"]],
    }
    clock.advance(6)  # 3 s after the backoff
    [second] = await pull(client, topic, "s")
    assert (second["offset"], second["delivery_attempt"]) == (offset, 2)
    assert second["receipt"] != first["receipt"]
    assert datetime.fromisoformat(second["ack_deadline"]) > datetime.fromisoformat(
        first["ack_deadline"]
    )

    old = [first["receipt"]]
    assert await ack(client, topic, "s", old) == {"acked": 0, "stale": old}
    assert await nack(client, topic, "s", old) == {"nacked": 0, "stale": old}
    assert await extend(client, topic, "s", old, 60) == {"extended": 0, "stale": old}
    # The stale calls did not disturb the current lease.
    assert (await stats(client, topic, "s"))["in_flight"] == 1
    assert await ack(client, topic, "s", [second["receipt"]]) == {"acked": 1, "stale": []}
    clock.advance(1000)
    assert await pull(client, topic, "s") == []
    assert (await stats(client, topic, "s"))["lag"] == 0


async def test_new_receipt_works_for_nack_and_extend_after_redelivery(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=5, retry_min_seconds=1, retry_max_seconds=1)
    await publish(client, topic, "m")
    [first] = await pull(client, topic, "s")
    clock.advance(9)  # lease (5 s) and backoff (1 s) over
    [second] = await pull(client, topic, "s")
    assert second["delivery_attempt"] == 2
    assert await extend(client, topic, "s", [second["receipt"]], 100) == {
        "extended": 1,
        "stale": [],
    }
    assert await nack(client, topic, "s", [second["receipt"]], delay_seconds=0) == {
        "nacked": 1,
        "stale": [],
    }
    [third] = await pull(client, topic, "s")
    assert third["delivery_attempt"] == 3
    assert await ack(client, topic, "s", [second["receipt"], first["receipt"]]) == {
        "acked": 0,
        "stale": [second["receipt"], first["receipt"]],
    }
    assert await ack(client, topic, "s", [third["receipt"]]) == {"acked": 1, "stale": []}


async def test_ack_after_ack_is_stale_and_message_never_comes_back(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=10)
    await publish(client, topic, "a", "b")
    got = await pull(client, topic, "s", 2)
    receipts = [m["receipt"] for m in got]
    assert await ack(client, topic, "s", receipts[:1]) == {"acked": 1, "stale": []}
    assert await ack(client, topic, "s", receipts) == {"acked": 1, "stale": receipts[:1]}
    assert await ack(client, topic, "s", receipts) == {"acked": 0, "stale": receipts}
    assert await nack(client, topic, "s", receipts) == {"nacked": 0, "stale": receipts}
    assert await extend(client, topic, "s", receipts, 30) == {"extended": 0, "stale": receipts}
    for _ in range(3):
        clock.advance(3600)
        assert await pull(client, topic, "s", 10) == []
    assert (await stats(client, topic, "s"))["lag"] == 0


async def test_same_receipt_twice_in_one_request_is_applied_once(client):
    topic = await setup(client)
    await publish(client, topic, "a")
    [m] = await pull(client, topic, "s")
    assert await ack(client, topic, "s", [m["receipt"], m["receipt"]]) == {
        "acked": 1,
        "stale": [m["receipt"]],
    }


def _forged(offset: int) -> str:
    raw = offset.to_bytes(8, "big", signed=True) + uuid.uuid4().bytes
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


async def test_garbage_and_forged_receipts_are_stale_never_applied(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=10, retry_min_seconds=1, retry_max_seconds=1)
    await create_subscription(client, topic, "other")
    offsets = await publish(client, topic, "a", "b")
    got = await pull(client, topic, "s", 2)
    [theirs] = await pull(client, topic, "other", 1)
    garbage = [
        "",
        "x",
        "not a receipt at all",
        "=" * 32,
        "!" * 32,
        "A" * 64,
        "é" * 32,
        base64.urlsafe_b64encode(os.urandom(24)).decode(),
        _forged(offsets[0]),  # right offset, guessed token
        _forged(-1),
        _forged(2**63 - 1),
        theirs["receipt"],  # a valid receipt, but of another subscription
        got[0]["receipt"][:-1] + ("A" if got[0]["receipt"][-1] != "A" else "B"),
    ]
    for action, extra in (("ack", {}), ("nack", {}), ("extend", {"ack_deadline_seconds": 60})):
        r = await client.post(
            sub_path(topic, "s") + f"/{action}", json={"receipts": garbage, **extra}
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert sorted(body["stale"]) == sorted(garbage), action
        assert next(v for k, v in body.items() if k != "stale") == 0
    # Nothing was applied: both leases are intact (no ack, no nack)...
    assert (await stats(client, topic, "s"))["in_flight"] == 2
    # ...and expire as usual, 10 s after the pull and 1 s of backoff: the extend by 60 s
    # was not applied either (3 s of margin on each side).
    clock.advance(14)
    again = await pull(client, topic, "s", 2)
    assert [(m["offset"], m["delivery_attempt"]) for m in again] == [(o, 2) for o in offsets]
    # A mix of good and bad receipts applies the good ones.
    mixed = [again[0]["receipt"], "garbage", again[1]["receipt"]]
    assert await ack(client, topic, "s", mixed) == {"acked": 2, "stale": ["garbage"]}
    # The other subscription's lease was untouched by all of this.
    assert await ack(client, topic, "other", [theirs["receipt"]]) == {"acked": 1, "stale": []}


async def test_receipts_of_the_right_length_that_are_not_receipts_are_stale(client):
    """32 characters is a receipt's length, but not every such string is one: the batch
    decoder's fast path must refuse them like the one-by-one path (stale, never a 500)."""
    topic = await setup(client)
    await publish(client, topic, "a")
    [m] = await pull(client, topic, "s")
    garbage = [
        "!" * 32,
        "=" * 32,
        "é" * 32,
        " " * 32,
        "A" * 31 + "=",
        "+" * 32,  # the standard base64 alphabet, not the URL-safe one
        "/" * 32,
        "A" * 30 + "\n\n",
        m["receipt"][:31] + ".",
        "\uff10" * 32,  # fullwidth digit zero: \d would take it
    ]
    assert all(len(receipt) == 32 for receipt in garbage)
    for action, extra in (("ack", {}), ("nack", {}), ("extend", {"ack_deadline_seconds": 60})):
        r = await client.post(
            sub_path(topic, "s") + f"/{action}", json={"receipts": garbage, **extra}
        )
        assert r.status_code == 200, (action, r.text)
        body = r.json()
        assert body["stale"] == garbage, action
        assert next(v for k, v in body.items() if k != "stale") == 0
    r = await client.post(sub_path(topic, "s") + "/pull", json={"ack": garbage})
    assert r.status_code == 200, r.text
    assert (r.json()["acked"], r.json()["stale"]) == (0, garbage)
    # The one real lease was not disturbed.
    assert await ack(client, topic, "s", [m["receipt"]]) == {"acked": 1, "stale": []}


def test_batch_receipt_decoding_equals_one_by_one():
    """decode_all's fast path (one base64 decode of the whole batch) decodes exactly what
    decode() does receipt by receipt."""
    real = [
        receipts.encode(o, lease, seg, uuid.uuid4())
        for o, lease, seg in ((0, 1, 1), (1, 7, 3), (2**40, 2**50, 2**31 - 1), (2**63 - 1, 1, 1))
    ]
    legacy = "A" * 32  # the 24-byte receipts of schema revisions before 0004
    batches = [
        real,
        [*real, "!" * 48],
        ["é" * 48] * 3,
        ["A" * 47 + "="],
        ["+" * 48, "/" * 48],
        [*real[:1], " " * 48],
        ["A" * 48],
        [*real, legacy],
        [legacy, "B" * 32],
    ]
    for batch in batches:
        assert receipts.decode_all(batch) == [receipts.decode(r) for r in batch], batch
    assert receipts.decode_all(real) == [receipts.decode(r) for r in real]
    assert all(key is not None for key in receipts.decode_all(real))
    assert receipts.decode_all(["!" * 48, "=" * 48, "!" * 32]) == [None, None, None]
    assert receipts.decode(legacy) is not None and receipts.decode(legacy).lease_id == 0


def test_batch_receipt_encoding_equals_one_by_one():
    """encode_all (a pull's receipts: one base64 encode of the packed batch, then sliced)
    gives exactly what encode() gives delivery by delivery, and they decode back."""
    now = datetime.now(UTC)
    deliveries = [
        Delivery(offset, lease, seg, uuid.uuid4(), 1, now, now, None, None, "1")
        for offset, lease, seg in (
            (0, 1, 1),
            (1, 7, 3),
            (2**40, 2**50, 2**31 - 1),
            (2**63 - 1, 1, 0),
        )
    ]
    for batch in (deliveries, deliveries[:1], []):
        encoded = receipts.encode_all(batch)
        assert encoded == [receipts.encode(d.offset, d.lease_id, d.seg, d.token) for d in batch]
        assert [r.offset if r else None for r in receipts.decode_all(encoded)] == [
            d.offset for d in batch
        ]


async def test_extend_with_a_stale_or_forged_receipt_leaves_the_current_lease_alone(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=10, retry_min_seconds=1, retry_max_seconds=1)
    a, b = await publish(client, topic, "a", "b")
    [a1] = await pull(client, topic, "s", 1)
    clock.advance(15)  # a's lease (10 s) and its backoff (1 s) are over
    got = await pull(client, topic, "s", 2)
    assert [(m["offset"], m["delivery_attempt"]) for m in got] == [(a, 2), (b, 1)]
    # An older attempt's receipt, and receipts with a right offset and a guessed token, for a
    # redelivered lease and for a first one.
    bad = [a1["receipt"], _forged(a), _forged(b)]
    assert await extend(client, topic, "s", bad, 3600) == {"extended": 0, "stale": bad}
    # The current leases still end 10 s after the pull (+1 s of backoff), not in an hour.
    clock.advance(6)
    assert await pull(client, topic, "s", 2) == []
    clock.advance(9)  # 15 s after the pull
    again = await pull(client, topic, "s", 2)
    assert [(m["offset"], m["delivery_attempt"]) for m in again] == [(a, 3), (b, 2)]
    receipts_now = [m["receipt"] for m in again]
    assert await ack(client, topic, "s", receipts_now) == {"acked": 2, "stale": []}


# ---- extend and nack ---------------------------------------------------------------------------


async def test_extend_moves_the_deadline(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=10, retry_min_seconds=1, retry_max_seconds=1)
    await publish(client, topic, "m")
    [m] = await pull(client, topic, "s")
    clock.advance(8)
    assert await extend(client, topic, "s", [m["receipt"]], 60) == {"extended": 1, "stale": []}
    clock.advance(10)  # past the old deadline (+ backoff)
    assert await pull(client, topic, "s") == []
    s = await stats(client, topic, "s")
    assert (s["in_flight"], s["backlog"]) == (1, 0)
    clock.advance(40)  # 50 s after the extend to 60 s: still leased
    assert await pull(client, topic, "s") == []
    # The receipt stays valid across an extend.
    assert await extend(client, topic, "s", [m["receipt"]], 5) == {"extended": 1, "stale": []}
    clock.advance(5 + 1 + 3)  # the shortened lease, its backoff and 3 s
    [again] = await pull(client, topic, "s")
    assert again["delivery_attempt"] == 2
    assert await ack(client, topic, "s", [m["receipt"]]) == {"acked": 0, "stale": [m["receipt"]]}


async def test_extend_can_shorten_and_cannot_revive_an_expired_lease(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=600, retry_min_seconds=1, retry_max_seconds=1)
    await publish(client, topic, "a", "b")
    a, b = await pull(client, topic, "s", 2)
    assert (await extend(client, topic, "s", [a["receipt"]], 2))["extended"] == 1
    clock.advance(3)
    # a's lease is over: extending it now is stale.
    assert await extend(client, topic, "s", [a["receipt"]], 600) == {
        "extended": 0,
        "stale": [a["receipt"]],
    }
    clock.advance(3)  # past its backoff (1 s)
    assert offsets_of(await pull(client, topic, "s", 2)) == [a["offset"]]
    assert (await ack(client, topic, "s", [b["receipt"]]))["acked"] == 1


async def test_the_newest_extension_of_a_message_decides_its_deadline(harness):
    """Extended to 600 s, then to 2 s: the second (newest) extension is the deadline, so an
    ack 3 s later is stale, however long the first one was."""
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=600, retry_min_seconds=1, retry_max_seconds=1)
    await publish(client, topic, "a")
    [a] = await pull(client, topic, "s", 1)
    assert (await extend(client, topic, "s", [a["receipt"]], 600))["extended"] == 1
    assert (await extend(client, topic, "s", [a["receipt"]], 2))["extended"] == 1
    clock.advance(3)
    assert await ack(client, topic, "s", [a["receipt"]]) == {"acked": 0, "stale": [a["receipt"]]}


async def test_nack_with_delay(harness):
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=600, retry_min_seconds=1, retry_max_seconds=1)
    [offset, other] = await publish(client, topic, "m", "n")
    m, n = await pull(client, topic, "s", 2)
    assert await nack(client, topic, "s", [m["receipt"]], delay_seconds=30) == {
        "nacked": 1,
        "stale": [],
    }
    # A nacked receipt is used up.
    assert await ack(client, topic, "s", [m["receipt"]]) == {"acked": 0, "stale": [m["receipt"]]}
    s = await stats(client, topic, "s")
    assert (s["delayed"], s["in_flight"], s["backlog"]) == (1, 1, 0)
    clock.advance(27)  # 3 s before the delay ends
    assert await pull(client, topic, "s") == []
    clock.advance(6)
    [again] = await pull(client, topic, "s")
    assert (again["offset"], again["delivery_attempt"]) == (offset, 2)
    # delay 0: deliverable at once.
    assert (await nack(client, topic, "s", [again["receipt"]], delay_seconds=0))["nacked"] == 1
    [third] = await pull(client, topic, "s")
    assert (third["offset"], third["delivery_attempt"]) == (offset, 3)
    assert (await ack(client, topic, "s", [third["receipt"], n["receipt"]]))["acked"] == 2
    assert other == n["offset"]


async def test_messages_nacked_together_come_back_one_pull_at_a_time(harness):
    """Messages nacked together wait in one timer. Pulls of one message take it in parts: the
    rest stays due as a timer of its own, written by the claim that split it, and the next
    pull finds it though nothing else happened in between; a timer left due when a pull is
    full comes next (revision 0017: each claim keeps its state's timer wake at the due time
    of the first timer it leaves, and a claim reads the timers only once that has come)."""
    client, clock = harness.client, harness.clock
    topic = await setup(client, ack_deadline_seconds=600, retry_min_seconds=1, retry_max_seconds=1)
    offsets = await publish(client, topic, "a", "b", "c")
    got = await pull(client, topic, "s", 3)
    # c alone first, then a and b together: two timers, c's due first.
    alone, together = [got[2]["receipt"]], [m["receipt"] for m in got[:2]]
    assert await nack(client, topic, "s", alone, delay_seconds=5) == {"nacked": 1, "stale": []}
    assert await nack(client, topic, "s", together, delay_seconds=5) == {"nacked": 2, "stale": []}
    assert await pull(client, topic, "s", 1) == []
    clock.advance(8)
    a, b, c = offsets
    for offset in (c, a, b):
        [again] = await pull(client, topic, "s", 1)
        assert (again["offset"], again["delivery_attempt"]) == (offset, 2)
    assert await pull(client, topic, "s", 1) == []


async def test_nack_default_backoff_is_exponential_with_jitter_and_capped(harness):
    """Backoff after attempt n: clamp(min * 2^(n-1) * U(0.8, 1.2), min, max). Every check
    stands 3 s of injected time away from the edge of the range it tells apart, so time spent
    between the steps never decides the outcome."""
    client, clock = harness.client, harness.clock
    topic = await setup(client, retry_min_seconds=10, retry_max_seconds=28, max_deliveries=0)
    n = 40
    await publish(client, topic, *range(n))

    async def round_trip(attempt: int) -> list[dict]:
        got = await pull(client, topic, "s", n)
        assert len(got) == n
        assert {m["delivery_attempt"] for m in got} == {attempt}
        result = await nack(client, topic, "s", [m["receipt"] for m in got])
        assert result == {"nacked": n, "stale": []}
        return got

    async def backlog() -> int:
        return (await stats(client, topic, "s"))["backlog"]

    # attempt 1 failed: 10 * 2^0 * (0.8..1.2), at least retry_min -> [10, 12]
    await round_trip(1)
    clock.advance(7)
    assert await backlog() == 0
    assert await pull(client, topic, "s", n) == []
    clock.advance(8)  # 15
    assert await backlog() == n

    # attempt 2 failed: 10 * 2 * (0.8..1.2) -> [16, 24], spread by the jitter
    await round_trip(2)
    clock.advance(13)  # beyond attempt 1's longest backoff (12): it grew
    assert await backlog() == 0
    clock.advance(7)  # 20: with 40 uniform draws over [16, 24], some are due, some not
    midway = await backlog()
    assert 0 < midway < n, midway
    clock.advance(7)  # 27
    assert await backlog() == n

    # attempt 3 failed: 10 * 4 * (0.8..1.2) = [32, 48], capped at retry_max = 28
    await round_trip(3)
    clock.advance(25)
    assert await backlog() == 0
    clock.advance(4)  # 29: past the cap, 3 s before the shortest uncapped backoff
    assert await backlog() == n

    # attempt 4..: still capped (the exponent never overflows)
    for attempt in range(4, 40):
        got = await pull(client, topic, "s", n)
        assert {m["delivery_attempt"] for m in got} == {attempt}
        await nack(client, topic, "s", [m["receipt"] for m in got])
        clock.advance(29)
    assert len(await pull(client, topic, "s", n)) == n


async def test_expiry_backoff_grows_with_attempts(harness):
    """As above, for leases that expire: every check is 3 s of injected time away from the
    edge of the jitter range it tells apart."""
    client, clock = harness.client, harness.clock
    topic = await setup(
        client, ack_deadline_seconds=10, retry_min_seconds=10, retry_max_seconds=100
    )
    await publish(client, topic, "m")
    await pull(client, topic, "s")
    # attempt 1 expires at 10, then its backoff 10 * (0.8..1.2), at least 10 -> due [20, 22]
    clock.advance(17)
    assert await pull(client, topic, "s") == []
    clock.advance(8)  # 25
    [m] = await pull(client, topic, "s")
    assert m["delivery_attempt"] == 2
    # attempt 2 expires at +10, then 20 * (0.8..1.2) = [16, 24] -> due [26, 34]; at +23 it
    # would be due had the backoff not grown (at most 22)
    clock.advance(23)
    assert await pull(client, topic, "s") == []
    clock.advance(14)  # +37
    [m] = await pull(client, topic, "s")
    assert m["delivery_attempt"] == 3


# ---- competing consumers -------------------------------------------------------------------


async def test_competing_consumers_never_share_a_lease_and_lose_nothing(harness):
    client = harness.client
    topic = await setup(client, ack_deadline_seconds=600, max_deliveries=0)
    total = 3000
    offsets = []
    for start in range(0, total, 1000):
        offsets += await publish(client, topic, *range(start, start + 1000))
    rng = random.Random(7)
    # offset -> list of (consumer, received_at, released_at) for every lease held
    holds: dict[int, list[tuple[int, float, float]]] = {}
    acked: list[int] = []
    transport = httpx.ASGITransport(app=harness.app)

    async def consumer(index: int) -> None:
        async with httpx.AsyncClient(transport=transport, base_url="http://sluice.test") as c:
            idle = 0
            while idle < 3:
                batch = await pull(c, topic, "s", rng.choice([1, 10, 50, 100]))
                received = time.monotonic()
                if not batch:
                    idle += 1
                    await asyncio.sleep(0.02)
                    continue
                idle = 0
                give_back = [m for m in batch if rng.random() < 0.05]
                keep = [m for m in batch if m not in give_back]
                await asyncio.sleep(0)  # let others interleave
                released = time.monotonic()
                for m in batch:
                    holds.setdefault(m["offset"], []).append((index, received, released))
                if give_back:
                    result = await nack(
                        c, topic, "s", [m["receipt"] for m in give_back], delay_seconds=0
                    )
                    assert result == {"nacked": len(give_back), "stale": []}
                if keep:
                    result = await ack(c, topic, "s", [m["receipt"] for m in keep])
                    assert result == {"acked": len(keep), "stale": []}
                    acked.extend(m["offset"] for m in keep)

    started = time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(consumer(i) for i in range(8))), 240)
    elapsed = time.monotonic() - started
    print(f"\n8 consumers drained {total} messages in {elapsed:.2f}s")

    assert sorted(acked) == offsets  # nothing lost, each acked exactly once
    assert set(holds) == set(offsets)
    redelivered = 0
    for offset, leases in holds.items():
        leases.sort(key=lambda h: h[1])
        redelivered += len(leases) - 1
        for (_, _, released), (_, received, _) in itertools.pairwise(leases):
            # The next lease of a message began only after the previous holder let go.
            assert received >= released, (offset, leases)
    assert redelivered > 0  # the random nacks did happen
    consumers_used = {h[0] for leases in holds.values() for h in leases}
    assert len(consumers_used) > 1
    s = await stats(client, topic, "s")
    assert (s["lag"], s["in_flight"], s["committed_offset"]) == (0, 0, offsets[-1] + 1)
