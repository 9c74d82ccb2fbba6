"""Concurrent acks of a subscription share writes (app.queue.settle_groups): each request is
answered with its own receipts, once the write holding them has committed; a receipt given
by two requests of a group counts for the first; a failed write fails every request of its
group; a request cancelled before its group was taken is not written; groups are capped.
Nacks and extends group the same way, each kind (and delay, deadline) apart."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from sluice.errors import NotFound, Unavailable
from sluice.queue import settle_groups
from sluice.queue.settle_groups import SettleGroups
from sluice.records import Receipt, Settled
from sluice.storage import settlement as settlement_sql
from tests.conftest import wait_until
from tests.helpers import (
    ack,
    assert_problem,
    extend,
    nack,
    publish,
    pull,
    stats,
    sub_path,
    topic_with_subscription,
)


class CountedSettles:
    """Wraps the storage's settle: records the receipts of each call; the first call waits
    for `release`, so that the acks after it queue up."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, hold: set[str] | None = None) -> None:
        self.real = settlement_sql.settle
        self.calls: list[int] = []
        self.kinds: list[str] = []
        self.release = asyncio.Event()
        # With `hold`, the first call of each of those kinds waits, and no other.
        self.hold = hold
        monkeypatch.setattr(settlement_sql, "settle", self.settle)

    async def settle(self, conn, kind, topic, sub, receipts, seconds, skew):
        self.calls.append(len(receipts))
        first_of_kind = not any(k.startswith(f"{kind} ") for k in self.kinds)
        self.kinds.append(f"{kind} {seconds}")
        held = len(self.calls) == 1 if self.hold is None else kind in self.hold and first_of_kind
        if held:  # bounded, so a failing test leaves nothing waiting
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.release.wait(), 5)
        return await self.real(conn, kind, topic, sub, receipts, seconds, skew)

    async def reach(self, calls: int) -> None:
        async def reached() -> bool:
            return len(self.calls) >= calls

        await wait_until(reached, timeout=10, interval=0.01)


async def leased(client, count: int) -> tuple[str, list[str]]:
    """A new topic with subscription "s", `count` messages published and pulled: their
    receipts."""
    topic = await topic_with_subscription(client)
    await publish(client, topic, *range(count))
    receipts = [m["receipt"] for m in await pull(client, topic, "s", count)]
    assert len(receipts) == count
    return topic, receipts


async def test_acks_that_arrive_during_a_write_share_the_next_one(harness, monkeypatch):
    client = harness.client
    topic, receipts = await leased(client, 12)
    settles = CountedSettles(monkeypatch)

    first = asyncio.create_task(ack(client, topic, "s", receipts[:1]))
    await settles.reach(1)
    # Ten acks queue behind the write under way; one of them repeats a receipt of another.
    others = [asyncio.create_task(ack(client, topic, "s", [r])) for r in receipts[1:11]]
    others.append(asyncio.create_task(ack(client, topic, "s", receipts[10:12])))
    await asyncio.sleep(0.2)
    settles.release.set()
    answers = await asyncio.gather(first, *others)

    assert settles.calls == [1, 12]  # the first alone, then all the others in one write
    assert [a["acked"] for a in answers] == [1] * 11 + [1]
    # receipts[10] was given by two requests of the group: it counts for the first.
    assert answers[-1]["stale"] == [receipts[10]]
    assert all(a["stale"] == [] for a in answers[:-1])
    after = await stats(client, topic, "s")
    assert (after["in_flight"], after["backlog"]) == (0, 0)


