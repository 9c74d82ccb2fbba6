"""SQL for topics: configuration, listing, deletion and log statistics."""

from __future__ import annotations

from typing import Any

import asyncpg

TOPIC_COLUMNS = (
    "topic_id, name, retention_seconds, dedup_window_seconds, max_message_bytes, "
    "next_offset, created_at, updated_at"
)


async def upsert_topic(
    conn: asyncpg.Connection, name: str, create: dict[str, Any], update: dict[str, Any]
) -> tuple[asyncpg.Record, bool]:
    """Create the topic with `create`, or change only the fields in `update`.

    Returns (row, created). The column names come from our own models, never from input.
    """
    columns = list(create)
    set_clause = ", ".join(f"{column} = EXCLUDED.{column}" for column in update)
    set_clause = (set_clause + ", " if set_clause else "") + "updated_at = clock_timestamp()"
    placeholders = ", ".join(f"${i}" for i in range(2, len(columns) + 2))
    row = await conn.fetchrow(
        f"INSERT INTO topics (name, {', '.join(columns)}) VALUES ($1, {placeholders}) "
        f"ON CONFLICT (name) DO UPDATE SET {set_clause} "
        f"RETURNING {TOPIC_COLUMNS}, (xmax = 0) AS created",
        name,
        *[create[column] if column not in update else update[column] for column in columns],
    )
    assert row is not None
    return row, row["created"]


async def get_topic(conn: asyncpg.Connection, name: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {TOPIC_COLUMNS} FROM topics WHERE name = $1",
        name,
    )


async def list_topics(
    conn: asyncpg.Connection, after: str | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {TOPIC_COLUMNS} FROM topics "
        "WHERE $1::text IS NULL OR name > $1 ORDER BY name LIMIT $2",
        after,
        limit,
    )


async def delete_topic(conn: asyncpg.Connection, name: str) -> bool:
    """Delete the topic row (its subscriptions go by cascade), then their delivery rows.

    Its messages are left to the maintenance task, which removes rows of topics that no
    longer exist in small batches, so deleting a large topic is never one long DELETE.
    """
    async with conn.transaction():
        topic_id = await conn.fetchval(
            "WITH d AS (DELETE FROM topics WHERE name = $1 RETURNING topic_id) "
            "INSERT INTO deleted_topics (topic_id) SELECT topic_id FROM d RETURNING topic_id",
            name,
        )
        if topic_id is None:
            return False
        await conn.execute("DELETE FROM deliveries WHERE topic_id = $1", topic_id)
    return True


async def log_stats(conn: asyncpg.Connection, topic_id: int, skew: float) -> asyncpg.Record:
    """Oldest and newest offset and the publish rate over the last minute.

    Offsets are gapless within what retention kept (aborted publishes roll the counter
    back and duplicates take no offset), so counts are differences of offsets: O(log n).
    """
    row = await conn.fetchrow(
        """
        SELECT
            (SELECT msg_offset FROM messages WHERE topic_id = $1
              ORDER BY msg_offset LIMIT 1) AS oldest_offset,
            (SELECT msg_offset FROM messages WHERE topic_id = $1
              ORDER BY msg_offset DESC LIMIT 1) AS head_offset,
            (SELECT msg_offset FROM messages WHERE topic_id = $1
                AND published_at >= sluice_now($2) - interval '60 seconds'
              ORDER BY published_at LIMIT 1) AS minute_ago_offset
        """,
        topic_id,
        skew,
    )
    assert row is not None
    return row
