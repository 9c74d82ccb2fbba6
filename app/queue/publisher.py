"""Publishing: group commit of concurrent requests, dedup, atomic batches.

Offsets are handed out under the topic's row lock until commit (storage.log), so on one
topic only one publish transaction makes progress at a time. To keep throughput high, each
process funnels the requests for a topic through one writer task: whatever arrived while
the previous transaction was committing goes into the next one. Each request is still
atomic: if a combined transaction fails, its requests are retried one by one so only the
faulty one fails. The batching is only an optimisation; correctness lives in Postgres.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

import asyncpg

from app.errors import topic_not_found
from app.storage import log as log_sql
from app.storage.log import NewMessage

log = logging.getLogger("sluice.publish")

# Upper bound of messages in one combined transaction.
MAX_GROUP_MESSAGES = 5000


@dataclass(slots=True)
class Published:
    offset: int
    duplicate: bool


@dataclass(slots=True)
class _Request:
    messages: list[NewMessage]
    future: asyncio.Future[list[Published]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


@dataclass(slots=True)
class TopicRef:
    topic_id: int
    name: str
    dedup_window_seconds: int


class Publisher:
    def __init__(self, pool: asyncpg.Pool, skew: SkewSource) -> None:
        self._pool = pool
        self._skew = skew
        self._queues: dict[int, list[_Request]] = {}
        self._writers: dict[int, asyncio.Task[None]] = {}
        self._topics: dict[int, TopicRef] = {}

    async def publish(self, topic: TopicRef, messages: list[NewMessage]) -> list[Published]:
        request = _Request(messages)
        self._topics[topic.topic_id] = topic
        self._queues.setdefault(topic.topic_id, []).append(request)
        if topic.topic_id not in self._writers:
            self._writers[topic.topic_id] = asyncio.create_task(self._drain(topic.topic_id))
        return await request.future

    async def _drain(self, topic_id: int) -> None:
        try:
            while self._queues.get(topic_id):
                group = self._take_group(topic_id)
                topic = self._topics[topic_id]
                try:
                    await self._write_group(topic, group)
                except Exception:
                    if len(group) == 1:
                        raise
                    # Isolate the faulty request: each one alone, atomic on its own.
                    for request in group:
                        await self._write_group(topic, [request])
        except Exception as exc:
            for request in self._queues.pop(topic_id, []):
                if not request.future.done():
                    request.future.set_exception(exc)
            raise
        finally:
            self._writers.pop(topic_id, None)
            if not self._queues.get(topic_id):
                self._queues.pop(topic_id, None)
                self._topics.pop(topic_id, None)

    def _take_group(self, topic_id: int) -> list[_Request]:
        pending = self._queues[topic_id]
        group: list[_Request] = []
        total = 0
        while pending and (not group or total + len(pending[0].messages) <= MAX_GROUP_MESSAGES):
            request = pending.pop(0)
            group.append(request)
            total += len(request.messages)
        return group

    async def _write_group(self, topic: TopicRef, group: list[_Request]) -> None:
        try:
            results = await self._write(topic, [r.messages for r in group])
        except Exception as exc:
            if len(group) == 1 and not group[0].future.done():
                group[0].future.set_exception(exc)
                return
            raise
        for request, result in zip(group, results, strict=True):
            if not request.future.done():
                request.future.set_result(result)

    async def _write(
        self, topic: TopicRef, batches: list[list[NewMessage]]
    ) -> list[list[Published]]:
        skew = self._skew.skew
        has_dedup = any(m.dedup_id is not None for batch in batches for m in batch)
        async with self._pool.acquire() as conn:
            if not has_dedup:
                # Fast path: one statement is one implicit transaction (one round trip).
                flat = [m for batch in batches for m in batch]
                base = await log_sql.append(conn, topic.topic_id, flat, skew)
                if base is None:
                    raise topic_not_found(topic.name)
                results: list[list[Published]] = []
                offset = base
                for batch in batches:
                    results.append([Published(offset + i, False) for i in range(len(batch))])
                    offset += len(batch)
                return results
            async with conn.transaction():
                # Lock first, then look: a concurrent publish of the same dedup_id has
                # either committed (and is seen) or waits for us.
                if not await log_sql.lock_topic(conn, topic.topic_id):
                    raise topic_not_found(topic.name)
                ids = list({m.dedup_id for b in batches for m in b if m.dedup_id is not None})
                seen = await log_sql.find_duplicates(
                    conn, topic.topic_id, ids, topic.dedup_window_seconds, skew
                )
                plan: list[list[tuple[int, object]]] = []  # (kind, ref) per message
                fresh: list[NewMessage] = []
                first_in_group: dict[str, int] = {}
                for batch in batches:
                    entries: list[tuple[int, object]] = []
                    for message in batch:
                        dedup = message.dedup_id
                        if dedup is not None and dedup in seen:
                            entries.append((0, seen[dedup]))
                        elif dedup is not None and dedup in first_in_group:
                            entries.append((1, first_in_group[dedup]))
                        else:
                            if dedup is not None:
                                first_in_group[dedup] = len(fresh)
                            entries.append((2, len(fresh)))
                            fresh.append(message)
                    plan.append(entries)
                base = await log_sql.append(conn, topic.topic_id, fresh, skew) if fresh else 0
                if base is None:
                    raise topic_not_found(topic.name)
                return [
                    [
                        Published(ref, True)  # type: ignore[arg-type]
                        if kind == 0
                        else Published(base + ref, kind == 1)  # type: ignore[operator]
                        for kind, ref in entries
                    ]
                    for entries in plan
                ]


class SkewSource:
    """Anything with a `skew` attribute (app.queue.clock.Clock)."""

    skew: float
