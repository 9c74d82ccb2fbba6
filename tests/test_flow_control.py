"""Flow control: the token-bucket rate limit (shared by every process), 429 answers and
the max_in_flight cap."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.conftest import unique
from tests.helpers import (
    ack,
    assert_problem,
    create_subscription,
    create_topic,
    nack,
    publish,
    pull,
    stats,
    sub_path,
    topic_with_subscription,
)


async def test_rate_limit_holds_across_two_processes_with_eight_consumers(server_factory):
    """Eight consumers on two processes draw from one bucket: what they are handed within a
    window is at most the burst plus rate x window (exactly what the bucket can give), and
    not much less, as somebody is always asking."""
    servers = [server_factory(), server_factory()]
    rate, burst, seconds = 40.0, 10, 6.0
    topic = unique()
    async with httpx.AsyncClient(base_url=servers[0].base_url, timeout=30) as admin:
        await create_topic(admin, topic)
        await create_subscription(
            admin, topic, "s", rate_limit_per_second=rate, rate_limit_burst=burst
        )
        for _ in range(3):
            await publish(admin, topic, *range(500))

    delivered = 0
    # Counted: messages of the pulls sent after `start` and answered by `stop_at`. Their
    # tokens were drawn inside the window, so the bucket bounds them; a pull answered
    # later is left out of both sides (its tokens may come from after the window).
    start = time.monotonic()
    stop_at = start + seconds

    async def consumer(base_url: str) -> None:
        nonlocal delivered
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            while time.monotonic() < stop_at:
                wait = max(0.0, min(2.0, stop_at - time.monotonic()))
                r = await client.post(
                    sub_path(topic, "s") + "/pull",
                    json={"max_messages": 50, "wait_seconds": round(wait, 2)},
                )
                if time.monotonic() > stop_at:
                    break
                if r.status_code == 429:
                    await asyncio.sleep(float(r.headers["Retry-After"]) / 10)
                    continue
                assert r.status_code == 200, r.text
                messages = r.json()["messages"]
                delivered += len(messages)
                if messages:
                    await ack(client, topic, "s", [m["receipt"] for m in messages])

    await asyncio.gather(*(consumer(servers[i % 2].base_url) for i in range(8)))
    most = rate * seconds + burst
    print(f"delivered {delivered} within {seconds}s, the bucket allows {most:.0f}")
    assert delivered <= most, (delivered, most)
    assert delivered >= 0.9 * most, (delivered, most)


async def test_pull_without_tokens_answers_429_with_rate_limit_headers(client):
    topic = await topic_with_subscription(client, rate_limit_per_second=0.2, rate_limit_burst=2)
    await publish(client, topic, *range(5))

    first = await client.post(sub_path(topic, "s") + "/pull", json={"max_messages": 5})
    assert first.status_code == 200
    assert len(first.json()["messages"]) == 2  # the burst
    assert first.headers["RateLimit-Remaining"] == "0"
    assert first.headers["RateLimit-Limit"] == "2"  # the bucket holds the burst

    limited = await client.post(
        sub_path(topic, "s") + "/pull", json={"max_messages": 5, "wait_seconds": 1}
    )
    body = assert_problem(limited, 429)
    assert "rate limit" in body["detail"]
    # The next token comes 5 s after the burst was taken (0.2/s), less the time the second
    # request took to get here: ceil() gives 5, or 4 after a stall of a second or more.
    assert limited.headers["Retry-After"] in ("4", "5"), limited.headers
    assert limited.headers["RateLimit-Remaining"] == "0"
    assert limited.headers["RateLimit-Limit"] == "2"
    assert limited.headers["RateLimit-Reset"] in ("4", "5"), limited.headers


async def test_the_slowest_rate_delivers_and_answers_429_within_1000_s(harness):
    client = harness.client
    topic = await topic_with_subscription(client, rate_limit_per_second=0.001)
    await publish(client, topic, *range(3))
    assert len(await pull(client, topic, "s", 3)) == 1  # the bucket holds one token
    limited = await client.post(
        sub_path(topic, "s") + "/pull", json={"max_messages": 3, "wait_seconds": 1}
    )
    assert_problem(limited, 429)
    # The next token is 1000 s away (999 after a stall of a second).
    assert limited.headers["Retry-After"] in ("999", "1000"), limited.headers
    harness.clock.advance(1000)
    assert len(await pull(client, topic, "s", 3)) == 1


async def test_rate_limited_pull_with_nothing_to_deliver_is_empty_not_429(client):
    topic = await topic_with_subscription(client, rate_limit_per_second=0.1, rate_limit_burst=1)
    await publish(client, topic, "only")
    assert len(await pull(client, topic, "s", 5)) == 1
    # No tokens left, but also nothing deliverable: an empty answer, not a 429.
    assert await pull(client, topic, "s", 5) == []


async def test_tokens_refill_with_time(harness):
    client = harness.client
    # A slow rate, so that real time spent between the steps (0.1 token per second) cannot
    # add a token: 25 s of injected time make 2.5 tokens.
    topic = await topic_with_subscription(client, rate_limit_per_second=0.1, rate_limit_burst=4)
    await publish(client, topic, *range(20))
    assert len(await pull(client, topic, "s", 20)) == 4
    harness.clock.advance(25)  # two more tokens (and half of a third)
    assert len(await pull(client, topic, "s", 20)) == 2
    harness.clock.advance(1000)  # refill stops at the burst
    assert len(await pull(client, topic, "s", 20)) == 4


async def test_waiting_pull_gets_messages_when_tokens_arrive(client):
    topic = await topic_with_subscription(client, rate_limit_per_second=4, rate_limit_burst=1)
    await publish(client, topic, *range(3))
    assert len(await pull(client, topic, "s", 3)) == 1
    started = time.monotonic()
    got = await pull(client, topic, "s", 3, wait_seconds=3)
    assert len(got) == 1
    assert time.monotonic() - started < 1.5  # one token every 0.25 s


async def test_max_in_flight_caps_leased_messages(client):
    topic = await topic_with_subscription(client, max_in_flight=3)
    await publish(client, topic, *range(10))
    first = await pull(client, topic, "s", 10)
    assert len(first) == 3
    assert await pull(client, topic, "s", 10) == []
    await ack(client, topic, "s", [first[0]["receipt"]])
    second = await pull(client, topic, "s", 10)
    assert [m["offset"] for m in second] == [first[-1]["offset"] + 1]


async def test_max_in_flight_counts_only_unexpired_leases(harness):
    """An expired lease waiting for its retry backoff is not in flight: it does not hold a
    slot under max_in_flight, so a fresh message is delivered meanwhile."""
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(
        client,
        max_in_flight=1,
        ack_deadline_seconds=10,
        retry_min_seconds=60,
        retry_max_seconds=60,
    )
    [a] = await publish(client, topic, "a")
    [held] = await pull(client, topic, "s", 5)
    assert held["offset"] == a
    [b] = await publish(client, topic, "b")
    assert await pull(client, topic, "s", 5) == []  # a's lease fills the cap
    clock.advance(13)  # a's lease ended 3 s ago; its backoff runs 57 s more
    s = await stats(client, topic, "s")
    assert (s["in_flight"], s["delayed"], s["backlog"]) == (0, 1, 1)
    [fresh] = await pull(client, topic, "s", 5)
    assert (fresh["offset"], fresh["delivery_attempt"]) == (b, 1)
    assert await ack(client, topic, "s", [fresh["receipt"]]) == {"acked": 1, "stale": []}
    clock.advance(60)  # a's backoff is over 3 s ago
    [again] = await pull(client, topic, "s", 5)
    assert (again["offset"], again["delivery_attempt"]) == (a, 2)


async def test_a_retry_that_comes_due_while_max_in_flight_is_reached_goes_out_once_room_is_made(
    harness,
):
    """A pull at the cap takes nothing and so reads no timer for delivery; it still finds
    when the next one is due (revision 0017 keeps that time in the state row, and a claim
    reads the timers only once it has come): once an ack makes room, the retry goes out."""
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(client, max_in_flight=1, ack_deadline_seconds=600)
    a, b = await publish(client, topic, "a", "b")
    [first] = await pull(client, topic, "s", 5)
    assert first["offset"] == a
    assert (await nack(client, topic, "s", [first["receipt"]], delay_seconds=5))["nacked"] == 1
    [second] = await pull(client, topic, "s", 5)  # a waits 5 s: b goes out, and fills the cap
    assert second["offset"] == b
    clock.advance(8)  # a is due, but there is no room
    assert await pull(client, topic, "s", 5) == []
    assert (await stats(client, topic, "s"))["backlog"] == 1
    assert await ack(client, topic, "s", [second["receipt"]]) == {"acked": 1, "stale": []}
    [again] = await pull(client, topic, "s", 5)
    assert (again["offset"], again["delivery_attempt"]) == (a, 2)


async def test_pull_waiting_at_max_in_flight_wakes_on_ack(client):
    topic = await topic_with_subscription(client, max_in_flight=1)
    await publish(client, topic, "a", "b")
    (held,) = await pull(client, topic, "s", 5)

    async def ack_later() -> None:
        await asyncio.sleep(0.3)
        await ack(client, topic, "s", [held["receipt"]])

    started = time.monotonic()
    waiting = asyncio.create_task(pull(client, topic, "s", 5, wait_seconds=5))
    await ack_later()
    got = await waiting
    assert [m["value"] for m in got] == ["b"]
    assert time.monotonic() - started < 2.0


async def test_pull_at_max_in_flight_returns_empty_after_wait(client):
    topic = await topic_with_subscription(client, max_in_flight=1)
    await publish(client, topic, "a", "b")
    assert len(await pull(client, topic, "s", 5)) == 1
    started = time.monotonic()
    assert await pull(client, topic, "s", 5, wait_seconds=0.5) == []
    assert time.monotonic() - started >= 0.45
