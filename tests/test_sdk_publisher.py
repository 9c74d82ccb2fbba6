"""sluice_client.Publisher against a real `sluice serve` process: batching, futures that
resolve to offsets, backpressure, and retries that never store a message twice."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime

import httpx
import pytest

from tests.conftest import unique
from tests.sdk_support import sc, server  # noqa: F401 (the fixture)


class CountingFlaky(httpx.AsyncBaseTransport):
    """Real HTTP, counting publish requests; `failures` lists what to do to the next publish
    requests: "503" (answered 503 without reaching the server), "lost" (forwarded and
    stored, then the answer is replaced by a read timeout), "reset" (connection error
    before sending)."""

    def __init__(self, failures: list[str] | None = None) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.failures = list(failures or [])
        self.publishes: list[int] = []  # messages per publish request

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/messages"):
            body = json.loads(request.content)
            self.publishes.append(len(body["messages"]))
            what = self.failures.pop(0) if self.failures else None
            if what == "503":
                return httpx.Response(
                    503,
                    json={
                        "type": "x",
                        "title": "Service unavailable",
                        "status": 503,
                        "detail": "x",
                    },
                    headers={"retry-after": "0"},
                )
            if what == "reset":
                raise httpx.ConnectError("reset", request=request)
            if what == "lost":
                response = await self.inner.handle_async_request(request)
                await response.aread()
                assert response.status_code == 201
                raise httpx.ReadTimeout("answer lost", request=request)
        return await self.inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self.inner.aclose()


async def stored_values(client: sc.AsyncClient, topic: str) -> list:
    return [m.value async for p in client.browse_pages(topic, limit=1000) for m in p.messages]


async def test_publisher_batches_and_futures_resolve_to_offsets(server):
    transport = CountingFlaky()
    async with sc.AsyncClient(server.base_url, transport=transport) as client:
        topic = unique("pub")
        await client.create_topic(topic)
        async with client.publisher(topic, linger_seconds=0.05) as pub:
            futures = [await pub.publish({"i": i}, key=f"k{i % 3}") for i in range(300)]
            offsets = await asyncio.gather(*futures)
        assert len(transport.publishes) < 10, transport.publishes  # 300 calls, few requests
        assert sum(transport.publishes) == 300
        assert offsets == sorted(offsets) and len(set(offsets)) == 300
        page = await client.browse(topic, limit=1000)
        assert {m.offset: m.value["i"] for m in page.messages} == {
            o: i for i, o in enumerate(offsets)
        }
        assert page.messages[0].key == "k0"
        # max_batch_messages caps a batch; flush() sends without waiting for the linger
        transport.publishes.clear()
        pub = sc.Publisher(client, topic, linger_seconds=10, max_batch_messages=40)
        futures = [await pub.publish(i) for i in range(100)]
        await pub.flush()
        assert all(f.done() for f in futures)
        assert max(transport.publishes) <= 40 and sum(transport.publishes) == 100
        await pub.close()
        with pytest.raises(RuntimeError):
            await pub.publish(1)


async def test_publisher_byte_limit_and_backpressure(server):
    async with sc.AsyncClient(server.base_url, transport=CountingFlaky()) as client:
        topic = unique("pub")
        await client.create_topic(topic)
        pub = sc.Publisher(
            client, topic, linger_seconds=0.01, max_batch_bytes=2_000, max_buffered=10
        )
        futures = []
        for i in range(60):
            futures.append(await pub.publish("x" * 300 + str(i)))
            assert pub.outstanding <= 10  # publish() waited for room
        await pub.close()
        offsets = [f.result() for f in futures]
        assert len(set(offsets)) == 60
        assert client._http._transport.publishes  # type: ignore[attr-defined]
        assert max(client._http._transport.publishes) <= 7  # ~2,000 bytes per request


@pytest.mark.parametrize("failures", [["lost", "lost"], ["503", "reset", "lost"]])
async def test_a_retried_batch_is_stored_once(server, failures):
    transport = CountingFlaky(failures)
    async with sc.AsyncClient(server.base_url, transport=transport) as client:
        topic = unique("pub")
        await client.create_topic(topic)
        async with sc.Publisher(client, topic, linger_seconds=0.05, retry_min_seconds=0.01) as pub:
            futures = [await pub.publish(i) for i in range(50)]
            futures.append(await pub.publish("mine", dedup_id="my-own-id"))
            offsets = await asyncio.gather(*futures)
        assert len(transport.publishes) == len(failures) + 1  # one batch, retried
        assert pub.batches_sent == 1 and pub.requests_sent == len(failures) + 1
        values = await stored_values(client, topic)
        assert values == [*range(50), "mine"]  # the lost answers stored it once
        assert len(set(offsets)) == 51
        assert (await client.get_topic(topic)).message_count == 51


async def test_a_refused_batch_fails_its_futures(server):
    async with sc.AsyncClient(server.base_url) as client:
        async with sc.Publisher(client, unique("missing"), linger_seconds=0.01) as pub:
            futures = [await pub.publish(i) for i in range(3)]
            await pub.flush()
        for f in futures:
            assert isinstance(f.exception(), sc.NotFound)


def test_sync_publisher_batches_from_plain_threads(server):
    topic = unique("pub")
    with sc.Client(server.base_url) as c:
        c.create_topic(topic)
        with sc.SyncPublisher(topic, base_url=server.base_url, linger_seconds=0.05) as pub:
            futures = [pub.publish({"i": i}) for i in range(200)]
            offsets = [f.result(timeout=10) for f in futures]
            assert pub.publisher.requests_sent < 10
            late = pub.publish("last")  # still buffered when close() flushes
        assert late.result(timeout=0) > max(offsets)
        assert len(set(offsets)) == 200
        assert c.get_topic(topic).message_count == 201
    with sc.SyncPublisher(unique("missing"), base_url=server.base_url) as pub:
        failed = pub.publish(1)
        pub.flush()
        assert isinstance(failed.exception(timeout=0), sc.NotFound)


class Overlap(CountingFlaky):
    """Counts how many publish requests were under way at once (at most)."""

    def __init__(self, failures: list[str] | None = None) -> None:
        super().__init__(failures)
        self.now = 0
        self.most = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.now += 1
        self.most = max(self.most, self.now)
        try:
            await asyncio.sleep(0.01)  # long enough for the next batch to start
            return await super().handle_async_request(request)
        finally:
            self.now -= 1


async def test_several_batches_in_flight_store_everything_once(server):
    transport = Overlap(failures=["lost", "503"])
    async with sc.AsyncClient(server.base_url, transport=transport) as client:
        topic = unique("pubconc")
        await client.create_topic(topic)
        publisher = sc.Publisher(
            client,
            topic,
            linger_seconds=0.001,
            max_batch_messages=100,
            max_in_flight_batches=4,
            retry_min_seconds=0.01,
        )
        futures = [await publisher.publish(i) for i in range(3000)]
        await publisher.close()
        offsets = [f.result() for f in futures]
        stored = await stored_values(client, topic)
    assert transport.most == 4  # never more than asked, and really concurrent
    assert len(set(offsets)) == 3000
    # The lost answer and the 503 were retried: each message stored exactly once.
    assert sorted(stored) == list(range(3000))
    assert publisher.requests_sent == publisher.batches_sent + 2
    with pytest.raises(ValueError):
        sc.Publisher(client, topic, max_in_flight_batches=0)


class SlowFirstPublish(httpx.AsyncHTTPTransport):
    """Real HTTP; the first publish request is held back 0.3 s before it is sent, so a
    batch sent after it and not waiting for it is stored first."""

    def __init__(self) -> None:
        super().__init__()
        self.publishes = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/messages"):
            self.publishes += 1
            if self.publishes == 1:
                await asyncio.sleep(0.3)
        return await super().handle_async_request(request)


@pytest.mark.parametrize("in_flight", [4, 1])
async def test_a_key_keeps_its_order_while_other_batches_overtake(server, in_flight):
    """Batches of 10: key a, no key, key a, key b. The first is held back. With several
    batches in flight (the default), the keyless one is stored before it, the second batch
    of key a after it; with one in flight, everything is stored in publish order."""
    async with sc.AsyncClient(server.base_url, transport=SlowFirstPublish()) as client:
        topic = unique("pubkeys")
        await client.create_topic(topic)
        publisher = sc.Publisher(
            client,
            topic,
            linger_seconds=0.001,
            max_batch_messages=10,
            max_in_flight_batches=in_flight,
        )
        keys = ["a"] * 10 + [None] * 10 + ["a"] * 10 + ["b"] * 10
        futures = [await publisher.publish(i, key=key) for i, key in enumerate(keys)]
        await publisher.close()
        offsets = [f.result() for f in futures]
    of_a = [offset for offset, key in zip(offsets, keys, strict=True) if key == "a"]
    assert of_a == sorted(of_a)
    if in_flight == 1:
        assert offsets == sorted(offsets)
    else:
        assert max(offsets[10:20]) < min(offsets[0:10])  # the keyless batch overtook


@pytest.mark.parametrize("with_orjson", [True, False])
def test_messages_encode_as_json_would_and_refuse_what_json_refuses(monkeypatch, with_orjson):
    from sluice_client import _publisher

    if not with_orjson:
        monkeypatch.setattr(_publisher, "orjson", None)
    elif _publisher.orjson is None:
        pytest.skip("orjson is not installed")
    for value in ({"a": 1, "b": None, "c": "é", "d": [1.5, True]}, "x" * 2000, {1: "int key"}):
        expected = json.loads(json.dumps({"value": value}))
        assert json.loads(_publisher._encode({"value": value})) == expected
    for bad in (float("nan"), [float("inf")], datetime.now(UTC)):
        with pytest.raises((ValueError, TypeError)):
            _publisher._encode({"value": bad})
