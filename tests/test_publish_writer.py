"""The publish writers (app.queue.publisher): one group commit after another on a connection
each keeps while requests keep coming, then gives back.

Driven directly (not through HTTP) so the tests choose which requests share a group, and
against the real pool and database, with a pool that counts what the writer takes from it.
"""

from __future__ import annotations

import asyncio
import random

import asyncpg
import pytest

from sluice.errors import NotFound, PayloadTooLarge, Unavailable
from sluice.queue import publisher as publisher_module
from sluice.queue.publisher import Publisher, _lost
from sluice.records import NewMessage, Published
from sluice.storage.db import create_pool
from tests.conftest import unique, wait_until
from tests.helpers import topic_lock_held

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


# ---- groups of several topics (revision 0012) ---------------------------------------------


async def new_topic(client, max_message_bytes: int = 1000) -> str:
    name = unique("multi")
    body = {"max_message_bytes": max_message_bytes}
    assert (await client.put(f"/v1/topics/{name}", json=body)).status_code == 201
    return name


def dedup_message(value: str, dedup_id: str) -> NewMessage:
    return NewMessage(value=value, key=None, headers=None, delay_seconds=0, dedup_id=dedup_id)


async def test_requests_of_several_topics_share_one_transaction(writer, client, harness):
    publisher, pool = writer
    a, b, c = [await new_topic(client) for _ in range(3)]
    # Queued in one loop turn: one group, one call, one transaction.
    order = [a, b, a, c, b, a]
    results = await asyncio.gather(
        *(publish_one(publisher, t, f'"{i}"') for i, t in enumerate(order))
    )
    assert len(pool.acquired) == 1
    async with harness.ctx.pool.acquire() as conn:
        rows = await conn.fetch(
            "SELECT t.name, m.msg_offset, m.value, m.xmin::text AS xid FROM sluice.messages m "
            "JOIN sluice.topics t USING (topic_id) WHERE t.name = ANY($1) ORDER BY m.msg_offset",
            [a, b, c],
        )
    assert len({row["xid"] for row in rows}) == 1  # one transaction
    stored = {(row["name"], row["msg_offset"]): row["value"] for row in rows}
    for i, (name, published) in enumerate(zip(order, results, strict=True)):
        assert stored[(name, published.offset)] == f'"{i}"'
    for name in (a, b, c):  # each topic's requests in arrival order
        offsets = [p.offset for t, p in zip(order, results, strict=True) if t == name]
        assert offsets == sorted(offsets) and len(set(offsets)) == len(offsets)


async def test_a_topic_whose_lock_is_held_elsewhere_does_not_hold_up_the_others(
    writer, client, harness, monkeypatch
):
    """Another transaction holds topic b's lock (another process's publish, the relay's
    pass). A group of b's and a's requests, b's first, writes a's; b's requests, the one
    that came while that group was written and those that come later wait for the lock
    with a writer of their own, in arrival order, while the other topics' requests keep
    being answered. Once b's are written, b's next requests share groups again."""
    from sluice.storage import log as log_sql

    publisher, _ = writer
    a, b, c = [await new_topic(client) for _ in range(3)]
    real = log_sql.publish_topics
    gate = asyncio.Event()
    calls = 0

    async def held_at_first(conn, topics, skew):
        nonlocal calls
        calls += 1
        if calls == 1:
            await gate.wait()
        return await real(conn, topics, skew)

    monkeypatch.setattr(log_sql, "publish_topics", held_at_first)
    contended: list[str] = []
    publisher.contended_listeners.append(contended.append)
    async with topic_lock_held(harness.ctx.pool, b):
        b1 = asyncio.create_task(publish_one(publisher, b, '"b1"'))
        a1 = asyncio.create_task(publish_one(publisher, a, '"a1"'))
        await wait_until(lambda: _true(calls == 1), timeout=5)
        b2 = asyncio.create_task(publish_one(publisher, b, '"b2"'))  # queued meanwhile
        await asyncio.sleep(0.05)
        gate.set()
        async with asyncio.timeout(5):
            await a1
            c1 = await publish_one(publisher, c, '"c1"')  # not behind b's lock
            a2 = await publish_one(publisher, a, '"a2"')
        b3 = asyncio.create_task(publish_one(publisher, b, '"b3"'))
        await asyncio.sleep(0.3)
        assert not any(task.done() for task in (b1, b2, b3))
    async with asyncio.timeout(5):
        written = await asyncio.gather(b1, b2, b3)
    assert [p.offset for p in written] == sorted(p.offset for p in written)
    assert a2.offset > a1.result().offset and c1.offset >= 0
    assert contended == [b]  # told once: b's later requests went straight to its writer
    # Once b's writer has lingered and gone, b's requests are back with the others: one
    # group, one transaction.
    await wait_until(lambda: _true(not publisher._contended), timeout=5)
    results = await asyncio.gather(publish_one(publisher, b, '"b4"'), publish_one(publisher, c))
    async with harness.ctx.pool.acquire() as conn:
        xids = await conn.fetch(
            "SELECT DISTINCT m.xmin::text FROM sluice.messages m JOIN sluice.topics t "
            "USING (topic_id) WHERE (t.name, m.msg_offset) IN (($1, $2), ($3, $4))",
            b, results[0].offset, c, results[1].offset,
        )  # fmt: skip
    assert len(xids) == 1


