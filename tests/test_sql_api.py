"""The SQL API (revision 0005): publish, ack and nack inside the application's own
transaction, through the outbox and the relay; the read-only views.

The app runs in-process (its relay loop included) and the "application" is a plain asyncpg
connection to the same database, as a user's service would be."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from sluice.queue import maintenance, receipts
from sluice.queue.relay import relay_once
from sluice.storage import migrate
from sluice.storage.db import plain_url
from sluice.storage.grants import grant
from tests.conftest import Harness, run_app, unique
from tests.helpers import (
    ack,
    create_topic,
    extend,
    publish,
    pull,
    seek,
    sql_ack_applies,
    stats,
    topic_lock_held,
    topic_path,
    topic_with_subscription,
)


@pytest.fixture
async def app_conn(db_url: str) -> AsyncIterator[asyncpg.Connection]:
    """The application's own connection to the database Sluice lives in."""
    conn = await asyncpg.connect(plain_url(db_url))
    yield conn
    await conn.close()


async def connect(db_url: str) -> asyncpg.Connection:
    return await asyncpg.connect(plain_url(db_url))


async def relay_all(harness: Harness) -> None:
    """Everything committed so far is relayed once this returns: a pass of our own that got
    the relay lock (the app's loop may hold it for a moment) and left nothing behind."""
    while (done := await relay_once(harness.ctx)).relayed < 0 or done.more:
        await asyncio.sleep(0.01)


@asynccontextmanager
async def manual_app(db_url: str, **settings: Any) -> AsyncIterator[Harness]:
    """The app without its relay loop: the test runs each relay pass and sees its result.
    The database is shared with the tests that ran before on this worker, and one may have
    stopped its app with a send or an ack not yet relayed: that is relayed first, so the
    counts a test asserts are its own."""
    async with run_app(db_url, sql_relay=False, **settings) as h:
        await relay_all(h)
        yield h


@pytest.fixture
async def manual(db_url: str) -> AsyncIterator[Harness]:
    async with manual_app(db_url) as h:
        yield h


async def follow_clock(conn: asyncpg.Connection, harness: Harness) -> None:
    """The SQL API's clock moves with the app's injected one."""
    await conn.execute(
        "SELECT set_config('sluice.clock_skew_seconds', $1, false)", str(harness.clock.skew)
    )


async def browse(harness: Harness, topic: str, from_offset: int = 0) -> list[dict]:
    r = await harness.client.get(
        topic_path(topic) + "/messages", params={"from_offset": from_offset, "limit": 1000}
    )
    assert r.status_code == 200, r.text
    return r.json()["messages"]


# ---- publish -----------------------------------------------------------------------------


async def test_a_committed_send_is_delivered_with_everything_it_carried(harness, app_conn):
    topic = await topic_with_subscription(harness.client)
    async with app_conn.transaction():
        one = await app_conn.fetchval(
            "SELECT sluice.send($1, $2::jsonb, p_key => 'k1', p_headers => '{\"h\": \"v\"}')",
            topic,
            json.dumps({"order": 1}),
        )
        many = await app_conn.fetchval(
            "SELECT sluice.send_batch($1, ARRAY['2', '\"three\"', 'null']::jsonb[])", topic
        )
    assert one < many[0] < many[1] < many[2]
    await relay_all(harness)
    got = await pull(harness.client, topic, "s", 10)
    assert [(m["offset"], m["value"], m["key"], m["headers"]) for m in got] == [
        (0, {"order": 1}, "k1", {"h": "v"}),
        (1, 2, None, None),
        (2, "three", None, None),
        (3, None, None, None),
    ]


async def test_a_relay_pass_reads_the_clock_once_it_holds_the_topics_lock(manual, app_conn):
    """A pass that waits for a topic's lock (an HTTP publish holds it) stamps its messages
    with the time it got the lock, not the time it asked: published_at grows with the
    offset, which a seek by time relies on (revision 0013)."""
    topic = await topic_with_subscription(manual.client)
    await follow_clock(app_conn, manual)
    await app_conn.execute("SELECT sluice.send($1, '\"late\"')", topic)
    async with topic_lock_held(manual.ctx.pool, topic) as holder:
        relaying = asyncio.create_task(relay_once(manual.ctx))
        await asyncio.sleep(0.3)
        assert not relaying.done()
        released = await holder.fetchval(
            "SELECT clock_timestamp() + make_interval(secs => $1)", manual.clock.skew
        )
    async with asyncio.timeout(10):
        assert (await relaying).relayed == 1
    [message] = await browse(manual, topic)
    published_at = datetime.fromisoformat(message["published_at"])
    assert published_at >= released, (published_at, released)


