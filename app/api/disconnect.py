"""Noticing that a long-poll's client has gone away (a proxy's idle timeout, a killed
worker): the pull stops waiting, and what it had claimed is given back at once instead of
being leased to nobody until the ack deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request


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
        """Whether the client has gone away by now, without waiting for it (Starlette's
        non-blocking look at the next ASGI message: the body has been read, so it is the
        disconnect or nothing yet)."""
        if not self._gone.is_set() and self._task is None and await self._request.is_disconnected():
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
