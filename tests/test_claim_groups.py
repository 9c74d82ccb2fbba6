"""Concurrent pulls of a subscription share claims (app.queue.claim_groups): each gets its
own messages, none twice; a pull cancelled while its group claimed gives its share back; a
failed claim fails every pull of its group; different ack deadlines never share."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from sluice.errors import SluiceError
from sluice.queue import consuming
from sluice.storage import claims as claims_sql
from tests.conftest import wait_until
from tests.helpers import ack, publish, pull, stats, topic_with_subscription


class CountedClaims:
    """Wraps the storage's claim: counts the calls and what each asked for; the first call
    (and the second with `hold_second`) waits for `release` (`release_second`), so that the
    pulls after it queue up."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold_second: bool = False) -> None:
        self.real = claims_sql.claim
        self.asked: list[int] = []
        self.release = asyncio.Event()
        self.release_second = asyncio.Event()
        if not hold_second:
            self.release_second.set()
        monkeypatch.setattr(claims_sql, "claim", self.claim)

    async def claim(self, conn, topic, sub, max_messages, deadline, skew, scan):
        self.asked.append(max_messages)
        # Bounded, so that a test that fails does not leave claims waiting forever.
        with contextlib.suppress(TimeoutError):
            if len(self.asked) == 1:
                await asyncio.wait_for(self.release.wait(), 5)
            elif len(self.asked) == 2:
                await asyncio.wait_for(self.release_second.wait(), 5)
        return await self.real(conn, topic, sub, max_messages, deadline, skew, scan)

    async def reach(self, calls: int) -> None:
        async def reached() -> bool:
            return len(self.asked) >= calls

        await wait_until(reached, timeout=10, interval=0.01)


async def test_pulls_that_arrive_during_a_claim_share_the_next_one(harness, monkeypatch):
    client = harness.client
    topic = await topic_with_subscription(client)
    await publish(client, topic, *range(20))
    claims = CountedClaims(monkeypatch)

    first = asyncio.create_task(pull(client, topic, "s", 2))
    await claims.reach(1)
    others = [asyncio.create_task(pull(client, topic, "s", 2)) for _ in range(9)]
    await asyncio.sleep(0.2)  # they queue behind the claim under way
    claims.release.set()
    answers = await asyncio.gather(first, *others)

    assert claims.asked == [2, 18]  # the first alone, then the nine together
    assert [len(a) for a in answers] == [2] * 10
    offsets = sorted(m["offset"] for answer in answers for m in answer)
    assert offsets == list(range(20))  # each message to exactly one pull
    receipts = [m["receipt"] for answer in answers for m in answer]
    assert (await ack(client, topic, "s", receipts))["acked"] == 20  # every share is ackable
    s = await stats(client, topic, "s")
    assert (s["in_flight"], s["lag"]) == (0, 0), s


async def test_shares_follow_arrival_and_a_short_claim_leaves_the_last_pulls_empty(
    harness, monkeypatch
):
    client = harness.client
    topic = await topic_with_subscription(client)
    await publish(client, topic, *range(5))
    claims = CountedClaims(monkeypatch)

    first = asyncio.create_task(pull(client, topic, "s", 1))
    await claims.reach(1)
    queued = []
    for _ in range(3):
        queued.append(asyncio.create_task(pull(client, topic, "s", 3)))
        await asyncio.sleep(0.05)  # in this order
    claims.release.set()
    answers = await asyncio.gather(first, *queued)
    assert claims.asked == [1, 9]
    assert [[m["value"] for m in a] for a in answers] == [[0], [1, 2, 3], [4], []]


async def test_a_pull_cancelled_while_its_group_claimed_gives_its_share_back(harness, monkeypatch):
    client = harness.client
    topic = await topic_with_subscription(client, ack_deadline_seconds=600)
    await publish(client, topic, *range(6))
    claims = CountedClaims(monkeypatch, hold_second=True)
    ctx = harness.ctx
    params = consuming.PullParams(topic, "s", max_messages=2)

    first = asyncio.create_task(consuming.claim(ctx, params))
    await claims.reach(1)
    leaving = asyncio.create_task(consuming.claim(ctx, params))
    await asyncio.sleep(0.05)
    staying = asyncio.create_task(consuming.claim(ctx, params))
    await asyncio.sleep(0.05)
    claims.release.set()
    await claims.reach(2)  # the group claim (for both) is under way
    assert claims.asked == [2, 4]
    leaving.cancel()  # its client went away meanwhile
    claims.release_second.set()
    assert [m.offset for m in (await first).messages] == [0, 1]
    assert [m.offset for m in (await staying).messages] == [4, 5]
    with pytest.raises(asyncio.CancelledError):
        await leaving

    async with asyncio.timeout(10):  # the share of the pull that left is given back
        while (await stats(client, topic, "s"))["backlog"] != 2:
            await asyncio.sleep(0.02)
    again = await pull(client, topic, "s", 10)
    assert [(m["offset"], m["delivery_attempt"]) for m in again] == [(2, 1), (3, 1)]


async def test_a_failed_group_claim_fails_every_pull_of_the_group(harness, monkeypatch):
    client = harness.client
    topic = await topic_with_subscription(client)
    real = claims_sql.claim
    release = asyncio.Event()
    calls = 0

    async def first_waits_then_fails(conn, *args):
        nonlocal calls
        calls += 1
        if calls == 1:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(release.wait(), 5)
            return await real(conn, *args)
        raise SluiceError("the database refused the claim")

    monkeypatch.setattr(claims_sql, "claim", first_waits_then_fails)
    ctx = harness.ctx
    params = consuming.PullParams(topic, "s", max_messages=1)
    first = asyncio.create_task(consuming.claim(ctx, params))
    while calls < 1:
        await asyncio.sleep(0.01)
    group = [asyncio.create_task(consuming.claim(ctx, params)) for _ in range(3)]
    await asyncio.sleep(0.1)
    release.set()
    assert (await first).messages == []
    results = await asyncio.gather(*group, return_exceptions=True)
    assert calls == 2
    assert all(isinstance(r, SluiceError) for r in results), results
    # each its own (a pull that acked first adds its acks to the error it answers)
    assert len({id(r) for r in results}) == 3
    # Nothing is left behind: the next pull claims on its own at once.
    monkeypatch.setattr(claims_sql, "claim", real)
    await publish(client, topic, "m")
    assert len(await pull(client, topic, "s", 1)) == 1
    assert not ctx.claim_groups._busy


async def test_pulls_with_different_ack_deadlines_do_not_share(harness, monkeypatch):
    client = harness.client
    topic = await topic_with_subscription(client)
    await publish(client, topic, *range(3))
    claims = CountedClaims(monkeypatch)
    ctx = harness.ctx

    first = asyncio.create_task(
        consuming.claim(ctx, consuming.PullParams(topic, "s", 1, ack_deadline_seconds=30))
    )
    await claims.reach(1)
    other = asyncio.create_task(
        consuming.claim(ctx, consuming.PullParams(topic, "s", 1, ack_deadline_seconds=60))
    )
    await asyncio.sleep(0.1)
    claims.release.set()
    a, b = await asyncio.gather(first, other)
    assert claims.asked == [1, 1]  # not one claim of 2: each on its own
    assert a.messages[0].lease_until != b.messages[0].lease_until