async def test_a_rolled_back_send_is_never_delivered(harness, app_conn):
    topic = await topic_with_subscription(harness.client)
    tx = app_conn.transaction()
    await tx.start()
    await app_conn.execute("SELECT sluice.send($1, '\"lost\"')", topic)
    await tx.rollback()
    await app_conn.execute("SELECT sluice.send($1, '\"kept\"')", topic)  # autocommit
    await relay_all(harness)
    await relay_all(harness)
    assert [m["value"] for m in await pull(harness.client, topic, "s", 10)] == ["kept"]
    assert [m["offset"] for m in await browse(harness, topic)] == [0]


async def test_a_commit_wakes_a_waiting_pull_through_the_relay(db_url, app_conn):
    """No test hook: the app's relay loop wakes on the commit's notification (its safety
    interval is 60 s here, so only the notification can deliver within the pull's wait)."""
    async with run_app(db_url, relay_interval_seconds=60) as harness:
        topic = await topic_with_subscription(harness.client)
        waiting = asyncio.create_task(pull(harness.client, topic, "s", 1, wait_seconds=15))
        await asyncio.sleep(0.3)
        assert not waiting.done()
        await app_conn.execute("SELECT sluice.send($1, '\"wake\"')", topic)
        got = await asyncio.wait_for(waiting, 15)
        assert [m["value"] for m in got] == ["wake"]


async def test_an_open_transaction_does_not_hold_up_other_publishers(harness, app_conn, db_url):
    """The SQL publish takes no topic lock: while an application's transaction that sent a
    message stays open for 2 s, HTTP and SQL publishes to the same topic go through at
    once and are delivered; the open one's message follows when it commits."""
    topic = await topic_with_subscription(harness.client)
    other = await connect(db_url)
    try:
        tx = app_conn.transaction()
        await tx.start()
        await app_conn.execute("SELECT sluice.send($1, '\"slow\"')", topic)
        started = time.monotonic()
        assert await publish(harness.client, topic, "http") == [0]
        await other.execute("SELECT sluice.send($1, '\"sql\"')", topic)
        await relay_all(harness)
        assert time.monotonic() - started < 1.0
        assert [m["value"] for m in await browse(harness, topic)] == ["http", "sql"]
        await asyncio.sleep(2)
        await tx.commit()
        await relay_all(harness)
        assert [(m["offset"], m["value"]) for m in await browse(harness, topic)] == [
            (0, "http"),
            (1, "sql"),
            (2, "slow"),
        ]
    finally:
        await other.close()


async def test_a_transaction_that_commits_after_a_later_one_is_relayed_after_it(db_url, app_conn):
    """The relay's bookkeeping: A draws its outbox id first and commits last. The pass
    between sees B (a higher id) and must still pick A up later, exactly once."""
    b_conn = await connect(db_url)
    async with manual_app(db_url) as harness:
        topic = await topic_with_subscription(harness.client)
        try:
            tx_a = app_conn.transaction()
            await tx_a.start()
            id_a = await app_conn.fetchval("SELECT sluice.send($1, '\"A\"')", topic)
            id_b = await b_conn.fetchval("SELECT sluice.send($1, '\"B\"')", topic)
            assert id_a < id_b
            assert (await relay_once(harness.ctx)).relayed == 1
            await tx_a.commit()
            assert (await relay_once(harness.ctx)).relayed == 1
            assert (await relay_once(harness.ctx)).relayed == 0
            assert [m["value"] for m in await browse(harness, topic)] == ["B", "A"]
        finally:
            await b_conn.close()


async def test_a_pass_relays_at_most_its_batch_and_the_next_one_goes_on(db_url, app_conn):
    async with manual_app(db_url, relay_batch=3) as h:
        topic = await topic_with_subscription(h.client)
        await app_conn.execute(
            "SELECT sluice.send_batch($1, array_agg(to_jsonb(i))) FROM generate_series(1, 8) i",
            topic,
        )
        passes = []
        while (done := await relay_once(h.ctx)).relayed > 0:
            passes.append((done.relayed, done.more))
        assert passes == [(3, True), (3, True), (2, False)]
        assert [m["value"] for m in await browse(h, topic)] == list(range(1, 9))


