"""Subscription operations: configuration, stats, seek, dead letters and redrive."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from sluice.errors import InvalidInput, subscription_not_found
from sluice.queue.context import QueueContext
from sluice.queue.rates import RATE_WINDOW_SECONDS
from sluice.queue.stats import delivery_counts
from sluice.queue.topics import require_topic, subscription_missing
from sluice.records import (
    SUBSCRIPTION_DEFAULTS,
    DeadLetter,
    DeliveryCounts,
    Subscription,
    SubscriptionConfig,
)
from sluice.storage import dead_letters as dead_letters_sql
from sluice.storage import log as log_sql
from sluice.storage import subscriptions as subs_sql
from sluice.storage import topics as topics_sql


@dataclass(slots=True)
class SubscriptionStats:
    subscription: Subscription
    counts: DeliveryCounts
    delivered_total: int
    rates: dict[str, float]


def _validate(topic: str, config: SubscriptionConfig) -> None:
    if config.retry_min_seconds > config.retry_max_seconds:
        raise InvalidInput("retry_min_seconds must not exceed retry_max_seconds")
    if config.rate_limit_burst is not None and config.rate_limit_per_second is None:
        raise InvalidInput("rate_limit_burst needs rate_limit_per_second")
    if config.dead_letter_topic == topic:
        raise InvalidInput("a topic cannot be its own dead_letter_topic")


async def put_subscription(
    ctx: QueueContext,
    topic: str,
    name: str,
    fields: dict[str, Any],
    start: Literal["earliest", "latest"],
) -> tuple[Subscription, bool]:
    """Create (start applies) or update the fields given; returns (subscription, created).

    Several instances of a consumer "ensuring" their subscription at start-up race here:
    the first creates it, the others find it and update (the same settings)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        topic_row = await require_topic(conn, topic)
        # Lock the topic row against a concurrent delete while we add to it.
        await conn.execute(
            "SELECT 1 FROM sluice.topics WHERE topic_id = $1 FOR KEY SHARE", topic_row.topic_id
        )
        existing = await subs_sql.get_subscription(conn, topic, name)
        created = False
        if existing is None:
            config = dataclasses.replace(SUBSCRIPTION_DEFAULTS, **fields)
            await _check(conn, topic, config)
            created = (
                await subs_sql.create_subscription(
                    conn, topic_row.topic_id, name, config, start, ctx.clock.skew
                )
                is not None
            )
        if not created:
            found = await subs_sql.get_subscription(conn, topic, name)
            assert found is not None
            # Configuration changes and ordering changes are serialised with claims.
            await subs_sql.lock_subscription(conn, found.sub_id)
            found = await subs_sql.get_subscription(conn, topic, name)
            assert found is not None
            config = dataclasses.replace(found.config, **fields)
            await _check(conn, topic, config)
            await subs_sql.update_subscription(conn, found.topic_id, found.sub_id, config)
            if found.config.ordered_by_key != config.ordered_by_key:
                await subs_sql.change_key_order(
                    conn, found.topic_id, found.sub_id, config.ordered_by_key, ctx.clock.skew
                )
            # More room, a faster rate, ordering off: waiting pulls of every process may be
            # able to deliver now. Let them look.
            await log_sql.notify(conn, found.topic_id, 1000)
        subscription = await subs_sql.get_subscription(conn, topic, name)
        assert subscription is not None
    return subscription, created


async def _check(conn: asyncpg.Connection, topic: str, config: SubscriptionConfig) -> None:
    _validate(topic, config)
    dlt = config.dead_letter_topic
    if dlt is not None and await topics_sql.get_topic(conn, dlt) is None:
        raise InvalidInput(f"dead_letter_topic '{dlt}' does not exist")


async def require_subscription(conn: asyncpg.Connection, topic: str, name: str) -> Subscription:
    found = await subs_sql.get_subscription(conn, topic, name)
    if found is None:
        raise await subscription_missing(conn, topic, name)
    return found


async def stats_for(
    ctx: QueueContext, conn: asyncpg.Connection, subscription: Subscription
) -> SubscriptionStats:
    (state,) = await subs_sql.delivery_states(
        conn, ctx.clock.skew, subscription.topic_id, subscription.sub_id
    )
    rates = await subs_sql.recent_rates(
        conn, subscription.topic_id, subscription.sub_id, RATE_WINDOW_SECONDS, ctx.clock.skew
    )
    return SubscriptionStats(subscription, delivery_counts(state), state.delivered_total, rates)


async def get_subscription(ctx: QueueContext, topic: str, name: str) -> SubscriptionStats:
    async with ctx.pool.acquire() as conn:
        subscription = await require_subscription(conn, topic, name)
        return await stats_for(ctx, conn, subscription)


async def list_subscriptions(
    ctx: QueueContext, topic: str, after: str | None, limit: int
) -> list[SubscriptionStats]:
    async with ctx.pool.acquire() as conn:
        topic_row = await require_topic(conn, topic)
        found = await subs_sql.list_subscriptions(conn, topic_row.topic_id, after, limit)
        return [await stats_for(ctx, conn, subscription) for subscription in found]


async def delete_subscription(ctx: QueueContext, topic: str, name: str) -> None:
    async with ctx.pool.acquire() as conn:
        topic_row = await require_topic(conn, topic)
        if not await subs_sql.delete_subscription(conn, topic_row.topic_id, name):
            raise subscription_not_found(topic, name)


async def seek(
    ctx: QueueContext,
    topic: str,
    name: str,
    *,
    offset: int | None = None,
    time: datetime | None = None,
    to: Literal["earliest", "latest"] | None = None,
) -> int:
    """Returns the offset the subscription now starts from (clamped to the retained log)."""
    async with ctx.pool.acquire() as conn:
        target = await subs_sql.seek(conn, topic, name, offset, time, to, ctx.clock.skew)
        if target is None:
            raise await subscription_missing(conn, topic, name)
    return target


async def dead_letters(
    ctx: QueueContext, topic: str, name: str, from_offset: int, limit: int
) -> list[DeadLetter]:
    async with ctx.pool.acquire() as conn:
        subscription = await require_subscription(conn, topic, name)
        return await dead_letters_sql.page(
            conn, subscription.topic_id, subscription.sub_id, from_offset, limit
        )


async def redrive(ctx: QueueContext, topic: str, name: str, offsets: list[int] | None) -> int:
    async with ctx.pool.acquire() as conn:
        count = await dead_letters_sql.redrive(conn, topic, name, offsets, ctx.clock.skew)
        if count is None:
            raise await subscription_missing(conn, topic, name)
    return count