async def test_a_lone_topic_whose_lock_is_held_elsewhere_does_not_hold_up_the_others(
    writer, client, harness
):
    """A group of a single topic whose lock another transaction holds (a relay pass moving
    many messages of it, another process's large publish) is set aside like a topic of a
    group of several: the process's writer goes on with the other topics' requests rather
    than waiting for the lock with every later request of every topic behind it."""
    publisher, _ = writer
    a, b = [await new_topic(client) for _ in range(2)]
    contended: list[str] = []
    publisher.contended_listeners.append(contended.append)
    async with topic_lock_held(harness.ctx.pool, b):
        b1 = asyncio.create_task(publish_one(publisher, b, '"b1"'))  # a group of its own
        await wait_until(lambda: _true(contended == [b]), timeout=5)
        async with asyncio.timeout(5):
            a1 = await publish_one(publisher, a, '"a1"')
            a2 = await publish_one(publisher, a, '"a2"')
        assert a2.offset > a1.offset
        await asyncio.sleep(0.2)
        assert not b1.done()
    async with asyncio.timeout(5):
        assert (await b1).offset >= 0


async def test_a_contended_topics_writer_keeps_the_topic_while_its_requests_keep_coming(
    writer, client, harness, monkeypatch
):
    """Two processes publishing to one topic find its lock taken again and again: the
    topic's own writer lingers for its next request as the process's writer does, so that
    request waits for the lock on it instead of being tried by the process's writer, found
    busy and set aside once more (a wasted round trip and a new writer per group: --workers
    2 on one topic under wrk answered 5,964-7,430 publishes/s at 16 connections that way,
    8,843-10,186 waiting; bench/RESULTS.md run 32)."""
    publisher, _ = writer
    monkeypatch.setattr(publisher_module, "LINGER_SECONDS", 30.0)  # no race with the test
    b = await new_topic(client)
    contended: list[str] = []
    publisher.contended_listeners.append(contended.append)
    async with topic_lock_held(harness.ctx.pool, b):
        b1 = asyncio.create_task(publish_one(publisher, b, '"b1"'))
        await wait_until(lambda: _true(contended == [b]), timeout=5)
    async with asyncio.timeout(5):
        first = await b1
    async with topic_lock_held(harness.ctx.pool, b):
        b2 = asyncio.create_task(publish_one(publisher, b, '"b2"'))
        await asyncio.sleep(0.2)
        assert not b2.done()
    async with asyncio.timeout(5):
        assert (await b2).offset > first.offset
    assert contended == [b]  # b2 went straight to b's writer, which waited for the lock


