"""Sluice over HTTP (httpx), exactly as a client would use it."""

from __future__ import annotations

from typing import Any

import asyncpg
import httpx
import orjson

from bench.peers import Delivery, Peer

_JSON = {"content-type": "application/json"}


class SluicePeer(Peer):
    name = "sluice"

    def __init__(self, base_url: str, database_url: str, max_connections: int = 2000) -> None:
        self.base_url = base_url
        self._database_url = database_url
        self._max_connections = max_connections
        self.client: httpx.AsyncClient | None = None
        self.server_pid: int | None = None

    async def start(self) -> None:
        limits = httpx.Limits(
            max_connections=self._max_connections,
            max_keepalive_connections=self._max_connections,
            # Below uvicorn's keep-alive timeout (5 s) so we never reuse a closing socket.
            keepalive_expiry=3.0,
        )
        self.client = httpx.AsyncClient(
            base_url=self.base_url, limits=limits, timeout=httpx.Timeout(60.0)
        )

    async def close(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None

    async def _send(self, method: str, path: str, body: bytes | None = None) -> httpx.Response:
        assert self.client is not None
        response = await self.client.request(method, path, content=body, headers=_JSON)
        if response.status_code >= 300:
            raise RuntimeError(f"{method} {path}: {response.status_code} {response.text[:300]}")
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

    async def ack(self, queue: str, handles: list[Any], subscriber: int = 0) -> int:
        if not handles:
            return 0
        response = await self._send(
            "POST",
            f"/v1/topics/{queue}/subscriptions/s{subscriber}/ack",
            orjson.dumps({"receipts": handles}),
        )
        return int(orjson.loads(response.content)["acked"])

    async def settle(self) -> None:
        conn = await asyncpg.connect(self._database_url)
        try:
            await conn.execute("ANALYZE")
        finally:
            await conn.close()

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
