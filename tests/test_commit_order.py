"""Commit order (SPEC 3.2) under concurrency, across two real server processes.

Many producers publish concurrently through two servers sharing one database, while a
reader tails the topic by browsing from `next_offset` over and over (alternating between
the servers). Offsets are commit-ordered when a message never shows up below an offset a
reader has already passed: at the end, the full log must be exactly what the tailing reader
saw, and every acknowledged (201) message must be in it exactly once, at its offset.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time

import httpx

from tests.conftest import unique
from tests.helpers import topic_path

PRODUCERS_PER_SERVER = 4
REQUESTS_PER_PRODUCER = 40
BATCH_SIZES = [1, 1, 1, 2, 3, 5, 10, 20, 40]


async def test_readers_never_see_a_message_appear_below_the_tail(server_factory):
    servers = [server_factory(), server_factory()]
    topic = unique("order")
    path = topic_path(topic) + "/messages"
    started = time.monotonic()

    async with httpx.AsyncClient(base_url=servers[0].base_url, timeout=30) as admin:
        r = await admin.put(topic_path(topic), json={})
        assert r.status_code == 201, r.text

    acked: dict[str, int] = {}  # message id -> offset from the 201 answer
    producers_done = asyncio.Event()

    async def producer(index: int, base_url: str) -> None:
        rng = random.Random(index)
        async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
            for request in range(REQUESTS_PER_PRODUCER):
                size = rng.choice(BATCH_SIZES)
                ids = [f"p{index}-r{request}-m{m}" for m in range(size)]
                # Some requests carry dedup ids (unique ones): the transactional path
                # with the early topic lock must be commit-ordered too.
                with_dedup = rng.random() < 0.25
                messages = [
                    {"value": {"id": i}, **({"dedup_id": i} if with_dedup else {})} for i in ids
                ]
                r = await client.post(path, json={"messages": messages})
                assert r.status_code == 201, r.text
                answer = r.json()["messages"]
                assert [m["duplicate"] for m in answer] == [False] * size
                offsets = [m["offset"] for m in answer]
                assert offsets == sorted(set(offsets)), offsets
                for message_id, offset in zip(ids, offsets, strict=True):
                    acked[message_id] = offset

    seen: dict[int, str] = {}  # offset -> message id, as the tailing reader saw them
    reader_stats = {"polls": 0, "pages": 0}

    async def reader() -> None:
        clients = [httpx.AsyncClient(base_url=server.base_url, timeout=30) for server in servers]
        try:
            next_offset = 0
            idle_after_done = 0
            while True:
                done = producers_done.is_set()
                client = clients[reader_stats["polls"] % len(clients)]
                reader_stats["polls"] += 1
                r = await client.get(path, params={"from_offset": next_offset, "limit": 1000})
                assert r.status_code == 200, r.text
                page = r.json()
                offsets = [m["offset"] for m in page["messages"]]
                if offsets:
                    reader_stats["pages"] += 1
                    assert offsets[0] >= next_offset
                    assert all(a < b for a, b in itertools.pairwise(offsets))
                    assert page["next_offset"] == offsets[-1] + 1
                    for message in page["messages"]:
                        assert message["offset"] not in seen
                        seen[message["offset"]] = message["value"]["id"]
                    next_offset = page["next_offset"]
                else:
                    assert page["next_offset"] == next_offset
                    if done:
                        # Read once more after every producer finished: then we are at
                        # the true end of the log.
                        idle_after_done += 1
                        if idle_after_done >= 2:
                            return
                    await asyncio.sleep(0.002)
        finally:
            for client in clients:
                await client.aclose()

    reader_task = asyncio.create_task(reader())
    producer_tasks = [
        asyncio.create_task(producer(s * PRODUCERS_PER_SERVER + p, server.base_url))
        for s, server in enumerate(servers)
        for p in range(PRODUCERS_PER_SERVER)
    ]
    try:
        await asyncio.wait_for(asyncio.gather(*producer_tasks), timeout=60)
    finally:
        producers_done.set()
    await asyncio.wait_for(reader_task, timeout=30)

    # The whole log, read afresh from the beginning.
    final: dict[int, str] = {}
    async with httpx.AsyncClient(base_url=servers[1].base_url, timeout=30) as client:
        offset = 0
        while True:
            r = await client.get(path, params={"from_offset": offset, "limit": 1000})
            page = r.json()
            if not page["messages"]:
                break
            for message in page["messages"]:
                final[message["offset"]] = message["value"]["id"]
            offset = page["next_offset"]

    total = len(servers) * PRODUCERS_PER_SERVER
    assert len(acked) > total * REQUESTS_PER_PRODUCER  # a few thousand messages
    # The test really tailed a growing log, not one finished batch.
    assert reader_stats["pages"] >= 10, reader_stats

    # Nothing appeared late below the tail: the tailing reader saw the whole log.
    late = sorted(set(final) - set(seen))
    assert not late, f"{len(late)} messages appeared below an offset already passed: {late[:10]}"
    assert final == seen

    # No loss, no duplicates: every acknowledged message is there once, at its offset.
    assert len(final) == len(acked)
    assert len(set(final.values())) == len(final)
    by_id = {message_id: offset for offset, message_id in final.items()}
    assert by_id == acked

    assert time.monotonic() - started < 60
