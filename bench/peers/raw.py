"""The baseline: hand-written asyncpg doing the best-case SQL for the same job.

One table per subscriber; publish is one INSERT ... SELECT unnest($1), with a NOTIFY in the
same statement only while a consumer of this process long-polls the queue (a NOTIFY
serialises commits, so the best case leaves it out when nobody listens); a claim is
WITH next AS MATERIALIZED (SELECT ... FOR UPDATE SKIP LOCKED) UPDATE ... FROM next
RETURNING (materialized: written as `id IN (subquery)` the planner may re-run the locking
subquery for every row, which stalled claims once statistics said "empty"); an ack is one
DELETE ... WHERE id = ANY($1). It offers none of Sluice's guarantees (no commit-ordered
offsets, no fencing token on ack, no retries or dead letters): that makes it the best case.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import asyncpg

from bench.peers import Delivery, Peer


def _table(queue: str, subscriber: int) -> str:
    return f"raw_{queue}_{subscriber}".replace("-", "_")


class RawPeer(Peer):
    name = "raw"

    def __init__(self, database_url: str, pool_size: int = 10, lease_seconds: int = 60) -> None:
        self._url = database_url
        self._pool_size = pool_size
        self._lease = lease_seconds
        self.pool: asyncpg.Pool | None = None
        # Where claims run, if not on `pool` (bench/wrk/floor_consume_app.py's async commits).
        self.claim_pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._events: dict[str, asyncio.Event] = {}
        self._listen_lock = asyncio.Lock()
        self._publish_sql: dict[str, str] = {}
        self._publish_notify_sql: dict[str, str] = {}

    async def start(self) -> None:
        self.pool = await asyncpg.create_pool(self._url, min_size=1, max_size=self._pool_size)

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def create_queue(self, queue: str, subscribers: int = 1) -> None:
        assert self.pool is not None
        ctes = []
        for i in range(subscribers):
            table = _table(queue, i)
            await self.pool.execute(
                f"""
                DROP TABLE IF EXISTS {table};
                CREATE TABLE {table} (
                    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                    vt          timestamptz NOT NULL DEFAULT now(),
                    read_ct     integer NOT NULL DEFAULT 0,
                    enqueued_at timestamptz NOT NULL DEFAULT now(),
                    payload     text NOT NULL
                )
                """
            )
            ctes.append(f"i{i} AS (INSERT INTO {table} (payload) SELECT unnest($1::text[]))")
        # One statement (one round trip, one transaction) for every subscriber's copy.
        head = f"WITH {', '.join(ctes)} "
        self._publish_sql[queue] = head + "SELECT 1"
        self._publish_notify_sql[queue] = head + f"SELECT pg_notify('{_table(queue, 0)}', '')"

    async def drop_queue(self, queue: str, subscribers: int = 1) -> None:
        assert self.pool is not None
        for i in range(subscribers):
            await self.pool.execute(f"DROP TABLE IF EXISTS {_table(queue, i)}")
        channel = _table(queue, 0)
        if self._events.pop(channel, None) is not None and self._listener is not None:
            await self._listener.remove_listener(channel, self._notified)

    async def publish(self, queue: str, prepared: list[str]) -> None:
        assert self.pool is not None
        listened = _table(queue, 0) in self._events
        sql = (self._publish_notify_sql if listened else self._publish_sql)[queue]
        await self.pool.execute(sql, prepared)

    async def _claim(self, table: str, max_messages: int) -> list[asyncpg.Record]:
        pool = self.claim_pool or self.pool
        assert pool is not None
        return await pool.fetch(
            f"""
            WITH next AS MATERIALIZED (
                SELECT id FROM {table} WHERE vt <= now()
                ORDER BY id LIMIT $1 FOR UPDATE SKIP LOCKED
            )
            UPDATE {table} AS m SET vt = now() + make_interval(secs => $2),
                                    read_ct = m.read_ct + 1
            FROM next WHERE m.id = next.id
            RETURNING m.id, m.payload
            """,
            max_messages,
            float(self._lease),
        )

    async def _event(self, channel: str) -> asyncio.Event:
        """The event the next notification on `channel` sets (LISTEN on first use)."""
        async with self._listen_lock:  # consumers arrive together: one connection, one LISTEN
            if self._listener is None:
                self._listener = await asyncpg.connect(self._url)
            if channel not in self._events:
                await self._listener.add_listener(channel, self._notified)
                self._events[channel] = asyncio.Event()
            return self._events[channel]

    def _notified(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        event = self._events.get(channel)
        if event is not None:
            # Wake everybody waiting now; later waiters take the fresh event.
            self._events[channel] = asyncio.Event()
            event.set()

    async def pull(
        self, queue: str, max_messages: int, wait_seconds: float = 0.0, subscriber: int = 0
    ) -> list[Delivery]:
        table = _table(queue, subscriber)
        if wait_seconds <= 0:
            rows = await self._claim(table, max_messages)
            return [Delivery(r["id"], r["payload"]) for r in rows]
        # Long-poll the best-case way: LISTEN on one connection, re-claim on a notification.
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_seconds
        while True:
            event = await self._event(_table(queue, 0))
            rows = await self._claim(table, max_messages)
            remaining = deadline - loop.time()
            if rows or remaining <= 0:
                return [Delivery(r["id"], r["payload"]) for r in rows]
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(event.wait(), remaining)

    async def ack(self, queue: str, handles: list[Any], subscriber: int = 0) -> int:
        assert self.pool is not None
        if not handles:
            return 0
        status = await self.pool.execute(
            f"DELETE FROM {_table(queue, subscriber)} WHERE id = ANY($1::bigint[])", handles
        )
        return int(status.split()[-1])
