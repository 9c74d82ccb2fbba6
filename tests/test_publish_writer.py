"""The publish writer of a topic (app.queue.publisher): one group commit after another on a
connection it keeps while requests keep coming, then gives back.

Driven directly (not through HTTP) so the tests choose which requests share a group, and
against the real pool and database, with a pool that counts what the writer takes from it.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from sluice.errors import NotFound, PayloadTooLarge
from sluice.queue import publisher as publisher_module
from sluice.queue.publisher import Publisher, _lost
from sluice.records import NewMessage, Published
from sluice.storage.db import create_pool
from tests.conftest import unique, wait_until

pytestmark = pytest.mark.asyncio


class CountingPool:
    """The app's pool, counting the connections the writer acquires and gives back."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.acquired: list[asyncpg.Connection] = []
        self.released = 0

    async def acquire(self) -> asyncpg.Connection:
        conn = await self.pool.acquire()
        self.acquired.append(conn)
        return conn

    async def release(self, conn: asyncpg.Connection) -> None:
        self.released += 1
        await self.pool.release(conn)

    def __getattr__(self, name: str) -> object:  # sizes and the rest: the pool's own
        return getattr(self.pool, name)


def message(value: str) -> NewMessage:
    return NewMessage(value=value, key=None, headers=None, delay_seconds=0, dedup_id=None)


async def publish_one(publisher: Publisher, topic: str, value: str = '"v"') -> Published:
    [published] = await publisher.publish(topic, [message(value)], [len(value)])
    return published


@pytest.fixture
async def topic(client) -> str:
    name = unique("writer")
    created = await client.put(f"/v1/topics/{name}", json={"max_message_bytes": 100})
    assert created.status_code == 201
    return name


@pytest.fixture
async def writer(harness):
    pool = CountingPool(harness.ctx.pool)
    publisher = Publisher(pool, harness.ctx.clock)  # type: ignore[arg-type]
    yield publisher, pool
    await publisher.close()


async def test_consecutive_requests_share_one_connection_then_it_is_given_back(writer, topic):
    publisher, pool = writer
    offsets = [(await publish_one(publisher, topic)).offset for _ in range(20)]
    assert offsets == sorted(offsets) and len(set(offsets)) == 20
    # One request after another, each within the linger of the one before: one acquire.
    assert len(pool.acquired) == 1
    await wait_until(lambda: _true(pool.released == 1), timeout=2)
    # After the linger nothing is held, and the next request takes a connection again.
    await publish_one(publisher, topic)
    assert len(pool.acquired) == 2


async def test_a_writer_waiting_for_requests_holds_its_connection_until_close(
    writer, topic, monkeypatch
):
    publisher, pool = writer
    monkeypatch.setattr(publisher_module, "LINGER_SECONDS", 30.0)
    await publish_one(publisher, topic)
    await asyncio.sleep(0.05)
    await publish_one(publisher, topic)
    assert (len(pool.acquired), pool.released) == (1, 0)
    # close() ends the wait now, not after 30 s, so the pool can close behind it.
    await asyncio.wait_for(publisher.close(), 2)
    assert pool.released == 1


async def test_a_connection_lost_while_the_writer_waits_is_replaced(
    writer, topic, monkeypatch, harness
):
    publisher, pool = writer
    monkeypatch.setattr(publisher_module, "LINGER_SECONDS", 30.0)
    await publish_one(publisher, topic)
    held = pool.acquired[0]
    async with harness.ctx.pool.acquire() as other:
        assert await other.fetchval("SELECT pg_terminate_backend($1)", held.get_server_pid())
    await wait_until(lambda: _true(_lost(held)), timeout=5)
    # Without the check the group would go to the dead connection and be answered 503.
    published = await publish_one(publisher, topic)
    assert published.offset > 0
    assert len(pool.acquired) == 2 and pool.acquired[1] is not held


async def test_a_refused_request_in_a_group_fails_alone(writer, topic):
    publisher, _ = writer
    big = '"' + "x" * 200 + '"'  # over the topic's max_message_bytes (100)
    # Queued in the same loop turn: the writer takes the three as one group, the database
    # refuses it, and each is written again on its own.
    results = await asyncio.gather(
        publish_one(publisher, topic, '"a"'),
        publish_one(publisher, topic, big),
        publish_one(publisher, topic, '"c"'),
        return_exceptions=True,
    )
    first, refused, last = results
    assert isinstance(refused, PayloadTooLarge), refused
    assert isinstance(first, Published) and isinstance(last, Published)
    assert first.offset < last.offset
    # The writer's connection survived the refusal: the next request is written on it.
    assert (await publish_one(publisher, topic)).offset > last.offset


async def test_a_group_for_a_missing_topic_is_answered_404_each(writer):
    publisher, _ = writer
    missing = unique("missing")
    results = await asyncio.gather(
        *(publish_one(publisher, missing) for _ in range(3)), return_exceptions=True
    )
    assert all(isinstance(r, NotFound) for r in results), results


async def test_requests_arriving_around_the_end_of_the_wait_are_all_answered(
    writer, topic, monkeypatch
) -> None:
    """Requests timed to land as the writer's wait ends (its timer fired, its task not yet
    run) or while it gives its connection back: none may be left in a queue no writer
    serves. Every one is answered, with distinct offsets."""
    publisher, pool = writer
    monkeypatch.setattr(publisher_module, "LINGER_SECONDS", 0.001)
    rng = random.Random(7)
    # Rounds: all producers wait about as long, then publish. After the longer waits the
    # writer's own wait (1 ms) has ended, or is just ending, when the requests come.
    pauses = [rng.choice((0, 0.0005, 0.0009, 0.001, 0.0011, 0.002, 0.003)) for _ in range(30)]

    async def producer() -> list[int]:
        offsets = []
        for pause in pauses:
            await asyncio.sleep(pause + rng.random() * 0.0002)
            offsets.append((await publish_one(publisher, topic)).offset)
        return offsets

    runs = await asyncio.wait_for(asyncio.gather(*(producer() for _ in range(4))), 20)
    offsets = [o for run in runs for o in run]
    assert len(set(offsets)) == 120
    assert all(run == sorted(run) for run in runs)
    assert len(pool.acquired) > 1  # the writer did stop and start again meanwhile
    await publisher.close()
    assert pool.released == len(pool.acquired)


async def _true(value: bool) -> bool:
    return value


async def test_a_busy_writer_does_not_keep_the_last_connection_from_others(
    harness, topic, monkeypatch, db_url
):
    """With a pool of one connection, a topic published without pause must not hold it
    for as long as it stays busy: another user of the pool gets it between two groups."""
    monkeypatch.setattr(publisher_module, "LINGER_SECONDS", 30.0)
    small = await create_pool(db_url, 1)
    publisher = Publisher(small, harness.ctx.clock)
    stop = asyncio.Event()

    async def producer() -> int:
        count = 0
        while not stop.is_set():
            await publish_one(publisher, topic)
            count += 1
        return count

    producers = [asyncio.create_task(producer()) for _ in range(3)]
    try:
        await asyncio.sleep(0.1)  # the writer is busy: one group after another
        async with asyncio.timeout(5):
            async with small.acquire() as conn:
                assert await conn.fetchval("SELECT 1") == 1
    finally:
        stop.set()
        counts = await asyncio.gather(*producers)
        await publisher.close()
        await small.close()
    assert all(counts)
