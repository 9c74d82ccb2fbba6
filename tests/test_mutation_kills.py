"""Tests written to kill surviving mutants of app/queue and app/storage (docs/testing.md,
"Mutation testing"): each one pins a behaviour a client sees that the rest of the suite
left open. The mutant each test kills is named in its docstring."""

from __future__ import annotations

import asyncio

from tests.conftest import run_app, wait_until
from tests.helpers import (
    assert_problem,
    nack,
    publish,
    pull,
    sub_path,
    topic_path,
    topic_with_subscription,
)


async def test_a_waiting_pull_wakes_at_a_sub_second_due_time(harness):
    """A long-poll wakes at the due time of a nack delay shorter than its wait, not a
    second later, and claims then, each time (kills consuming.py `_DUE_SLACK_SECONDS =
    1.005`, `result.now is None`, `max(1.0, ...)` for until_due, `not news or ...` and
    `remaining <= 1`)."""
    client = harness.client
    topic = await topic_with_subscription(client)
    [offset] = await publish(client, topic, "m")
    [m] = await pull(client, topic, "s")
    for attempt in (2, 3):
        await nack(client, topic, "s", [m["receipt"]], delay_seconds=0.2)
        # Due in 0.2 s, the wait is 1 s and the safety re-check (5 s x 0.5..1) comes later:
        # only the known due time can bring the message within this pull.
        got = await pull(client, topic, "s", 1, wait_seconds=1)
        assert [(g["offset"], g["delivery_attempt"]) for g in got] == [(offset, attempt)]
        [m] = got


async def test_a_claim_reads_a_bounded_stretch_of_delayed_messages(client):
    """A pull reads at most SCAN_LIMIT messages past those that cannot go out now, and
    the next pull (or a waiting one) goes on from there (kills consuming.py
    `SCAN_LIMIT = None`, an unbounded read of the log in one claim)."""
    topic = await topic_with_subscription(client)
    for _ in range(3):  # 3000 delayed messages: more than SCAN_LIMIT (2000)
        batch = [{"value": i, "delay_seconds": 900} for i in range(1000)]
        r = await client.post(topic_path(topic) + "/messages", json={"messages": batch})
        assert r.status_code == 201, r.text
    [ready] = await publish(client, topic, "ready")
    assert await pull(client, topic, "s", 1) == []  # gave up after 2000 delayed ones
    got = await pull(client, topic, "s", 1, wait_seconds=5)  # goes on at once
    assert [g["offset"] for g in got] == [ready]


async def test_rate_limit_headers_of_a_pull_with_tokens_left(client):
    """RateLimit-Limit is the bucket's capacity (the burst), RateLimit-Remaining the whole
    tokens left, and RateLimit-Reset 0 while a token is there (kills consuming.py
    `burst and 0` in RateLimit-Limit and `else 1` in RateLimit-Reset)."""
    topic = await topic_with_subscription(client, rate_limit_per_second=2, rate_limit_burst=10)
    await publish(client, topic, *range(3))
    r = await client.post(sub_path(topic, "s") + "/pull", json={"max_messages": 1})
    assert r.status_code == 200, r.text
    assert len(r.json()["messages"]) == 1
    # The bucket starts full (10) and cannot hold more: 9 whole tokens are left.
    assert r.headers["RateLimit-Limit"] == "10"
    assert r.headers["RateLimit-Remaining"] == "9"
    assert r.headers["RateLimit-Reset"] == "0"


async def test_rate_limit_headers_of_a_rate_below_one_per_second(client):
    """A rate below 1/s still says what the bucket holds: its default burst is one token
    (the rate's integer part, 0, said "Limit 0" next to "Remaining 1"), and Remaining never
    exceeds Limit."""
    topic = await topic_with_subscription(client, rate_limit_per_second=0.5)
    await publish(client, topic, *range(3))
    first = await client.post(sub_path(topic, "s") + "/pull", json={"max_messages": 1})
    assert first.status_code == 200, first.text
    assert len(first.json()["messages"]) == 1
    assert first.headers["RateLimit-Limit"] == "1"
    assert first.headers["RateLimit-Remaining"] == "0"
    assert first.headers["RateLimit-Reset"] == "2"  # the next token is 2 s away
    limited = await client.post(sub_path(topic, "s") + "/pull", json={"max_messages": 1})
    assert_problem(limited, 429)
    assert limited.headers["RateLimit-Limit"] == "1"
    assert int(limited.headers["Retry-After"]) in (1, 2)


async def test_retry_after_of_a_token_less_than_a_second_away_is_1(client):
    """A 429 whose next token comes in under a second says Retry-After: 1 (kills
    consuming.py `max(2, ...)` for Retry-After)."""
    topic = await topic_with_subscription(client, rate_limit_per_second=4, rate_limit_burst=1)
    await publish(client, topic, *range(3))
    assert len(await pull(client, topic, "s", 3)) == 1  # the one token of the burst
    limited = await client.post(sub_path(topic, "s") + "/pull", json={"max_messages": 3})
    assert_problem(limited, 429)
    assert limited.headers["Retry-After"] == "1"  # the next token is 0.25 s away
    assert limited.headers["RateLimit-Reset"] == "1"


async def test_a_waiting_pull_answers_at_once_when_the_server_shuts_down(harness):
    """Shutting down (the hub closes, as on SIGTERM) ends a waiting long-poll at once, not at
    the end of its wait (kills consuming.py `remaining <= 0 and hub.closing or gone`)."""
    client, hub = harness.client, harness.ctx.hub
    topic = await topic_with_subscription(client)
    task = asyncio.create_task(pull(client, topic, "s", 1, wait_seconds=20))

    async def parked() -> bool:
        return hub.waiting_count() > 0

    await wait_until(parked, timeout=10, interval=0.005)
    hub.close()
    assert await asyncio.wait_for(task, 5) == []


async def test_idle_waiting_pulls_share_the_safety_recheck_and_answer_empty(db_url):
    """Several idle long-polls of one subscription: one of them runs each safety re-check,
    the others keep waiting, and every one answers 200 with nothing at the end of its
    wait (kills consuming.py `break` for the `continue` of a skipped re-check)."""
    async with run_app(db_url, poll_recheck_seconds=0.3) as h:
        topic = await topic_with_subscription(h.client)
        answers = await asyncio.gather(
            *(
                h.client.post(
                    sub_path(topic, "s") + "/pull", json={"max_messages": 1, "wait_seconds": 1.5}
                )
                for _ in range(4)
            )
        )
        assert [(r.status_code, r.json()["messages"]) for r in answers] == [(200, [])] * 4


async def test_pull_of_a_missing_subscription_is_404(client):
    """A pull (without acks) of a subscription or topic that does not exist answers 404,
    not 500 (kills claims.py `Claim(found=True)` for a subscription not found)."""
    topic = await topic_with_subscription(client)
    for path in (sub_path(topic, "nope"), sub_path(topic + "-gone", "s")):
        assert_problem(await client.post(path + "/pull", json={"max_messages": 1}), 404)