async def test_published_at_is_read_once_the_topics_lock_is_held(writer, client, harness):
    """A publish that waits for its topic's lock (another process's publish) stores the
    time it got the lock, not the time it asked: published_at grows with the offset, which a
    seek by time relies on."""
    publisher, _ = writer
    a = await new_topic(client)
    skew = harness.ctx.clock.skew
    async with topic_lock_held(harness.ctx.pool, a):
        waiting = asyncio.create_task(publish_one(publisher, a))
        await asyncio.sleep(0.3)
        async with harness.ctx.pool.acquire() as conn:
            released = await conn.fetchval(
                "SELECT clock_timestamp() + make_interval(secs => $1)", skew
            )
    published = await asyncio.wait_for(waiting, 5)
    async with harness.ctx.pool.acquire() as conn:
        stored = await conn.fetchval(
            "SELECT m.published_at FROM sluice.messages m JOIN sluice.topics t USING "
            "(topic_id) WHERE t.name = $1 AND m.msg_offset = $2",
            a, published.offset,
        )  # fmt: skip
    assert stored >= released


async def test_a_refused_or_missing_topic_in_a_group_of_several_fails_alone(writer, client):
    publisher, _ = writer
    small, other = await new_topic(client, max_message_bytes=100), await new_topic(client)
    missing = unique("missing")
    big = '"' + "x" * 200 + '"'
    results = await asyncio.gather(
        publish_one(publisher, small, '"s1"'),
        publish_one(publisher, other, '"o1"'),
        publish_one(publisher, small, big),
        publish_one(publisher, missing),
        publish_one(publisher, small, '"s2"'),
        return_exceptions=True,
    )
    s1, o1, refused, absent, s2 = results
    assert isinstance(refused, PayloadTooLarge), refused
    assert isinstance(absent, NotFound), absent
    assert isinstance(o1, Published)
    assert isinstance(s1, Published) and isinstance(s2, Published) and s1.offset < s2.offset


async def test_a_refused_call_for_several_topics_writes_each_topic_on_its_own(
    writer, client, monkeypatch
):
    """The database refuses the combined call (an error: it rolled back): each topic's
    requests are written in a transaction of their own, and all are answered."""
    from sluice.storage import log as log_sql

    publisher, _ = writer
    a, b = await new_topic(client), await new_topic(client)

    async def refused(conn, topics, skew):
        raise asyncpg.exceptions.RaiseError("refused")

    monkeypatch.setattr(log_sql, "publish_topics", refused)
    results = await asyncio.wait_for(
        asyncio.gather(
            publish_one(publisher, a), publish_one(publisher, b), publish_one(publisher, a)
        ),
        10,
    )
    assert results[0].offset < results[2].offset and results[1].offset >= 0


async def test_dedup_ids_in_a_group_of_several_topics_are_per_topic(writer, client):
    publisher, _ = writer
    a, b = await new_topic(client), await new_topic(client)

    async def publish(topic: str, value: str, dedup_id: str) -> Published:
        [published] = await publisher.publish(topic, [dedup_message(value, dedup_id)], [10])
        return published

    a1, b1, a2, plain = await asyncio.gather(
        publish(a, '"a1"', "same"),
        publish(b, '"b1"', "same"),
        publish(a, '"a2"', "same"),
        publish_one(publisher, b, '"plain"'),
    )
    assert not a1.duplicate and not b1.duplicate
    assert a2.duplicate and a2.offset == a1.offset
    assert not plain.duplicate and plain.offset > b1.offset


async def test_a_group_of_several_topics_whose_outcome_is_unknown_is_answered_503(
    writer, client, harness, monkeypatch
):
    """The combined call committed, then the connection broke: every request of every
    topic is answered 503, and nothing is written twice."""
    from sluice.storage import log as log_sql

    publisher, _ = writer
    a, b = await new_topic(client), await new_topic(client)
    real = log_sql.publish_topics

    async def committed_then_lost(conn, topics, skew):
        await real(conn, topics, skew)
        raise ConnectionResetError("connection lost after COMMIT was sent")

    monkeypatch.setattr(log_sql, "publish_topics", committed_then_lost)
    results = await asyncio.gather(
        publish_one(publisher, a), publish_one(publisher, b), return_exceptions=True
    )
    assert all(isinstance(r, Unavailable) for r in results), results
    async with harness.ctx.pool.acquire() as conn:
        counts = await conn.fetch(
            "SELECT t.name, count(*) FROM sluice.messages m JOIN sluice.topics t USING "
            "(topic_id) WHERE t.name = ANY($1) GROUP BY t.name",
            [a, b],
        )
    assert sorted(row["count"] for row in counts) == [1, 1]


