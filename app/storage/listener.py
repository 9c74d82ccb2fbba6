"""The one LISTEN connection of a process, and the topics it declares waiters for.

It hands every notification to a callback (the waiter hub). Notifications are hints: when
the connection dies (Postgres restart, network) we reconnect with backoff and tell the hub
to wake everybody, since notifications may have been lost meanwhile. A periodic keepalive
query detects a silently dead connection, and no query of it may take longer than
QUERY_TIMEOUT_SECONDS (a connection that neither answers nor closes would hold it for good).

A publish notifies only when some process declares that it has a long-poll waiting for the
topic (revision 0010): the connection holds a session-level shared advisory lock on the
topic's bucket while this process has waiters there, and for `linger_seconds` after the
last one left, so a consumer that long-polls again and again does not take and give back
the lock on every pull. A publish that finds the key free takes it until its commit and does
not notify; asking for the key then waits for that commit. So once the key is held, every
publish either has notified or is visible to a claim that starts now: `on_interest` is
called then with the bucket's waited topics, whose waiters the hub wakes to claim again.

The relay declares in the same way that it waits for the SQL API's writes (revision 0011),
with one key for the whole cluster taken exclusively and without waiting: an application's
commit takes it shared, so it is free only between commits, and a process that finds it
taken tries again later (another process may hold it, which serves everybody: the
notification reaches every listener). `on_outbox_declared` is called once it is held.
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

# The advisory lock class and bucket count of sluice.append_messages (revision 0010).
INTEREST_LOCK_CLASS = 1397511171
INTEREST_BUCKETS = 256
DECLARE_INTEREST = "SELECT pg_advisory_lock_shared($1, $2)"
WITHDRAW_INTEREST = "SELECT pg_advisory_unlock_shared($1, $2)"
# How long declaring interest may wait for a publish of the bucket to commit before it is
# tried again later (notifications to this connection wait meanwhile).
INTEREST_LOCK_TIMEOUT = "50ms"
INTEREST_RETRY_SECONDS = 0.05
# The relays' key (sluice.outbox_committing, revision 0011): at most one process holds it.
OUTBOX_LOCK_CLASS = 1397511172
DECLARE_OUTBOX = "SELECT pg_try_advisory_lock($1, 0)"
WITHDRAW_OUTBOX = "SELECT pg_advisory_unlock($1, 0)"
OUTBOX_RETRY_SECONDS = (0.02, 1.0)  # first and longest wait before trying the key again
# How long any query of this connection may take before the connection counts as dead and is
# replaced: a backend that stops answering (a stopped host, a network dropping packets
# without a reset) would otherwise hold the listener in that query for good, so that no
# keepalive runs and nothing declares the topics waited for.
QUERY_TIMEOUT_SECONDS = 5.0


def interest_bucket(topic_id: int) -> int:
    """The bucket of a topic's advisory key, as sluice.append_messages computes it."""
    return topic_id % INTEREST_BUCKETS


