"""The background maintenance pass of each process (one pass at a time cluster-wide).

- retention: each topic's floor moves up to its first message within retention; readers
  treat what is below as gone at once;
- deadlines: subscriptions nobody pulls from still get their expired leases retried or
  parked (a claim of nothing);
- segments: each retention lane gets a new segment when its open one has run its length,
  and segments whose every message has expired are dropped whole. Both are DDL under a
  short lock_timeout: when a lock is not granted (e.g. pg_dump holds ACCESS SHARE on every
  table), the pass skips it and the next pass tries again;
- old rate buckets are deleted;
- the SQL API's outbox: partitions relayed in full are emptied (TRUNCATE, same short
  lock_timeout), and the next partition takes new rows once the current one has served.
"""

from __future__ import annotations

import asyncio
import logging

from sluice.queue import consuming, relay
from sluice.queue.context import QueueContext
from sluice.queue.rates import KEEP_SECONDS
from sluice.storage import maintenance as sql
from sluice.storage import subscriptions as subs_sql

log = logging.getLogger("sluice.maintenance")


async def run_pass(ctx: QueueContext) -> dict[str, int]:
    """One maintenance pass; returns what it did (for tests and logs)."""
    done = {
        "expired_messages": 0,
        "expired_leases": 0,
        "dead_lettered": 0,
        "segments_opened": 0,
        "segments_dropped": 0,
        "ddl_postponed": 0,
        "outbox_emptied": 0,
    }
    skew = ctx.clock.skew
    async with ctx.pool.acquire() as conn:
        if not await sql.try_lock(conn):
            return done
        try:
            moved = await sql.advance_retention(conn, skew)
            done["expired_messages"] = sum(moved.values())
            expiring = await sql.subscriptions_to_expire(conn, skew)
            for lane in await sql.lanes_to_rotate(conn, skew):
                if await sql.open_segment(conn, lane, skew):
                    done["segments_opened"] += 1
                else:
                    done["ddl_postponed"] += 1
            for seg in await sql.droppable_segments(conn):
                if await sql.drop_segment(conn, seg):
                    done["segments_dropped"] += 1
                else:
                    done["ddl_postponed"] += 1
            await subs_sql.delete_old_rates(conn, KEEP_SECONDS, skew)
            for key, n in (await relay.rotate_outbox(ctx, conn)).items():
                done[key] += n
        finally:
            await sql.unlock(conn)
    for topic, subscription in expiring:
        result = await consuming.claim(ctx, consuming.PullParams(topic, subscription, 0))
        done["expired_leases"] += result.expired
        done["dead_lettered"] += result.dead_lettered
    return done


async def maintenance_loop(ctx: QueueContext) -> None:
    while True:
        await asyncio.sleep(ctx.settings.maintenance_interval_seconds)
        try:
            result = await run_pass(ctx)
            if any(result.values()):
                log.info("maintenance pass", extra=result)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("maintenance pass failed")
