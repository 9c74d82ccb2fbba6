"""Segments: the per-message tables are partitioned by segment; each retention lane opens a
new segment when its open one has run its length, and a segment whose every message has
expired is dropped whole. Dropping needs ACCESS EXCLUSIVE locks: it never waits in line
behind a long transaction (pg_dump holds ACCESS SHARE on every table), it gives up after a
short lock_timeout and the next pass tries again."""

from __future__ import annotations

import asyncio
import time

import asyncpg

from sluice.queue.maintenance import run_pass
from sluice.storage import migrate
from sluice.storage.db import plain_url
from tests.conftest import run_app, unique
from tests.helpers import ack, create_subscription, create_topic, publish, pull, stats, topic_path

LANE_0_PERIOD = 600  # seconds: topics keeping messages up to an hour


async def segments(url: str) -> dict[int, tuple[int, bool]]:
    """seg -> (lane, open)."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = await conn.fetch("SELECT seg, lane, closed_at IS NULL AS open FROM sluice.segments")
        return {r["seg"]: (r["lane"], r["open"]) for r in rows}
    finally:
        await conn.close()


async def partitions_of(url: str, seg: int) -> list[str]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = await conn.fetch(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'sluice' AND c.relname LIKE $1",
            f"%\\_{seg:06d}",
        )
        return sorted(r["relname"] for r in rows)
    finally:
        await conn.close()


async def lane_0_topic_past_its_segment(h, url: str) -> tuple[str, int]:
    """A topic with 60 s retention and a subscription whose messages have all expired by
    now, in a lane segment that has run its length: the next pass opens a new segment for
    the lane, and may drop the old one."""
    client, clock = h.client, h.clock
    topic = unique()
    await create_topic(client, topic, retention_seconds=60)
    await create_subscription(client, topic, "s", start="earliest")
    await publish(client, topic, "old-0", "old-1")
    (first,) = {s for s, (lane, open_) in (await segments(url)).items() if lane == 0 and open_}
    clock.advance(LANE_0_PERIOD + 60)
    return topic, first


async def test_expired_segments_are_dropped_whole(fresh_db_url):
    await migrate.upgrade(fresh_db_url)
    async with run_app(fresh_db_url) as h:
        topic, first = await lane_0_topic_past_its_segment(h, fresh_db_url)
        assert len(await partitions_of(fresh_db_url, first)) == 8
        done = await run_pass(h.ctx)
        assert (done["segments_opened"], done["segments_dropped"]) == (1, 1), done
        assert await partitions_of(fresh_db_url, first) == []
        assert first not in await segments(fresh_db_url)

        # The subscription's state rows moved to a live segment, and its row says which
        # (state_of reads that partition only: revision 0009).
        conn = await asyncpg.connect(plain_url(fresh_db_url))
        try:
            named, newest = await conn.fetchrow(
                "SELECT s.state_seg, (SELECT z.seg FROM sluice.sub_states z "
                "WHERE z.topic_id = s.topic_id AND z.sub_id = s.sub_id "
                "ORDER BY z.state_id DESC LIMIT 1) "
                "FROM sluice.subscriptions s JOIN sluice.topics t USING (topic_id) "
                "WHERE t.name = $1 AND s.name = 's'",
                topic,
            )
        finally:
            await conn.close()
        assert named == newest and named != first
        # The topic and its subscription carry on: the state moved to a live segment, the
        # offsets go on from where they were.
        assert await publish(h.client, topic, "new-2") == [2]
        body = (await h.client.get(topic_path(topic))).json()
        assert (body["oldest_offset"], body["head_offset"], body["message_count"]) == (2, 2, 1)
        got = await pull(h.client, topic, "s", 10)
        assert [m["value"] for m in got] == ["new-2"]  # old-0, old-1 expired
        s = await stats(h.client, topic, "s")
        assert (s["committed_offset"], s["in_flight"], s["backlog"]) == (2, 1, 0)
        await ack(h.client, topic, "s", [m["receipt"] for m in got])
        assert (await stats(h.client, topic, "s"))["committed_offset"] == 3


async def test_a_segment_with_unexpired_messages_stays(fresh_db_url):
    await migrate.upgrade(fresh_db_url)
    async with run_app(fresh_db_url) as h:
        client = h.client
        short, longer = unique(), unique()
        await create_topic(client, short, retention_seconds=60)
        await create_topic(client, longer, retention_seconds=3000)  # lane 0 too
        await publish(client, short, "a")
        await publish(client, longer, "b")
        first = {
            s for s, (lane, open_) in (await segments(fresh_db_url)).items() if lane == 0 and open_
        }
        h.clock.advance(LANE_0_PERIOD + 60)
        done = await run_pass(h.ctx)  # opens the next segment; `short` has expired, `longer` not
        assert (done["segments_opened"], done["segments_dropped"]) == (1, 0), done
        await publish(client, short, "c")
        await publish(client, longer, "d")
        done = await run_pass(h.ctx)
        assert done["segments_dropped"] == 0
        (seg,) = first
        assert seg in await segments(fresh_db_url)
        got = (await client.get(topic_path(longer) + "/messages")).json()["messages"]
        assert [m["value"] for m in got] == ["b", "d"]
        h.clock.advance(3000)
        await run_pass(h.ctx)
        assert seg not in await segments(fresh_db_url)


async def test_a_drop_gives_way_to_a_transaction_holding_every_table(fresh_db_url):
    """pg_dump's transaction holds ACCESS SHARE on every table until it ends: the drop gives
    up within its lock_timeout (publish and pull go on meanwhile), and happens once the
    transaction is over. Opening a segment (ATTACH PARTITION) is not in its way."""
    await migrate.upgrade(fresh_db_url)
    async with run_app(fresh_db_url) as h:
        _, first = await lane_0_topic_past_its_segment(h, fresh_db_url)
        # Traffic on a topic of another lane: it writes nothing into the first segment.
        other = unique()
        await create_topic(h.client, other)
        await create_subscription(h.client, other, "s")
        dump = await asyncpg.connect(plain_url(fresh_db_url))
        try:
            await dump.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            tables = await dump.fetch(
                "SELECT c.oid::regclass::text AS name FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'sluice' AND c.relkind IN ('r', 'p')"
            )
            for table in tables:
                await dump.execute(f"LOCK TABLE {table['name']} IN ACCESS SHARE MODE")

            traffic_done = asyncio.Event()

            async def traffic() -> int:
                count = 0
                while not traffic_done.is_set():
                    await publish(h.client, other, count)
                    got = await pull(h.client, other, "s", 10)
                    await ack(h.client, other, "s", [m["receipt"] for m in got])
                    count += 1
                return count

            running = asyncio.create_task(traffic())
            started = time.monotonic()
            done = await run_pass(h.ctx)
            took = time.monotonic() - started
            traffic_done.set()
            rounds = await running
            assert done["segments_opened"] == 1, done
            assert done["segments_dropped"] == 0 and done["ddl_postponed"] >= 1, done
            assert took < 5, took
            assert rounds > 0
            assert len(await partitions_of(fresh_db_url, first)) == 8
        finally:
            await dump.execute("COMMIT")
            await dump.close()
        done = await run_pass(h.ctx)
        assert done["segments_dropped"] == 1, done
        assert await partitions_of(fresh_db_url, first) == []


async def test_the_segment_of_a_topic_that_went_quiet_is_dropped(fresh_db_url):
    """A topic that published once and never again: once its messages expire and its lane
    has moved on, their segment goes, and the topic's offsets carry on afterwards."""
    await migrate.upgrade(fresh_db_url)
    async with run_app(fresh_db_url) as h:
        busy = unique()
        await create_topic(h.client, busy, retention_seconds=3000)
        quiet, first = await lane_0_topic_past_its_segment(h, fresh_db_url)
        await publish(h.client, busy, "unexpired")  # keeps the first segment from going
        await run_pass(h.ctx)
        assert first in await segments(fresh_db_url)
        h.clock.advance(3000)
        await publish(h.client, busy, "later")
        done = await run_pass(h.ctx)
        assert first not in await segments(fresh_db_url), done
        assert await publish(h.client, quiet, "again") == [2]
        got = (await h.client.get(topic_path(quiet) + "/messages")).json()["messages"]
        assert [(m["offset"], m["value"]) for m in got] == [(2, "again")]
