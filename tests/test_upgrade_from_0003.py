"""A running system upgrades from schema revision 0003 (rows updated and deleted per
message) to the insert-only storage without losing messages, leases or dead letters:
receipts handed out before the upgrade still ack, held-back keys still wait their turn,
dead letters stay parked, offsets carry on where they were."""

from __future__ import annotations

import base64
import struct
import uuid

import asyncpg

from sluice.storage import migrate
from sluice.storage.db import plain_url
from tests.conftest import run_app
from tests.helpers import ack, publish, pull, sql_ack_applies, stats, sub_path, topic_path

DEADLINE_SECONDS = 600


def legacy_receipt(offset: int, token: uuid.UUID) -> str:
    """A receipt as revision 0003 encoded it: offset and token, 24 bytes."""
    return base64.urlsafe_b64encode(struct.pack(">q16s", offset, token.bytes)).decode()


async def fill_revision_0003(url: str) -> dict[str, object]:
    """A topic of 10 messages (0-1 expired by retention, so 2..9 retained); subscription
    `plain` with 2 acked, 3 leased, 4 waiting for a retry, 5 dead; subscription `keyed`
    (ordered) with 6 (key k) leased and 7 (key k) held back behind it; an API key."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        topic_id = await conn.fetchval(
            "INSERT INTO topics (name, retention_seconds, dedup_window_seconds, "
            "max_message_bytes, next_offset) VALUES ('legacy', 604800, 300, 1048576, 10) "
            "RETURNING topic_id"
        )
        for offset in range(2, 10):
            await conn.execute(
                "INSERT INTO messages (topic_id, msg_offset, published_at, key, value) "
                "VALUES ($1, $2, clock_timestamp(), $3, $4)",
                topic_id,
                offset,
                "k" if offset in (6, 7) else None,
                f'"m{offset}"',
            )
        plain = await conn.fetchval(
            "INSERT INTO subscriptions (topic_id, name, ack_deadline_seconds, max_deliveries, "
            "retry_min_seconds, retry_max_seconds, ordered_by_key, next_offset, "
            "delivered_total) VALUES ($1, 'plain', 30, 5, 1, 600, false, 6, 4) "
            "RETURNING sub_id",
            topic_id,
        )
        keyed = await conn.fetchval(
            "INSERT INTO subscriptions (topic_id, name, ack_deadline_seconds, max_deliveries, "
            "retry_min_seconds, retry_max_seconds, ordered_by_key, next_offset, "
            "delivered_total) VALUES ($1, 'keyed', 30, 5, 1, 600, true, 8, 1) "
            "RETURNING sub_id",
            topic_id,
        )
        plain_token, keyed_token = uuid.uuid4(), uuid.uuid4()
        lease_until = f"clock_timestamp() + interval '{DEADLINE_SECONDS} seconds'"
        await conn.execute(
            "INSERT INTO deliveries (topic_id, sub_id, msg_offset, state, due_at, lease_until, "
            f"lease_token, attempts) VALUES ($1, $2, 3, 'leased', {lease_until} "
            f"+ interval '5 seconds', {lease_until}, $3, 1)",
            topic_id,
            plain,
            plain_token,
        )
        await conn.execute(
            "INSERT INTO deliveries (topic_id, sub_id, msg_offset, state, due_at, attempts) "
            "VALUES ($1, $2, 4, 'ready', clock_timestamp() + interval '1 hour', 2)",
            topic_id,
            plain,
        )
        await conn.execute(
            "INSERT INTO deliveries (topic_id, sub_id, msg_offset, state, due_at, attempts, "
            "dead_at) VALUES ($1, $2, 5, 'dead', clock_timestamp(), 5, clock_timestamp())",
            topic_id,
            plain,
        )
        await conn.execute(
            "INSERT INTO deliveries (topic_id, sub_id, msg_offset, state, due_at, lease_until, "
            f"lease_token, attempts, key) VALUES ($1, $2, 6, 'leased', {lease_until}, "
            f"{lease_until}, $3, 1, 'k')",
            topic_id,
            keyed,
            keyed_token,
        )
        await conn.execute(
            "INSERT INTO deliveries (topic_id, sub_id, msg_offset, state, due_at, attempts, key) "
            "VALUES ($1, $2, 7, 'blocked', clock_timestamp(), 0, 'k')",
            topic_id,
            keyed,
        )
        await conn.execute(
            "INSERT INTO api_keys (name, secret_hash, scopes) VALUES ('old', 'abc', '{admin}')"
        )
    finally:
        await conn.close()
    return {"plain": legacy_receipt(3, plain_token), "keyed": legacy_receipt(6, keyed_token)}


async def test_upgrade_keeps_messages_leases_and_dead_letters(fresh_db_url):
    await migrate.upgrade(fresh_db_url, "0003")
    receipts = await fill_revision_0003(fresh_db_url)
    await migrate.upgrade(fresh_db_url)

    conn = await asyncpg.connect(plain_url(fresh_db_url))
    try:
        assert await conn.fetchval("SELECT to_regclass('public.deliveries')") is None
        assert await conn.fetchval("SELECT count(*) FROM sluice.api_keys") == 1
        # The one key is kept: the API stays closed; for this test it is deleted again.
        await conn.execute("DELETE FROM sluice.api_keys")
    finally:
        await conn.close()

    async with run_app(fresh_db_url) as h:
        client, clock = h.client, h.clock
        browsed = (await client.get(topic_path("legacy") + "/messages")).json()
        assert [m["offset"] for m in browsed["messages"]] == list(range(2, 10))
        topic = (await client.get(topic_path("legacy"))).json()
        assert (topic["oldest_offset"], topic["head_offset"]) == (2, 9)

        plain = await stats(client, "legacy", "plain")
        assert plain["in_flight"] == 1  # 3
        assert plain["delayed"] == 1  # 4, waiting for its retry
        assert plain["backlog"] == 4  # 6..9 beyond the cursor
        assert plain["dead_lettered"] == 1  # 5
        assert plain["committed_offset"] == 3
        parked = (await client.get(sub_path("legacy", "plain") + "/dead-letters")).json()
        assert [(m["offset"], m["delivery_attempts"]) for m in parked["messages"]] == [(5, 5)]

        # Key order survives: 7 waits until 6 (leased before the upgrade) is acked.
        keyed = await stats(client, "legacy", "keyed")
        assert (keyed["in_flight"], keyed["delayed"], keyed["backlog"]) == (1, 1, 2)
        assert [m["offset"] for m in await pull(client, "legacy", "keyed", 10)] == [8, 9]
        await ack(client, "legacy", "keyed", [receipts["keyed"]])
        assert [m["offset"] for m in await pull(client, "legacy", "keyed", 10)] == [7]

        # A receipt handed out before the upgrade acks its lease, once.
        assert await ack(client, "legacy", "plain", [receipts["plain"]]) == {
            "acked": 1,
            "stale": [],
        }
        assert (await ack(client, "legacy", "plain", [receipts["plain"]]))["stale"] == [
            receipts["plain"]
        ]
        got = await pull(client, "legacy", "plain", 10)
        assert [m["offset"] for m in got] == [6, 7, 8, 9]
        await ack(client, "legacy", "plain", [m["receipt"] for m in got])
        clock.advance(3600)  # 4's retry time
        [retried] = await pull(client, "legacy", "plain", 10)
        assert (retried["offset"], retried["delivery_attempt"]) == (4, 3)

        # Offsets carry on where the old counter was.
        assert await publish(client, "legacy", "new") == [10]


async def add_split_lease(url: str) -> dict[str, str]:
    """Subscription `split` of the topic `legacy`: 8 leased for 600 s, 9 for 20 s (revision
    0003 kept a deadline per message; the upgrade carries both into one lease)."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        topic_id = await conn.fetchval("SELECT topic_id FROM topics WHERE name = 'legacy'")
        split = await conn.fetchval(
            "INSERT INTO subscriptions (topic_id, name, ack_deadline_seconds, max_deliveries, "
            "retry_min_seconds, retry_max_seconds, ordered_by_key, next_offset, "
            "delivered_total) VALUES ($1, 'split', 30, 5, 1, 600, false, 10, 2) "
            "RETURNING sub_id",
            topic_id,
        )
        tokens = {}
        for offset, seconds in ((8, 600), (9, 20)):
            tokens[offset] = uuid.uuid4()
            await conn.execute(
                "INSERT INTO deliveries (topic_id, sub_id, msg_offset, state, due_at, "
                "lease_until, lease_token, attempts) VALUES ($1, $2, $3, 'leased', "
                "clock_timestamp() + make_interval(secs => $4), "
                "clock_timestamp() + make_interval(secs => $4), $5, 1)",
                topic_id,
                split,
                offset,
                seconds,
                tokens[offset],
            )
    finally:
        await conn.close()
    return {"long": legacy_receipt(8, tokens[8]), "short": legacy_receipt(9, tokens[9])}


