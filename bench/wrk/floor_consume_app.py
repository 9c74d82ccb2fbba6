"""The floor of a consumer's round trips over HTTP: a bare ASGI app that answers Sluice's
topic, subscription, publish, pull and ack paths with the raw baseline's SQL
(bench/peers/raw.py: one table per subscription, a pull is one `UPDATE ... FOR UPDATE SKIP
LOCKED ... RETURNING`, an ack one `DELETE ... WHERE id = ANY($1)`, each its own transaction
on an asyncpg pool; pulls on a pool of their own that commits without waiting for the WAL
flush, as Sluice's claims do, acks durably). Nothing else: no auth, validation, limits, log
line, metrics, grouping, offsets in commit order, fencing tokens, retries or dead letters;
a pull's answer carries a message's receipt (its id), offset and value only. What any
Python HTTP server in front of the cheapest SQL pays per pull and ack on this machine:
bench/consume_floor.py drives it with the bench's own consumer loop, next to Sluice and
pgmq.

    FLOOR_DATABASE_URL=postgresql://... .venv/bin/python -m uvicorn \\
        bench.wrk.floor_consume_app:app --port 8003 --log-level warning --no-access-log
"""

from __future__ import annotations

import os
from typing import Any

import asyncpg
import orjson

from bench.peers.raw import RawPeer
from bench.wrk.floor_pg_app import read_body

HEADERS = [(b"content-type", b"application/json")]


class _AsyncClaims(RawPeer):
    """The raw baseline with its claims on a pool whose commits do not wait for the WAL flush
    (losing a claim in a crash only delivers again)."""

    async def start(self) -> None:
        await super().start()
        self.claim_pool = await asyncpg.create_pool(
            self._url, min_size=1, max_size=10, server_settings={"synchronous_commit": "off"}
        )

    async def close(self) -> None:
        if self.claim_pool is not None:
            await self.claim_pool.close()
        await super().close()


_raw = _AsyncClaims(os.environ.get("FLOOR_DATABASE_URL", ""), lease_seconds=60)


async def _answer(send: Any, status: int, content: bytes) -> None:
    headers = [*HEADERS, (b"content-length", str(len(content)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": content})


async def _lifespan(receive: Any, send: Any) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await _raw.start()
            await send({"type": "lifespan.startup.complete"})
        else:
            await _raw.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        await _lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    body = await read_body(receive)
    # /v1/topics/{topic}[/messages | /subscriptions/{sub}[/pull | /ack]]
    parts = scope["path"].strip("/").split("/")
    method = scope["method"]
    if method == "GET" or len(parts) < 3:  # the readiness probe
        await _answer(send, 200, b"{}")
        return
    topic = parts[2]
    if method == "PUT" and len(parts) == 3:
        await _raw.create_queue(topic)  # one subscription, the table the pulls read
        await _answer(send, 201, b"{}")
    elif method == "PUT":
        await _answer(send, 201, b"{}")
    elif parts[3:] == ["messages"]:
        values = [orjson.dumps(m["value"]).decode() for m in orjson.loads(body)["messages"]]
        await _raw.publish(topic, values)
        await _answer(send, 201, b'{"messages":[]}')
    elif parts[-1] == "pull":
        asked = orjson.loads(body)
        deliveries = await _raw.pull(topic, asked["max_messages"])
        messages = [
            {"receipt": str(d.handle), "offset": d.handle, "value": orjson.Fragment(d.value)}
            for d in deliveries
        ]
        await _answer(send, 200, orjson.dumps({"messages": messages}))
    elif parts[-1] == "ack":
        ids = [int(receipt) for receipt in orjson.loads(body)["receipts"]]
        acked = await _raw.ack(topic, ids)
        await _answer(send, 200, orjson.dumps({"acked": acked, "stale": []}))
    else:
        await _answer(send, 404, b"{}")
