"""Noticing that a long-poll's client has gone away (a proxy's idle timeout, a killed
worker): the pull stops waiting, and what it had claimed is given back at once instead of
being leased to nobody until the ack deadline."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from starlette.requests import Request


@contextlib.asynccontextmanager
async def watch_disconnect(request: Request, enabled: bool) -> AsyncIterator[asyncio.Event | None]:
    """An event set when the client disconnects (None when not `enabled`). The request body
    has been read by then, so the next ASGI message is the disconnect (or the end of the
    response, after which nothing reads the event)."""
    if not enabled:
        yield None
        return
    gone = asyncio.Event()

    async def listen() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        gone.set()

    task = asyncio.create_task(listen(), name="sluice-disconnect-watch")
    try:
        yield gone
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