async def test_sql_and_http_publishers_keep_offsets_in_commit_order(harness, db_url):
    """SPEC 3.2 across both APIs: HTTP publishes and SQL transactions of varied length run
    concurrently while a reader tails the log. A message must never appear below an offset
    the reader has passed, and every committed message is in the log exactly once."""
    topic = await topic_with_subscription(harness.client)
    done = asyncio.Event()
    committed: set[str] = set()

    async def sql_producer(index: int) -> None:
        rng = random.Random(index)
        conn = await connect(db_url)
        try:
            for n in range(15):
                ids = [f"sql{index}-{n}-{m}" for m in range(rng.choice([1, 1, 3]))]
                async with conn.transaction():
                    await conn.execute(
                        "SELECT sluice.send_batch($1, $2::jsonb[])",
                        topic,
                        [json.dumps(i) for i in ids],
                    )
                    await asyncio.sleep(rng.choice([0, 0, 0.01, 0.05, 0.2]))
                committed.update(ids)
        finally:
            await conn.close()

    async def http_producer(index: int) -> None:
        for n in range(15):
            ids = [f"http{index}-{n}-{m}" for m in range(1 + n % 3)]
            await publish(harness.client, topic, *ids)
            committed.update(ids)
            await asyncio.sleep(0.01)

    seen: dict[int, str] = {}

    async def reader() -> None:
        next_offset = 0
        quiet = 0
        while quiet < 3:
            finished = done.is_set()
            page = await browse(harness, topic, next_offset)
            for m in page:
                assert m["offset"] >= next_offset
                seen[m["offset"]] = m["value"]
            if page:
                next_offset = page[-1]["offset"] + 1
            quiet = quiet + 1 if finished and not page else 0
            await asyncio.sleep(0.01)

    reading = asyncio.create_task(reader())
    await asyncio.gather(
        *(sql_producer(i) for i in range(3)), *(http_producer(i) for i in range(2))
    )
    await wait_for_relay(harness, topic, len(committed))
    done.set()
    await reading
    full = {m["offset"]: m["value"] for m in await browse(harness, topic)}
    assert full == seen, "a message appeared below an offset the reader had passed"
    assert sorted(full) == list(range(len(full)))
    assert sorted(full.values()) == sorted(committed)


async def wait_for_relay(harness: Harness, topic: str, count: int) -> None:
    deadline = time.monotonic() + 10
    while len(await browse(harness, topic)) < count:
        assert time.monotonic() < deadline, "the relay did not catch up"
        await asyncio.sleep(0.05)


async def test_dedup_ids_and_delays_work_as_over_http(harness, app_conn):
    topic = await topic_with_subscription(harness.client)
    await publish(harness.client, topic, "first", dedup_id="d1")
    await app_conn.execute("SELECT sluice.send($1, '\"again\"', p_dedup_id => 'd1')", topic)
    await app_conn.execute("SELECT sluice.send($1, '\"later\"', p_delay_seconds => 30)", topic)
    await relay_all(harness)
    assert [m["value"] for m in await browse(harness, topic)] == ["first", "later"]
    [first] = await pull(harness.client, topic, "s", 10)
    assert first["value"] == "first"
    await ack(harness.client, topic, "s", [first["receipt"]])
    harness.clock.advance(31)
    assert [m["value"] for m in await pull(harness.client, topic, "s", 10)] == ["later"]


@pytest.mark.parametrize(
    ("call", "message"),
    [
        ("SELECT sluice.send('no-such-topic', '1')", 'topic "no-such-topic" does not exist'),
        ("SELECT sluice.send($1, NULL)", "message 0: value is null"),
        ("SELECT sluice.send($1, '1', repeat('k', 257))", "key longer than 256"),
        ("SELECT sluice.send($1, '1', p_headers => '[1]')", "headers must be an object"),
        ("SELECT sluice.send($1, '1', p_headers => '{\"a\": 1}')", "headers must map"),
        ("SELECT sluice.send($1, '1', p_dedup_id => '')", "dedup_id must be 1..128"),
        ("SELECT sluice.send($1, '1', p_delay_seconds => 901)", "delay_seconds must be 0..900"),
        ("SELECT sluice.send($1, to_jsonb(repeat('x', 2000)))", "max_message_bytes (1024)"),
        ("SELECT sluice.send_batch($1, '{}'::jsonb[])", "1..1000 messages, not 0"),
        ("SELECT sluice.send_batch($1, ARRAY['1', '2']::jsonb[], ARRAY['k'])", "p_keys has not"),
    ],
)
async def test_bad_input_is_refused_in_the_callers_transaction(harness, app_conn, call, message):
    topic = unique("bad")
    await create_topic(harness.client, topic, max_message_bytes=1024)
    with pytest.raises(asyncpg.PostgresError) as raised:
        await app_conn.execute(call, *([topic] if "$1" in call else []))
    assert message in str(raised.value)
    assert (
        await app_conn.fetchval(
            "SELECT count(*) FROM sluice.outbox WHERE topic_id = "
            "(SELECT topic_id FROM sluice.topics WHERE name = $1)",
            topic,
        )
        == 0
    )


# ---- ack and nack ------------------------------------------------------------------------


async def lease_one(harness: Harness, **config: object) -> tuple[str, dict]:
    topic = await topic_with_subscription(
        harness.client, ack_deadline_seconds=30, retry_min_seconds=1, retry_max_seconds=1, **config
    )
    await publish(harness.client, topic, "job")
    [message] = await pull(harness.client, topic, "s", 1)
    return topic, message


