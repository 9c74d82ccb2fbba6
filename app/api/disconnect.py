"""Noticing that a long-poll's client has gone away (a proxy's idle timeout, a killed
worker): the pull stops waiting, and what it had claimed is given back at once instead of
being leased to nobody until the ack deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from starlette.requests import Request


class DisconnectWatch:
    """Listens for the client's disconnect from the first call of `start()` on: a pull
    answered at once (messages were there) never starts listening, and costs neither the
    listener task nor the turns of the event loop its cancellation takes."""

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
) -> AsyncIterator[Callable[[], asyncio.Event] | None]:
    """A callable that starts watching for the client's disconnect and returns the event
    set then (None when not `enabled`): the queue layer calls it once a pull has to wait."""
    if not enabled:
        yield None
        return
    watch = DisconnectWatch(request)
    try:
        yield watch.start
    finally:
        await watch.close()
