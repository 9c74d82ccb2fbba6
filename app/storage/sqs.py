"""SQL for the SQS endpoint's queues: the row each queue keeps beside its topic (attributes
as SQS shows them, tags, timestamps). Messages go through the log like any other; nothing
here is written per message."""

from __future__ import annotations

import json

import asyncpg

from sluice.records import SqsQueue

_COLUMNS = (
    "q.topic_id, t.name AS topic, q.queue_name, q.attributes::text AS attributes, "
    "q.tags::text AS tags, q.created_at, q.updated_at"
)

# create_queue: the queue row of a topic just created; NULL when the name is taken.
CREATE_QUEUE = f"""
WITH q AS (
    INSERT INTO sluice.sqs_queues (topic_id, queue_name, attributes, tags)
    VALUES ($1, $2, $3::jsonb, $4::jsonb)
    ON CONFLICT DO NOTHING
    RETURNING *
)
SELECT {_COLUMNS} FROM q JOIN sluice.topics t ON t.topic_id = q.topic_id
"""

# get_queue: one queue by its SQS name.
GET_QUEUE = f"""
SELECT {_COLUMNS} FROM sluice.sqs_queues q JOIN sluice.topics t ON t.topic_id = q.topic_id
WHERE q.queue_name = $1
"""

# list_queues: up to $3 queues in name order whose name starts with $1, after $2.
LIST_QUEUES = f"""
SELECT {_COLUMNS} FROM sluice.sqs_queues q JOIN sluice.topics t ON t.topic_id = q.topic_id
WHERE starts_with(q.queue_name, $1) AND ($2::text IS NULL OR q.queue_name > $2)
ORDER BY q.queue_name LIMIT $3
"""

# dead_letter_sources: queues whose redrive policy names the queue $1 as dead-letter target.
DEAD_LETTER_SOURCES = f"""
SELECT {_COLUMNS} FROM sluice.sqs_queues q JOIN sluice.topics t ON t.topic_id = q.topic_id
WHERE q.attributes->>'RedrivePolicy' IS NOT NULL
  AND split_part((q.attributes->>'RedrivePolicy')::jsonb->>'deadLetterTargetArn', ':', 6) = $1
ORDER BY q.queue_name
"""

# set_attributes: replace a queue's attributes (a configuration call, not per message).
SET_ATTRIBUTES = """
UPDATE sluice.sqs_queues SET attributes = $2::jsonb, updated_at = clock_timestamp()
WHERE topic_id = $1
"""

# set_tags: replace a queue's tags (LastModifiedTimestamp is about attributes only).
SET_TAGS = "UPDATE sluice.sqs_queues SET tags = $2::jsonb WHERE topic_id = $1"


def _queue(row: asyncpg.Record) -> SqsQueue:
    return SqsQueue(
        row["topic_id"],
        row["topic"],
        row["queue_name"],
        json.loads(row["attributes"]),
        json.loads(row["tags"]),
        row["created_at"],
        row["updated_at"],
    )


async def create_queue(
    conn: asyncpg.Connection,
    topic_id: int,
    name: str,
    attributes: dict[str, str],
    tags: dict[str, str],
) -> SqsQueue | None:
    row = await conn.fetchrow(
        CREATE_QUEUE, topic_id, name, json.dumps(attributes), json.dumps(tags)
    )
    return None if row is None else _queue(row)


async def get_queue(conn: asyncpg.Connection, name: str) -> SqsQueue | None:
    row = await conn.fetchrow(GET_QUEUE, name)
    return None if row is None else _queue(row)


async def list_queues(
    conn: asyncpg.Connection, prefix: str, after: str | None, limit: int
) -> list[SqsQueue]:
    return [_queue(row) for row in await conn.fetch(LIST_QUEUES, prefix, after, limit)]


async def dead_letter_sources(conn: asyncpg.Connection, name: str) -> list[SqsQueue]:
    return [_queue(row) for row in await conn.fetch(DEAD_LETTER_SOURCES, name)]


async def set_attributes(
    conn: asyncpg.Connection, topic_id: int, attributes: dict[str, str]
) -> None:
    await conn.execute(SET_ATTRIBUTES, topic_id, json.dumps(attributes))


async def set_tags(conn: asyncpg.Connection, topic_id: int, tags: dict[str, str]) -> None:
    await conn.execute(SET_TAGS, topic_id, json.dumps(tags))