class Listener:
    def __init__(
        self,
        url: str,
        on_notify: Callable[[int, int], None],
        on_reconnect: Callable[[], None],
        keepalive_seconds: float = 5.0,
        on_outbox: Callable[[], None] | None = None,
        on_interest: Callable[[frozenset[int]], None] | None = None,
        linger_seconds: float = 30.0,
        on_outbox_declared: Callable[[], None] | None = None,
    ) -> None:
        self._url = plain_url(url)
        self._on_notify = on_notify
        self._on_reconnect = on_reconnect
        self._on_outbox = on_outbox
        self._on_interest = on_interest
        self._keepalive = keepalive_seconds
        self._linger = linger_seconds
        self._task: asyncio.Task[None] | None = None
        self.connected = asyncio.Event()
        # The backend of the current connection (pg_stat_activity.pid), for operators and tests.
        self.backend_pid: int | None = None
        # bucket -> topics of this process with waiters there
        self._waiting: dict[int, set[int]] = {}
        # bucket -> loop time its last waiter left (its key is given back `linger` later)
        self._idle_since: dict[int, float] = {}
        self._held: set[int] = set()  # buckets whose key this connection holds
        self._retry_at = 0.0  # when to try again to declare what a lock timeout refused
        self._changed = asyncio.Event()
        self._on_outbox_declared = on_outbox_declared
        self._outbox_wanted = False
        self.outbox_declared = False  # this connection holds the relays' key
        self._outbox_retry_at = 0.0
        self._outbox_backoff = OUTBOX_RETRY_SECONDS[0]

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="sluice-listener")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    def topic_waited(self, topic_id: int) -> None:
        """The hub's first waiter for a topic arrived."""
        bucket = interest_bucket(topic_id)
        self._waiting.setdefault(bucket, set()).add(topic_id)
        self._idle_since.pop(bucket, None)
        if bucket not in self._held:
            self._changed.set()

    def topic_unwaited(self, topic_id: int) -> None:
        """The hub's last waiter for a topic left."""
        bucket = interest_bucket(topic_id)
        topics = self._waiting.get(bucket)
        if topics is None:
            return
        topics.discard(topic_id)
        if not topics:
            del self._waiting[bucket]
            self._idle_since[bucket] = asyncio.get_running_loop().time()
            self._changed.set()

    def want_outbox(self, wanted: bool) -> None:
        """The relay has found the outbox empty for a while (True) or has work (False)."""
        if wanted == self._outbox_wanted:
            return
        self._outbox_wanted = wanted
        self._outbox_retry_at = 0.0
        self._outbox_backoff = OUTBOX_RETRY_SECONDS[0]
        self._changed.set()

    def declared(self) -> frozenset[int]:
        """The buckets whose key this process holds now."""
        return frozenset(self._held)

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

            def on_close(_conn: object, closed: asyncio.Event = closed) -> None:
                closed.set()
                self._changed.set()

            try:
                conn = await asyncpg.connect(
                    self._url,
                    timeout=5,
                    server_settings={"lock_timeout": INTEREST_LOCK_TIMEOUT},
                    # Every query of it, LISTEN included, unless it names its own timeout.
                    command_timeout=QUERY_TIMEOUT_SECONDS,
                )
                conn.add_termination_listener(on_close)
                self.backend_pid = conn.get_server_pid()
                await conn.add_listener(NOTIFY_CHANNEL, self._dispatch)
                self.connected.set()
                if not first:
                    log.info(
                        "listen connection re-established",
                        extra={"backend_pid": self.backend_pid},
                    )
                    self._on_reconnect()
                first = False
                delay = 0.1
                await self._serve(conn, closed)
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
                # The session's locks end with it: the next connection declares again.
                self._held.clear()
                self._retry_at = 0.0
                self.outbox_declared = False
                self._outbox_retry_at = 0.0
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(conn.close(), 2)

    async def _serve(self, conn: asyncpg.Connection, closed: asyncio.Event) -> None:
        """Keep the connection alive and its declared buckets in step with the waiters."""
        loop = asyncio.get_running_loop()
        last_query = loop.time()
        while True:
            await self._reconcile(conn)
            if closed.is_set():
                raise ConnectionError("listen connection closed")
            now = loop.time()
            wake_at = last_query + self._keepalive
            for since in self._idle_since.values():
                wake_at = min(wake_at, since + self._linger)
            if self._retry_at > now:
                wake_at = min(wake_at, self._retry_at)
            if self._outbox_wanted and not self.outbox_declared:
                wake_at = min(wake_at, self._outbox_retry_at)
            self._changed.clear()
            if not self._pending(now):
                # asyncio.timeout, not wait_for: see Relay.run.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(max(0.0, wake_at - now)):
                        await self._changed.wait()
            if closed.is_set():
                raise ConnectionError("listen connection closed")
            if loop.time() >= last_query + self._keepalive:
                await conn.fetchval("SELECT 1", timeout=self._keepalive)
                last_query = loop.time()

    def _pending(self, now: float) -> bool:
        """Whether `_reconcile` has something to do now."""
        if now >= self._retry_at and any(b not in self._held for b in self._waiting):
            return True
        if self._outbox_wanted != self.outbox_declared and (
            not self._outbox_wanted or now >= self._outbox_retry_at
        ):
            return True
        return any(now >= since + self._linger for since in self._idle_since.values())

    async def _reconcile(self, conn: asyncpg.Connection) -> None:
        await self._reconcile_outbox(conn)
        now = asyncio.get_running_loop().time()
        for bucket, since in list(self._idle_since.items()):
            if now < since + self._linger or bucket in self._waiting:
                continue
            del self._idle_since[bucket]
            if bucket in self._held:
                await conn.fetchval(WITHDRAW_INTEREST, INTEREST_LOCK_CLASS, bucket)
                self._held.discard(bucket)
        if now < self._retry_at:
            return
        for bucket in [b for b in self._waiting if b not in self._held]:
            try:
                await conn.fetchval(DECLARE_INTEREST, INTEREST_LOCK_CLASS, bucket)
            except asyncpg.LockNotAvailableError:
                # A publish of the bucket is still committing (or an unusually long relay
                # pass): its waiters re-check when the key is ours, a moment later.
                self._retry_at = asyncio.get_running_loop().time() + INTEREST_RETRY_SECONDS
                return
            self._held.add(bucket)
            topics = self._waiting.get(bucket)
            if topics and self._on_interest is not None:
                self._on_interest(frozenset(topics))

    async def _reconcile_outbox(self, conn: asyncpg.Connection) -> None:
        if not self._outbox_wanted:
            if self.outbox_declared:
                await conn.fetchval(WITHDRAW_OUTBOX, OUTBOX_LOCK_CLASS)
                self.outbox_declared = False
            return
        now = asyncio.get_running_loop().time()
        if self.outbox_declared or now < self._outbox_retry_at:
            return
        if await conn.fetchval(DECLARE_OUTBOX, OUTBOX_LOCK_CLASS):
            self.outbox_declared = True
            self._outbox_backoff = OUTBOX_RETRY_SECONDS[0]
            if self._on_outbox_declared is not None:
                self._on_outbox_declared()  # one more pass: a commit may have skipped notifying
            return
        # An application's commit holds it shared (a moment), or another process holds it.
        self._outbox_retry_at = now + self._outbox_backoff
        self._outbox_backoff = min(self._outbox_backoff * 2, OUTBOX_RETRY_SECONDS[1])
