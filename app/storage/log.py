"""SQL for the topic log: appending in commit order, browsing, finding offsets by time.

Commit order (SPEC 3.2) is kept by sluice.append_messages: the topic's transaction-scoped
advisory lock is held until commit and the next offset is read from the log under it, so a
second publisher of a topic gets its offsets only once the first one's are visible to
everybody. Throughput comes from batching: app.queue.publisher packs the concurrent
requests of a process into one call.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg

from sluice.records import Message, NewMessage

NOTIFY_CHANNEL = "sluice"

# publish_batch: append a group of messages to a topic by name, in one transaction; checks
# the topic exists and accepts the largest message first (nothing stored otherwise).
PUBLISH_BATCH = """
SELECT status, first_offset, offsets, duplicates FROM sluice.publish_batch(
    p_topic => $1, p_values => $2, p_keys => $3, p_headers => $4, p_delays => $5,
    p_dedup_ids => $6, p_largest => $7, p_skew => $8)
"""

# publish_topics: the messages of several topics in one transaction, topic after topic in
# the given order, each as publish_batch would append them (revision 0012); a topic whose
# lock another transaction holds is left out ('busy') rather than waited for.
PUBLISH_TOPICS = """
SELECT statuses, first_offsets, listed, offsets, duplicates FROM sluice.publish_topics(
    p_topics => $1, p_counts => $2, p_largest => $3, p_values => $4, p_keys => $5,
    p_headers => $6, p_delays => $7, p_dedup_ids => $8, p_skew => $9)
"""

# notify: wake the long-polls of a topic on every process (delivered at commit).
NOTIFY = "SELECT pg_notify($1, $2)"

# browse: retained messages from an offset on, in offset order.
BROWSE = """
SELECT msg_offset, published_at, deliver_at, key, headers, value
FROM sluice.browse(p_topic_id => $1, p_from => $2, p_limit => $3)
"""

# first_offset_at_or_after: the first retained message published at or after a time.
FIRST_OFFSET_AT_OR_AFTER = """
SELECT m.msg_offset FROM sluice.messages m JOIN sluice.topics t USING (topic_id)
WHERE m.topic_id = $1 AND m.published_at >= $2 AND m.msg_offset >= t.retention_floor
ORDER BY m.published_at, m.msg_offset LIMIT 1
"""


@dataclass(frozen=True, slots=True)
class Appended:
    status: str  # 'ok', 'no_topic' or 'too_large'
    offsets: list[int]
    duplicates: list[bool]


async def publish_batch(
    conn: asyncpg.Connection,
    topic: str,
    messages: list[NewMessage],
    largest_message_bytes: int,
    skew: float,
) -> Appended:
    dedup = _sparse([m.dedup_id for m in messages])
    row = await conn.fetchrow(
        PUBLISH_BATCH,
        topic,
        [m.value for m in messages],
        _sparse([m.key for m in messages]),
        _sparse([m.headers for m in messages]),
        _sparse([m.delay_seconds or None for m in messages]),
        dedup,
        largest_message_bytes,
        skew,
    )
    assert row is not None
    if row["status"] == "ok" and dedup is None:
        # No dedup ids: the messages took consecutive offsets.
        first = row["first_offset"]
        return Appended("ok", list(range(first, first + len(messages))), [False] * len(messages))
    return Appended(row["status"], row["offsets"] or [], row["duplicates"] or [])


async def publish_topics(
    conn: asyncpg.Connection,
    topics: list[tuple[str, list[NewMessage], int]],
    skew: float,
) -> list[Appended]:
    """Append each topic's messages (topic name, messages, largest message's bytes) in one
    transaction: an outcome per topic, in the same order; a topic that is not 'ok' stored
    nothing ('busy': another transaction holds its lock)."""
    flat = [m for _, messages, _ in topics for m in messages]
    row = await conn.fetchrow(
        PUBLISH_TOPICS,
        [name for name, _, _ in topics],
        [len(messages) for _, messages, _ in topics],
        [largest for _, _, largest in topics],
        [m.value for m in flat],
        _sparse([m.key for m in flat]),
        _sparse([m.headers for m in flat]),
        _sparse([m.delay_seconds or None for m in flat]),
        _sparse([m.dedup_id for m in flat]),
        skew,
    )
    assert row is not None
    outcomes = []
    listed_at = 0
    for (_, messages, _), status, first, listed in zip(
        topics, row["statuses"], row["first_offsets"], row["listed"], strict=True
    ):
        count = len(messages)
        if status != "ok":
            outcomes.append(Appended(status, [], []))
        elif listed:
            end = listed_at + count
            outcomes.append(
                Appended("ok", row["offsets"][listed_at:end], row["duplicates"][listed_at:end])
            )
            listed_at = end
        else:
            outcomes.append(Appended("ok", list(range(first, first + count)), [False] * count))
    return outcomes


async def notify(conn: asyncpg.Connection, topic_id: int, count: int) -> None:
    """Waiting pulls of the topic look again (at commit, on every process): `count` says
    how many messages may have become deliverable."""
    await conn.execute(NOTIFY, NOTIFY_CHANNEL, f"{topic_id}:{count}")


def _sparse(column: list[object]) -> list[object] | None:
    """NULL instead of an array of NULLs (most messages have no key, headers, delay or
    dedup id): less to encode and send, and the multi-argument unnest pads it with NULLs."""
    return column if any(value is not None for value in column) else None


def _message(row: asyncpg.Record) -> Message:
    return Message(
        row["msg_offset"],
        row["published_at"],
        row["deliver_at"],
        row["key"],
        row["headers"],
        row["value"],
    )


async def browse(
    conn: asyncpg.Connection, topic_id: int, from_offset: int, limit: int
) -> list[Message]:
    return [_message(row) for row in await conn.fetch(BROWSE, topic_id, from_offset, limit)]


async def get_message(conn: asyncpg.Connection, topic_id: int, offset: int) -> Message | None:
    rows = await conn.fetch(BROWSE, topic_id, offset, 1)
    if not rows or rows[0]["msg_offset"] != offset:
        return None
    return _message(rows[0])


async def first_offset_at_or_after(
    conn: asyncpg.Connection, topic_id: int, published_at: datetime
) -> int | None:
    return await conn.fetchval(FIRST_OFFSET_AT_OR_AFTER, topic_id, published_at)
