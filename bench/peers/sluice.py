"""Sluice over HTTP, exactly as a client would use it."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import httpx
import orjson

from bench.peers import Delivery, Peer

_JSON = {"content-type": "application/json"}

# The load generator shares the machine with the server and Postgres, so its own cost
# counts: for the same requests httpx used about three times the CPU of aiohttp and held the
# server below what it can serve (bench/RESULTS.md). aiohttp is the default; `--http-client
# httpx` keeps the other one measurable.
HTTP_CLIENTS = ("aiohttp", "httpx")


@dataclass(slots=True)
class Reply:
    status_code: int
    headers: Mapping[str, str]
    content: bytes

    def json(self) -> Any:
        return orjson.loads(self.content)


class SluicePeer(Peer):
    name = "sluice"

    def __init__(
        self,
        base_url: str,
        database_url: str,
        max_connections: int = 2000,
        http_client: str = "aiohttp",
    ) -> None:
        if http_client not in HTTP_CLIENTS:
            raise ValueError(f"http client must be one of {HTTP_CLIENTS}")
        self.base_url = base_url
        self.http_client = http_client
        self._database_url = database_url
        self._max_connections = max_connections
        self._httpx: httpx.AsyncClient | None = None
        self._aiohttp: aiohttp.ClientSession | None = None
        self.server_pid: int | None = None

    async def start(self) -> None:
        # Keep-alive below uvicorn's timeout (5 s) so we never reuse a closing socket.
        if self.http_client == "aiohttp":
            connector = aiohttp.TCPConnector(
                limit=self._max_connections, keepalive_timeout=3.0, force_close=False
            )
            self._aiohttp = aiohttp.ClientSession(
                base_url=self.base_url,
                connector=connector,
                timeout=aiohttp.ClientTimeout(total=60.0),
                skip_auto_headers=("User-Agent",),
            )
            return
        limits = httpx.Limits(
            max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections,
            keepalive_expiry=3.0,
        )
        self._httpx = httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=httpx.Timeout(60.0)
        )

    async def close(self) -> None:
        if self._httpx is not None:
            await self._httpx.aclose()
            self._httpx = None
        if self._aiohttp is not None:
            await self._aiohttp.close()
            self._aiohttp = None

    async def request(self, method: str, path: str, body: bytes | None = None) -> Reply:
        """One HTTP request; any status comes back (no exception for 4xx/5xx)."""
        if self._aiohttp is not None:
            async with self._aiohttp.request(method, path, data=body, headers=_JSON) as reply:
                return Reply(reply.status, reply.headers, await reply.read())
        assert self._httpx is not None, "start() first"
        response = await self._httpx.request(method, path, content=body, headers=_JSON)
        return Reply(response.status_code, response.headers, response.content)

    async def _send(self, method: str, path: str, body: bytes | None = None) -> Reply:
        response = await self.request(method, path, body)
        if response.status_code >= 300:
            text = response.content[:300].decode(errors="replace")
            raise RuntimeError(f"{method} {path}: {response.status_code} {text}")
        return response

    async def create_queue(self, queue: str, subscribers: int = 1) -> None:
        await self._send("PUT", f"/v1/topics/{queue}", b"{}")
        sub = orjson.dumps({"start": "earliest", "ack_deadline_seconds": 60})
        for i in range(subscribers):
            await self._send("PUT", f"/v1/topics/{queue}/subscriptions/s{i}", sub)

    # Topics are kept: deleting one starts background deletes in the server that would
    # disturb the phases measured after it. Later phases use other topics.

    def prepare(self, values: list[bytes]) -> bytes:
        return b'{"messages":[' + b",".join(b'{"value":' + v + b"}" for v in values) + b"]}"

    async def publish(self, queue: str, prepared: bytes) -> None:
        await self._send("POST", f"/v1/topics/{queue}/messages", prepared)

    async def pull(
        self, queue: str, max_messages: int, wait_seconds: float = 0.0, subscriber: int = 0
    ) -> list[Delivery]:
        body = orjson.dumps({"max_messages": max_messages, "wait_seconds": wait_seconds})
        response = await self._send(
            "POST", f"/v1/topics/{queue}/subscriptions/s{subscriber}/pull", body
        )
        return [
            Delivery(m["receipt"], m["value"]) for m in orjson.loads(response.content)["messages"]
        ]

    async def pull_acking(
        self, queue: str, max_messages: int, handles: list[Any], subscriber: int = 0
    ) -> list[Delivery]:
        """Acknowledge `handles` and pull the next batch in one request (`ack` in the pull)."""
        body = orjson.dumps({"max_messages": max_messages, "ack": handles})
        response = await self._send(
            "POST", f"/v1/topics/{queue}/subscriptions/s{subscriber}/pull", body
        )
        answer = orjson.loads(response.content)
        if answer["acked"] != len(handles):
            raise RuntimeError(f"acked {answer['acked']} of {len(handles)}: {answer['stale']}")
        return [Delivery(m["receipt"], m["value"]) for m in answer["messages"]]

    async def ack(self, queue: str, handles: list[Any], subscriber: int = 0) -> int:
        if not handles:
            return 0
        response = await self._send(
            "POST",
            f"/v1/topics/{queue}/subscriptions/s{subscriber}/ack",
            orjson.dumps({"receipts": handles}),
        )
        return int(orjson.loads(response.content)["acked"])

    async def database_connections(self) -> int:
        """Connections the server holds to its database now (SPEC: pool <= 20)."""
        conn = await asyncpg.connect(self._database_url)
        try:
            return int(
                await conn.fetchval(
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE datname = current_database() AND pid <> pg_backend_pid()"
                )
            )
        finally:
            await conn.close()


class SluiceSqlPeer(SluicePeer):
    """Sluice's SQL API: publish with sluice.send / send_batch on the application's own
    connection (each call its own transaction), consume over HTTP like `sluice`. A publish
    is done at its commit; the relay moves it into the log right after, and catch_up()
    says how long the log took to hold everything once the producers stopped."""

    name = "sluice-sql"

    def __init__(self, base_url: str, database_url: str, pool_size: int = 10, **kw: Any) -> None:
        super().__init__(base_url, database_url, **kw)
        self._pool_size = pool_size
        self.pool: asyncpg.Pool | None = None

    async def start(self) -> None:
        await super().start()
        self.pool = await asyncpg.create_pool(
            self._database_url, min_size=1, max_size=self._pool_size
        )

    async def close(self) -> None:
        if self.pool is not None:
            await self.pool.close()
            self.pool = None
        await super().close()

    def prepare(self, values: list[bytes]) -> list[str]:  # type: ignore[override]
        return [v.decode() for v in values]

    async def publish(self, queue: str, prepared: list[str]) -> None:  # type: ignore[override]
        assert self.pool is not None
        if len(prepared) == 1:
            await self.pool.execute("SELECT sluice.send($1, $2::jsonb)", queue, prepared[0])
        else:
            await self.pool.execute(
                "SELECT sluice.send_batch($1, $2::text[]::jsonb[])", queue, prepared
            )

    async def catch_up(self, within: float = 120.0) -> float:
        """Seconds until the relay has moved everything sent so far into the log."""
        assert self.pool is not None
        started = asyncio.get_running_loop().time()
        last = await self.pool.fetchval("SELECT max(seq) FROM sluice.outbox WHERE kind = 'message'")
        if last is None:
            return 0.0
        while asyncio.get_running_loop().time() - started < within:
            cursor = await self.pool.fetchval(
                "SELECT cursor FROM sluice.outbox WHERE kind = 'relayed' ORDER BY seq DESC LIMIT 1"
            )
            if cursor is not None and cursor >= last:
                break
            await asyncio.sleep(0.02)
        return asyncio.get_running_loop().time() - started
