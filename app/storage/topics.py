"""SQL for topics: configuration, listing, deletion and log statistics."""

from __future__ import annotations

import asyncpg

from sluice.records import LogStats, Topic, TopicConfig

_COLUMNS = (
    "topic_id, name, retention_seconds, dedup_window_seconds, max_message_bytes, "
    "created_at, updated_at"
)

# upsert_topic: create with every setting, or change only those named in $5 (an array of
# setting names); `created` tells which happened. Concurrent creations meet at the unique
# name: one creates, the others update.
UPSERT_TOPIC = f"""
INSERT INTO sluice.topics AS t (name, retention_seconds, dedup_window_seconds, max_message_bytes)
VALUES ($1, $2, $3, $4)
ON CONFLICT (name) DO UPDATE SET
    retention_seconds = CASE WHEN 'retention_seconds' = ANY($5)
                             THEN EXCLUDED.retention_seconds ELSE t.retention_seconds END,
    dedup_window_seconds = CASE WHEN 'dedup_window_seconds' = ANY($5)
                                THEN EXCLUDED.dedup_window_seconds ELSE t.dedup_window_seconds END,
    max_message_bytes = CASE WHEN 'max_message_bytes' = ANY($5)
                             THEN EXCLUDED.max_message_bytes ELSE t.max_message_bytes END,
    updated_at = clock_timestamp()
RETURNING {_COLUMNS}, (xmax = 0) AS created
"""

# get_topic: one topic by name.
GET_TOPIC = f"SELECT {_COLUMNS} FROM sluice.topics WHERE name = $1"

# list_topics: up to $2 topics by name, after $1 (NULL: from the start).
LIST_TOPICS = f"""
SELECT {_COLUMNS} FROM sluice.topics
WHERE ($1::text IS NULL OR name > $1)
ORDER BY name LIMIT $2
"""

# delete_topic: the topic and (cascade) its subscriptions. Its messages and delivery state
# are dropped with their segments (nothing per message is deleted now).
DELETE_TOPIC = "DELETE FROM sluice.topics WHERE name = $1 RETURNING topic_id"

# log_stats: oldest retained offset, newest offset, and the first offset of the last minute.
LOG_STATS = """
SELECT oldest_offset, head_offset, minute_ago_offset
FROM sluice.log_stats(p_topic_id => $1, p_skew => $2)
"""


def _topic(row: asyncpg.Record) -> Topic:
    return Topic(
        row["topic_id"],
        row["name"],
        row["retention_seconds"],
        row["dedup_window_seconds"],
        row["max_message_bytes"],
        row["created_at"],
        row["updated_at"],
    )


async def upsert_topic(
    conn: asyncpg.Connection, name: str, config: TopicConfig, changed: list[str]
) -> tuple[Topic, bool]:
    """Create the topic with `config`, or change only the settings named in `changed`."""
    row = await conn.fetchrow(
        UPSERT_TOPIC,
        name,
        config.retention_seconds,
        config.dedup_window_seconds,
        config.max_message_bytes,
        changed,
    )
    assert row is not None
    return _topic(row), row["created"]


async def get_topic(conn: asyncpg.Connection, name: str) -> Topic | None:
    row = await conn.fetchrow(GET_TOPIC, name)
    return None if row is None else _topic(row)


async def list_topics(conn: asyncpg.Connection, after: str | None, limit: int) -> list[Topic]:
    return [_topic(row) for row in await conn.fetch(LIST_TOPICS, after, limit)]


async def delete_topic(conn: asyncpg.Connection, name: str) -> bool:
    return await conn.fetchval(DELETE_TOPIC, name) is not None


async def log_stats(conn: asyncpg.Connection, topic_id: int, skew: float) -> LogStats:
    row = await conn.fetchrow(LOG_STATS, topic_id, skew)
    assert row is not None
    return LogStats(row["oldest_offset"], row["head_offset"], row["minute_ago_offset"])
