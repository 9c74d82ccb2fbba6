"""The one LISTEN connection of a process.

It hands every notification to a callback (the waiter hub). Notifications are hints: when
the connection dies (Postgres restart, network) we reconnect with backoff and tell the hub
to wake everybody, since notifications may have been lost meanwhile. A periodic keepalive
query detects a silently dead connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

import asyncpg

from sluice.storage.db import plain_url
from sluice.storage.log import NOTIFY_CHANNEL
from sluice.storage.outbox import OUTBOX_PAYLOAD

log = logging.getLogger("sluice.listener")


class Listener:
    def __init__(
        self,
        url: str,
        on_notify: Callable[[int, int], None],
        on_reconnect: Callable[[], None],
        keepalive_seconds: float = 5.0,
        on_outbox: Callable[[], None] | None = None,
    ) -> None:
        self._url = plain_url(url)
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._on_outbox = on_outbox
        self._keepalive = keepalive_seconds
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sluice-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def _dispatch(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        if payload == OUTBOX_PAYLOAD:
            if self._on_outbox is not None:
                self._on_outbox()
            return
        topic, _, count = payload.partition(":")
        try:
            self._on_notify(int(topic), int(count or 1))
        except ValueError:
            log.warning("ignoring malformed notification", extra={"payload": payload[:100]})

    async def _run(self) -> None:
        delay = 0.1
        first = True
        while True:
            conn: asyncpg.Connection | None = None
            # Set by asyncpg as soon as the connection drops (e.g. Postgres shut down): do
            # not wait for the next keepalive to notice, or /readyz says "ready" and
            # notifications are lost for up to a keepalive period after a restart.
            closed = asyncio.Event()
            try:
                conn = await asyncpg.connect(self._url, timeout=5)
                conn.add_termination_listener(lambda _conn, closed=closed: closed.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._dispatch)
                self.connected.set()
                if not first:
                    log.info("listen connection re-established")
                    self._on_reconnect()
                first = False
                delay = 0.1
                while True:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(closed.wait(), self._keepalive)
                    if closed.is_set():
                        raise ConnectionError("listen connection closed")
                    await conn.fetchval("SELECT 1", timeout=self._keepalive)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # any failure means: reconnect
                self.connected.clear()
                log.warning("listen connection lost", extra={"error": repr(exc)[:200]})
                self._on_reconnect()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
                first = False
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)
