"""A pull that acknowledges the previous batch first (`ack` in the pull body): one round
trip per batch for a consumer, with exactly the semantics of /ack followed by /pull."""

from __future__ import annotations

import asyncio

from tests.helpers import (
    ack,
    assert_problem,
    publish,
    pull,
    stats,
    sub_path,
    topic_with_subscription,
)


async def pull_acking(client, topic: str, receipts: list[str], max_messages: int = 10, **extra):
    body = {"max_messages": max_messages, "ack": receipts, **extra}
    r = await client.post(sub_path(topic, "s") + "/pull", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def test_pull_acks_the_previous_batch_and_returns_the_next(harness):
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(client, ack_deadline_seconds=10)
    offsets = await publish(client, topic, *range(6))
    first = await pull(client, topic, "s", 2)
    answer = await pull_acking(client, topic, [m["receipt"] for m in first], 2)
    assert answer["acked"] == 2 and answer["stale"] == []
    assert [m["offset"] for m in answer["messages"]] == offsets[2:4]
    second = answer["messages"]
    # A receipt given again (already applied) comes back stale, the current ones apply.
    again = await pull_acking(
        client, topic, [first[0]["receipt"], *(m["receipt"] for m in second)], 2
    )
    assert again["acked"] == 2 and again["stale"] == [first[0]["receipt"]]
    assert [m["offset"] for m in again["messages"]] == offsets[4:6]
    # Acknowledged means never delivered again, even after every deadline has passed.
    clock.advance(3600)
    redelivered = await pull(client, topic, "s", 10)
    assert [m["offset"] for m in redelivered] == offsets[4:6]
    assert (await ack(client, topic, "s", [m["receipt"] for m in redelivered]))["acked"] == 2
    assert (await stats(client, topic, "s"))["lag"] == 0


async def test_ack_fields_only_when_the_pull_carried_ack(client):
    topic = await topic_with_subscription(client)
    await publish(client, topic, "a")
    r = await client.post(sub_path(topic, "s") + "/pull", json={"max_messages": 1})
    assert set(r.json()) == {"messages"}
    assert await pull_acking(client, topic, []) == {"messages": [], "acked": 0, "stale": []}


async def test_garbage_receipts_in_a_pull_are_stale_and_the_pull_still_answers(client):
    topic = await topic_with_subscription(client)
    await publish(client, topic, "a", "b")
    answer = await pull_acking(client, topic, ["not-a-receipt", "AAAAAAAAAAC7JjI0aF2HRbqv1pSe3Q0e"])
    assert answer["acked"] == 0
    assert answer["stale"] == ["not-a-receipt", "AAAAAAAAAAC7JjI0aF2HRbqv1pSe3Q0e"]
    assert [m["value"] for m in answer["messages"]] == ["a", "b"]


async def test_ack_in_pull_is_validated(client):
    topic = await topic_with_subscription(client)
    for bad in ("abc", ["x" * 65], ["x"] * 1001, [1], {"r": "x"}):
        r = await client.post(sub_path(topic, "s") + "/pull", json={"ack": bad})
        assert_problem(r, 422)


async def test_ack_in_pull_of_a_missing_subscription_is_404(client):
    topic = await topic_with_subscription(client)
    r = await client.post(sub_path(topic, "nope") + "/pull", json={"ack": ["x"]})
    assert_problem(r, 404)


async def test_acks_free_room_under_max_in_flight_for_the_same_pull(client):
    topic = await topic_with_subscription(client, max_in_flight=2)
    await publish(client, topic, *range(4))
    held = await pull(client, topic, "s", 10)
    assert len(held) == 2
    answer = await pull_acking(client, topic, [m["receipt"] for m in held], 10)
    assert answer["acked"] == 2
    assert [m["value"] for m in answer["messages"]] == [2, 3]


async def test_acking_the_head_of_a_key_releases_its_next_message_in_the_same_pull(client):
    topic = await topic_with_subscription(client, ordered_by_key=True)
    r = await client.post(
        f"/v1/topics/{topic}/messages",
        json={"messages": [{"value": i, "key": "k"} for i in range(3)]},
    )
    assert r.status_code == 201, r.text
    [head] = await pull(client, topic, "s", 10)
    answer = await pull_acking(client, topic, [head["receipt"]], 10)
    assert answer["acked"] == 1
    assert [m["value"] for m in answer["messages"]] == [1]


async def test_acks_of_a_rate_limited_pull_are_applied_and_reported_in_the_problem(client):
    topic = await topic_with_subscription(client, rate_limit_per_second=0.2, rate_limit_burst=2)
    await publish(client, topic, *range(5))
    burst = await pull(client, topic, "s", 5)
    assert len(burst) == 2
    r = await client.post(
        sub_path(topic, "s") + "/pull",
        json={"max_messages": 5, "wait_seconds": 1, "ack": [m["receipt"] for m in burst]},
    )
    body = assert_problem(r, 429)
    assert body["acked"] == 2 and body["stale"] == []
    # The next token comes 5 s after the burst was taken (4 after a stall of a second).
    assert r.headers["Retry-After"] in ("4", "5"), r.headers
    assert (await stats(client, topic, "s"))["in_flight"] == 0


async def test_a_waiting_pull_has_applied_its_acks_before_it_waits(client):
    topic = await topic_with_subscription(client)
    await publish(client, topic, "a")
    [m] = await pull(client, topic, "s", 1)
    waiting = asyncio.create_task(pull_acking(client, topic, [m["receipt"]], 1, wait_seconds=5))
    for _ in range(100):
        if (await stats(client, topic, "s"))["in_flight"] == 0:
            break
        await asyncio.sleep(0.02)
    assert (await stats(client, topic, "s"))["in_flight"] == 0
    assert not waiting.done()  # still waiting for a message, its ack already committed
    await publish(client, topic, "b")
    answer = await asyncio.wait_for(waiting, 5)
    assert answer["acked"] == 1 and [x["value"] for x in answer["messages"]] == ["b"]


async def test_competing_consumers_acking_in_their_pulls_get_each_message_once(client):
    topic = await topic_with_subscription(client, ack_deadline_seconds=600)
    offsets: list[int] = []
    for start in range(0, 600, 200):
        offsets += await publish(client, topic, *range(start, start + 200))
    seen: list[int] = []
    acked = 0

    async def consumer() -> None:
        nonlocal acked
        previous: list[str] = []
        while True:
            answer = await pull_acking(client, topic, previous, 25)
            assert answer["stale"] == []
            acked += answer["acked"]
            seen.extend(m["offset"] for m in answer["messages"])
            previous = [m["receipt"] for m in answer["messages"]]
            if not previous:
                return

    await asyncio.gather(*(consumer() for _ in range(6)))
    assert sorted(seen) == offsets  # every message once: no lease handed out twice
    assert acked == len(offsets)
    after = await stats(client, topic, "s")
    assert after["in_flight"] == 0 and after["lag"] == 0


async def test_claims_of_a_subscription_take_turns_in_a_process(harness):
    """Pulls of one subscription queue at its claim gate in the process (not at the row lock
    in Postgres); other subscriptions are not held up, and unused gates go away."""
    client, ctx = harness.client, harness.ctx
    topic = await topic_with_subscription(client)
    await publish(client, topic, "a")
    gate = ctx.claim_gate(topic, "s")
    assert ctx.claim_gate(topic, "s") is gate
    async with gate:
        blocked = asyncio.create_task(pull(client, topic, "s", 1))
        other = await topic_with_subscription(client)
        await publish(client, other, "b")
        assert [m["value"] for m in await pull(client, other, "s", 1)] == ["b"]
        await asyncio.sleep(0.2)
        assert not blocked.done()  # waits for the gate, holding no connection
    assert [m["value"] for m in await asyncio.wait_for(blocked, 5)] == ["a"]
    del gate
    assert (topic, "s") not in ctx.claim_gates
