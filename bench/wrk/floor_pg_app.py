"""The floor of a publish that commits: the bare ASGI app of floor_app.py plus one INSERT per
request, each its own transaction, through asyncpg. Nothing else (no auth, validation,
limits, log line, metrics, grouping): what a Python server pays for a commit per request on
this machine, which is what every single-message publish costs when no other request comes
to share its commit (few connections). Values are stored as jsonb (Sluice stores the text
it checked): a little more work for Postgres, none for the server. Two ways to the
connection:

- `pool_app`: asyncpg's Pool, acquire and release around each INSERT (reset on release
  turned off, as Sluice does: `sluice.storage.db`);
- `free_list_app`: a list of connections opened at start, taken and put back without an
  await when one is idle (the cheapest way there is).

And the floor of a publish that shares its commit (`grouped_app`): one writer task on one
connection inserts, in one statement and transaction, every request that queued while it
wrote the previous ones (Sluice's publisher, minus everything else).

    FLOOR_DATABASE_URL=postgresql://... .venv/bin/python -m uvicorn \\
        bench.wrk.floor_pg_app:pool_app --port 8002 --log-level warning --no-access-log
"""

from __future__ import annotations

import asyncio
import os
from collections import deque
from typing import Any, Protocol

import asyncpg
import orjson

# Sluice's default pool size (SLUICE_POOL_SIZE).
CONNECTIONS = 10
HEADERS = [(b"content-type", b"application/json")]

# A table per app: both start at once, and two CREATE TABLE IF NOT EXISTS of one name can
# collide (a unique violation in pg_type).
INSERT = "INSERT INTO {table} (value) VALUES ($1::jsonb) RETURNING msg_offset"
TABLE = "CREATE TABLE IF NOT EXISTS {table} (msg_offset bigserial PRIMARY KEY, value jsonb)"


async def _keep_session(_conn: asyncpg.Connection) -> None:
    return None


class _Connections(Protocol):
    """Where a request gets its connection: asyncpg's pool, or a list of our own."""

    table: str
    insert_sql: str

    async def open(self, url: str) -> None: ...

    async def close(self) -> None: ...

    async def insert(self, value: str) -> int: ...


class _Pool:
    table = "floor_pool"
    insert_sql = INSERT.format(table=table)

    async def open(self, url: str) -> None:
        self._pool = await asyncpg.create_pool(
            url, min_size=CONNECTIONS, max_size=CONNECTIONS, reset=_keep_session
        )

    async def close(self) -> None:
        await self._pool.close()

    async def insert(self, value: str) -> int:
        async with self._pool.acquire() as conn:
            return await conn.fetchval(self.insert_sql, value)


class _FreeList:
    table = "floor_list"
    insert_sql = INSERT.format(table=table)

    async def open(self, url: str) -> None:
        self._idle: asyncio.LifoQueue[asyncpg.Connection] = asyncio.LifoQueue()
        for _ in range(CONNECTIONS):
            self._idle.put_nowait(await asyncpg.connect(url))

    async def close(self) -> None:
        while not self._idle.empty():
            await self._idle.get_nowait().close()

    async def insert(self, value: str) -> int:
        try:
            conn = self._idle.get_nowait()
        except asyncio.QueueEmpty:
            conn = await self._idle.get()
        try:
            return await conn.fetchval(self.insert_sql, value)
        finally:
            self._idle.put_nowait(conn)


class _Grouped:
    table = "floor_grouped"
    insert_sql = (
        f"INSERT INTO {table} (value) SELECT v FROM unnest($1::jsonb[]) WITH ORDINALITY AS x(v, n)"
        " ORDER BY n RETURNING msg_offset"
    )

    async def open(self, url: str) -> None:
        self._conn = await asyncpg.connect(url)
        self._waiting: deque[tuple[str, asyncio.Future[int]]] = deque()
        self._wake: asyncio.Future[None] | None = None
        self._writer = asyncio.create_task(self._write())

    async def close(self) -> None:
        self._writer.cancel()
        await self._conn.close()

    async def insert(self, value: str) -> int:
        answer = asyncio.get_running_loop().create_future()
        self._waiting.append((value, answer))
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        return await answer

    async def _write(self) -> None:
        while True:
            if not self._waiting:
                self._wake = asyncio.get_running_loop().create_future()
                await self._wake
            group = list(self._waiting)
            self._waiting.clear()
            try:
                rows = await self._conn.fetch(self.insert_sql, [value for value, _ in group])
            except Exception as exc:  # each request of the group answers 500; go on
                for _, answer in group:
                    answer.set_exception(exc)
                continue
            # Offsets are taken in insertion order (one sequence, one statement).
            for (_, answer), offset in zip(group, sorted(row[0] for row in rows), strict=True):
                answer.set_result(offset)


async def read_body(receive: Any) -> bytes:
    """The request's body, all its chunks."""
    body = b""
    more = True
    while more:
        message = await receive()
        body += message.get("body", b"")
        more = message.get("more_body", False)
    return body


def _app(connections: _Connections) -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    url = os.environ["FLOOR_DATABASE_URL"]
                    setup = await asyncpg.connect(url)
                    try:
                        await setup.execute(TABLE.format(table=connections.table))
                    finally:
                        await setup.close()
                    await connections.open(url)
                    await send({"type": "lifespan.startup.complete"})
                else:
                    await connections.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = await read_body(receive)
        if scope["method"] != "POST":  # the readiness probe of bench.wrk.run
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            await send({"type": "http.response.body", "body": b"{}"})
            return
        value = orjson.loads(body)["messages"][0]["value"]
        offset = await connections.insert(orjson.dumps(value).decode())
        answer = orjson.dumps({"messages": [{"offset": offset, "duplicate": False}]})
        headers = [*HEADERS, (b"content-length", str(len(answer)).encode())]
        await send({"type": "http.response.start", "status": 201, "headers": headers})
        await send({"type": "http.response.body", "body": answer})

    return app


pool_app = _app(_Pool())
free_list_app = _app(_FreeList())
grouped_app = _app(_Grouped())
