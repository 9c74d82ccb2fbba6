"""The background maintenance loop of each process (one pass at a time cluster-wide)."""

from __future__ import annotations

import asyncio
import logging

from sluice.queue.context import QueueContext
from sluice.queue.rates import KEEP_SECONDS
from sluice.storage import delivery as delivery_sql
from sluice.storage import maintenance as sql
from sluice.storage import subscriptions as subs_sql

log = logging.getLogger("sluice.maintenance")


async def run_pass(ctx: QueueContext) -> dict[str, int]:
    """One maintenance pass; returns what it did (for tests and logs)."""
    done = {"expired_messages": 0, "purged_messages": 0, "dead_lettered": 0}
    batch = ctx.settings.retention_batch_size
    skew = ctx.clock.skew
    async with ctx.pool.acquire() as conn:
        if not await sql.try_lock(conn):
            return done
        try:
            for row in await sql.retention_cutoffs(conn, skew):
                if row["oldest"] is None or row["oldest"] >= row["keep_from"]:
                    continue
                while True:
                    n = await sql.delete_deliveries_below(
                        conn, row["topic_id"], row["keep_from"], batch
                    )
                    if n < batch:
                        break
                while True:
                    n = await sql.delete_messages_below(
                        conn, row["topic_id"], row["keep_from"], batch
                    )
                    done["expired_messages"] += n
                    if n < batch:
                        break
            for topic_id in await sql.deleted_topics(conn):
                n = await sql.delete_messages_below(conn, topic_id, 2**63 - 1, batch)
                done["purged_messages"] += n
                if n < batch:
                    await sql.forget_deleted_topic(conn, topic_id)
            for sub in await sql.subscriptions_with_expiring_leases(conn, skew):
                async with conn.transaction():
                    locked = await delivery_sql.lock_subscription(
                        conn, sub["topic"], sub["name"], skew
                    )
                    if locked is not None:
                        dead = await delivery_sql.dead_letter_due(conn, locked, locked["now"])
                        done["dead_lettered"] += len(dead)
                        ctx.rates.record(
                            locked["topic_id"],
                            locked["sub_id"],
                            sub["topic"],
                            sub["name"],
                            dead_lettered=len(dead),
                            expired=sum(1 for r in dead if r["prev_state"] == "leased"),
                        )
            await subs_sql.delete_old_rates(conn, KEEP_SECONDS, skew)
            await sql.vacuum_hot_tables(conn)
        finally:
            await sql.unlock(conn)
    return done


async def subscription_vacuum_loop(ctx: QueueContext) -> None:
    """Vacuum `subscriptions` every few hundred milliseconds while this process claims
    (see Settings.subscription_vacuum_seconds); nothing while its claims write nothing."""
    while True:
        await asyncio.sleep(ctx.settings.subscription_vacuum_seconds)
        if not ctx.subscription_writes:
            continue
        ctx.subscription_writes = 0
        try:
            async with ctx.pool.acquire() as conn:
                await sql.vacuum_hot_tables(conn, ("subscriptions",))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("vacuum of subscriptions failed")


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