async def test_each_message_leased_before_the_upgrade_keeps_its_own_deadline(fresh_db_url):
    """Two messages of one subscription leased before the upgrade, one for 600 s and one for
    20 s, end up in one carried lease: 30 s later the first one's receipt still acks (over
    HTTP, and in SQL) and the second one's is stale."""
    await migrate.upgrade(fresh_db_url, "0003")
    await fill_revision_0003(fresh_db_url)
    receipts = await add_split_lease(fresh_db_url)
    await migrate.upgrade(fresh_db_url)
    conn = await asyncpg.connect(plain_url(fresh_db_url))
    try:
        await conn.execute("DELETE FROM sluice.api_keys")  # the API open, as above
        async with run_app(fresh_db_url) as h:
            h.clock.advance(30)
            await conn.execute(
                "SELECT set_config('sluice.clock_skew_seconds', $1, false)", str(h.clock.skew)
            )
            given = [receipts["long"], receipts["short"]]
            assert await sql_ack_applies(conn, "legacy", "split", given) == [True, False]
            assert await ack(h.client, "legacy", "split", [receipts["short"]]) == {
                "acked": 0,
                "stale": [receipts["short"]],
            }
            assert await ack(h.client, "legacy", "split", [receipts["long"]]) == {
                "acked": 1,
                "stale": [],
            }
    finally:
        await conn.close()
