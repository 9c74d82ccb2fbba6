"""A publish notifies only the topics some process has a long-poll waiting for (revision
0010): each process's listener holds a shared advisory key per topic bucket while it has
waiters there (and `listener_linger_seconds` after), and a publish that can take the key
itself skips its NOTIFY. What must hold: a waiting long-poll still wakes within
milliseconds, whatever moment the publish committed at, including while the key was being
declared and after the listener's connection was lost. The same for the SQL API (revision
0011): an application's commit wakes the relays only while one of them declares it waits,
and every commit is relayed in time whichever relay holds the key."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator

import asyncpg
import pytest

from sluice.queue.relay import Relay
from sluice.storage import listener as listener_module
from sluice.storage.db import plain_url
from sluice.storage.listener import INTEREST_LOCK_CLASS, OUTBOX_LOCK_CLASS, interest_bucket
from tests.conftest import run_app, wait_until
from tests.helpers import ack, nack, publish, pull, topic_with_subscription

# Anything faster than this comes from a notification or a declared key, never from the
# periodic safety re-check.
RECHECK = 30.0

HELD_KEYS = """
    SELECT pid, objid::int AS bucket FROM pg_locks
    WHERE locktype = 'advisory' AND classid = $1 AND objsubid = 2 AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def topic_id_of(conn: asyncpg.Connection, topic: str) -> int:
    return await conn.fetchval("SELECT topic_id FROM sluice.topics WHERE name = $1", topic)


async def start_waiting(harness, topic: str, wait_seconds: float = 10):
    before = harness.ctx.hub.waiting_count()
    task = asyncio.create_task(pull(harness.client, topic, "s", 10, wait_seconds=wait_seconds))

    async def parked() -> bool:
        return harness.ctx.hub.waiting_count() > before

    await wait_until(parked, timeout=10, interval=0.005)
    return task