async def test_an_ack_committed_with_the_effect_is_never_redelivered(manual, app_conn):
    topic, message = await lease_one(manual)
    await follow_clock(app_conn, manual)
    async with app_conn.transaction():
        await app_conn.execute("CREATE TEMP TABLE IF NOT EXISTS effects (v text)")
        await app_conn.execute("INSERT INTO effects VALUES ('done')")
        rows = await app_conn.fetch(
            "SELECT * FROM sluice.ack($1, 's', $2)", topic, [message["receipt"]]
        )
    assert [(r["receipt"], r["applies"]) for r in rows] == [(message["receipt"], True)]
    assert (await relay_once(manual.ctx)).settled[0]["applied"] == 1
    manual.clock.advance(60)
    assert await pull(manual.client, topic, "s", 10) == []
    assert (await stats(manual.client, topic, "s"))["in_flight"] == 0


async def test_an_ack_rolled_back_is_redelivered_after_the_deadline(harness, app_conn):
    topic, message = await lease_one(harness)
    await follow_clock(app_conn, harness)
    tx = app_conn.transaction()
    await tx.start()
    await app_conn.fetch("SELECT * FROM sluice.ack($1, 's', $2)", topic, [message["receipt"]])
    await tx.rollback()
    await relay_all(harness)
    assert await pull(harness.client, topic, "s", 10) == []  # still leased
    harness.clock.advance(30)
    assert await pull(harness.client, topic, "s", 10) == []  # expired: backoff of 1 s
    harness.clock.advance(2)
    again = await pull(harness.client, topic, "s", 10)
    assert [(m["offset"], m["delivery_attempt"]) for m in again] == [(message["offset"], 2)]


async def test_a_stale_receipt_is_reported_at_the_call(harness, app_conn):
    topic, message = await lease_one(harness)
    await ack(harness.client, topic, "s", [message["receipt"]])
    await follow_clock(app_conn, harness)
    rows = await app_conn.fetch(
        "SELECT * FROM sluice.ack($1, 's', $2)", topic, [message["receipt"], "not-a-receipt"]
    )
    assert [r["applies"] for r in rows] == [False, False]
    assert (
        await app_conn.fetchval(
            "SELECT count(*) FROM sluice.outbox WHERE kind = 'ack' "
            "AND topic_id = (SELECT topic_id FROM sluice.topics "
            "WHERE name = $1)",
            topic,
        )
        == 0
    )


async def test_an_expired_receipt_is_stale_at_the_call(harness, app_conn):
    topic, message = await lease_one(harness)
    harness.clock.advance(31)
    await follow_clock(app_conn, harness)
    rows = await app_conn.fetch(
        "SELECT * FROM sluice.ack($1, 's', $2)", topic, [message["receipt"]]
    )
    assert [r["applies"] for r in rows] == [False]


def altered(receipt: str, seg: int = 0, token: uuid.UUID | None = None) -> str:
    """The receipt naming another segment (seg added to its own), or another token."""
    r = receipts.decode(receipt)
    assert r is not None
    return receipts.encode(r.offset, r.lease_id, r.seg + seg, token or uuid.UUID(r.token))


async def test_each_receipt_is_checked_at_the_call_as_an_ack_over_http_would_be(harness, app_conn):
    """Past the lease's 30 s: a member extended to 600 s applies; one extended to 600 s and
    then to 35 s does not (the newest extension decides); a receipt naming another segment
    or carrying another token never applies; each receipt on its own, in order."""
    client = harness.client
    topic = await topic_with_subscription(client, ack_deadline_seconds=30)
    await publish(client, topic, "a", "b", "c")
    long, short, plain = await pull(client, topic, "s", 3)
    assert (await extend(client, topic, "s", [long["receipt"]], 600))["extended"] == 1
    assert (await extend(client, topic, "s", [short["receipt"]], 600))["extended"] == 1
    assert (await extend(client, topic, "s", [short["receipt"]], 35))["extended"] == 1
    harness.clock.advance(40)
    await follow_clock(app_conn, harness)
    given = [
        long["receipt"],
        short["receipt"],
        plain["receipt"],
        altered(long["receipt"], seg=1),
        altered(long["receipt"], token=uuid.uuid4()),
        long["receipt"],
    ]
    answers = await sql_ack_applies(app_conn, topic, "s", given)
    assert answers == [True, False, False, False, False, True]


