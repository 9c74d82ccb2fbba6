"""The per-subscription gauges of /metrics, read from the database at scrape time."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from sluice.queue.context import QueueContext
from sluice.queue.stats import delivery_counts
from sluice.records import SubscriptionGauges
from sluice.storage import subscriptions as subs_sql

log = logging.getLogger("sluice.metrics")

# A scrape never waits longer than this for the database; the gauges are left out then.
DB_TIMEOUT_SECONDS = 5.0


async def read(ctx: QueueContext) -> list[SubscriptionGauges] | None:
    """Every subscription's numbers (one query), or None when the database cannot be read:
    the scrape then says so (sluice_database_up 0) instead of failing."""
    try:
        async with asyncio.timeout(DB_TIMEOUT_SECONDS), ctx.pool.acquire() as conn:
            states = await subs_sql.delivery_states(conn, ctx.clock.skew)
    except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        log.warning("metrics: cannot read subscription state", extra={"error": repr(exc)[:200]})
        return None
    return [
        SubscriptionGauges(state.topic, state.subscription, delivery_counts(state))
        for state in states
    ]
