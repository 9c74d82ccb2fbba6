"""Publishing: group commit of concurrent requests, dedup, atomic batches.

Offsets are handed out under the topic's advisory lock until commit (storage
sluice.append_messages), so on one topic only one publish transaction makes progress at a
time. To keep throughput high, each process funnels its publish requests through one writer
task: whatever arrived while a transaction was committing goes into the next one, whatever
its topics, as one sluice.publish_topics call, which appends topic after topic in one
transaction and leaves out a topic whose lock another transaction holds ('busy': another
process's publish, the SQL API's relay, a dead-letter copy). That topic's requests, and those
that come for it while they are written, go to a writer of the topic's own, which waits for
the lock on its own connection (sluice.publish_batch), so the process's other topics are
not held up behind a lock held elsewhere (only while the writer sorts out a refused group or
a message too large for its topic, request by request, may it wait for a lock). A process
publishing to many topics thus pays one round trip and one commit per group, not per topic
(bench/RESULTS.md run 31).
Every writer keeps its pool connection from one group to the next, and for a moment after
its queue runs dry (LINGER_SECONDS), so a steady stream of requests pays for neither a task
nor a pool checkout per group, and a topic that stays contended (two processes publishing
to it) stays with its own writer rather than being tried and set aside again per group.
Each request stays atomic: when the combined call is refused by the database (an
error that proves nothing was stored), its topics are written one by one, and a topic's
requests one by one, so only the faulty one fails. When the outcome is unknown (the
connection broke, the command timed out: the transaction may have committed), nothing is
retried: every request of the group is answered 503, and clients retry with dedup ids. The
batching is only an optimisation; correctness lives in Postgres.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import asyncpg

from sluice.errors import PayloadTooLarge, Unavailable, topic_not_found
from sluice.records import NewMessage, Published
from sluice.storage import log as log_sql
from sluice.storage import topics as topics_sql

log = logging.getLogger("sluice.publish")

# Upper bound of messages in one combined transaction.
MAX_GROUP_MESSAGES = 5000
# One writer per process, for every topic. Two writers of one topic split the arrivals into
# smaller groups and kept a backend waiting on the topic's lock (wrk, 4 connections: 5,200
# publishes/s and 120 us of server CPU each with one, 3,600-4,300 and 145-176 us with two;
# bench/RESULTS.md run 25); a writer per topic wrote a transaction per topic where one writer
# shares it among them (run 31).
# How long the writer keeps its task and pool connection once the queue is empty,
# waiting for the next request. A producer that publishes one message per request sends
# its next one a round trip after its answer: without the wait, every such request paid for
# a new writer task and a pool acquire and release (~20 us of a ~180 us single-message
# publish at 4 connections under wrk; bench/RESULTS.md run 28). Short enough that an idle
# process holds no connection for long, nor holds up the pool's close at shutdown
# (Publisher.close ends the wait at once). When the pool has no connection left, the writer
# keeps none between groups (Publisher._pool_exhausted).
LINGER_SECONDS = 0.002


# Errors after which a write may or may not have committed: the connection broke, or the
# command timed out.
OUTCOME_UNKNOWN = (OSError, TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError)


class SkewSource(Protocol):
    skew: float


class _Refused(Exception):
    """The database answered the combined call with an error: it was rolled back."""


@dataclass(eq=False, slots=True)
class _Writer:
    """Requests in arrival order and the task that writes them, group after group. The
    process's writer (topic None) tries each topic's lock; a contended topic's writer waits
    for its topic's."""

    topic: str | None
    queue: deque[_Request] = field(default_factory=deque)
    task: asyncio.Task[None] | None = None
    # The task waiting for a request (its queue ran dry): the future that wakes it.
    lingering: asyncio.Future[None] | None = None