async def test_nacks_and_extends_that_arrive_during_a_write_share_the_next_one(
    harness, monkeypatch
):
    """A handler failing on every message nacks one receipt per request, a worker extends
    each long handler's lease: concurrent requests of one kind and delay (or deadline) share
    a write; another kind or delay waits for none of them."""
    client = harness.client
    topic, receipts = await leased(client, 9)
    settles = CountedSettles(monkeypatch, hold={"nack", "extend"})

    first_nack = asyncio.create_task(nack(client, topic, "s", receipts[:1], delay_seconds=60))
    await settles.reach(1)
    nacks = [
        asyncio.create_task(nack(client, topic, "s", [r], delay_seconds=60)) for r in receipts[1:4]
    ]
    first_extend = asyncio.create_task(extend(client, topic, "s", receipts[6:7], 120))
    await settles.reach(2)
    extends = [asyncio.create_task(extend(client, topic, "s", [r], 120)) for r in receipts[7:9]]
    # Neither waits behind the held writes: an ack, a nack of another delay.
    async with asyncio.timeout(5):
        assert (await ack(client, topic, "s", receipts[4:5]))["acked"] == 1
        assert (await nack(client, topic, "s", receipts[5:6], delay_seconds=30))["nacked"] == 1
    await asyncio.sleep(0.1)
    assert not any(task.done() for task in (first_nack, first_extend, *nacks, *extends))
    settles.release.set()
    nacked = await asyncio.gather(first_nack, *nacks)
    extended = await asyncio.gather(first_extend, *extends)
    assert [a["nacked"] for a in nacked] == [1, 1, 1, 1]
    assert [e["extended"] for e in extended] == [1, 1, 1]

    def writes(kind: str) -> list[int]:
        return [n for n, k in zip(settles.calls, settles.kinds, strict=True) if k == kind]

    # The first of each alone, then those queued behind it in one write.
    assert writes("nack 60.0") == [1, 3]
    assert writes("extend 120.0") == [1, 2]
    assert writes("ack None") == [1] and writes("nack 30.0") == [1]
    after = await stats(client, topic, "s")
    assert (after["in_flight"], after["delayed"]) == (3, 5)


async def test_a_group_of_last_attempt_nacks_counts_its_dead_letters_once_each(
    harness, monkeypatch
):
    """Nacks at the last attempt park their messages; a group's dead letters are told to its
    requests at most one per receipt each applied, so the counts add up and none is negative
    (with several workers the metrics counters are increased at once, and prometheus_client
    raises on a negative amount: the request would answer 500 after its nack committed)."""
    client = harness.client
    topic = await topic_with_subscription(client, max_deliveries=1)
    await publish(client, topic, *range(4))
    receipts = [m["receipt"] for m in await pull(client, topic, "s", 4)]
    settles = CountedSettles(monkeypatch)
    counted: list[tuple[str, int]] = []
    harness.ctx.rates.listeners.append(lambda _t, _s, kind, n: counted.append((kind, n)))

    first = asyncio.create_task(nack(client, topic, "s", receipts[:1]))
    await settles.reach(1)
    grouped = [asyncio.create_task(nack(client, topic, "s", [r])) for r in receipts[1:]]
    await asyncio.sleep(0.1)
    settles.release.set()
    answers = await asyncio.gather(first, *grouped)
    assert settles.calls == [1, 3]
    assert [a["nacked"] for a in answers] == [1, 1, 1, 1]
    after = await stats(client, topic, "s")
    assert (after["in_flight"], after["dead_lettered"]) == (0, 4)
    assert all(n > 0 for _, n in counted), counted
    assert sum(n for kind, n in counted if kind == "dead_lettered") == 4, counted
    assert sum(n for kind, n in counted if kind == "nacked") == 0, counted


async def test_stale_and_acked_receipts_in_one_group_are_told_apart(harness, monkeypatch):
    client = harness.client
    topic, receipts = await leased(client, 3)
    assert (await ack(client, topic, "s", [receipts[0]]))["acked"] == 1  # acked before
    settles = CountedSettles(monkeypatch)

    first = asyncio.create_task(ack(client, topic, "s", [receipts[1]]))
    await settles.reach(1)
    grouped = [
        asyncio.create_task(ack(client, topic, "s", [receipts[0], receipts[2]])),
        asyncio.create_task(ack(client, topic, "s", ["not-a-receipt"])),
    ]
    await asyncio.sleep(0.1)
    settles.release.set()
    one, (two, three) = await first, await asyncio.gather(*grouped)
    assert settles.calls == [1, 2]
    assert one == {"acked": 1, "stale": []}
    assert two == {"acked": 1, "stale": [receipts[0]]}
    assert three == {"acked": 0, "stale": ["not-a-receipt"]}


async def test_a_failed_write_fails_every_ack_of_its_group(harness, monkeypatch):
    client = harness.client
    topic, receipts = await leased(client, 4)
    settles = CountedSettles(monkeypatch)
    real = settles.settle

    async def failing_second(conn, kind, topic_name, sub, given, seconds, skew):
        if len(settles.calls) == 1:  # the group's write
            settles.calls.append(len(given))
            raise Unavailable("the database went away")
        return await real(conn, kind, topic_name, sub, given, seconds, skew)

    first = asyncio.create_task(ack(client, topic, "s", receipts[:1]))
    await settles.reach(1)
    monkeypatch.setattr(settlement_sql, "settle", failing_second)
    grouped = [
        asyncio.create_task(client.post(sub_path(topic, "s") + "/ack", json={"receipts": [r]}))
        for r in receipts[1:]
    ]
    await asyncio.sleep(0.1)
    settles.release.set()
    assert (await first)["acked"] == 1
    for answer in await asyncio.gather(*grouped):
        assert_problem(answer, 503)
    assert settles.calls == [1, 3]
    # Nothing of the failed group was applied: the receipts still ack.
    monkeypatch.setattr(settlement_sql, "settle", settles.real)
    assert (await ack(client, topic, "s", receipts[1:]))["acked"] == 3


