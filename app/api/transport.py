"""uvicorn's httptools protocol with the writes of one turn of the event loop sent together.

uvicorn writes a response in two calls to its transport, the status line and headers, then
the body; uvloop sends each at once, so every response cost two write(2) calls and two TCP
segments. In a profile of single-message publishes under wrk those two writes were a fifth
of the server's CPU (bench/RESULTS.md run 34). Here the connection's transport keeps what
is written until the callbacks ready in this turn of the loop have run, then sends it in one
call (`writelines`: one vectored write, no copy of a large body). A response is therefore
one write; an idle server still sends each response in the turn that made it. `close()`
sends what is kept first, so a `Connection: close` answer is not cut off, and once what is
kept reaches SEND_AT bytes it goes out at once: a large body is not held back for the end of
the turn, and the real transport's flow control (uvicorn pauses a response while the
socket's buffer is full) sees every byte as it would without this.
"""

from __future__ import annotations

import asyncio
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# What is kept goes out at once from this size on (a response's head and a small body are
# far below it).
SEND_AT = 64 * 1024


class TurnBatchedTransport:
    """A transport whose `write` calls of one loop turn go out as one `writelines` call.
    Everything else is the wrapped transport's (flow control, extra info, reading)."""

    __slots__ = ("_flush_scheduled", "_kept", "_loop", "_pending", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._pending: list[bytes] = []
        self._kept = 0  # bytes in _pending
        self._flush_scheduled = False

    def write(self, data: bytes) -> None:
        if not data:
            return
        self._pending.append(data)
        self._kept += len(data)
        if self._kept >= SEND_AT:
            self._send()
        elif not self._flush_scheduled:
            self._flush_scheduled = True
            self._loop.call_soon(self._end_of_turn)

    def writelines(self, chunks: Any) -> None:
        for chunk in chunks:
            self.write(chunk)

    def _end_of_turn(self) -> None:
        self._flush_scheduled = False
        self._send()

    def _send(self) -> None:
        pending = self._pending
        if not pending:
            return
        self._pending = []
        self._kept = 0
        if self._transport.is_closing():
            return  # the connection is gone: the real transport would drop the bytes too
        if len(pending) == 1:
            self._transport.write(pending[0])
        else:
            self._transport.writelines(pending)

    def close(self) -> None:
        self._send()
        self._transport.close()

    def write_eof(self) -> None:
        self._send()
        self._transport.write_eof()

    def get_write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() + self._kept

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)


class TurnBatchedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol on a `TurnBatchedTransport` (`uvicorn.run(http=...)`)."""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        # (uvloop's transports are not asyncio.Transport subclasses: no isinstance check.)
        wrapped: Any = TurnBatchedTransport(transport, self.loop)
        super().connection_made(wrapped)


# What `uvicorn.run(http=...)` is given: a name, which worker processes import themselves.
UVICORN_HTTP = "sluice.api.transport:TurnBatchedHttpToolsProtocol"
