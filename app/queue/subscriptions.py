"""Subscription operations: configuration, stats, seek, dead letters and redrive."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import asyncpg

from sluice.errors import InvalidInput, subscription_not_found
from sluice.queue.context import QueueContext
from sluice.queue.rates import RATE_WINDOW_SECONDS
from sluice.queue.stats import DeliveryCounts, delivery_counts
from sluice.queue.topics import require_topic, subscription_missing
from sluice.storage import delivery as delivery_sql
from sluice.storage import log as log_sql
from sluice.storage import subscriptions as subs_sql
from sluice.storage import topics as topics_sql

SUBSCRIPTION_DEFAULTS: dict[str, Any] = {
    "ack_deadline_seconds": 30,
    "max_deliveries": 10,
    "retry_min_seconds": 1.0,
    "retry_max_seconds": 600.0,
    "dead_letter_topic": None,
    "ordered_by_key": False,
    "rate_limit_per_second": None,
    "rate_limit_burst": None,
    "max_in_flight": None,
}


@dataclass(slots=True)
class SubscriptionStats:
    row: asyncpg.Record
    counts: DeliveryCounts
    rates: dict[str, float]


def _validate(topic: str, config: dict[str, Any]) -> None:
    if config["retry_min_seconds"] > config["retry_max_seconds"]:
        raise InvalidInput("retry_min_seconds must not exceed retry_max_seconds")
    if config["rate_limit_burst"] is not None and config["rate_limit_per_second"] is None:
        raise InvalidInput("rate_limit_burst needs rate_limit_per_second")
    if config["dead_letter_topic"] == topic:
        raise InvalidInput("a topic cannot be its own dead_letter_topic")


async def put_subscription(
    ctx: QueueContext,
    topic: str,
    name: str,
    fields: dict[str, Any],
    start: Literal["earliest", "latest"],
) -> tuple[asyncpg.Record, bool]:
    """Create (start applies) or update the fields given; returns (row, created)."""
    async with ctx.pool.acquire() as conn, conn.transaction():
        topic_row = await require_topic(conn, topic)
        # Lock the topic row against a concurrent delete while we add to it.
        await conn.execute(
            "SELECT 1 FROM topics WHERE topic_id = $1 FOR KEY SHARE", topic_row["topic_id"]
        )
        existing = await subs_sql.get_subscription(conn, topic, name, lock="UPDATE")
        base = dict(SUBSCRIPTION_DEFAULTS)
        if existing is not None:
            base.update({k: existing[k] for k in SUBSCRIPTION_DEFAULTS})
        config = {**base, **fields}
        _validate(topic, config)
        dlt = config["dead_letter_topic"]
        if dlt is not None and await topics_sql.get_topic(conn, dlt) is None:
            raise InvalidInput(f"dead_letter_topic '{dlt}' does not exist")
        if existing is None:
            oldest, log_end = await delivery_sql.log_bounds(conn, topic_row["topic_id"])
            start_offset = (
                log_end if start == "latest" else (oldest if oldest is not None else log_end)
            )
            await subs_sql.insert_subscription(
                conn, topic_row["topic_id"], name, config, start_offset
            )
        else:
            await subs_sql.update_subscription(
                conn, existing["topic_id"], existing["sub_id"], config
            )
            if existing["ordered_by_key"] and not config["ordered_by_key"]:
                await delivery_sql.release_blocked(
                    conn, existing["topic_id"], existing["sub_id"], ctx.clock.skew
                )
            elif config["ordered_by_key"] and not existing["ordered_by_key"]:
                await delivery_sql.adopt_key_order(conn, existing["topic_id"], existing["sub_id"])
        row = await subs_sql.get_subscription(conn, topic, name)
        assert row is not None
        return row, existing is None


async def require_subscription(
    conn: asyncpg.Connection, topic: str, name: str, lock: str | None = None
) -> asyncpg.Record:
    row = await subs_sql.get_subscription(conn, topic, name, lock=lock)
    if row is None:
        raise await subscription_missing(conn, topic, name)
    return row


async def stats_for(
    ctx: QueueContext, conn: asyncpg.Connection, row: asyncpg.Record
) -> SubscriptionStats:
    (state,) = await subs_sql.delivery_states(conn, ctx.clock.skew, row["topic_id"], row["sub_id"])
    rates = await subs_sql.recent_rates(
        conn, row["topic_id"], row["sub_id"], RATE_WINDOW_SECONDS, ctx.clock.skew
    )
    return SubscriptionStats(row=row, counts=delivery_counts(state), rates=rates)


async def get_subscription(ctx: QueueContext, topic: str, name: str) -> SubscriptionStats:
    async with ctx.pool.acquire() as conn:
        row = await require_subscription(conn, topic, name)
        return await stats_for(ctx, conn, row)


async def list_subscriptions(
    ctx: QueueContext, topic: str, after: str | None, limit: int
) -> list[SubscriptionStats]:
    async with ctx.pool.acquire() as conn:
        topic_row = await require_topic(conn, topic)
        rows = await subs_sql.list_subscriptions(conn, topic_row["topic_id"], after, limit)
        return [await stats_for(ctx, conn, row) for row in rows]


async def delete_subscription(ctx: QueueContext, topic: str, name: str) -> None:
    async with ctx.pool.acquire() as conn:
        topic_row = await require_topic(conn, topic)
        if not await subs_sql.delete_subscription(conn, topic_row["topic_id"], name):
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
    """Returns the offset the subscription now starts from."""
    async with ctx.pool.acquire() as conn:
        async with conn.transaction():
            sub = await delivery_sql.lock_subscription(conn, topic, name, ctx.clock.skew)
            if sub is None:
                raise await subscription_missing(conn, topic, name)
            oldest, log_end = await delivery_sql.log_bounds(conn, sub["topic_id"])
            if offset is not None:
                # Clamped to the log: an offset past the head seeks to the head (messages
                # not yet published are never skipped), one below the oldest retained
                # message to the oldest.
                target = min(offset, log_end)
                if oldest is not None:
                    target = max(target, oldest)
            elif time is not None:
                found = await log_sql.first_offset_at_or_after(conn, sub["topic_id"], time)
                target = log_end if found is None else found
            elif to == "earliest":
                target = oldest if oldest is not None else log_end
            else:
                target = log_end
            await delivery_sql.seek(conn, sub, target)
        await delivery_sql.notify(conn, sub["topic_id"], 1000)
    return target


async def dead_letters(
    ctx: QueueContext, topic: str, name: str, from_offset: int, limit: int
) -> list[asyncpg.Record]:
    async with ctx.pool.acquire() as conn:
        row = await require_subscription(conn, topic, name)
        return await delivery_sql.list_dead_letters(
            conn, row["topic_id"], row["sub_id"], from_offset, limit
        )


async def redrive(ctx: QueueContext, topic: str, name: str, offsets: list[int] | None) -> int:
    async with ctx.pool.acquire() as conn:
        async with conn.transaction():
            sub = await delivery_sql.lock_subscription(conn, topic, name, ctx.clock.skew)
            if sub is None:
                raise await subscription_missing(conn, topic, name)
            count = await delivery_sql.redrive(conn, sub, offsets)
        if count:
            await delivery_sql.notify(conn, sub["topic_id"], count)
    return count