async def test_a_lease_settled_one_receipt_at_a_time_keeps_each_receipts_history(harness, app_conn):
    """Members of one lease settled one request at a time, each a lease event that names
    only its own receipt (an ack or nack reads only the events naming its receipts, revision
    0021): a member acked among them is stale while the others still apply; past the lease's
    30 s, the member extended before all of them still applies and one never extended does
    not. The same at the SQL call and over HTTP, whatever the order of the receipts."""
    client = harness.client
    topic = await topic_with_subscription(client, ack_deadline_seconds=30)
    await publish(client, topic, *range(8))
    leased = [m["receipt"] for m in await pull(client, topic, "s", 8)]
    assert len({receipts.decode(r).lease_id for r in leased}) == 1  # type: ignore[union-attr]
    extended, acked, *others, fresh = leased
    assert (await extend(client, topic, "s", [extended], 600))["extended"] == 1
    for receipt in [acked, *others]:
        assert await ack(client, topic, "s", [receipt]) == {"acked": 1, "stale": []}
    await follow_clock(app_conn, harness)
    assert await sql_ack_applies(app_conn, topic, "s", [extended, acked, fresh]) == [
        True,
        False,
        True,
    ]
    harness.clock.advance(40)
    await follow_clock(app_conn, harness)
    assert await sql_ack_applies(app_conn, topic, "s", [fresh, extended]) == [False, True]
    answer = await ack(client, topic, "s", [acked, fresh, extended])
    assert answer == {"acked": 1, "stale": [acked, fresh]}


async def test_receipts_from_before_a_seek_are_stale_at_the_call(harness, app_conn):
    topic, message = await lease_one(harness)
    await follow_clock(app_conn, harness)
    assert await sql_ack_applies(app_conn, topic, "s", [message["receipt"]]) == [True]
    await seek(harness.client, topic, "s", to="latest")
    assert await sql_ack_applies(app_conn, topic, "s", [message["receipt"]]) == [False]


async def test_a_receipt_for_a_message_retention_took_is_stale_at_the_call(harness, app_conn):
    topic, message = await lease_one(harness)
    await follow_clock(app_conn, harness)
    assert await sql_ack_applies(app_conn, topic, "s", [message["receipt"]]) == [True]
    # What a maintenance pass does once the message is older than the topic's retention.
    await app_conn.execute(
        "UPDATE sluice.topics SET retention_floor = $2 WHERE name = $1",
        topic,
        message["offset"] + 1,
    )
    assert await sql_ack_applies(app_conn, topic, "s", [message["receipt"]]) == [False]


async def test_an_ack_applies_as_of_its_call_when_committed_after_the_deadline(harness, app_conn):
    """Acked 5 s before the deadline, committed (and relayed) 10 s after it, with no claim
    in between: the ack holds, as of the time of the call."""
    topic, message = await lease_one(harness)
    harness.clock.advance(25)
    await follow_clock(app_conn, harness)
    async with app_conn.transaction():
        await app_conn.fetch("SELECT * FROM sluice.ack($1, 's', $2)", topic, [message["receipt"]])
        harness.clock.advance(15)
    await relay_all(harness)
    assert await pull(harness.client, topic, "s", 10) == []


async def test_a_claim_after_the_deadline_wins_over_a_late_commit(manual, app_conn):
    """At-least-once: the lease expired and the message went to another consumer before
    the ack's transaction committed; the ack is stale when relayed, the redelivery stands."""
    topic, message = await lease_one(manual)
    await follow_clock(app_conn, manual)
    async with app_conn.transaction():
        await app_conn.fetch("SELECT * FROM sluice.ack($1, 's', $2)", topic, [message["receipt"]])
        manual.clock.advance(30)
        await pull(manual.client, topic, "s", 10)  # expires it: the backoff starts
        manual.clock.advance(2)
        again = await pull(manual.client, topic, "s", 10)
        assert [m["delivery_attempt"] for m in again] == [2]
    done = await relay_once(manual.ctx)
    assert done.settled[0]["applied"] == 0 and done.settled[0]["stale"] == 1


async def test_a_nack_in_sql_makes_the_message_due_after_its_delay(harness, app_conn):
    topic, message = await lease_one(harness)
    await follow_clock(app_conn, harness)
    rows = await app_conn.fetch(
        "SELECT * FROM sluice.nack($1, 's', $2, 10)", topic, [message["receipt"]]
    )
    assert [r["applies"] for r in rows] == [True]
    await relay_all(harness)
    assert await pull(harness.client, topic, "s", 10) == []
    harness.clock.advance(11)
    assert [m["delivery_attempt"] for m in await pull(harness.client, topic, "s", 10)] == [2]


async def test_acks_of_an_unknown_subscription_are_refused(harness, app_conn):
    topic = await topic_with_subscription(harness.client)
    with pytest.raises(asyncpg.PostgresError, match="does not exist"):
        await app_conn.fetch("SELECT * FROM sluice.ack($1, 'nope', ARRAY['x'])", topic)


# ---- the outbox's rotation ---------------------------------------------------------------