@dataclass(slots=True)
class _Request:
    topic: str
    messages: list[NewMessage]
    sizes: list[int]
    future: asyncio.Future[list[Published]] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class Publisher:
    def __init__(self, pool: asyncpg.Pool, clock: SkewSource) -> None:
        self._pool = pool
        self._clock = clock
        self._writer = _Writer(None)
        # Topics whose lock another transaction held when the process's writer tried it:
        # their writers, until their queues run dry.
        self._contended: dict[str, _Writer] = {}
        # Told the topic each time a group finds its lock taken (app.main: a metric).
        self.contended_listeners: list[Callable[[str], None]] = []
        self._closed = False

    async def publish(
        self, topic: str, messages: list[NewMessage], sizes: list[int]
    ) -> list[Published]:
        """Store the messages atomically; `sizes` are their byte sizes for the topic's
        max_message_bytes check."""
        request = _Request(topic, messages, sizes)
        # A contended topic's requests queue behind those of it that wait for its lock.
        writer = self._contended.get(topic, self._writer)
        writer.queue.append(request)
        self._wake(writer)
        return await request.future

    def _wake(self, writer: _Writer) -> None:
        """Start the writer's task, or wake it if it waits for a request."""
        lingering, writer.lingering = writer.lingering, None
        if lingering is not None:
            if not lingering.done():
                lingering.set_result(None)
        elif writer.task is None:
            name = "sluice-publish" + ("" if writer.topic is None else f"-{writer.topic}")
            writer.task = asyncio.create_task(self._drain(writer), name=name)

    async def close(self) -> None:
        """Wake the writers that wait for a request, so they give their connections back
        now (before the pool closes)."""
        self._closed = True
        while tasks := [
            w.task for w in (self._writer, *self._contended.values()) if w.task is not None
        ]:
            for writer in (self._writer, *self._contended.values()):
                if writer.lingering is not None and not writer.lingering.done():
                    writer.lingering.set_result(None)
                writer.lingering = None
            await asyncio.wait(tasks)

    async def _drain(self, writer: _Writer) -> None:
        conn: asyncpg.Connection | None = None
        try:
            while writer.queue or await self._linger(writer):
                group = _take_group(writer.queue)
                try:
                    if conn is not None and _lost(conn):  # while the writer waited
                        await self._pool.release(conn)
                        conn = None
                    if conn is None:
                        # Raises when no connection can be made (Postgres down): the group
                        # gets the error rather than waiting for an answer that never comes.
                        conn = await self._pool.acquire()
                    if writer.topic is None:
                        usable = await self._write_group(group, conn)
                    else:
                        usable = await self._write_topic_group(writer.topic, group, conn)
                except Exception as exc:
                    for request in group:
                        _settle(request, exc)
                    usable = False
                if conn is not None and (not usable or self._pool_exhausted()):
                    # The connection may be broken or still cancelling a command (the pool
                    # knows what to do with it: it closes a broken one), or others may be
                    # waiting for one: the next group takes a connection again.
                    await self._pool.release(conn)
                    conn = None
        finally:
            # Before the release's await: a request that comes meanwhile starts a writer (the
            # process's, once a contended topic's writer is done).
            writer.task = None
            if writer.topic is not None and self._contended.get(writer.topic) is writer:
                del self._contended[writer.topic]
                if writer.queue:  # left by an error between groups: the process's writer's
                    self._writer.queue.extend(writer.queue)
                    writer.queue.clear()
                    self._wake(self._writer)
            if conn is not None:
                await self._pool.release(conn)

    def _pool_exhausted(self) -> bool:
        """No connection idle and none can be opened: a writer that kept its connection
        could keep everyone else waiting for the pool (acks, other topics) while its topic
        stays busy, so it gives it back after each group, as without the wait."""
        pool = self._pool
        return pool.get_idle_size() == 0 and pool.get_size() >= pool.get_max_size()

    async def _linger(self, writer: _Writer) -> bool:
        """Wait up to LINGER_SECONDS for the writer's next request: True if one came."""
        if self._closed:
            return False
        loop = asyncio.get_running_loop()
        woken = writer.lingering = loop.create_future()
        timer = loop.call_later(LINGER_SECONDS, _resolve, woken)
        try:
            await woken
        finally:
            timer.cancel()
            if writer.lingering is woken:
                writer.lingering = None
        return bool(writer.queue)

    async def _write_group(self, group: list[_Request], conn: asyncpg.Connection) -> bool:
        """Write the group, whatever its topics, in one transaction (sluice.publish_topics)
        and answer its requests; False when `conn` may be unusable."""
        by_topic: dict[str, list[_Request]] = {}
        for request in group:
            by_topic.setdefault(request.topic, []).append(request)
        topics = [
            (
                topic,
                [m for request in requests for m in request.messages],
                max(size for request in requests for size in request.sizes),
            )
            for topic, requests in by_topic.items()
        ]
        try:
            outcomes = await log_sql.publish_topics(conn, topics, self._clock.skew)
        except OUTCOME_UNKNOWN as exc:
            self._outcome_unknown(list(by_topic), [r for rs in by_topic.values() for r in rs], exc)
            return False
        except asyncpg.PostgresError:
            # Refused, so rolled back: each topic in a transaction of its own (which waits
            # for the topic's lock: an error path, so no other topic's requests are queued
            # behind it for long).
            usable = True
            for topic, requests in by_topic.items():
                usable = await self._write_topic_group(topic, requests, conn) and usable
            return usable
        usable = True
        for (topic, requests), outcome in zip(by_topic.items(), outcomes, strict=True):
            if outcome.status == "ok":
                _answer(requests, outcome)
            elif outcome.status == "no_topic":
                for request in requests:
                    _settle(request, topic_not_found(topic))
            elif outcome.status == "busy":
                self._set_aside(topic, requests)
            else:  # a message too large: the topic's requests on their own find which
                usable = await self._write_each(topic, requests, conn) and usable
        return usable

    def _set_aside(self, topic: str, requests: list[_Request]) -> None:
        """Another transaction holds the topic's lock: its requests, and those of it that
        came meanwhile, go to a writer of its own, which waits for the lock."""
        for listener in self.contended_listeners:
            listener(topic)
        writer = self._contended.get(topic)
        if writer is None:
            writer = self._contended[topic] = _Writer(topic)
        writer.queue.extend(requests)
        queue = self._writer.queue
        if any(request.topic == topic for request in queue):
            others: deque[_Request] = deque()
            for request in queue:
                (writer.queue if request.topic == topic else others).append(request)
            self._writer.queue = others
        self._wake(writer)

    def _outcome_unknown(
        self, topics: list[str], requests: list[_Request], exc: BaseException
    ) -> None:
        # The combined transaction may or may not have committed: retrying could store
        # every message twice. Answer 503; the clients retry with their dedup ids.
        log.warning(
            "publish outcome unknown", extra={"topic": ",".join(topics), "error": repr(exc)[:200]}
        )
        unknown = Unavailable(
            "the database connection was lost while publishing; the messages may or may "
            "not be stored: retry with dedup_id to avoid duplicates",
            headers={"Retry-After": "1"},
        )
        for request in requests:
            _settle(request, unknown)

    async def _write_topic_group(
        self, topic: str, group: list[_Request], conn: asyncpg.Connection
    ) -> bool:
        """Write the requests of one topic and answer them; False when `conn` may be
        unusable."""
        try:
            outcome = await self._write(topic, group, conn)
        except _Refused as refused:
            if len(group) == 1:
                _settle(group[0], refused.__cause__ or refused)
                return True
            outcome = None
        except OUTCOME_UNKNOWN as exc:
            self._outcome_unknown([topic], group, exc)
            return False
        if outcome is None or outcome.status == "too_large":
            return await self._write_each(topic, group, conn)
        if outcome.status == "no_topic":
            for request in group:
                _settle(request, topic_not_found(topic))
            return True
        _answer(group, outcome)
        return True

    async def _write_each(
        self, topic: str, group: list[_Request], conn: asyncpg.Connection
    ) -> bool:
        """The topic refused the group's write: isolate the faulty request, each one alone,
        atomic on its own (a request alone is refused with the reason)."""
        if len(group) == 1:
            _settle(group[0], await self._refusal(topic, group[0], conn))
            return True
        usable = True
        for request in group:
            try:
                usable = await self._write_topic_group(topic, [request], conn) and usable
            except Exception as exc:  # answered above; this is only a guard
                _settle(request, exc)
        return usable

    async def _refusal(self, topic: str, request: _Request, conn: asyncpg.Connection) -> Exception:
        """Why the topic refused a request alone: gone, or a message above its size limit."""
        found = await topics_sql.get_topic(conn, topic)
        if found is None:
            return topic_not_found(topic)
        index, size = max(enumerate(request.sizes), key=lambda item: item[1])
        return PayloadTooLarge(
            f"message {index} is {size} bytes; topic '{topic}' accepts at most "
            f"{found.max_message_bytes}"
        )

    async def _write(
        self, topic: str, group: list[_Request], conn: asyncpg.Connection
    ) -> log_sql.Appended:
        """Write the group in one transaction (one call)."""
        largest = max(size for request in group for size in request.sizes)
        flat = [m for request in group for m in request.messages]
        try:
            return await log_sql.publish_batch(conn, topic, flat, largest, self._clock.skew)
        except asyncpg.PostgresError as exc:
            if isinstance(exc, asyncpg.PostgresConnectionError):
                raise
            raise _Refused(str(exc)) from exc


