"""Helpers that make tests read like the behaviour they check."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx

JSON = {"content-type": "application/json"}


def topic_path(topic: str) -> str:
    return f"/v1/topics/{topic}"


def sub_path(topic: str, sub: str) -> str:
    return f"/v1/topics/{topic}/subscriptions/{sub}"


async def create_topic(client: httpx.AsyncClient, topic: str, **config: Any) -> dict[str, Any]:
    r = await client.put(topic_path(topic), json=config)
    assert r.status_code in (200, 201), r.text
    return r.json()


async def publish(client: httpx.AsyncClient, topic: str, *values: Any, **fields: Any) -> list[int]:
    messages = [{"value": v, **fields} for v in values]
    r = await client.post(topic_path(topic) + "/messages", json={"messages": messages})
    assert r.status_code == 201, r.text
    return [m["offset"] for m in r.json()["messages"]]


async def create_subscription(
    client: httpx.AsyncClient, topic: str, sub: str, **config: Any
) -> dict[str, Any]:
    r = await client.put(sub_path(topic, sub), json=config)
    assert r.status_code in (200, 201), r.text
    return r.json()


async def pull(
    client: httpx.AsyncClient,
    topic: str,
    sub: str,
    max_messages: int = 10,
    wait_seconds: float = 0,
    **extra: Any,
) -> list[dict[str, Any]]:
    body = {"max_messages": max_messages, "wait_seconds": wait_seconds, **extra}
    r = await client.post(sub_path(topic, sub) + "/pull", json=body)
    assert r.status_code == 200, r.text
    return r.json()["messages"]


async def ack(client: httpx.AsyncClient, topic: str, sub: str, receipts: list[str]) -> dict:
    r = await client.post(sub_path(topic, sub) + "/ack", json={"receipts": receipts})
    assert r.status_code == 200, r.text
    return r.json()


async def nack(
    client: httpx.AsyncClient, topic: str, sub: str, receipts: list[str], **extra: Any
) -> dict:
    r = await client.post(sub_path(topic, sub) + "/nack", json={"receipts": receipts, **extra})
    assert r.status_code == 200, r.text
    return r.json()


async def stats(client: httpx.AsyncClient, topic: str, sub: str) -> dict[str, Any]:
    r = await client.get(sub_path(topic, sub))
    assert r.status_code == 200, r.text
    return r.json()


def assert_problem(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/problem+json"), response.headers
    body = response.json()
    assert body["status"] == status
    assert body["type"].startswith("https://")
    assert body["title"] and body["detail"]
    return body


async def extend(
    client: httpx.AsyncClient, topic: str, sub: str, receipts: list[str], seconds: int
) -> dict:
    r = await client.post(
        sub_path(topic, sub) + "/extend",
        json={"receipts": receipts, "ack_deadline_seconds": seconds},
    )
    assert r.status_code == 200, r.text
    return r.json()


async def seek(client: httpx.AsyncClient, topic: str, sub: str, **body: Any) -> dict:
    r = await client.post(sub_path(topic, sub) + "/seek", json=body)
    assert r.status_code == 200, r.text
    return r.json()


async def drain(
    client: httpx.AsyncClient, topic: str, sub: str, batch: int = 100, do_ack: bool = True
) -> list[dict[str, Any]]:
    """Pull (wait_seconds=0) until empty; ack each batch unless do_ack is False."""
    got: list[dict[str, Any]] = []
    while messages := await pull(client, topic, sub, batch):
        got += messages
        if do_ack:
            result = await ack(client, topic, sub, [m["receipt"] for m in messages])
            assert result == {"acked": len(messages), "stale": []}, result
    return got


def offsets_of(messages: list[dict[str, Any]]) -> list[int]:
    return [m["offset"] for m in messages]


async def topic_with_subscription(client: httpx.AsyncClient, sub: str = "s", **config: Any) -> str:
    """A new topic (unique name) with one subscription configured with `config`."""
    topic = f"t-{uuid.uuid4().hex[:10]}"
    await create_topic(client, topic)
    await create_subscription(client, topic, sub, **config)
    return topic


APPEND_LOCK_CLASS = 1397511169  # sluice.append_messages: a topic's lock until commit


@contextlib.asynccontextmanager
async def topic_lock_held(pool: asyncpg.Pool, topic: str) -> AsyncIterator[asyncpg.Connection]:
    """Another transaction (another process's publish, the relay's pass) holds the topic's
    lock until the block ends: its connection, to do more in that transaction."""
    async with pool.acquire() as holder, holder.transaction():
        topic_id = await holder.fetchval(
            "SELECT topic_id FROM sluice.topics WHERE name = $1", topic
        )
        await holder.execute("SELECT pg_advisory_xact_lock($1, $2)", APPEND_LOCK_CLASS, topic_id)
        yield holder


async def sql_ack_applies(
    conn: asyncpg.Connection, topic: str, sub: str, receipts: list[str]
) -> list[bool]:
    """What the SQL API's sluice.ack answers for each receipt, in a transaction rolled back
    (nothing is recorded for the relay, so the same receipts can be checked again)."""
    check = conn.transaction()
    await check.start()
    try:
        rows = await conn.fetch("SELECT * FROM sluice.ack($1, $2, $3)", topic, sub, receipts)
    finally:
        await check.rollback()
    return [r["applies"] for r in rows]