async def outbox_rows(conn: asyncpg.Connection) -> dict[int, int]:
    rows = await conn.fetch("SELECT part, count(*) AS n FROM sluice.outbox GROUP BY part")
    return {r["part"]: r["n"] for r in rows}


async def test_the_outbox_is_emptied_by_truncate_only_once_relayed(db_url, app_conn):
    """Rotation: the partition an open transaction wrote to cannot be emptied (its lock is
    not granted within the timeout: postponed, nothing waits in line), and what it holds is
    still relayed once it commits; then the partition is emptied, and no row of the outbox
    was ever updated or deleted."""
    async with manual_app(db_url, outbox_rotate_seconds=1) as h:
        topic = await topic_with_subscription(h.client)
        current = await app_conn.fetchval("SELECT part FROM sluice.outbox_current")
        tx = app_conn.transaction()
        await tx.start()
        await app_conn.execute("SELECT sluice.send($1, '\"open\"')", topic)
        other = await connect(db_url)
        try:
            await other.execute("SELECT sluice.send($1, '\"closed\"')", topic)
            await relay_once(h.ctx)
            h.clock.advance(2)
            assert (await maintenance.run_pass(h.ctx))["outbox_emptied"] == 0
            assert await other.fetchval("SELECT part FROM sluice.outbox_current") != current
            h.clock.advance(2)
            started = time.monotonic()
            result = await maintenance.run_pass(h.ctx)
            assert result["ddl_postponed"] >= 1 and result["outbox_emptied"] == 0
            assert time.monotonic() - started < 2
            await tx.commit()
            await relay_once(h.ctx)
            assert [m["value"] for m in await browse(h, topic)] == ["closed", "open"]
            assert current in await outbox_rows(other)
            h.clock.advance(2)
            await other.execute("SELECT sluice.send($1, '\"next\"')", topic)
            await relay_once(h.ctx)  # the newest mark now lives in another partition
            assert (await maintenance.run_pass(h.ctx))["outbox_emptied"] >= 1
            assert current not in await outbox_rows(other)
            dead = await other.fetchval(
                "SELECT coalesce(sum(n_tup_upd + n_tup_del), 0) FROM pg_stat_user_tables "
                "WHERE schemaname = 'sluice' AND relname LIKE 'outbox%' "
                "AND relname <> 'outbox_current'"
            )
            assert dead == 0
        finally:
            await other.close()
        assert [m["value"] for m in await browse(h, topic)] == ["closed", "open", "next"]


async def test_an_idle_relay_writes_nothing(manual, app_conn):
    await relay_once(manual.ctx)
    before = await app_conn.fetchval("SELECT count(*) FROM sluice.outbox")
    for _ in range(5):
        assert (await relay_once(manual.ctx)).relayed == 0
    assert await app_conn.fetchval("SELECT count(*) FROM sluice.outbox") == before


# ---- views -------------------------------------------------------------------------------


async def test_views_join_queue_state_with_business_tables(harness, app_conn):
    topic = await topic_with_subscription(harness.client, max_deliveries=1)
    await publish(harness.client, topic, {"order": 7}, {"order": 8})
    [first, _] = await pull(harness.client, topic, "s", 2)
    await harness.client.post(
        f"/v1/topics/{topic}/subscriptions/s/nack", json={"receipts": [first["receipt"]]}
    )
    messages = await app_conn.fetch(
        'SELECT "offset", value FROM sluice.topic_messages WHERE topic = $1 ORDER BY 1', topic
    )
    assert [(r["offset"], json.loads(r["value"])) for r in messages] == [
        (0, {"order": 7}),
        (1, {"order": 8}),
    ]
    [row] = await app_conn.fetch("SELECT * FROM sluice.subscription_stats WHERE topic = $1", topic)
    assert (row["subscription"], row["in_flight"], row["dead_lettered"]) == ("s", 1, 1)
    [dead] = await app_conn.fetch(
        "SELECT * FROM sluice.dead_letter_messages WHERE topic = $1", topic
    )
    assert (dead["offset"], json.loads(dead["value"]), dead["attempts"]) == (0, {"order": 7}, 1)
    [t] = await app_conn.fetch("SELECT * FROM sluice.topic_stats WHERE topic = $1", topic)
    assert (t["oldest_offset"], t["head_offset"], t["retained"]) == (0, 1, 2)


# ---- privileges --------------------------------------------------------------------------


