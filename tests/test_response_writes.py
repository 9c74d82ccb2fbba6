"""Each response leaves the server in one write (app.api.transport): uvicorn writes the status
line and headers, then the body, and the connection's transport sends what one turn of the
event loop wrote in one call."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import uvicorn

from sluice.api.transport import (
    SEND_AT,
    UVICORN_HTTP,
    TurnBatchedHttpToolsProtocol,
    TurnBatchedTransport,
)


class RecordingTransport:
    """The calls a transport gets, each write / writelines call as one entry."""

    def __init__(self) -> None:
        self.calls: list[bytes] = []
        self.closed = False
        self.extra: dict[str, Any] = {}

    def write(self, data: bytes) -> None:
        assert not self.closed
        self.calls.append(bytes(data))

    def writelines(self, chunks: list[bytes]) -> None:
        assert not self.closed
        self.calls.append(b"".join(chunks))

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.extra.get(name, default)


async def test_the_writes_of_one_turn_go_out_in_one_call_in_order() -> None:
    real = RecordingTransport()
    transport = TurnBatchedTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    transport.write(b"")
    transport.writelines([b"hello", b" world"])
    assert real.calls == []
    assert transport.get_write_buffer_size() == len(b"HTTP/1.1 200 OK\r\n\r\nhello world")
    await asyncio.sleep(0)
    assert real.calls == [b"HTTP/1.1 200 OK\r\n\r\nhello world"]
    transport.write(b"next")
    await asyncio.sleep(0)
    assert real.calls[1:] == [b"next"]
    await asyncio.sleep(0)
    assert len(real.calls) == 2  # nothing kept: no empty write


async def test_close_sends_what_was_kept_first_and_a_closed_connection_gets_nothing() -> None:
    real = RecordingTransport()
    transport = TurnBatchedTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n")
    transport.close()
    assert real.calls == [b"HTTP/1.1 400 Bad Request\r\nconnection: close\r\n\r\n"]
    assert real.closed
    await asyncio.sleep(0)  # the scheduled send finds nothing left
    assert len(real.calls) == 1

    gone = RecordingTransport()
    transport = TurnBatchedTransport(gone, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"late")
    gone.closed = True  # the client went away before the turn ended
    await asyncio.sleep(0)
    assert gone.calls == []


async def test_a_large_write_goes_out_at_once_so_flow_control_sees_it() -> None:
    real = RecordingTransport()
    transport = TurnBatchedTransport(real, asyncio.get_running_loop())  # type: ignore[arg-type]
    transport.write(b"HTTP/1.1 200 OK\r\n\r\n")
    body = b"x" * SEND_AT
    transport.write(body)
    assert real.calls == [b"HTTP/1.1 200 OK\r\n\r\n" + body]  # before the turn ends
    assert transport.get_write_buffer_size() == 0
    transport.write(b"tail")
    await asyncio.sleep(0)
    assert real.calls[1:] == [b"tail"]


async def _app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        message = await receive()
        await send({"type": "lifespan.shutdown.complete"})
        return
    size = int(scope["path"].strip("/") or 5)
    if scope["method"] == "POST":  # the request body first (an Expect: 100-continue waits)
        message = await receive()
        size = len(message["body"])
    body = b"x" * size
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def test_a_response_is_one_write_on_the_connection() -> None:
    config = uvicorn.Config(_app, http=TurnBatchedHttpToolsProtocol, lifespan="off")
    config.load()
    protocol = TurnBatchedHttpToolsProtocol(config, uvicorn.server.ServerState(), app_state={})
    real = RecordingTransport()
    real.extra["sockname"] = ("127.0.0.1", 8000)
    real.extra["peername"] = ("127.0.0.1", 50000)
    protocol.connection_made(real)  # type: ignore[arg-type]
    protocol.data_received(b"GET /11 HTTP/1.1\r\nhost: test\r\n\r\n")
    for _ in range(20):
        await asyncio.sleep(0)
    assert len(real.calls) == 1
    head, _, body = real.calls[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK")
    assert body == b"x" * 11
    protocol.connection_lost(None)


@contextlib.asynccontextmanager
async def _served() -> AsyncIterator[int]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    config = uvicorn.Config(
        _app,
        host="127.0.0.1",
        port=port,
        http=TurnBatchedHttpToolsProtocol,
        lifespan="off",
        log_level="warning",
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    try:
        yield port
    finally:
        server.should_exit = True
        await task


def _content_length(head: bytes) -> int:
    return next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )


async def _read_response(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    return head, await reader.readexactly(_content_length(head))


async def test_keep_alive_pipelining_large_bodies_continue_and_close_over_a_socket() -> None:
    async with _served() as port:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        # Two requests in one segment, then a body far above the transport's buffer limits
        # (flow control pauses the writes), a request that waits for "100 Continue", then
        # one that closes the connection.
        writer.write(b"GET /3 HTTP/1.1\r\nhost: t\r\n\r\nGET /4 HTTP/1.1\r\nhost: t\r\n\r\n")
        assert (await _read_response(reader))[1] == b"xxx"
        assert (await _read_response(reader))[1] == b"xxxx"
        big = 4 * 1024 * 1024
        writer.write(f"GET /{big} HTTP/1.1\r\nhost: t\r\n\r\n".encode())
        assert (await _read_response(reader))[1] == b"x" * big
        # A client that waits for "100 Continue" before it sends the body gets it.
        writer.write(
            b"POST /0 HTTP/1.1\r\nhost: t\r\ncontent-length: 6\r\nexpect: 100-continue\r\n\r\n"
        )
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"abcdef")
        assert (await _read_response(reader))[1] == b"x" * 6
        writer.write(b"GET /7 HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
        head, body = await _read_response(reader)
        assert b"connection: close" in head.lower() and body == b"x" * 7
        assert await reader.read() == b""  # the server closed it after sending everything
        writer.close()


def _write_calls(pid: int) -> int:
    for line in Path(f"/proc/{pid}/io").read_text().splitlines():
        if line.startswith("syscw:"):
            return int(line.split()[1])
    raise AssertionError("no syscw in /proc/PID/io")


def test_sluice_serve_sends_each_response_in_one_write(server_factory: Any) -> None:
    """`sluice serve` runs the protocol: a request answered without the database (and without
    a log line, at WARNING) costs the server one write call, not two."""
    server = server_factory()
    requests = 200
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        stream = conn.makefile("rb")

        def get() -> None:
            conn.sendall(b"GET /healthz HTTP/1.1\r\nhost: t\r\n\r\n")
            head = b""
            while not head.endswith(b"\r\n\r\n"):
                head += stream.readline()
            length = _content_length(head)
            assert head.startswith(b"HTTP/1.1 200") and len(stream.read(length)) == length

        get()  # warm: the first request's imports and caches
        before = _write_calls(server.proc.pid)
        for _ in range(requests):
            get()
        writes = _write_calls(server.proc.pid) - before
    # One per response; a little room for the server's own background writes (Postgres).
    assert requests <= writes < 1.25 * requests, writes


def test_the_protocol_name_given_to_uvicorn_imports() -> None:
    """`sluice serve` names the protocol (worker processes import it by that name)."""
    from uvicorn.importer import import_from_string

    assert import_from_string(UVICORN_HTTP) is TurnBatchedHttpToolsProtocol
    assert "http=UVICORN_HTTP" in (Path(__file__).parents[1] / "app" / "cli.py").read_text()
