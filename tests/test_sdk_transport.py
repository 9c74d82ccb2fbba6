"""The SDK over aiohttp (AsyncClient(transport="aiohttp"), the `aiohttp` extra) against a
real server: the same answers and errors as over httpx's own transport, a Worker draining
with failures and a Publisher whose batches are retried, and a server that is not there."""

from __future__ import annotations

import asyncio

import pytest

from tests.conftest import free_port, unique
from tests.sdk_support import sc, server  # noqa: F401 (the fixture)


async def test_operations_and_problem_errors_over_aiohttp(server):
    async with sc.AsyncClient(server.base_url, transport="aiohttp") as client:
        topic = unique("aio")
        await client.create_topic(topic)
        await client.create_subscription(topic, "s")
        results = await client.publish(topic, [{"value": {"n": n}} for n in range(5)])
        assert [r.offset for r in results] == [0, 1, 2, 3, 4]
        pulled = await client.pull(topic, "s", max_messages=10)
        assert [d.value for d in pulled.messages] == [{"n": n} for n in range(5)]
        acked = await client.ack(topic, "s", pulled.messages)
        assert acked.acked == 5
        with pytest.raises(sc.NotFound):
            await client.get_topic(unique("missing"))
        with pytest.raises(sc.NotFound):
            await client.pull(topic, unique("missing"))


async def test_a_server_that_is_not_there_fails_to_connect_over_aiohttp():
    async with sc.AsyncClient(
        f"http://127.0.0.1:{free_port()}", transport="aiohttp", timeout=5
    ) as client:
        with pytest.raises(sc.ConnectionFailed):
            await client.list_topics()


async def test_worker_and_publisher_over_aiohttp(server):
    topic = unique("aio")
    count = 600
    async with sc.AsyncClient(server.base_url, transport="aiohttp") as client:
        await client.create_topic(topic)
        await client.create_subscription(topic, "s", retry_min_seconds=1, retry_max_seconds=1)
        async with sc.Publisher(client, topic, linger_seconds=0.005) as publisher:
            futures = [await publisher.publish({"n": n}) for n in range(count)]
            offsets = await asyncio.gather(*futures)
        assert sorted(offsets) == list(range(count))
        done: set[int] = set()
        all_done = asyncio.Event()

        async def handler(delivery: sc.Delivery) -> None:
            n = delivery.value["n"]
            if n % 10 == 0 and delivery.delivery_attempt == 1:
                raise sc.Retry(0)  # each tenth message fails once
            done.add(n)
            if len(done) == count:
                all_done.set()

        worker = sc.Worker(
            client, topic, "s", handler, concurrency=50, wait_seconds=1, handle_signals=False
        )
        running = asyncio.create_task(worker.run())
        await asyncio.wait_for(all_done.wait(), 60)
        worker.stop()
        stats = await running
        assert stats.acked == count and stats.failed == count // 10
        assert (await client.get_subscription(topic, "s")).backlog == 0


def test_without_the_extra_the_error_says_what_to_install(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_httpx_aiohttp(name, *args, **kwargs):
        if name == "httpx_aiohttp":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_httpx_aiohttp)
    with pytest.raises(ImportError, match=r"sluice-client\[aiohttp\]"):
        sc.AsyncClient("http://127.0.0.1:1", transport="aiohttp")