async def test_roles_get_only_what_they_are_granted(harness, app_conn, db_url):
    topic, message = await lease_one(harness)
    role = unique("app").replace("-", "_")
    await app_conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    base, _, query = plain_url(db_url).partition("?")
    as_role = base.replace("postgres:@", f"{role}:pw@", 1).replace(
        "://postgres@", f"://{role}:pw@", 1
    )
    as_role += f"?{query}" if query else ""
    conn = await asyncpg.connect(as_role)
    try:
        with pytest.raises(asyncpg.InsufficientPrivilegeError):
            await conn.execute("SELECT sluice.send($1, '1')", topic)
        await grant(app_conn, role, publish=True, consume=False, read=False)
        await conn.execute("SELECT sluice.send($1, '1')", topic)
        for forbidden in (
            "SELECT * FROM sluice.ack($1, 's', ARRAY['x'])",
            "SELECT * FROM sluice.topic_messages WHERE topic = $1",
            "SELECT count(*) FROM sluice.messages WHERE $1 <> ''",
            "SELECT sluice.relay(10, 0) WHERE $1 <> ''",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.fetch(forbidden, topic)
        await grant(app_conn, role, publish=False, consume=True, read=True)
        rows = await conn.fetch(
            "SELECT * FROM sluice.ack($1, 's', $2)", topic, [message["receipt"]]
        )
        assert [r["applies"] for r in rows] == [True]
        await wait_for_relay(harness, topic, 2)  # "job" and the role's message
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM sluice.topic_messages WHERE topic = $1", topic
            )
            == 2
        )
    finally:
        await conn.close()
        await app_conn.execute(f"DROP OWNED BY {role}")
        await app_conn.execute(f"DROP ROLE {role}")


def test_the_proof_in_the_design_notes_names_the_invariant():
    """docs/design.md states what the relay relies on (the SQL file's header points there)."""
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "design.md").read_text()
    section = text.split("## SQL API", 1)[1]
    for phrase in ("xid8", "pg_current_snapshot", "TRUNCATE", "commit order"):
        assert phrase in section


async def test_many_short_transactions_each_relayed_once(harness, db_url):
    topic = await topic_with_subscription(harness.client)
    conns = [await connect(db_url) for _ in range(4)]
    try:

        async def writer(conn: asyncpg.Connection, index: int) -> None:
            for n in range(25):
                await conn.execute(
                    "SELECT sluice.send($1, $2::jsonb)", topic, json.dumps(f"{index}-{n}")
                )

        await asyncio.gather(*(writer(c, i) for i, c in enumerate(conns)))
    finally:
        for conn in conns:
            await conn.close()
    await wait_for_relay(harness, topic, 100)
    values = [m["value"] for m in await browse(harness, topic)]
    assert sorted(values) == sorted(f"{i}-{n}" for i, n in itertools.product(range(4), range(25)))
    for index in range(4):
        mine = [v for v in values if v.startswith(f"{index}-")]
        assert mine == [f"{index}-{n}" for n in range(25)]  # one session's order is kept


async def test_an_idle_outbox_is_left_alone(fresh_db_url):
    """No SQL traffic: maintenance passes neither rotate nor write anything of the outbox."""
    await migrate.upgrade(fresh_db_url)
    conn = await connect(fresh_db_url)
    try:
        before = await conn.fetchval("SELECT xmin::text FROM sluice.outbox_current")
        async with run_app(fresh_db_url, outbox_rotate_seconds=1) as h:
            for _ in range(3):
                h.clock.advance(5)
                await maintenance.run_pass(h.ctx)
                await relay_once(h.ctx)
        assert await conn.fetchval("SELECT xmin::text FROM sluice.outbox_current") == before
        assert await conn.fetchval("SELECT count(*) FROM sluice.outbox") == 0
    finally:
        await conn.close()


async def test_the_cli_grants_prints_and_revokes(db_url, app_conn):
    from tests.test_auth import sluice

    role = unique("cli").replace("-", "_")
    await app_conn.execute(f"CREATE ROLE {role} NOLOGIN")
    try:
        shown = sluice(db_url, "sql", "grant", role, "--publish", "--read", "--print")
        assert shown.returncode == 0, shown.stderr
        assert shown.stdout.splitlines() == [
            f'GRANT USAGE ON SCHEMA sluice TO "{role}";',
            "GRANT EXECUTE ON FUNCTION sluice.send(text, jsonb, text, jsonb, text, integer) "
            f'TO "{role}";',
            "GRANT EXECUTE ON FUNCTION sluice.send_batch(text, jsonb[], text[], jsonb[], "
            f'text[], integer[]) TO "{role}";',
            "GRANT SELECT ON sluice.topic_messages, sluice.topic_stats, "
            f'sluice.subscription_stats, sluice.dead_letter_messages TO "{role}";',
        ]
        assert not await may_send(app_conn, role)  # --print ran nothing
        done = sluice(db_url, "sql", "grant", role, "--publish")
        assert done.returncode == 0 and f"role {role} may now publish" in done.stderr
        assert await may_send(app_conn, role)
        done = sluice(db_url, "sql", "revoke", role)
        assert done.returncode == 0, done.stderr
        assert not await may_send(app_conn, role)
        assert sluice(db_url, "sql", "grant", role).returncode == 2  # says what
        missing = sluice(db_url, "sql", "grant", "no_such_role_x", "--consume")
        assert missing.returncode == 1 and "no role named" in missing.stderr
    finally:
        await app_conn.execute(f"DROP OWNED BY {role}")
        await app_conn.execute(f"DROP ROLE {role}")


