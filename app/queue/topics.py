"""Topic operations: configuration, publish, browse and stats."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from sluice.errors import NotFound, subscription_not_found, topic_not_found
from sluice.queue.context import QueueContext
from sluice.records import TOPIC_DEFAULTS, Message, NewMessage, Published, Topic
from sluice.storage import log as log_sql
from sluice.storage import topics as topics_sql


@dataclass(slots=True)
class TopicStats:
    topic: Topic
    head_offset: int | None
    oldest_offset: int | None
    message_count: int
    publish_rate_per_second: float


async def put_topic(ctx: QueueContext, name: str, fields: dict[str, Any]) -> tuple[Topic, bool]:
    """Create with defaults for what is missing, or update only the given fields."""
    config = dataclasses.replace(TOPIC_DEFAULTS, **fields)
    async with ctx.pool.acquire() as conn:
        return await topics_sql.upsert_topic(conn, name, config, list(fields))


async def require_topic(conn: asyncpg.Connection, name: str) -> Topic:
    topic = await topics_sql.get_topic(conn, name)
    if topic is None:
        raise topic_not_found(name)
    return topic


async def subscription_missing(conn: asyncpg.Connection, topic: str, name: str) -> NotFound:
    """The 404 for a subscription that was not found: naming the topic when that is what
    is missing (raises), else the subscription (returned, for the caller to raise)."""
    await require_topic(conn, topic)
    return subscription_not_found(topic, name)


async def get_topic(ctx: QueueContext, name: str) -> TopicStats:
    async with ctx.pool.acquire() as conn:
        topic = await require_topic(conn, name)
        stats = await topics_sql.log_stats(conn, topic.topic_id, ctx.clock.skew)
    head, oldest = stats.head_offset, stats.oldest_offset
    # Offsets are gapless between the retention floor and the head.
    count = 0 if head is None or oldest is None else head - oldest + 1
    minute = stats.minute_ago_offset
    rate = 0.0 if minute is None or head is None else (head - minute + 1) / 60.0
    return TopicStats(topic, head, oldest, count, round(rate, 3))


@dataclass(slots=True)
class TopicPage:
    topics: list[Topic]
    next_after: str | None  # the last name of a full page; None once the listing ends


# A listing filtered by the caller's access reads the topic table in batches this large.
VISIBLE_SCAN_BATCH = 1000


async def list_topics(
    ctx: QueueContext,
    after: str | None,
    limit: int,
    visible: Callable[[str], bool] | None = None,
) -> TopicPage:
    """Up to `limit` topics in name order after `after`.

    With `visible` (the topics an API key may read), only those are listed, and the table
    is read on past the others so that a page runs short only at the end. The cursor is
    always the last topic listed: a name the caller may not see is never handed out,
    neither as an item nor as `next_after`."""
    async with ctx.pool.acquire() as conn:
        if visible is None:
            topics = await topics_sql.list_topics(conn, after, limit)
            return TopicPage(topics, topics[-1].name if len(topics) == limit else None)
        listed: list[Topic] = []
        batch = max(limit, VISIBLE_SCAN_BATCH)
        while True:
            scanned = await topics_sql.list_topics(conn, after, batch)
            for topic in scanned:
                if visible(topic.name):
                    listed.append(topic)
                    if len(listed) == limit:
                        return TopicPage(listed, topic.name)
            if len(scanned) < batch:
                return TopicPage(listed, None)
            after = scanned[-1].name


async def delete_topic(ctx: QueueContext, name: str) -> None:
    async with ctx.pool.acquire() as conn:
        if not await topics_sql.delete_topic(conn, name):
            raise topic_not_found(name)


async def publish(ctx: QueueContext, name: str, messages: list[NewMessage]) -> list[Published]:
    """Atomic, durable publish. The topic's existence and max_message_bytes are checked in
    the publishing call itself (no separate look-up)."""
    sizes = [
        len(m.value.encode()) + len((m.key or "").encode()) + len((m.headers or "").encode())
        for m in messages
    ]
    published = await ctx.publisher.publish(name, messages, sizes)
    ctx.rates.published(name, published)
    return published


async def browse(ctx: QueueContext, name: str, from_offset: int, limit: int) -> list[Message]:
    async with ctx.pool.acquire() as conn:
        topic = await require_topic(conn, name)
        return await log_sql.browse(conn, topic.topic_id, from_offset, limit)


async def get_message(ctx: QueueContext, name: str, offset: int) -> Message:
    async with ctx.pool.acquire() as conn:
        topic = await require_topic(conn, name)
        message = await log_sql.get_message(conn, topic.topic_id, offset)
    if message is None:
        raise NotFound(f"topic '{name}' has no message at offset {offset}")
    return message
