"""SQL for the topic log: appending messages in commit order and reading them back.

Commit order (SPEC 3.2): the INSERT's first step is an UPDATE of the topic's counter row.
That row lock is held until the transaction commits, so a second publisher on the same
topic gets its offsets only after the first one is visible to everybody. A reader that has
seen offset N can therefore never later find a new message below N. Throughput comes from
batching: app.queue.publisher packs concurrent requests of a process into one statement.
"""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

NOTIFY_CHANNEL = "sluice"


@dataclass(slots=True)
class NewMessage:
    value: str  # JSON text
    key: str | None
    headers: str | None  # JSON text of a string->string object
    delay_seconds: int
    dedup_id: str | None


# One statement, one implicit transaction (one round trip): take the offsets (locking the
# topic row, found by name), insert the rows, and queue one notification for the batch. The
# size limit is part of the WHERE clause: no row back means "no such topic" or "a message
# is too large", which the caller tells apart with a follow-up read.
_APPEND = f"""
WITH t AS (
    UPDATE topics SET next_offset = next_offset + $2
    WHERE name = $1 AND max_message_bytes >= $9
    RETURNING topic_id, next_offset - $2 AS base, sluice_now($8) AS ts
), ins AS (
    INSERT INTO messages
        (topic_id, msg_offset, published_at, deliver_at, key, headers, dedup_id, value)
    SELECT t.topic_id, t.base + m.ord - 1, t.ts,
           CASE WHEN m.delay > 0 THEN t.ts + make_interval(secs => m.delay) END,
           m.key, m.headers, m.dedup_id, m.value
    FROM t, unnest($3::text[], $4::text[], $5::text[], $6::int[], $7::text[])
            WITH ORDINALITY AS m(value, key, headers, delay, dedup_id, ord)
)
SELECT t.base, pg_notify('{NOTIFY_CHANNEL}', t.topic_id::text || ':' || $2::text) FROM t
"""


async def append(
    conn: asyncpg.Connection,
    topic: str,
    messages: list[NewMessage],
    skew: float,
    largest_message_bytes: int = 0,
) -> int | None:
    """Append messages; returns the first offset, or None when the topic does not exist
    or accepts no message of `largest_message_bytes`."""
    if not messages:
        return None
    row = await conn.fetchrow(
        _APPEND,
        topic,
        len(messages),
        [m.value for m in messages],
        _sparse([m.key for m in messages]),
        _sparse([m.headers for m in messages]),
        _sparse([m.delay_seconds or None for m in messages]),
        _sparse([m.dedup_id for m in messages]),
        skew,
        largest_message_bytes,
    )
    return None if row is None else row["base"]


def _sparse(column: list[object]) -> list[object] | None:
    """NULL instead of an array of NULLs (most messages have no key, headers, delay or
    dedup id): less to encode and send, and the multi-argument unnest pads it with NULLs."""
    return column if any(value is not None for value in column) else None


async def lock_topic(conn: asyncpg.Connection, topic: str) -> asyncpg.Record | None:
    """Take the topic's offset lock early (inside a transaction) for dedup look-ups."""
    return await conn.fetchrow(
        "SELECT topic_id, dedup_window_seconds, max_message_bytes FROM topics "
        "WHERE name = $1 FOR NO KEY UPDATE",
        topic,
    )


async def find_duplicates(
    conn: asyncpg.Connection, topic_id: int, dedup_ids: list[str], window: int, skew: float
) -> dict[str, int]:
    """Offsets of messages with these dedup ids published within the window."""
    rows = await conn.fetch(
        """
        SELECT DISTINCT ON (dedup_id) dedup_id, msg_offset FROM messages
        WHERE topic_id = $1 AND dedup_id = ANY($2::text[])
          AND published_at > sluice_now($4) - make_interval(secs => $3)
        ORDER BY dedup_id, msg_offset
        """,
        topic_id,
        dedup_ids,
        float(window),
        skew,
    )
    return {row["dedup_id"]: row["msg_offset"] for row in rows}


MESSAGE_COLUMNS = "msg_offset, published_at, deliver_at, key, headers, value"


async def browse(
    conn: asyncpg.Connection, topic_id: int, from_offset: int, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        f"SELECT {MESSAGE_COLUMNS} FROM messages "
        "WHERE topic_id = $1 AND msg_offset >= $2 ORDER BY msg_offset LIMIT $3",
        topic_id,
        from_offset,
        limit,
    )


async def get_message(
    conn: asyncpg.Connection, topic_id: int, offset: int
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        f"SELECT {MESSAGE_COLUMNS} FROM messages WHERE topic_id = $1 AND msg_offset = $2",
        topic_id,
        offset,
    )


async def first_offset_at_or_after(
    conn: asyncpg.Connection, topic_id: int, published_at: object
) -> int | None:
    return await conn.fetchval(
        "SELECT msg_offset FROM messages WHERE topic_id = $1 AND published_at >= $2 "
        "ORDER BY published_at, msg_offset LIMIT 1",
        topic_id,
        published_at,
    )
