"""Event counts per subscription (delivered, acked, nacked, expired, dead-lettered).

Each process adds up its events in memory and writes them to Postgres about once a second
(one statement for all subscriptions), so the rates in the stats cover every process
without adding a write to each ack. A crash loses at most a second of counts: these are
observations, not delivery state. Listeners (Prometheus) see each event as it happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Sequence

import asyncpg

from sluice.records import Published
from sluice.storage import subscriptions as subs_sql
from sluice.storage.subscriptions import RATE_KINDS

log = logging.getLogger("sluice.rates")

RATE_WINDOW_SECONDS = 60
KEEP_SECONDS = 3600

# (topic, subscription, kind, count)
EventListener = Callable[[str, str, str, int], None]
# (topic, what a publish answered)
PublishListener = Callable[[str, Sequence[Published]], None]


class RateRecorder:
    """Where the queue reports what happens: per-subscription events are added up for the
    rates (written to Postgres once a second), and every event goes to the listeners
    (app.main subscribes the Prometheus counters)."""

    def __init__(self) -> None:
        self._pending: dict[tuple[int, int], list[int]] = {}
        self.listeners: list[EventListener] = []
        self.publish_listeners: list[PublishListener] = []

    def published(self, topic: str, published: Sequence[Published]) -> None:
        for listener in self.publish_listeners:
            listener(topic, published)

    def record(
        self, topic_id: int, sub_id: int, topic: str, subscription: str, **counts: int
    ) -> None:
        """counts: any of RATE_KINDS as keyword arguments."""
        slot = self._pending.setdefault((topic_id, sub_id), [0] * len(RATE_KINDS))
        for kind, n in counts.items():
            if n:
                slot[RATE_KINDS.index(kind)] += n
                for listener in self.listeners:
                    listener(topic, subscription, kind, n)

    async def flush(self, pool: asyncpg.Pool, skew: float) -> None:
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        rows = [(t, s, values) for (t, s), values in pending.items()]
        try:
            async with pool.acquire() as conn:
                await subs_sql.add_rate_counts(conn, rows, skew)
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("could not store rate counts", extra={"error": repr(exc)[:200]})

    async def run(self, pool: asyncpg.Pool, clock_skew: Callable[[], float]) -> None:
        try:
            while True:
                await asyncio.sleep(1.0)
                await self.flush(pool, clock_skew())
        finally:
            with contextlib.suppress(Exception):
                await self.flush(pool, clock_skew())