class Notifications:
    """A LISTEN of the channel Sluice notifies on, from outside the app."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.conn = conn
        self.payloads: list[str] = []

    async def __aenter__(self) -> Notifications:
        await self.conn.add_listener("sluice", self._got)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.conn.remove_listener("sluice", self._got)

    def _got(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        self.payloads.append(payload)

    async def settle(self) -> list[str]:
        """What arrived, once a round trip has let anything already sent come in."""
        await asyncio.sleep(0.2)
        await self.conn.fetchval("SELECT 1")
        return list(self.payloads)


@pytest.fixture
async def db(fresh_db_url):
    conn = await asyncpg.connect(plain_url(fresh_db_url))
    yield conn
    await conn.close()


async def test_a_publish_notifies_only_while_a_process_declares_waiters(fresh_db_url, db):
    async with run_app(fresh_db_url, poll_recheck_seconds=RECHECK) as h:
        topic = await topic_with_subscription(h.client)
        topic_id = await topic_id_of(db, topic)
        async with Notifications(db) as seen:
            await publish(h.client, topic, "nobody waits")
            assert await seen.settle() == []
            assert await db.fetch(HELD_KEYS, INTEREST_LOCK_CLASS) == []

            # Somebody (here: this test's session) declares waiters for the topic's bucket.
            await db.execute(
                "SELECT pg_advisory_lock_shared($1, $2)",
                INTEREST_LOCK_CLASS,
                interest_bucket(topic_id),
            )
            await publish(h.client, topic, "somebody waits")
            assert await seen.settle() == [f"{topic_id}:1"]

            await db.execute(
                "SELECT pg_advisory_unlock_shared($1, $2)",
                INTEREST_LOCK_CLASS,
                interest_bucket(topic_id),
            )
            await publish(h.client, topic, "nobody again")
            assert await seen.settle() == [f"{topic_id}:1"]


async def test_a_batch_is_one_notification_that_counts_its_messages(fresh_db_url, db):
    """NOTIFY is queued per transaction: a publish of many messages sends one notification
    for its topic, carrying the count (waiters to wake), never one per message."""
    async with run_app(fresh_db_url, poll_recheck_seconds=RECHECK) as h:
        topic = await topic_with_subscription(h.client)
        topic_id = await topic_id_of(db, topic)
        await db.execute(
            "SELECT pg_advisory_lock_shared($1, $2)", INTEREST_LOCK_CLASS, interest_bucket(topic_id)
        )
        async with Notifications(db) as seen:
            await publish(h.client, topic, *range(250))
            assert await seen.settle() == [f"{topic_id}:250"]


async def test_a_lost_notification_is_made_good_by_the_periodic_recheck(fresh_db_url, db):
    """A notification is a hint: when it is lost (a listener that did not read it, a full
    notification queue), the waiting pull still finds the message by its periodic re-check,
    long before its wait ends."""
    async with run_app(fresh_db_url, poll_recheck_seconds=1.0) as h:
        listener = h.app.state.listener
        dropped: list[int] = []
        listener._on_notify = lambda topic_id, _count: dropped.append(topic_id)
        topic = await topic_with_subscription(h.client)
        topic_id = await topic_id_of(db, topic)
        task = await start_waiting(h, topic, wait_seconds=20)

        async def declared() -> bool:
            return interest_bucket(topic_id) in listener.declared()

        await wait_until(declared, timeout=5, interval=0.01)
        published = time.monotonic()
        [offset] = await publish(h.client, topic, "its notification is dropped")
        got = await asyncio.wait_for(task, 10)
        assert [m["offset"] for m in got] == [offset]
        assert dropped == [topic_id]  # it was sent, and nobody was woken by it
        assert time.monotonic() - published < 3.0


@contextlib.contextmanager
def stopped(pid: int) -> Iterator[None]:
    """Postgres backend `pid` (of the test's own server) stopped, as a backend on a host that
    no longer answers would be: its connection stays open and nothing comes back. It is
    continued whatever happens, and then finds its client gone."""
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def holders(conn: asyncpg.Connection, bucket: int) -> set[int]:
    rows = await conn.fetch(HELD_KEYS, INTEREST_LOCK_CLASS)
    return {r["pid"] for r in rows if r["bucket"] == bucket}


async def _replaced_and_woken(h, db, topic: str, first: int, task: asyncio.Task) -> None:
    """The listener holds the topic's key on a connection other than `first`, and a publish
    wakes the waiting pull `task` through it."""
    listener = h.app.state.listener
    bucket = interest_bucket(await topic_id_of(db, topic))

    async def declared_again() -> bool:
        pid = listener.backend_pid
        return pid != first and pid in await holders(db, bucket)

    await wait_until(declared_again, timeout=10, interval=0.02)
    assert not task.done()
    published = time.monotonic()
    [offset] = await publish(h.client, topic, "after the reconnect")
    got = await asyncio.wait_for(task, 5)
    assert [m["offset"] for m in got] == [offset]
    assert time.monotonic() - published < 1.0


async def test_a_listen_connection_that_stops_answering_is_replaced(fresh_db_url, db, caplog):
    """The keepalive query finds a connection that neither answers nor closes: the listener
    connects again, declares its waiters' topics again, and a publish wakes them as before."""
    async with run_app(
        fresh_db_url, poll_recheck_seconds=RECHECK, listener_keepalive_seconds=0.5
    ) as h:
        listener = h.app.state.listener
        topic = await topic_with_subscription(h.client)
        bucket = interest_bucket(await topic_id_of(db, topic))
        task = await start_waiting(h, topic, wait_seconds=20)

        async def declared_by_the_listener() -> bool:
            return listener.backend_pid in await holders(db, bucket)

        await wait_until(declared_by_the_listener, timeout=5, interval=0.01)
        first = listener.backend_pid
        assert first is not None
        with stopped(first):
            await _replaced_and_woken(h, db, topic, first, task)
        assert "listen connection lost" in caplog.text


async def test_a_query_the_listen_connection_never_answers_is_given_up(
    fresh_db_url, db, caplog, monkeypatch
):
    """Declaring a topic on a connection that stopped answering does not hold the listener
    for good (its keepalive would never run again): the query is given up after
    QUERY_TIMEOUT_SECONDS and the listener connects again. The keepalive is far off here, so
    only that bound can find it."""
    monkeypatch.setattr(listener_module, "QUERY_TIMEOUT_SECONDS", 0.5)
    async with run_app(
        fresh_db_url, poll_recheck_seconds=RECHECK, listener_keepalive_seconds=RECHECK
    ) as h:
        listener = h.app.state.listener
        await asyncio.wait_for(listener.connected.wait(), 10)
        topic = await topic_with_subscription(h.client)
        first = listener.backend_pid
        assert first is not None
        with stopped(first):
            task = await start_waiting(h, topic, wait_seconds=20)  # declared on `first`
            await _replaced_and_woken(h, db, topic, first, task)
        assert "listen connection lost" in caplog.text


async def test_acks_and_nacks_notify_only_while_a_process_declares_waiters(fresh_db_url, db):
    """An ack under max_in_flight (room in flight) and a nack (deliverable again) could let a
    waiting pull go on; with nobody waiting they skip their NOTIFY, as a publish does
    (revision 0014)."""
    async with run_app(fresh_db_url, poll_recheck_seconds=RECHECK) as h:
        topic = await topic_with_subscription(h.client, max_in_flight=10)
        topic_id = await topic_id_of(db, topic)
        bucket = interest_bucket(topic_id)
        async with Notifications(db) as seen:
            await publish(h.client, topic, 1, 2, 3, 4)
            assert await seen.settle() == []
            receipts = [m["receipt"] for m in await pull(h.client, topic, "s", 4)]
            await ack(h.client, topic, "s", receipts[:1])
            await nack(h.client, topic, "s", receipts[1:2], delay_seconds=0)
            assert await seen.settle() == []

            await db.execute("SELECT pg_advisory_lock_shared($1, $2)", INTEREST_LOCK_CLASS, bucket)
            await ack(h.client, topic, "s", receipts[2:3])
            await nack(h.client, topic, "s", receipts[3:4], delay_seconds=0)
            assert await seen.settle() == [f"{topic_id}:1", f"{topic_id}:1"]
            await db.execute(
                "SELECT pg_advisory_unlock_shared($1, $2)", INTEREST_LOCK_CLASS, bucket
            )


async def test_a_pull_waiting_at_max_in_flight_is_woken_by_an_ack(fresh_db_url, db):
    """The waiting pull's process declares the key, so the ack that makes room notifies it:
    it goes on at once, not at the periodic re-check."""
    async with run_app(fresh_db_url, poll_recheck_seconds=RECHECK) as h:
        topic = await topic_with_subscription(h.client, max_in_flight=1)
        await publish(h.client, topic, "first", "second")
        [first] = await pull(h.client, topic, "s", 10)
        task = await start_waiting(h, topic)
        await asyncio.sleep(0.2)  # the listener declares the key
        assert not task.done()
        acked = time.monotonic()
        await ack(h.client, topic, "s", [first["receipt"]])
        got = await asyncio.wait_for(task, 5)
        assert [m["value"] for m in got] == ["second"]
        assert time.monotonic() - acked < 1.0


async def test_a_long_poll_declares_its_topic_and_the_key_is_given_back_after_the_linger(
    fresh_db_url, db
):
    async with run_app(
        fresh_db_url, poll_recheck_seconds=RECHECK, listener_linger_seconds=2.0
    ) as h:
        listener = h.app.state.listener
        topic = await topic_with_subscription(h.client)
        bucket = interest_bucket(await topic_id_of(db, topic))
        task = await start_waiting(h, topic)

        async def declared() -> bool:
            return bucket in listener.declared()

        await wait_until(declared, timeout=5, interval=0.01)
        held = await db.fetch(HELD_KEYS, INTEREST_LOCK_CLASS)
        assert [row["bucket"] for row in held] == [bucket]

        published = time.monotonic()
        [offset] = await publish(h.client, topic, "wake up")
        got = await asyncio.wait_for(task, 5)
        assert [m["offset"] for m in got] == [offset]
        assert time.monotonic() - published < 1.0

        # The key stays while consumers keep coming back, then goes.
        await asyncio.sleep(0.2)
        assert bucket in listener.declared()

        async def withdrawn() -> bool:
            return not listener.declared() and not await db.fetch(HELD_KEYS, INTEREST_LOCK_CLASS)

        await wait_until(withdrawn, timeout=10, interval=0.02)
        async with Notifications(db) as seen:
            await publish(h.client, topic, "nobody waits any more")
            assert await seen.settle() == []


async def test_a_publish_that_skipped_its_notify_still_wakes_a_long_poll_parked_meanwhile(
    fresh_db_url, db, caplog
):
    """The race the key closes: a publish finds nobody waiting and skips its NOTIFY; before
    it commits, a long-poll claims (nothing yet visible) and parks. Declaring the key waits
    for the publish's commit, and the long-poll claims again once the key is held."""
    async with run_app(fresh_db_url, poll_recheck_seconds=RECHECK) as h:
        listener = h.app.state.listener
        topic = await topic_with_subscription(h.client)
        bucket = interest_bucket(await topic_id_of(db, topic))
        async with Notifications(db) as seen:
            publisher = await asyncpg.connect(plain_url(fresh_db_url))
            try:
                tx = publisher.transaction()
                await tx.start()
                row = await publisher.fetchrow(
                    "SELECT * FROM sluice.publish_batch($1, $2, $3, $4, $5, $6, $7, 0)",
                    topic,
                    [json.dumps("in flight")],
                    [None],
                    [None],
                    [0],
                    None,
                    100,
                )
                assert row["status"] == "ok"
                task = await start_waiting(h, topic)
                # The listener cannot declare the bucket while the publish holds its key.
                await asyncio.sleep(0.3)
                assert bucket not in listener.declared()
                assert not task.done()
                committed = time.monotonic()
                await tx.commit()
            finally:
                await publisher.close()
            got = await asyncio.wait_for(task, 5)
            woke_after = time.monotonic() - committed
            assert [m["offset"] for m in got] == [row["first_offset"]]
            assert woke_after < 1.0, woke_after
            assert await seen.settle() == []  # it was woken without a notification
        # The listener waited for the key (lock_timeout, then again), it did not reconnect.
        assert "listen connection lost" not in caplog.text


async def test_the_key_is_declared_again_when_the_listen_connection_is_lost(fresh_db_url, db):
    async with run_app(fresh_db_url, poll_recheck_seconds=RECHECK) as h:
        listener = h.app.state.listener
        topic = await topic_with_subscription(h.client)
        bucket = interest_bucket(await topic_id_of(db, topic))
        task = await start_waiting(h, topic, wait_seconds=15)

        async def holder() -> int | None:
            rows = await db.fetch(HELD_KEYS, INTEREST_LOCK_CLASS)
            return rows[0]["pid"] if rows and bucket in listener.declared() else None

        first = await wait_until(holder, timeout=5, interval=0.01)
        await db.execute("SELECT pg_terminate_backend($1)", first)

        async def declared_again() -> int | None:
            pid = await holder()
            return pid if pid not in (None, first) else None

        await wait_until(declared_again, timeout=10, interval=0.02)
        assert not task.done()  # woken by the reconnect, it claimed again and waits on
        published = time.monotonic()
        [offset] = await publish(h.client, topic, "after the reconnect")
        got = await asyncio.wait_for(task, 5)
        assert [m["offset"] for m in got] == [offset]
        assert time.monotonic() - published < 1.0


# The SQL API (revision 0011): an application's commit wakes the relays only while one of
# them declares that it waits (the key is taken exclusively, by one process at most).
OUTBOX_KEY = """
    SELECT pid FROM pg_locks
    WHERE locktype = 'advisory' AND classid = $1 AND objid = 0 AND objsubid = 2
      AND mode = 'ExclusiveLock' AND granted
      AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


async def send_in_a_transaction(conn: asyncpg.Connection, topic: str, value: object) -> None:
    async with conn.transaction():
        await conn.fetchval("SELECT sluice.send($1, $2::jsonb)", topic, json.dumps(value))


async def test_an_application_commit_notifies_only_while_a_relay_declares_it_waits(
    fresh_db_url, db
):
    async with run_app(fresh_db_url, sql_relay=False) as h:
        topic = await topic_with_subscription(h.client)
        assert not h.app.state.listener.outbox_declared  # no relay here
        app = await asyncpg.connect(plain_url(fresh_db_url))
        try:
            async with Notifications(db) as seen:
                await send_in_a_transaction(app, topic, "nobody waits")
                assert await seen.settle() == []
                await db.execute("SELECT pg_advisory_lock($1, 0)", OUTBOX_LOCK_CLASS)
                await send_in_a_transaction(app, topic, "a relay waits")
                assert await seen.settle() == ["outbox"]
                # Rolled back: no notification either way.
                with pytest.raises(RuntimeError):
                    async with app.transaction():
                        await app.fetchval("SELECT sluice.send($1, '1'::jsonb)", topic)
                        raise RuntimeError("roll back")
                assert await seen.settle() == ["outbox"]
                await db.execute("SELECT pg_advisory_unlock($1, 0)", OUTBOX_LOCK_CLASS)
        finally:
            await app.close()


async def test_an_idle_relay_declares_and_a_commit_wakes_it_then_it_polls_while_busy(
    fresh_db_url, db
):
    """relay_interval_seconds is 60: a message relayed within a second was woken by the
    commit's notification (or by the relay's own polling right after a pass that had work)."""
    async with run_app(fresh_db_url, relay_interval_seconds=60) as h:
        listener = h.app.state.listener
        topic = await topic_with_subscription(h.client)

        async def declared() -> bool:
            return listener.outbox_declared and bool(await db.fetch(OUTBOX_KEY, OUTBOX_LOCK_CLASS))

        await wait_until(declared, timeout=10, interval=0.01)
        app = await asyncpg.connect(plain_url(fresh_db_url))
        try:
            for round_ in range(3):
                task = await start_waiting(h, topic)
                committed = time.monotonic()
                await send_in_a_transaction(app, topic, f"from SQL {round_}")
                got = await asyncio.wait_for(task, 5)
                assert [m["value"] for m in got] == [f"from SQL {round_}"]
                assert time.monotonic() - committed < 1.0
                # Quiet again: the relay declares again (and is woken by the next commit).
                await wait_until(declared, timeout=10, interval=0.01)
        finally:
            await app.close()


async def test_one_process_declares_for_the_cluster_and_every_commit_is_relayed(fresh_db_url, db):
    async with (
        run_app(fresh_db_url, relay_interval_seconds=60) as first,
        run_app(fresh_db_url, relay_interval_seconds=60) as second,
    ):
        listeners = [first.app.state.listener, second.app.state.listener]
        topic = await topic_with_subscription(first.client)

        async def one_declared() -> bool:
            return [x.outbox_declared for x in listeners].count(True) == 1 and len(
                await db.fetch(OUTBOX_KEY, OUTBOX_LOCK_CLASS)
            ) == 1

        await wait_until(one_declared, timeout=10, interval=0.01)
        app = await asyncpg.connect(plain_url(fresh_db_url))
        try:
            task = await start_waiting(second, topic)
            committed = time.monotonic()
            await send_in_a_transaction(app, topic, "to whichever relay")
            got = await asyncio.wait_for(task, 5)
            assert [m["value"] for m in got] == ["to whichever relay"]
            assert time.monotonic() - committed < 1.0
        finally:
            await app.close()


async def test_a_relay_cancelled_as_it_is_woken_stops(db_url):
    """Shutdown cancels the relay; a notification may set its wake-up in the same instant.
    (asyncio.wait_for on Python 3.11 swallowed that cancellation and the relay ran on, so
    the app's shutdown never ended: seen once in the full suite.)"""
    async with run_app(db_url, relay_interval_seconds=60, sql_relay=False) as h:
        relay = Relay(h.ctx)
        declared = asyncio.Event()
        relay.declare_waiting = lambda waiting: declared.set() if waiting else None
        task = asyncio.create_task(relay.run())
        await asyncio.wait_for(declared.wait(), 10)  # idle: waiting for its wake-up
        relay.wake()
        task.cancel()
        done, _ = await asyncio.wait([task], timeout=5)
        assert done, "the relay kept running after its cancellation"
        assert task.cancelled()