def _lost(conn: asyncpg.Connection) -> bool:
    try:
        return conn.is_closed()
    except asyncpg.InterfaceError:  # the pool took it back when it broke (asyncpg detaches it)
        return True


def _take_group(pending: deque[_Request]) -> list[_Request]:
    """The requests at the head of the queue, up to MAX_GROUP_MESSAGES messages (at least
    one request)."""
    group: list[_Request] = []
    total = 0
    while pending and (not group or total + len(pending[0].messages) <= MAX_GROUP_MESSAGES):
        request = pending.popleft()
        group.append(request)
        total += len(request.messages)
    return group


def _answer(requests: list[_Request], outcome: log_sql.Appended) -> None:
    """Each request its slice of the offsets, in the order they were appended."""
    offset = 0
    for request in requests:
        count = len(request.messages)
        _settle(
            request,
            [
                Published(o, d)
                for o, d in zip(
                    outcome.offsets[offset : offset + count],
                    outcome.duplicates[offset : offset + count],
                    strict=True,
                )
            ],
        )
        offset += count


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def _settle(request: _Request, outcome: list[Published] | BaseException) -> None:
    """Answer a request unless its client went away (cancelled future)."""
    if request.future.done():
        return
    if isinstance(outcome, BaseException):
        request.future.set_exception(outcome)
    else:
        request.future.set_result(outcome)