async def test_acks_for_a_deleted_subscription_are_answered_404_each(harness, monkeypatch):
    client = harness.client
    topic, [receipt] = await leased(client, 1)
    settles = CountedSettles(monkeypatch)
    url = sub_path(topic, "s") + "/ack"

    def post() -> asyncio.Task:
        return asyncio.create_task(client.post(url, json={"receipts": [receipt]}))

    first = post()
    await settles.reach(1)  # held before its statement: the subscription is not locked
    grouped = [post() for _ in range(3)]
    await asyncio.sleep(0.1)
    assert (await client.delete(sub_path(topic, "s"))).status_code == 204
    settles.release.set()
    for answer in [await first, *await asyncio.gather(*grouped)]:
        assert_problem(answer, 404)
    assert settles.calls == [1, 3]


def _receipt(offset: int) -> Receipt:
    return Receipt(offset=offset, lease_id=1, seg=0, token=f"{offset:032x}")


async def test_a_request_cancelled_while_it_waited_is_not_written():
    groups = SettleGroups()
    written: list[list[int]] = []
    release = asyncio.Event()

    async def write(receipts: list[Receipt]) -> Settled:
        written.append([r.offset for r in receipts])
        if len(written) == 1:
            await release.wait()
        return Settled(found=True, topic_id=1, sub_id=1, applied={r.key for r in receipts})

    first = asyncio.create_task(groups.settle("t", "s", [_receipt(1)], write))
    await asyncio.sleep(0)
    gone = asyncio.create_task(groups.settle("t", "s", [_receipt(2)], write))
    kept = asyncio.create_task(groups.settle("t", "s", [_receipt(3)], write))
    await asyncio.sleep(0)
    gone.cancel()
    release.set()
    assert (await first).applied == {_receipt(1).key}
    assert (await kept).applied == {_receipt(3).key}
    assert written == [[1], [3]]
    with pytest.raises(asyncio.CancelledError):
        await gone


async def test_groups_hold_at_most_max_group_receipts(monkeypatch):
    monkeypatch.setattr(settle_groups, "MAX_GROUP_RECEIPTS", 4)
    groups = SettleGroups()
    written: list[int] = []
    release = asyncio.Event()

    async def write(receipts: list[Receipt]) -> Settled:
        written.append(len(receipts))
        if len(written) == 1:
            await release.wait()
        return Settled(found=True, topic_id=1, sub_id=1, applied={r.key for r in receipts})

    first = asyncio.create_task(groups.settle("t", "s", [_receipt(0)], write))
    await asyncio.sleep(0)
    sizes = [3, 1, 2, 2, 5]  # the 5 exceeds the cap alone: it still goes, in a group of its own
    offsets = iter(range(1, 100))
    waiting = [
        asyncio.create_task(
            groups.settle("t", "s", [_receipt(next(offsets)) for _ in range(n)], write)
        )
        for n in sizes
    ]
    await asyncio.sleep(0)
    release.set()
    await first
    answers = await asyncio.gather(*waiting)
    assert [len(a.applied) for a in answers] == sizes
    assert written == [1, 4, 4, 5]


async def test_different_subscriptions_do_not_wait_for_each_other():
    groups = SettleGroups()
    release = asyncio.Event()

    async def slow(receipts: list[Receipt]) -> Settled:
        await release.wait()
        return Settled(found=True, topic_id=1, sub_id=1, applied=set())

    async def fast(receipts: list[Receipt]) -> Settled:
        return Settled(found=True, topic_id=1, sub_id=2, applied={r.key for r in receipts})

    held = asyncio.create_task(groups.settle("t", "a", [_receipt(1)], slow))
    await asyncio.sleep(0)
    other = await asyncio.wait_for(groups.settle("t", "b", [_receipt(2)], fast), 2)
    assert other.applied == {_receipt(2).key}
    release.set()
    await held
    with pytest.raises(NotFound):  # nothing left over: a later ack of "a" writes at once

        async def missing(receipts: list[Receipt]) -> Settled:
            raise NotFound("gone")

        await groups.settle("t", "a", [], missing)
