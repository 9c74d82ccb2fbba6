"""In-memory waiting room for long-polls: waiting pulls hold no database connection.

Each process has one LISTEN connection (storage.listener) that calls `notify` here. A
notification for a topic wakes, per subscription, as many waiters as messages arrived
(oldest waiter first), instead of stampeding every waiter at the pool. A waiter that then
fills its whole batch wakes the next one, since more may be left.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager


class Waiter:
    __slots__ = ("capacity", "event")

    def __init__(self, capacity: int = 1) -> None:
        self.event = asyncio.Event()
        self.capacity = capacity  # how many messages one claim of this waiter takes

    async def wait(self, seconds: float) -> bool:
        """True when woken, False when `seconds` passed first."""
        if seconds <= 0:
            return self.event.is_set()
        try:
            async with asyncio.timeout(seconds):
                await self.event.wait()
        except TimeoutError:
            return False
        return True


async def _relay(source: asyncio.Event, target: asyncio.Event) -> None:
    await source.wait()
    target.set()


class WaiterHub:
    def __init__(self) -> None:
        # Told when a topic gets its first waiter and loses its last: the listener declares
        # the process's interest in the topic's publishes (storage.listener).
        self.on_topic_waited: Callable[[int], None] | None = None
        self.on_topic_unwaited: Callable[[int], None] | None = None
        # topic_id -> subscription key -> waiters in arrival order
        self._waiters: dict[int, dict[str, OrderedDict[Waiter, None]]] = {}
        self.closing = False
        # Bumped on every notification: a pull compares it before and after registering
        # to know whether it may have missed one.
        self.notifications = 0
        self._rechecked: dict[tuple[int, str], float] = {}

    @asynccontextmanager
    async def waiting(
        self,
        topic_id: int,
        subscription: str,
        capacity: int = 1,
        client_gone: asyncio.Event | None = None,
    ) -> AsyncIterator[Waiter]:
        """Register a waiter; `client_gone` (set when the pull's client disconnects) wakes it
        too, so a long-poll nobody listens to any more ends at once."""
        waiter = Waiter(capacity)
        if self.closing:
            waiter.event.set()
        subscriptions = self._waiters.get(topic_id)
        if subscriptions is None:
            subscriptions = self._waiters[topic_id] = {}
            if self.on_topic_waited is not None:
                self.on_topic_waited(topic_id)
        queue = subscriptions.setdefault(subscription, OrderedDict())
        queue[waiter] = None
        relay = None
        if client_gone is not None:
            relay = asyncio.create_task(_relay(client_gone, waiter.event))
        try:
            yield waiter
        finally:
            if relay is not None:
                relay.cancel()
            queue.pop(waiter, None)
            if not queue:
                subs = self._waiters.get(topic_id)
                if subs is not None and subs.get(subscription) is queue:
                    del subs[subscription]
                    self._rechecked.pop((topic_id, subscription), None)
                    if not subs:
                        del self._waiters[topic_id]
                        if self.on_topic_unwaited is not None:
                            self.on_topic_unwaited(topic_id)

    def notify(self, topic_id: int, count: int) -> None:
        self.notifications += 1
        for queue in list(self._waiters.get(topic_id, {}).values()):
            self._wake(queue, count)

    def wake_next(self, topic_id: int, subscription: str) -> None:
        queue = self._waiters.get(topic_id, {}).get(subscription)
        if queue:
            self._wake(queue, 1)

    def wake_topics(self, topic_ids: frozenset[int]) -> None:
        """Every waiter of these topics claims again: publishes that did not notify may have
        committed before this process's interest was declared (storage.listener)."""
        self.notifications += 1
        for topic_id in topic_ids:
            for queue in list(self._waiters.get(topic_id, {}).values()):
                for waiter in queue:
                    waiter.event.set()

    def wake_all(self) -> None:
        self.wake_topics(frozenset(self._waiters))

    def close(self) -> None:
        """Shutdown: every waiting pull returns now with what it has."""
        self.closing = True
        self.wake_all()

    def waiting_count(self) -> int:
        return sum(len(q) for subs in self._waiters.values() for q in subs.values())

    def take_recheck(self, topic_id: int, subscription: str, interval: float) -> bool:
        """Whether this waiter should run the periodic safety re-check of the subscription:
        only if no other waiter of this process did within `interval`, so 1000 idle
        long-polls on one subscription re-check about once per interval, not 1000 times."""
        now = asyncio.get_running_loop().time()
        key = (topic_id, subscription)
        if now - self._rechecked.get(key, -interval) < interval:
            return False
        self._rechecked[key] = now
        return True

    @staticmethod
    def _wake(queue: OrderedDict[Waiter, None], count: int) -> None:
        """Wake the oldest waiters until their batches can take `count` messages."""
        room = 0
        for waiter in queue:
            if room >= count:
                break
            if not waiter.event.is_set():
                waiter.event.set()
                room += waiter.capacity
