"""The relay of the SQL API: what applications published, acked or nacked through SQL
moves from the outbox into the queue once their transaction has committed.

Every process runs one; a transaction-scoped try-lock in Postgres lets one pass run at a
time cluster-wide (a process that finds it taken does nothing: the holder relays). A relay
that has work polls every ACTIVE_POLL_SECONDS until QUIET_PASSES passes in a row found
nothing; then it asks its listener to declare that it waits (revision 0011: only then do
the applications' commits notify, see storage.listener) and waits for a notification, or
`relay_interval_seconds` in any case (notifications are hints: a reconnecting listener may
have missed some). The outbox's partitions rotate in the maintenance pass (rotate_outbox
below).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from sluice.queue.context import QueueContext
from sluice.records import EventKind, Published
from sluice.storage import outbox as outbox_sql

log = logging.getLogger("sluice.relay")

# How long the DDL of the rotation (TRUNCATE of a relayed partition) may wait for its lock.
TRUNCATE_LOCK_TIMEOUT = "100ms"
# While there is work: a pass this often, until this many passes in a row found nothing.
ACTIVE_POLL_SECONDS = 0.02
QUIET_PASSES = 5


class Relay:
    def __init__(self, ctx: QueueContext) -> None:
        self._ctx = ctx
        self._wake = asyncio.Event()
        # Declares (True) or withdraws (False) this relay's waiting: Listener.want_outbox.
        self.declare_waiting: Callable[[bool], None] | None = None

    def wake(self) -> None:
        """Called by the listener on the SQL API's notification."""
        self._wake.set()

    async def run(self) -> None:
        interval = self._ctx.settings.relay_interval_seconds
        quiet = 0
        while True:
            waiting = quiet >= QUIET_PASSES
            # asyncio.timeout, not wait_for: on 3.11 wait_for drops a cancellation that
            # arrives as the event is set, and the relay then outlives the app's shutdown.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(
                    interval if waiting else min(interval, ACTIVE_POLL_SECONDS)
                ):
                    await self._wake.wait()
            self._wake.clear()
            relayed = 0
            try:
                while True:
                    done = await relay_once(self._ctx)
                    relayed += max(done.relayed, 0)
                    if not done.more:
                        break
            except asyncio.CancelledError:
                raise
            except Exception:
                # Postgres restarting, a deadlock with an HTTP ack: the next pass retries
                # (nothing of a failed pass is kept).
                log.warning("relay pass failed; retrying", exc_info=True)
                await asyncio.sleep(min(interval, 1.0))
                self._wake.set()
                continue
            quiet = 0 if relayed else min(quiet + 1, QUIET_PASSES)
            if self.declare_waiting is not None:
                self.declare_waiting(quiet >= QUIET_PASSES)


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
