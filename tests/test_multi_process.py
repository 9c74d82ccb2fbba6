"""Two server processes on one database: consumers on both compete without ever sharing a
lease and nothing is lost; receipts work on either process; a long-poll on one process is
woken by a publish through the other."""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import httpx
import pytest

from tests.conftest import unique
from tests.helpers import ack, create_subscription, create_topic, nack, publish, pull


@pytest.fixture
def two_servers(server_factory):
    return server_factory(), server_factory()


async def test_consumers_on_two_processes_compete_without_overlap(two_servers):
    a, b = two_servers
    topic = unique()
    total = 2000
    async with (
        httpx.AsyncClient(base_url=a.base_url, timeout=60) as ca,
        httpx.AsyncClient(base_url=b.base_url, timeout=60) as cb,
    ):
        await create_topic(ca, topic)
        await create_subscription(cb, topic, "s", ack_deadline_seconds=600, max_deliveries=0)
        offsets = []
        for start in range(0, total, 500):
            # publish through both processes
            client = ca if start % 1000 == 0 else cb
            offsets += await publish(client, topic, *range(start, start + 500))
        assert offsets == sorted(offsets)

        rng = random.Random(5)
        holds: dict[int, list[tuple[float, float, str]]] = {}
        acked: list[int] = []

        async def consumer(name: str, base_url: str) -> None:
            async with httpx.AsyncClient(base_url=base_url, timeout=60) as c:
                idle = 0
                while idle < 3:
                    batch = await pull(c, topic, "s", rng.choice([1, 20, 50]))
                    received = time.monotonic()
                    if not batch:
                        idle += 1
                        await asyncio.sleep(0.05)
                        continue
                    idle = 0
                    give_back = [m for m in batch if rng.random() < 0.05]
                    keep = [m for m in batch if m not in give_back]
                    released = time.monotonic()
                    for m in batch:
                        holds.setdefault(m["offset"], []).append((received, released, name))
                    if give_back:
                        r = await nack(
                            c, topic, "s", [m["receipt"] for m in give_back], delay_seconds=0
                        )
                        assert r == {"nacked": len(give_back), "stale": []}
                    if keep:
                        r = await ack(c, topic, "s", [m["receipt"] for m in keep])
                        assert r == {"acked": len(keep), "stale": []}
                        acked.extend(m["offset"] for m in keep)

        consumers = [consumer(f"a{i}", a.base_url) for i in range(4)]
        consumers += [consumer(f"b{i}", b.base_url) for i in range(4)]
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*consumers), 240)
        print(f"\n8 consumers on 2 processes drained {total} in {time.monotonic() - started:.1f}s")

        assert sorted(acked) == offsets  # nothing lost, each acked once
        for offset, leases in holds.items():
            leases.sort()
            for (_, released, _), (received, _, _) in itertools.pairwise(leases):
                assert received >= released, (offset, leases)
        by_process = {name[0] for leases in holds.values() for _, _, name in leases}
        assert by_process == {"a", "b"}  # both processes delivered
        r = await cb.get(f"/v1/topics/{topic}/subscriptions/s")
        body = r.json()
        assert (body["lag"], body["in_flight"]) == (0, 0)
        assert body["committed_offset"] == offsets[-1] + 1


async def test_receipts_work_on_either_process(two_servers):
    a, b = two_servers
    topic = unique()
    async with (
        httpx.AsyncClient(base_url=a.base_url, timeout=30) as ca,
        httpx.AsyncClient(base_url=b.base_url, timeout=30) as cb,
    ):
        await create_topic(ca, topic)
        await create_subscription(ca, topic, "s")
        await publish(ca, topic, "x", "y")
        x, y = await pull(ca, topic, "s", 2)
        assert await ack(cb, topic, "s", [x["receipt"]]) == {"acked": 1, "stale": []}
        assert await ack(ca, topic, "s", [x["receipt"]]) == {"acked": 0, "stale": [x["receipt"]]}
        assert (await nack(cb, topic, "s", [y["receipt"]], delay_seconds=0))["nacked"] == 1
        [again] = await pull(cb, topic, "s", 2)
        assert (again["offset"], again["delivery_attempt"]) == (y["offset"], 2)
        assert await ack(ca, topic, "s", [y["receipt"]]) == {"acked": 0, "stale": [y["receipt"]]}
        assert (await ack(ca, topic, "s", [again["receipt"]]))["acked"] == 1


async def test_long_poll_on_one_process_is_woken_by_a_publish_through_the_other(two_servers):
    a, b = two_servers
    topic = unique()
    async with (
        httpx.AsyncClient(base_url=a.base_url, timeout=30) as ca,
        httpx.AsyncClient(base_url=b.base_url, timeout=30) as cb,
    ):
        await create_topic(ca, topic)
        await create_subscription(ca, topic, "s")
        latencies = []
        for i in range(3):
            waiting = asyncio.create_task(pull(ca, topic, "s", 10, wait_seconds=15))
            await asyncio.sleep(0.5)  # let it park on process A
            assert not waiting.done()
            published = time.monotonic()
            [offset] = await publish(cb, topic, i)
            got = await asyncio.wait_for(waiting, 15)
            latencies.append(time.monotonic() - published)
            assert [m["offset"] for m in got] == [offset]
            await ack(cb, topic, "s", [got[0]["receipt"]])
        print(
            "\ncross-process publish -> wake-up: "
            + ", ".join(f"{x * 1000:.0f} ms" for x in latencies)
        )
        assert max(latencies) < 0.5, latencies

        # A nack through B also wakes the long-poll on A.
        await publish(ca, topic, "again")
        [m] = await pull(cb, topic, "s")
        waiting = asyncio.create_task(pull(ca, topic, "s", 10, wait_seconds=15))
        await asyncio.sleep(0.5)
        assert not waiting.done()
        nacked = time.monotonic()
        await nack(cb, topic, "s", [m["receipt"]], delay_seconds=0)
        [got] = await asyncio.wait_for(waiting, 15)
        assert time.monotonic() - nacked < 0.5
        assert (got["offset"], got["delivery_attempt"]) == (m["offset"], 2)