async def may_send(conn: asyncpg.Connection, role: str) -> bool:
    return await conn.fetchval(
        "SELECT has_function_privilege($1, "
        "'sluice.send(text, jsonb, text, jsonb, text, integer)', 'EXECUTE')",
        role,
    )


async def test_two_processes_relaying_at_once_move_each_message_once(db_url):
    """Two apps (each with its relay loop) on one database while four sessions send: every
    message reaches the log exactly once, each session's messages in its own order."""
    async with run_app(db_url) as first, run_app(db_url) as second:
        topic = await topic_with_subscription(first.client)
        conns = [await connect(db_url) for _ in range(4)]
        try:

            async def writer(conn: asyncpg.Connection, index: int) -> None:
                for n in range(30):
                    async with conn.transaction():
                        await conn.execute(
                            "SELECT sluice.send($1, $2::jsonb)", topic, json.dumps(f"{index}-{n}")
                        )
                        if n % 7 == 0:
                            await asyncio.sleep(0.05)  # some stay open across relay passes

            await asyncio.gather(*(writer(c, i) for i, c in enumerate(conns)))
        finally:
            for conn in conns:
                await conn.close()
        await wait_for_relay(second, topic, 120)
        await relay_all(first)
        values = [m["value"] for m in await browse(first, topic)]
        assert len(values) == 120 and len(set(values)) == 120
        for index in range(4):
            mine = [v for v in values if v.startswith(f"{index}-")]
            assert mine == [f"{index}-{n}" for n in range(30)]


async def test_an_application_role_cannot_move_the_sql_clock(harness, app_conn, db_url):
    """The skew setting is for Sluice's own role (tests). Set in another role's session it
    changes nothing: a receipt still inside its deadline applies, where the same setting in
    Sluice's own session puts the call a day later, past the deadline."""
    topic, message = await lease_one(harness)
    role = unique("skew").replace("-", "_")
    await app_conn.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    await grant(app_conn, role, publish=False, consume=True, read=False)
    base, _, query = plain_url(db_url).partition("?")
    as_role = base.replace("postgres:@", f"{role}:pw@", 1) + (f"?{query}" if query else "")
    conn = await asyncpg.connect(as_role)
    check = "SELECT applies FROM sluice.ack($1, 's', $2)"
    try:
        for session in (conn, app_conn):
            await session.execute("SELECT set_config('sluice.clock_skew_seconds', '86400', false)")
        for session, applies in ((conn, True), (app_conn, False)):
            tx = session.transaction()
            await tx.start()
            assert await session.fetchval(check, topic, [message["receipt"]]) is applies
            await tx.rollback()  # nothing is acked: the second check sees the same lease
    finally:
        await app_conn.execute("SELECT set_config('sluice.clock_skew_seconds', '0', false)")
        await conn.close()
        await app_conn.execute(f"DROP OWNED BY {role}")
        await app_conn.execute(f"DROP ROLE {role}")


async def test_a_transaction_in_progress_but_above_the_snapshots_xmax_is_not_lost(db_url, app_conn):
    """A snapshot lists in xip only in-progress xids below its xmax, which is one past the
    newest *completed* xid. X takes its xid after W, draws its outbox id before W's, and is
    still open when W commits and a pass relays W: X's xid is then at or above the pass's
    xmax, absent from its xip, and its outbox id below the pass's cursor. It must still be
    relayed when X commits (the pass's bound covers it)."""
    w_conn, x_conn = await connect(db_url), await connect(db_url)
    async with manual_app(db_url) as harness:
        topic = await topic_with_subscription(harness.client)
        try:
            w_tx, x_tx = w_conn.transaction(), x_conn.transaction()
            await w_tx.start()
            await x_tx.start()
            w = int(await w_conn.fetchval("SELECT pg_current_xact_id()::text"))
            id_x = await x_conn.fetchval("SELECT sluice.send($1, '\"X\"')", topic)
            x = int(await x_conn.fetchval("SELECT pg_current_xact_id()::text"))
            id_w = await w_conn.fetchval("SELECT sluice.send($1, '\"W\"')", topic)
            assert w < x and id_x < id_w
            await w_tx.commit()
            assert (await relay_once(harness.ctx)).relayed == 1
            await x_tx.commit()
            assert (await relay_once(harness.ctx)).relayed == 1
            assert [m["value"] for m in await browse(harness, topic)] == ["W", "X"]
        finally:
            await w_conn.close()
            await x_conn.close()
