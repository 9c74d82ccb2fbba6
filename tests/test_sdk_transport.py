"""AsyncClient's transports against a real server: over aiohttp (httpx-aiohttp, the
default when installed) and over httpx's own, the same answers and errors, a Worker
draining with failures and a Publisher whose batches are retried, a server that is not
there; proxies from the environment and cookies as httpx keeps them."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import pytest

from tests.conftest import ROOT, free_port, unique
from tests.sdk_support import sc, server  # noqa: F401 (the fixture)

TRANSPORTS = pytest.mark.parametrize("transport", ["aiohttp", "httpx"])


@TRANSPORTS
async def test_operations_and_problem_errors(server, transport):
    async with sc.AsyncClient(server.base_url, transport=transport) as client:
        assert client.transport_name == transport
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


@TRANSPORTS
async def test_a_server_that_is_not_there_fails_to_connect(transport):
    async with sc.AsyncClient(
        f"http://127.0.0.1:{free_port()}", transport=transport, timeout=5
    ) as client:
        with pytest.raises(sc.ConnectionFailed):
            await client.list_topics()


@TRANSPORTS
async def test_worker_and_publisher(server, transport):
    topic = unique("aio")
    count = 600
    async with sc.AsyncClient(server.base_url, transport=transport) as client:
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
    # The default then is httpx's own transport.
    assert sc.AsyncClient("http://127.0.0.1:1").transport_name == "httpx"


def test_the_default_transport_is_aiohttp_when_it_is_installed():
    assert sc.AsyncClient("http://127.0.0.1:1").transport_name == "aiohttp"
    assert sc.AsyncClient("http://127.0.0.1:1", transport="httpx").transport_name == "httpx"
    with pytest.raises(ValueError, match="transport"):
        sc.AsyncClient("http://127.0.0.1:1", transport="curl")  # type: ignore[arg-type]


# ---- AsyncClient's requests straight to the transport ------------------------------------


@TRANSPORTS
async def test_async_requests_go_through_the_proxy_httpx_takes_from_the_environment(
    monkeypatch, transport
):
    """AsyncClient hands a request to the transport httpx picks for its URL (not through
    `AsyncClient.send`): a proxy set in the environment still carries it, with the
    client's headers."""
    seen: list[bytes] = []

    async def proxy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        length = next(
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        )
        seen.append(head + await reader.readexactly(length))
        body = b'{"messages": []}'
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(proxy, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    for name in ("NO_PROXY", "no_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", f"http://127.0.0.1:{port}")
    try:
        async with sc.AsyncClient(
            "http://sluice.invalid:8000", api_key="k1", transport=transport
        ) as client:

            async def not_by_send(*args, **kwargs):
                raise AssertionError("went through AsyncClient.send")

            monkeypatch.setattr(client._http, "send", not_by_send)
            result = await client.pull("t", "s", max_messages=5, ack=["r1"])
    finally:
        listener.close()
        await listener.wait_closed()
    assert result.messages == [] and len(seen) == 1
    head, _, body = seen[0].partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST http://sluice.invalid:8000/v1/topics/t/subscriptions/s/pull HTTP/1.1"
    headers = dict(line.lower().split(": ", 1) for line in lines[1:])
    assert headers["authorization"] == "bearer k1"
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("sluice-client/")
    assert b'"ack":["r1"]' in body.replace(b" ", b"")


async def test_a_cookie_the_server_sets_is_sent_back_as_httpx_would():
    """A load balancer's sticky-session cookie: kept from the answer that set it and sent
    with every later request, as `AsyncClient.send` does."""
    cookies_seen: list[str | None] = []

    async def app(scope, receive, send):
        assert scope["type"] == "http"
        while (await receive()).get("more_body"):
            pass
        headers = dict(scope["headers"])
        cookies_seen.append(headers.get(b"cookie", b"").decode() or None)
        extra = [] if b"cookie" in headers else [(b"set-cookie", b"lb=node-2; Path=/")]
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json"), *extra],
            }
        )
        await send({"type": "http.response.body", "body": b'{"messages": []}'})

    async with sc.AsyncClient("http://sluice.test", transport=httpx.ASGITransport(app)) as client:
        for _ in range(3):
            await client.pull("t", "s")
    assert cookies_seen == [None, "lb=node-2", "lb=node-2"]


@TRANSPORTS
async def test_an_answer_that_is_not_http_is_a_connection_failure(transport):
    """Whatever the transport raises when no usable answer came (httpx: a protocol error;
    aiohttp: errors httpx-aiohttp leaves unmapped) is ConnectionFailed, which a Worker
    and a Publisher retry, never a bare library exception."""

    async def not_http(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"SPDY/9 what\r\n\r\n")
        await writer.drain()
        writer.close()

    listener = await asyncio.start_server(not_http, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        async with sc.AsyncClient(
            f"http://127.0.0.1:{port}", transport=transport, timeout=5
        ) as client:
            with pytest.raises(sc.ConnectionFailed):
                await client.pull("t", "s")  # straight to the transport
            with pytest.raises(sc.ConnectionFailed):
                await client.list_topics()  # by httpx's send (query parameters)
    finally:
        listener.close()
        await listener.wait_closed()


def test_importing_the_client_leaves_aiohttp_unloaded():
    """The CLI and the sync Client never use aiohttp; loading it with the package would
    add ~85 ms to the start of every command."""
    code = "import sys, sluice_client; sluice_client.Client(); print('aiohttp' in sys.modules)"
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT / "clients" / "python",
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "False", out
