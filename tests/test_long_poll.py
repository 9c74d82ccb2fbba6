"""Long polling with real time: a waiting pull wakes within milliseconds of a publish, when
a delay or a backoff ends, or when a lease expires; it returns empty after wait_seconds; and
1000 waiting pulls hold no database connections."""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import asyncpg
import httpx
import pytest

from tests.conftest import run_app, unique, wait_until
from tests.helpers import (
    ack,
    create_subscription,
    create_topic,
    nack,
    publish,
    pull,
    sub_path,
    topic_with_subscription,
)


@pytest.fixture
async def harness(db_url):
    """The app with a 30 s safety re-check: any faster wake-up comes from a notification or
    a known due time, never from the periodic re-check."""
    async with run_app(db_url, poll_recheck_seconds=30.0) as h:
        yield h


async def setup(client, **config) -> str:
    return await topic_with_subscription(client, **config)


async def waiting_pull(harness, topic, wait_seconds=10, **extra):
    """Start a long-poll and return (task, started_at) once it is parked in the hub."""
    before = harness.ctx.hub.waiting_count()
    started = time.monotonic()
    task = asyncio.create_task(
        pull(harness.client, topic, "s", 10, wait_seconds=wait_seconds, **extra)
    )

    async def parked() -> bool:
        return harness.ctx.hub.waiting_count() > before

    await wait_until(parked, timeout=10, interval=0.005)
    return task, started


async def test_publish_wakes_a_waiting_pull_within_milliseconds(harness):
    topic = await setup(harness.client)
    latencies = []
    for i in range(5):
        task, _ = await waiting_pull(harness, topic)
        await asyncio.sleep(0.05)  # really waiting
        assert not task.done()
        published = time.monotonic()
        [offset] = await publish(harness.client, topic, i)
        got = await asyncio.wait_for(task, 10)
        latencies.append(time.monotonic() - published)
        assert [m["offset"] for m in got] == [offset]
        await ack(harness.client, topic, "s", [got[0]["receipt"]])
    print(
        f"\npublish -> long-poll wake-up: median {statistics.median(latencies) * 1000:.1f} ms,"
        f" max {max(latencies) * 1000:.1f} ms"
    )
    assert max(latencies) < 0.5, latencies


async def test_waiting_pull_wakes_when_a_delayed_message_becomes_due(harness):
    topic = await setup(harness.client)
    published = time.monotonic()
    [offset] = await publish(harness.client, topic, "later", delay_seconds=1)
    # the periodic re-check is 5 s in tests: only the known due time can wake it early
    task, _ = await waiting_pull(harness, topic, wait_seconds=10)
    got = await asyncio.wait_for(task, 10)
    elapsed = time.monotonic() - published
    print(f"\ndelayed 1 s message delivered after {elapsed * 1000:.0f} ms")
    assert [m["offset"] for m in got] == [offset]
    assert 0.9 <= elapsed < 4, elapsed


async def test_waiting_pull_wakes_when_a_nack_backoff_ends(harness):
    topic = await setup(harness.client, retry_min_seconds=1, retry_max_seconds=1)
    [offset] = await publish(harness.client, topic, "m")
    [m] = await pull(harness.client, topic, "s")
    nacked = time.monotonic()
    await nack(harness.client, topic, "s", [m["receipt"]])  # default backoff: 1 s
    task, _ = await waiting_pull(harness, topic)
    got = await asyncio.wait_for(task, 10)
    elapsed = time.monotonic() - nacked
    assert [(g["offset"], g["delivery_attempt"]) for g in got] == [(offset, 2)]
    assert 0.9 <= elapsed < 4, elapsed

    # nack with an explicit delay too
    nacked = time.monotonic()
    await nack(harness.client, topic, "s", [got[0]["receipt"]], delay_seconds=1)
    task, _ = await waiting_pull(harness, topic)
    got = await asyncio.wait_for(task, 10)
    elapsed = time.monotonic() - nacked
    assert [(g["offset"], g["delivery_attempt"]) for g in got] == [(offset, 3)]
    assert 0.9 <= elapsed < 4, elapsed


