"""Publishing: group commit of concurrent requests, dedup, atomic batches.

Offsets are handed out under the topic's row lock until commit (storage.log), so on one
topic only one publish transaction makes progress at a time. To keep throughput high, each
process funnels the requests for a topic through a couple of writer tasks: whatever arrived
while a transaction was committing goes into the next one, and a second writer already
waits on the row lock so no time is lost between two commits. Each request stays atomic: if
a combined statement fails, its requests are retried one by one so only the faulty one
fails. The batching is only an optimisation; correctness lives in Postgres.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from sluice.errors import PayloadTooLarge, topic_not_found
from sluice.storage import log as log_sql
from sluice.storage import topics as topics_sql
from sluice.storage.log import NewMessage

log = logging.getLogger("sluice.publish")

# Upper bound of messages in one combined transaction.
MAX_GROUP_MESSAGES = 5000
# Writer tasks per topic and process: one commits while the next waits on the row lock.
WRITERS_PER_TOPIC = 2


class SkewSource(Protocol):
    skew: float


@dataclass(slots=True)
class Published:
    offset: int
    duplicate: bool


@dataclass(slots=True)
class _Request:
    messages: list[NewMessage]
    sizes: list[int]
    future: asyncio.Future[list[Published]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Publisher:
    def __init__(self, pool: asyncpg.Pool, clock: SkewSource) -> None:
        self._pool = pool
        self._clock = clock
        self._queues: dict[str, deque[_Request]] = {}
        self._writers: dict[str, int] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def publish(
        self, topic: str, messages: list[NewMessage], sizes: list[int]
    ) -> list[Published]:
        """Store the messages atomically; `sizes` are their byte sizes for the topic's
        max_message_bytes check."""
        request = _Request(messages, sizes)
        self._queues.setdefault(topic, deque()).append(request)
        if self._writers.get(topic, 0) < WRITERS_PER_TOPIC:
            self._writers[topic] = self._writers.get(topic, 0) + 1
            task = asyncio.create_task(self._drain(topic), name=f"sluice-publish-{topic}")
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await request.future

    async def _drain(self, topic: str) -> None:
        try:
            while self._queues.get(topic):
                group = self._take_group(topic)
                try:
                    await self._write_group(topic, group)
                except Exception as exc:
                    for request in group:
                        _settle(request, exc)
        finally:
            self._writers[topic] -= 1
            if not self._writers[topic]:
                del self._writers[topic]
                if not self._queues.get(topic):
                    self._queues.pop(topic, None)

    def _take_group(self, topic: str) -> list[_Request]:
        pending = self._queues[topic]
        group: list[_Request] = []
        total = 0
        while pending and (not group or total + len(pending[0].messages) <= MAX_GROUP_MESSAGES):
            request = pending.popleft()
            group.append(request)
            total += len(request.messages)
        return group

    async def _write_group(self, topic: str, group: list[_Request]) -> None:
        try:
            results = await self._write(topic, group)
        except Exception:
            if len(group) == 1:
                raise
            results = None
        if results is None:
            # Isolate the faulty request: each one alone, atomic on its own.
            for request in group:
                try:
                    single = await self._write(topic, [request])
                    if single is None:
                        raise await self._refusal(topic, request)
                except Exception as exc:
                    _settle(request, exc)
                else:
                    _settle(request, single[0])
            return
        for request, result in zip(group, results, strict=True):
            _settle(request, result)

    async def _refusal(self, topic: str, request: _Request) -> Exception:
        """Why the append found no topic row: gone, or a message above the size limit."""
        async with self._pool.acquire() as conn:
            row = await topics_sql.get_topic(conn, topic)
        if row is None:
            return topic_not_found(topic)
        limit = row["max_message_bytes"]
        index, size = max(enumerate(request.sizes), key=lambda item: item[1])
        return PayloadTooLarge(
            f"message {index} is {size} bytes; topic '{topic}' accepts at most {limit}"
        )

    async def _write(self, topic: str, group: list[_Request]) -> list[list[Published]] | None:
        """Write the group in one transaction; None when the topic refused it."""
        skew = self._clock.skew
        largest = max(size for request in group for size in request.sizes)
        has_dedup = any(m.dedup_id is not None for r in group for m in r.messages)
        async with self._pool.acquire() as conn:
            if not has_dedup:
                flat = [m for request in group for m in request.messages]
                base = await log_sql.append(conn, topic, flat, skew, largest)
                if base is None:
                    return None
                return _consecutive(base, group)
            async with conn.transaction():
                return await self._write_with_dedup(conn, topic, group, largest, skew)

    async def _write_with_dedup(
        self,
        conn: asyncpg.Connection,
        topic: str,
        group: list[_Request],
        largest: int,
        skew: float,
    ) -> list[list[Published]] | None:
        # Lock first, then look: a concurrent publish of the same dedup_id has either
        # committed (and is seen) or waits for us.
        locked = await log_sql.lock_topic(conn, topic)
        if locked is None or locked["max_message_bytes"] < largest:
            return None
        ids = list({m.dedup_id for r in group for m in r.messages if m.dedup_id is not None})
        seen = await log_sql.find_duplicates(
            conn, locked["topic_id"], ids, locked["dedup_window_seconds"], skew
        )
        fresh: list[NewMessage] = []
        first_in_group: dict[str, int] = {}
        # Per message: (index into `fresh`, True, duplicate?) when it is stored now or is a
        # repeat of a message stored now; (offset, False, True) for an earlier duplicate.
        plan: list[list[tuple[int, bool, bool]]] = []
        for request in group:
            entries: list[tuple[int, bool, bool]] = []
            for message in request.messages:
                dedup = message.dedup_id
                if dedup is not None and dedup in seen:
                    entries.append((seen[dedup], False, True))
                elif dedup is not None and dedup in first_in_group:
                    entries.append((first_in_group[dedup], True, True))
                else:
                    if dedup is not None:
                        first_in_group[dedup] = len(fresh)
                    entries.append((len(fresh), True, False))
                    fresh.append(message)
            plan.append(entries)
        base = 0
        if fresh:
            appended = await log_sql.append(conn, topic, fresh, skew, largest)
            if appended is None:
                return None
            base = appended
        return [
            [
                Published(base + value if is_fresh else value, duplicate)
                for value, is_fresh, duplicate in entries
            ]
            for entries in plan
        ]


def _settle(request: _Request, outcome: list[Published] | BaseException) -> None:
    """Answer a request unless its client went away (cancelled future)."""
    if request.future.done():
        return
    if isinstance(outcome, BaseException):
        request.future.set_exception(outcome)
    else:
        request.future.set_result(outcome)


def _consecutive(base: int, group: list[_Request]) -> list[list[Published]]:
    results: list[list[Published]] = []
    offset = base
    for request in group:
        results.append([Published(offset + i, False) for i in range(len(request.messages))])
        offset += len(request.messages)
    return results