async def test_writers_grouping_the_same_topics_in_opposite_orders_never_deadlock(
    harness, client, db_url
):
    """Two processes' writers (two publishers, each on a pool of its own), one grouping a
    before b, the other b before a, many times over: a group waits only for its first
    topic's lock, so Postgres never finds a deadlock, and every request is stored once."""
    a, b = await new_topic(client), await new_topic(client)
    pools = [await create_pool(db_url, 2) for _ in range(2)]
    publishers = [Publisher(pool, harness.ctx.clock) for pool in pools]
    async with harness.ctx.pool.acquire() as conn:
        before = await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )

    async def rounds(publisher: Publisher, first: str, second: str) -> list[Published]:
        done: list[Published] = []
        for i in range(40):
            done += await asyncio.gather(
                publish_one(publisher, first, f'"{i}"'), publish_one(publisher, second, f'"{i}"')
            )
        return done

    try:
        async with asyncio.timeout(60):
            runs = await asyncio.gather(rounds(publishers[0], a, b), rounds(publishers[1], b, a))
    finally:
        for publisher in publishers:
            await publisher.close()
        for pool in pools:
            await pool.close()
    async with harness.ctx.pool.acquire() as conn:
        await conn.execute("SELECT pg_stat_clear_snapshot()")
        after = await conn.fetchval(
            "SELECT deadlocks FROM pg_stat_database WHERE datname = current_database()"
        )
        stored = await conn.fetchval(
            "SELECT count(*) FROM sluice.messages m JOIN sluice.topics t USING (topic_id) "
            "WHERE t.name = ANY($1)",
            [a, b],
        )
    assert after == before
    topics_of_runs = [(a, b), (b, a)]
    stored_by_us = {
        (topics_of_runs[k][i % 2], published.offset)
        for k, run in enumerate(runs)
        for i, published in enumerate(run)
    }
    assert stored == 160 == len(stored_by_us)


class UnreachablePool(CountingPool):
    """A pool that can make no connection (Postgres down): acquire raises."""

    async def acquire(self) -> asyncpg.Connection:
        raise ConnectionRefusedError("connection refused")


async def test_a_group_whose_connection_cannot_be_made_gets_the_error(harness, topic):
    """No connection to be had (Postgres down): the group's requests get the error at once,
    not an answer that never comes, and the next request tries again."""
    publisher = Publisher(UnreachablePool(harness.ctx.pool), harness.ctx.clock)  # type: ignore[arg-type]
    try:
        for _ in range(2):
            results = await asyncio.wait_for(
                asyncio.gather(
                    publish_one(publisher, topic), publish_one(publisher, topic),
                    return_exceptions=True,
                ),
                5,
            )  # fmt: skip
            assert all(isinstance(r, ConnectionRefusedError) for r in results), results
    finally:
        await asyncio.wait_for(publisher.close(), 5)


async def test_a_contended_topic_whose_connection_cannot_be_made_gets_the_error(
    writer, client, harness, monkeypatch
):
    """A topic set aside (its lock taken) whose writer can get no connection: its requests
    get the error, and the topic's next requests are grouped with the others again."""
    publisher, pool = writer
    monkeypatch.setattr(publisher_module, "LINGER_SECONDS", 30.0)  # keeps its connection
    a, b = await new_topic(client), await new_topic(client)
    real_acquire = pool.acquire
    refuse = False

    async def acquire() -> asyncpg.Connection:
        if refuse:
            raise ConnectionRefusedError("connection refused")
        return await real_acquire()

    monkeypatch.setattr(pool, "acquire", acquire)
    async with topic_lock_held(harness.ctx.pool, b):
        # The writer takes its connection and keeps it; then b's writer finds none.
        await publish_one(publisher, a)
        refuse = True
        results = await asyncio.wait_for(
            asyncio.gather(
                publish_one(publisher, b), publish_one(publisher, a), return_exceptions=True
            ),
            5,
        )
    refused, published = results
    assert isinstance(refused, ConnectionRefusedError), refused
    assert isinstance(published, Published), published
    refuse = False
    assert (await asyncio.wait_for(publish_one(publisher, b), 5)).offset >= 0
