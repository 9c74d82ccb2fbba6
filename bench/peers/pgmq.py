"""pgmq 1.5 (SQL-only install) loaded into its own database at bench time.

The install file is read from --pgmq-sql (by default the copy kept beside the spec,
../shared/peers/pgmq/pgmq.sql); nothing of pgmq lives in this repository. Calls:
pgmq.send_batch, pgmq.read / pgmq.read_with_poll, pgmq.delete. Fan-out is one queue per
subscriber, filled by one statement.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import asyncpg

from bench.peers import Delivery, Peer, PeerUnavailable


def _queue(queue: str, subscriber: int) -> str:
    return f"{queue}_{subscriber}".replace("-", "_")


class PgmqPeer(Peer):
    name = "pgmq"

    def __init__(
        self,
        database_url: str,
        install_sql: Path,
        pool_size: int = 10,
        lease_seconds: int = 60,
        poll_interval_ms: int = 100,
    ) -> None:
        self._url = database_url
        self._install = install_sql
        self._pool_size = pool_size
        self._lease = lease_seconds
        self._poll_ms = poll_interval_ms
        self.pool: asyncpg.Pool | None = None
        self._names: dict[str, list[str]] = {}

    async def start(self) -> None:
        if not self._install.is_file():
            raise PeerUnavailable(f"pgmq install file not found: {self._install}")
        conn = await asyncpg.connect(self._url)
        try:
            installed = await conn.fetchval("SELECT to_regnamespace('pgmq') IS NOT NULL")
            if not installed:
                await conn.execute(self._install.read_text())
        except (asyncpg.PostgresError, OSError, UnicodeDecodeError) as exc:
            raise PeerUnavailable(f"pgmq install file failed to load: {exc}") from exc
        finally:
            await conn.close()
        self.pool = await asyncpg.create_pool(self._url, min_size=1, max_size=self._pool_size)

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None

    async def create_queue(self, queue: str, subscribers: int = 1) -> None:
        assert self.pool is not None
        names = [_queue(queue, i) for i in range(subscribers)]
        for name in names:
            exists = await self.pool.fetchval(
                "SELECT EXISTS (SELECT 1 FROM pgmq.meta WHERE queue_name = $1)", name
            )
            if exists:
                await self.pool.execute("SELECT pgmq.drop_queue($1)", name)
            await self.pool.execute("SELECT pgmq.create($1)", name)
        self._names[queue] = names

    async def drop_queue(self, queue: str, subscribers: int = 1) -> None:
        assert self.pool is not None
        for i in range(subscribers):
            await self.pool.execute("SELECT pgmq.drop_queue($1)", _queue(queue, i))

    async def publish(self, queue: str, prepared: list[str]) -> None:
        values = prepared
        assert self.pool is not None
        names = self._names[queue]
        if len(names) == 1:
            await self.pool.execute(
                "SELECT count(*) FROM pgmq.send_batch($1::text, $2::text[]::jsonb[])",
                names[0],
                values,
            )
        else:
            await self.pool.execute(
                "SELECT count(*) FROM unnest($1::text[]) AS q(name), "
                "LATERAL pgmq.send_batch(q.name, $2::text[]::jsonb[])",
                names,
                values,
            )

    async def pull(
        self, queue: str, max_messages: int, wait_seconds: float = 0.0, subscriber: int = 0
    ) -> list[Delivery]:
        assert self.pool is not None
        name = _queue(queue, subscriber)
        if wait_seconds <= 0:
            rows = await self.pool.fetch(
                "SELECT msg_id, message::text AS message FROM pgmq.read($1, $2, $3)",
                name,
                self._lease,
                max_messages,
            )
        else:
            # pgmq's long-poll holds a connection and re-reads every poll_interval_ms.
            rows = await self.pool.fetch(
                "SELECT msg_id, message::text AS message "
                "FROM pgmq.read_with_poll($1, $2, $3, $4, $5)",
                name,
                self._lease,
                max_messages,
                max(1, round(wait_seconds)),
                self._poll_ms,
            )
        return [Delivery(r["msg_id"], r["message"]) for r in rows]

    async def ack(self, queue: str, handles: list[Any], subscriber: int = 0) -> int:
        assert self.pool is not None
        if not handles:
            return 0
        return int(
            await self.pool.fetchval(
                "SELECT count(*) FROM pgmq.delete($1::text, $2::bigint[])",
                _queue(queue, subscriber),
                handles,
            )
        )
