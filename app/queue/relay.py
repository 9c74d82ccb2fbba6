"""The relay of the SQL API: what applications published, acked or nacked through SQL
moves from the outbox into the queue once their transaction has committed.

Every process runs one; a transaction-scoped try-lock in Postgres lets one pass run at a
time cluster-wide (a process that finds it taken does nothing: the holder relays). A pass
runs when the SQL API's notification arrives (at the application's commit), when the
previous pass left rows behind, and every `relay_interval_seconds` in any case
(notifications are hints: a reconnecting listener may have missed some). The outbox's
partitions rotate in the maintenance pass (rotate_outbox below).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from sluice.queue.context import QueueContext
from sluice.records import EventKind, Published
from sluice.storage import outbox as outbox_sql

log = logging.getLogger("sluice.relay")

# How long the DDL of the rotation (TRUNCATE of a relayed partition) may wait for its lock.
TRUNCATE_LOCK_TIMEOUT = "100ms"


class Relay:
    def __init__(self, ctx: QueueContext) -> None:
        self._ctx = ctx
        self._wake = asyncio.Event()

    def wake(self) -> None:
        """Called by the listener on the SQL API's notification."""
        self._wake.set()

    async def run(self) -> None:
        interval = self._ctx.settings.relay_interval_seconds
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), interval)
            self._wake.clear()
            try:
                while (await relay_once(self._ctx)).more:
                    pass
            except asyncio.CancelledError:
                raise
            except Exception:
                # Postgres restarting, a deadlock with an HTTP ack: the next pass retries
                # (nothing of a failed pass is kept).
                log.warning("relay pass failed; retrying", exc_info=True)
                await asyncio.sleep(min(interval, 1.0))
                self._wake.set()


async def relay_once(ctx: QueueContext) -> outbox_sql.RelayPass:
    """One pass (tests call it directly)."""
    async with ctx.pool.acquire() as conn:
        done = await outbox_sql.relay(conn, ctx.settings.relay_batch, ctx.clock.skew)
    for item in done.published:
        ctx.rates.published(
            item["topic"],
            [
                Published(offset, duplicate)
                for offset, duplicate in zip(item["offsets"], item["duplicates"], strict=True)
            ],
        )
    for item in done.settled:
        kind = EventKind.ACKED if item["kind"] == "ack" else EventKind.NACKED
        ctx.rates.record(
            item["topic_id"],
            item["sub_id"],
            item["topic"],
            item["subscription"],
            **{
                kind: item["applied"] - item["dead_lettered"],
                EventKind.DEAD_LETTERED: item["dead_lettered"],
            },
        )
        if item["stale"]:
            log.warning(
                "SQL %s committed after its receipts went stale",
                item["kind"],
                extra={
                    "topic": item["topic"],
                    "subscription": item["subscription"],
                    "stale": item["stale"],
                },
            )
    return done


async def rotate_outbox(ctx: QueueContext, conn: asyncpg.Connection) -> dict[str, int]:
    """Empty the partitions whose rows have all been relayed, then move on to the next one
    when the current one has served its turn. Part of the maintenance pass."""
    done = {"outbox_emptied": 0, "ddl_postponed": 0}
    for part in await outbox_sql.parts_to_empty(conn):
        emptied = await outbox_sql.empty_part(conn, part, TRUNCATE_LOCK_TIMEOUT)
        if emptied is None:
            done["ddl_postponed"] += 1
        elif emptied:
            done["outbox_emptied"] += 1
    await outbox_sql.rotate(conn, ctx.settings.outbox_rotate_seconds, ctx.clock.skew)
    return done