async def test_waiting_pull_wakes_when_a_lease_expires(harness):
    topic = await setup(harness.client, retry_min_seconds=0, retry_max_seconds=0)
    [offset] = await publish(harness.client, topic, "m")
    leased = time.monotonic()
    [m] = await pull(harness.client, topic, "s", ack_deadline_seconds=1)
    task, _ = await waiting_pull(harness, topic)
    got = await asyncio.wait_for(task, 10)
    elapsed = time.monotonic() - leased
    assert [(g["offset"], g["delivery_attempt"]) for g in got] == [(offset, 2)]
    assert 0.9 <= elapsed < 4, elapsed
    assert m["receipt"] != got[0]["receipt"]


async def test_waiting_pull_wakes_when_a_nack_makes_a_message_available_now(harness):
    topic = await setup(harness.client)
    await publish(harness.client, topic, "m")
    [m] = await pull(harness.client, topic, "s")
    task, _ = await waiting_pull(harness, topic)
    await asyncio.sleep(0.05)
    assert not task.done()
    nacked = time.monotonic()
    await nack(harness.client, topic, "s", [m["receipt"]], delay_seconds=0)
    got = await asyncio.wait_for(task, 10)
    assert time.monotonic() - nacked < 0.5
    assert got[0]["delivery_attempt"] == 2


async def test_waiting_pull_wakes_on_seek_and_on_redrive(harness):
    client = harness.client
    topic = await setup(client, max_deliveries=1)
    [offset] = await publish(client, topic, "m")
    [m] = await pull(client, topic, "s")
    await ack(client, topic, "s", [m["receipt"]])
    task, _ = await waiting_pull(harness, topic)
    await asyncio.sleep(0.05)
    assert not task.done()
    sought = time.monotonic()
    r = await client.post(sub_path(topic, "s") + "/seek", json={"offset": offset})
    assert r.status_code == 200, r.text
    got = await asyncio.wait_for(task, 10)
    assert time.monotonic() - sought < 0.5
    assert [g["offset"] for g in got] == [offset]

    await nack(client, topic, "s", [got[0]["receipt"]])  # last attempt: parked
    task, _ = await waiting_pull(harness, topic)
    await asyncio.sleep(0.05)
    assert not task.done()
    redriven = time.monotonic()
    r = await client.post(sub_path(topic, "s") + "/dead-letters/redrive", json={})
    assert r.json() == {"redriven": 1}
    got = await asyncio.wait_for(task, 10)
    assert time.monotonic() - redriven < 0.5
    assert [(g["offset"], g["delivery_attempt"]) for g in got] == [(offset, 1)]


async def test_empty_after_wait_seconds(harness):
    topic = await setup(harness.client)
    started = time.monotonic()
    assert await pull(harness.client, topic, "s", 10, wait_seconds=1) == []
    elapsed = time.monotonic() - started
    assert 0.95 <= elapsed < 4, elapsed
    # A publish to another topic or subscription does not end the wait early with nothing.
    other = await setup(harness.client)
    task, started = await waiting_pull(harness, topic, wait_seconds=1)
    await publish(harness.client, other, "elsewhere")
    assert await asyncio.wait_for(task, 10) == []
    assert time.monotonic() - started >= 0.95
    # wait_seconds=0 answers at once
    started = time.monotonic()
    assert await pull(harness.client, topic, "s", 10, wait_seconds=0) == []
    assert time.monotonic() - started < 0.5


async def test_message_published_while_waiting_goes_to_one_waiter_only(harness):
    topic = await setup(harness.client)
    tasks = [(await waiting_pull(harness, topic, wait_seconds=2))[0] for _ in range(5)]
    [offset] = await publish(harness.client, topic, "only one")
    results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
    delivered = [m["offset"] for r in results for m in r]
    assert delivered == [offset]


async def _server_connections(db_url: str) -> tuple[int, int]:
    """Connections to this database other than ours: (all, not idle)."""
    conn = await asyncpg.connect(db_url)
    try:
        row = await conn.fetchrow(
            "SELECT count(*) AS total, count(*) FILTER (WHERE state <> 'idle') AS busy "
            "FROM pg_stat_activity WHERE datname = current_database() "
            "AND backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
        return row["total"], row["busy"]
    finally:
        await conn.close()


async def raw_post(port: int, path: str, body: dict) -> tuple[int, bytes]:
    """One POST over its own connection: (status, body)."""
    payload = json.dumps(body).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(payload)}\r\nConnection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        return status, await reader.readexactly(length)
    finally:
        writer.close()


