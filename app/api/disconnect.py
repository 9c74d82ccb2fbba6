"""Noticing that a long-poll's client has gone away (a proxy's idle timeout, a killed
worker): the pull stops waiting, and what it had claimed is given back at once instead of
being leased to nobody until the ack deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.types import Message, Receive


class DisconnectWatch:
    """Listens for the client's disconnect from the first call of `start()` on: a pull
    answered at once (messages were there) never starts listening, and costs neither the
    listener task nor the turns of the event loop its cancellation takes; it asks `gone()`
    once instead, which does not wait."""

    def __init__(self, request: Request) -> None:
        self._request = request
        self._gone = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Event:
        """The event set when the client disconnects. The request body has been read by
        then, so the next ASGI message is the disconnect (or the end of the response,
        after which nothing reads the event)."""
        if self._task is None:
            self._task = asyncio.create_task(self._listen(), name="sluice-disconnect-watch")
        return self._gone

    async def gone(self) -> bool:
        """Whether the client has gone away by now, without waiting for it: the body has
        been read, so the next ASGI message is the disconnect or nothing yet."""
        if not self._gone.is_set() and self._task is None:
            message = _ready_message(self._request.receive)
            if message is not None and message["type"] == "http.disconnect":
                self._gone.set()
        return self._gone.is_set()

    async def _listen(self) -> None:
        while (await self._request.receive())["type"] != "http.disconnect":
            pass
        self._gone.set()

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task


def _ready_message(receive: Receive) -> Message | None:
    """The next ASGI message if the server already has it, else None, without a turn of the
    event loop: receive() is run up to its first suspension and closed there if it would
    wait. Starlette's `Request.is_disconnected` gives the same answer by cancelling the
    wait through an anyio cancel scope, which costs two turns of the loop: on a busy server
    each turn waits for a whole loop's worth of other requests' work, and every long-poll
    answered at once took them (bench/RESULTS.md run 25). Closing the suspended receive()
    undoes its wait (the server's own Event.wait cleans up in its finally), as the
    cancellation would have."""
    step = receive()
    try:
        step.send(None)
    except StopIteration as done:
        return done.value  # type: ignore[no-any-return]
    step.close()
    return None


@contextlib.asynccontextmanager
async def watch_disconnect(
    request: Request, enabled: bool
) -> AsyncIterator[DisconnectWatch | None]:
    """A watch for the client's disconnect (None when not `enabled`): the queue layer asks
    it whether the client is gone when a pull is answered at once, and starts it when a
    pull has to wait."""
    if not enabled:
        yield None
        return
    watch = DisconnectWatch(request)
    try:
        yield watch
    finally:
        await watch.close()
