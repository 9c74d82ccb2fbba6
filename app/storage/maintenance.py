"""SQL for background maintenance: retention, purging deleted topics, expiring leases.

Every delete here is bounded (LIMIT per statement, one short transaction each), so no
long-running DELETE holds back vacuum or locks, and dead tuples stay few.
"""

from __future__ import annotations

import asyncpg

# Only one process at a time runs a maintenance pass (others skip it).
MAINTENANCE_LOCK_KEY = 0x51C3_0002


async def try_lock(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", MAINTENANCE_LOCK_KEY))


async def unlock(conn: asyncpg.Connection) -> None:
    await conn.execute("SELECT pg_advisory_unlock($1)", MAINTENANCE_LOCK_KEY)


async def retention_cutoffs(conn: asyncpg.Connection, skew: float) -> list[asyncpg.Record]:
    """Per topic: the first offset to keep (everything below it has expired)."""
    return await conn.fetch(
        """
        SELECT t.topic_id,
               coalesce((SELECT m.msg_offset FROM messages m
                         WHERE m.topic_id = t.topic_id
                           AND m.published_at >= sluice_now($1)
                                                 - make_interval(secs => t.retention_seconds)
                         ORDER BY m.published_at, m.msg_offset LIMIT 1),
                        t.next_offset) AS keep_from,
               (SELECT m.msg_offset FROM messages m WHERE m.topic_id = t.topic_id
                 ORDER BY m.msg_offset LIMIT 1) AS oldest
        FROM topics t
        """,
        skew,
    )


async def delete_messages_below(
    conn: asyncpg.Connection, topic_id: int, keep_from: int, batch: int
) -> int:
    deleted = await conn.fetchval(
        """
        WITH victims AS (
            SELECT msg_offset FROM messages WHERE topic_id = $1 AND msg_offset < $2
            ORDER BY msg_offset LIMIT $3
        ), gone AS (
            DELETE FROM messages m USING victims v
            WHERE m.topic_id = $1 AND m.msg_offset = v.msg_offset RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        topic_id,
        keep_from,
        batch,
    )
    return int(deleted)


async def delete_deliveries_below(
    conn: asyncpg.Connection, topic_id: int, keep_from: int, batch: int
) -> int:
    deleted = await conn.fetchval(
        """
        WITH victims AS (
            SELECT sub_id, msg_offset FROM deliveries WHERE topic_id = $1 AND msg_offset < $2
            LIMIT $3
        ), gone AS (
            DELETE FROM deliveries d USING victims v
            WHERE d.topic_id = $1 AND d.sub_id = v.sub_id AND d.msg_offset = v.msg_offset
            RETURNING 1
        )
        SELECT count(*) FROM gone
        """,
        topic_id,
        keep_from,
        batch,
    )
    return int(deleted)


async def deleted_topics(conn: asyncpg.Connection) -> list[int]:
    rows = await conn.fetch("SELECT topic_id FROM deleted_topics ORDER BY topic_id LIMIT 100")
    return [r["topic_id"] for r in rows]


async def forget_deleted_topic(conn: asyncpg.Connection, topic_id: int) -> None:
    await conn.execute("DELETE FROM deleted_topics WHERE topic_id = $1", topic_id)


async def subscriptions_with_expiring_leases(
    conn: asyncpg.Connection, skew: float
) -> list[asyncpg.Record]:
    """Subscriptions that have a lease past due and a max_deliveries to enforce."""
    return await conn.fetch(
        """
        SELECT t.name AS topic, s.name FROM subscriptions s JOIN topics t USING (topic_id)
        CROSS JOIN (SELECT sluice_now($1) AS now) n
        WHERE s.max_deliveries > 0 AND (
            -- in due order with LIMIT 1: a walk of the due index up to now (see
            -- delivery._first_due), never a scan of every subscription's rows
            SELECT true FROM deliveries d
            WHERE d.topic_id = s.topic_id AND d.sub_id = s.sub_id
              AND d.state IN ('ready', 'leased') AND d.due_at <= n.now
              AND d.attempts >= s.max_deliveries
            ORDER BY d.due_at LIMIT 1)
        """,
        skew,
    )


# The hot tables: every lease inserts a `deliveries` row and every ack deletes it, and every
# claim updates its subscription row. Their time-ordered indexes collect dead entries that
# claims must step over until a vacuum removes them; autovacuum wakes once a minute by
# default (a server-wide setting), so the maintenance pass vacuums them itself.
HOT_TABLES = ("deliveries", "subscriptions")


async def vacuum_hot_tables(conn: asyncpg.Connection, tables: tuple[str, ...] = HOT_TABLES) -> None:
    # Not inside a transaction (VACUUM cannot be); SKIP_LOCKED never waits on a lock.
    await conn.execute(f"VACUUM (SKIP_LOCKED) {', '.join(tables)}")