async def test_1000_waiting_pulls_on_a_pool_of_10(fresh_db_url, server_factory):
    # A database of its own, so every connection to it is the server's.
    server = server_factory(env={"SLUICE_DB_POOL_SIZE": "10"}, url=fresh_db_url)
    topic = unique()
    n, woken, wait_seconds = 1000, 100, 20
    limits = httpx.Limits(max_connections=n + 100, max_keepalive_connections=n + 100)
    timeout = httpx.Timeout(90.0, connect=30.0, pool=90.0)
    async with httpx.AsyncClient(base_url=server.base_url, limits=limits, timeout=timeout) as c:
        await create_topic(c, topic)
        await create_subscription(c, topic, "s", ack_deadline_seconds=600)

        # The 1000 pulls are sent over plain sockets: httpx's per-connection cost made
        # parking them all take over 15 s on a loaded 2-core CI machine.
        path = sub_path(topic, "s") + "/pull"
        port = int(server.base_url.rsplit(":", 1)[1])

        async def one() -> tuple[list[dict], float, float]:
            started = time.monotonic()
            status, body = await raw_post(
                port, path, {"max_messages": 1, "wait_seconds": wait_seconds}
            )
            assert status == 200, body
            return json.loads(body)["messages"], started, time.monotonic()

        started = time.monotonic()
        tasks = [asyncio.create_task(one()) for _ in range(n)]

        # Every request reaches the server and parks (it counts them as in progress).
        async def all_parked() -> bool:
            async with httpx.AsyncClient(base_url=server.base_url) as probe:
                text = (await probe.get("/metrics")).text
            line = next(x for x in text.splitlines() if x.startswith("sluice_http_requests_in_"))
            return float(line.split()[-1]) >= n  # (+1: this scrape)

        await wait_until(all_parked, timeout=wait_seconds - 5, interval=0.2)
        await asyncio.sleep(1)  # the last of them finish their first (empty) claim
        assert not any(t.done() for t in tasks), "a long-poll returned before any publish"
        samples = []
        for _ in range(10):
            samples.append(await _server_connections(fresh_db_url))
            await asyncio.sleep(0.1)
        total = max(s[0] for s in samples)
        busy = sorted(s[1] for s in samples)
        print(
            f"\n{n} waiting pulls: server holds {total} database connections "
            f"(not idle: {busy}), setup {time.monotonic() - started:.1f}s"
        )
        assert 1 <= total <= 12, samples  # pool of 10 + the LISTEN connection (+1 slack)
        assert busy[5] <= 2, samples  # waiting pulls hold no connection and run no queries

        # A publish of `woken` messages wakes that many waiters, each with one message.
        published = time.monotonic()
        offsets = await publish(c, topic, *range(woken))

        async def all_delivered() -> bool:
            return sum(t.done() for t in tasks) >= woken

        await wait_until(all_delivered, timeout=12, interval=0.01)
        done = [t.result() for t in tasks if t.done()]
        first = min(r[2] for r in done) - published
        last = max(r[2] for r in done) - published
        print(
            f"publish woke the first waiter after {first * 1000:.0f} ms, "
            f"{woken} of them in {last:.2f}s"
        )
        assert len(done) == woken
        assert sorted(m["offset"] for r in done for m in r[0]) == offsets
        assert first < 0.5

        # The others keep waiting and answer empty after their wait_seconds.
        results = await asyncio.wait_for(asyncio.gather(*tasks), 90)
        empty = [r for r in results if not r[0]]
        assert len(empty) == n - woken
        durations = sorted(r[2] - r[1] for r in empty)
        print(
            f"{len(empty)} unanswered pulls returned empty after "
            f"{durations[0]:.1f}..{durations[-1]:.1f}s (wait_seconds={wait_seconds})"
        )
        assert durations[0] >= wait_seconds - 0.1
        total, _ = await _server_connections(fresh_db_url)
        assert total <= 12
