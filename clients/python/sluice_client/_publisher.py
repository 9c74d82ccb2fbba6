"""`Publisher`: batches messages in the background and retries batches safely."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import json
import logging
import os
import random
import threading
from collections import deque
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ._errors import RateLimited, SluiceError, is_retryable
from ._models import OutgoingMessage

try:  # optional: several times faster than json for large values; not a dependency
    import orjson
except ImportError:  # pragma: no cover - depends on the environment
    orjson = None  # type: ignore[assignment]


_ORJSON_OPTIONS = 0
if orjson is not None:
    # What json refuses, orjson must not take either (datetimes, dataclasses; subclasses go
    # to json, which handles them its own way): the result is the same with or without it.
    _ORJSON_OPTIONS = (
        orjson.OPT_PASSTHROUGH_DATETIME
        | orjson.OPT_PASSTHROUGH_DATACLASS
        | orjson.OPT_PASSTHROUGH_SUBCLASS
    )


def _encode(body: Any) -> bytes:
    """`body` as compact JSON; NaN and infinities are refused (ValueError)."""
    if orjson is not None:
        try:
            encoded = orjson.dumps(body, option=_ORJSON_OPTIONS)
        except TypeError:
            pass  # something only json takes (or refuses with its own error)
        else:
            # orjson writes NaN and infinities as null; json (below) refuses them.
            if b"null" not in encoded:
                return encoded
    return json.dumps(body, allow_nan=False, separators=(",", ":"), ensure_ascii=False).encode()


def _encode_value_only(value: Any, dedup_id: str | None) -> bytes:
    """The JSON object of a message with only a value and maybe a dedup id: what
    OutgoingMessage(value, dedup_id=...).to_json() encodes to, without the dict."""
    if dedup_id is None:
        return b'{"value":' + _encode(value) + b"}"
    return b'{"value":' + _encode(value) + b',"dedup_id":' + _encode(dedup_id) + b"}"


if TYPE_CHECKING:
    from ._client import AsyncClient

log = logging.getLogger("sluice_client.publisher")


# How much a publishing loop buffers between two turns of the event loop: enough that the
# turns cost little next to the messages, few enough that the sender's requests and their
# answers keep moving (one turn per message was a third of the cost: bench/RESULTS.md
# run 23).
_YIELD_EVERY_MESSAGES = 100
_YIELD_EVERY_BYTES = 128 * 1024


@dataclass(slots=True, eq=False)  # hashed by identity: a batch is a set member
class _Pending:
    encoded: bytes  # the message as a JSON object, serialized once when buffered
    future: asyncio.Future[int]
    size: int  # bytes it adds to a request body
    has_dedup_id: bool
    key: str | None


class Publisher:
    """Batches `publish()` calls to one topic into requests of up to `max_batch_messages`
    messages and about `max_batch_bytes` of JSON, sent at most `linger_seconds` after the
    first message of a batch is buffered.

    Every message gets a dedup id unless it has one, so a batch that fails with no answer,
    a timeout or a 503/429 is retried as it was without storing anything twice (within the
    topic's `dedup_window_seconds`).

    Order: messages with the same key are stored in the order they were published, always.
    Up to `max_in_flight_batches` (4) batches are under way at once, but a batch that
    holds a key of a batch still under way waits until that one is settled (retries
    included), as Pub/Sub's publisher does with ordering keys; messages without a key keep
    their order within a batch only. `max_in_flight_batches=1` sends one batch at a time:
    every message in publish order, at the throughput of one request at a time.
    At most `max_buffered` messages wait or are in flight: `publish()` waits for room
    (backpressure). `close()` (or leaving `async with`) flushes first.
    """

    def __init__(
        self,
        client: AsyncClient,
        topic: str,
        *,
        linger_seconds: float = 0.01,
        max_batch_messages: int = 1000,
        max_batch_bytes: int = 1_000_000,
        max_buffered: int = 10_000,
        max_retries: int = 8,
        retry_min_seconds: float = 0.1,
        retry_max_seconds: float = 5.0,
        auto_dedup: bool = True,
        max_in_flight_batches: int = 4,
    ) -> None:
        if not 1 <= max_batch_messages <= 1000:
            raise ValueError("max_batch_messages must be 1..1000")
        if max_in_flight_batches < 1:
            raise ValueError("max_in_flight_batches must be >= 1")
        self.max_in_flight_batches = max_in_flight_batches
        self._in_flight = asyncio.Semaphore(max_in_flight_batches)
        self._sending: set[asyncio.Task[None]] = set()
        self.client = client
        self.topic = topic
        self.linger_seconds = linger_seconds
        self.max_batch_messages = max_batch_messages
        self.max_batch_bytes = max_batch_bytes
        self.max_retries = max_retries
        self.retry_min_seconds = retry_min_seconds
        self.retry_max_seconds = retry_max_seconds
        self.auto_dedup = auto_dedup
        self.max_buffered = max_buffered
        # Set when a batch settled: publish() waits on it while the buffer is full. An
        # event, not a semaphore: a settled batch wakes a waiting publish() once, not once
        # per message (with a full buffer that was a task switch per message).
        self._has_room = asyncio.Event()
        # Messages buffered or in flight, counted rather than tracked per message: a done
        # callback per future cost an event-loop handle per message.
        self._outstanding = 0
        self._in_flight_batches: set[tuple[_Pending, ...]] = set()
        # Keys of the batches under way (no two hold the same key), and a signal that one
        # of them settled: a batch holding one of these keys waits, so a key's order is kept.
        self._keys_in_flight: set[str] = set()
        self._batch_settled = asyncio.Event()
        # Automatic dedup ids: a random prefix per publisher and a fixed-width counter. As
        # unique as a uuid4 each (128 random bits per publisher), cheaper to make, and the
        # ids of one publisher ascend: the server's dedup index takes them at one place
        # instead of a random page per message (bench/RESULTS.md run 23: 1000 random ids
        # cost the append 23 ms, ascending ones 18.5 ms, none 12 ms).
        self._dedup_prefix = os.urandom(16).hex() + "-"
        self._dedup_counter = 0
        self._unyielded_messages = 0
        self._unyielded_bytes = 0
        self._queue: deque[_Pending] = deque()
        self._queued_bytes = 0
        self._wake = asyncio.Event()  # something was queued, or close/flush was asked
        self._ready = asyncio.Event()  # a batch is full, or flush/close: skip the linger
        self._flushing = 0
        self._closed = False
        self._sender: asyncio.Task[None] | None = None
        #: requests sent (attempts included) and batches sent, for observing batching
        self.requests_sent = 0
        self.batches_sent = 0

    # ---- public ---------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """Messages buffered or in flight, not settled yet (at most `max_buffered`)."""
        return self._outstanding

    async def publish(
        self,
        value: Any,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay_seconds: int = 0,
        dedup_id: str | None = None,
    ) -> asyncio.Future[int]:
        """Buffer one message (waiting while the buffer is full) and return a future that
        resolves to its offset, or to the SluiceError its batch ended with."""
        if self._closed:
            raise RuntimeError("the publisher is closed")
        if dedup_id is None and self.auto_dedup:
            self._dedup_counter += 1
            dedup_id = f"{self._dedup_prefix}{self._dedup_counter:012x}"
        # Serialized once, here: a value JSON cannot carry fails this call, not its batch.
        if key is None and headers is None and not delay_seconds:
            encoded = _encode_value_only(value, dedup_id)
        else:
            message = OutgoingMessage(value, key, headers, delay_seconds, dedup_id)
            encoded = _encode(message.to_json())
        while self._outstanding >= self.max_buffered and not self._closed:
            self._has_room.clear()
            await self._has_room.wait()
        if self._closed:
            raise RuntimeError("the publisher is closed")
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        pending = _Pending(encoded, future, len(encoded) + 1, dedup_id is not None, key)
        self._outstanding += 1
        self._queue.append(pending)
        self._queued_bytes += pending.size
        self._start()
        self._wake.set()
        if (
            len(self._queue) >= self.max_batch_messages
            or self._queued_bytes >= self.max_batch_bytes
        ):
            self._ready.set()  # a batch is full: the sender skips the rest of the linger
        self._unyielded_messages += 1
        self._unyielded_bytes += pending.size
        if (
            self._unyielded_messages >= _YIELD_EVERY_MESSAGES
            or self._unyielded_bytes >= _YIELD_EVERY_BYTES
        ):
            # A caller publishing in a loop never waits while there is room: without a turn
            # now and then the sender could not start a request, nor write the rest of a
            # large body or read an answer, until the whole buffer is full.
            self._unyielded_messages = self._unyielded_bytes = 0
            await asyncio.sleep(0)
        return future

    async def flush(self) -> None:
        """Send everything buffered now and wait until each of those messages is settled
        (stored or failed)."""
        waiting = [item.future for item in self._queue]
        for batch in self._in_flight_batches:
            waiting.extend(item.future for item in batch)
        if not waiting:
            return
        self._flushing += 1
        self._wake.set()
        self._ready.set()
        try:
            await asyncio.gather(*waiting, return_exceptions=True)
        finally:
            self._flushing -= 1

    async def close(self) -> None:
        """Flush, then stop the background task. publish() raises afterwards."""
        if self._closed and self._sender is None:
            return
        await self.flush()
        self._closed = True
        self._has_room.set()  # a publish() waiting for room raises now
        self._wake.set()
        self._ready.set()
        if self._sender is not None:
            sender, self._sender = self._sender, None
            await sender

    async def __aenter__(self) -> Publisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- the background sender ------------------------------------------------------------

    def _start(self) -> None:
        if self._sender is None or self._sender.done():
            self._sender = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            await self._send_until_closed()
        except BaseException as exc:
            # Whatever stopped the sender, nothing buffered may wait forever.
            failure = exc if isinstance(exc, Exception) else None
            for item in self._queue:
                if failure is None:
                    item.future.cancel()
                elif not item.future.done():
                    item.future.set_exception(failure)
            self._outstanding -= len(self._queue)
            self._queue.clear()
            self._queued_bytes = 0
            self._has_room.set()
            raise

    async def _send_until_closed(self) -> None:
        while True:
            while not self._queue:
                if self._closed:
                    return
                self._wake.clear()
                await self._wake.wait()
            concurrent = self.max_in_flight_batches > 1
            if concurrent:
                # A slot first, then the linger: messages buffered while every slot was
                # busy go into this batch rather than wait for the next one.
                await self._in_flight.acquire()
            if not self._flushing and not self._closed and not self._batch_full():
                self._ready.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._ready.wait(), self.linger_seconds)
            batch = self._take_batch()
            if not concurrent:
                await self._send_settled(batch, set())
                continue
            keys = {item.key for item in batch if item.key is not None}
            await self._wait_for_keys(batch, keys)
            self._keys_in_flight |= keys
            task = asyncio.get_running_loop().create_task(self._send_settled(batch, keys))
            self._sending.add(task)
            task.add_done_callback(self._sent)

    def _sent(self, task: asyncio.Task[None]) -> None:
        self._sending.discard(task)
        self._in_flight.release()

    async def _wait_for_keys(self, batch: list[_Pending], keys: set[str]) -> None:
        """Wait until no batch under way holds one of `keys`. Batches leave in order: while
        this one waits, no later one overtakes it (a later one may hold the same key)."""
        members = tuple(batch)
        self._in_flight_batches.add(members)  # flush() waits for it from now on
        try:
            while not keys.isdisjoint(self._keys_in_flight):
                self._batch_settled.clear()
                await self._batch_settled.wait()
        except BaseException:
            # Stopped while waiting: the batch goes back to the buffer, whose messages the
            # sender's end settles.
            self._in_flight_batches.discard(members)
            self._queue.extendleft(reversed(batch))
            self._queued_bytes += sum(item.size for item in batch)
            raise

    async def _send_settled(self, batch: list[_Pending], keys: set[str]) -> None:
        members = tuple(batch)
        try:
            self._in_flight_batches.add(members)
            await self._send(batch)
        except Exception as exc:  # settle the futures whatever happens
            for item in batch:
                if not item.future.done():
                    item.future.set_exception(exc)
        except asyncio.CancelledError:
            for item in batch:
                item.future.cancel()
            raise
        finally:
            self._in_flight_batches.discard(members)
            self._keys_in_flight -= keys
            self._batch_settled.set()
            self._outstanding -= len(batch)
            self._has_room.set()

    def _batch_full(self) -> bool:
        return (
            len(self._queue) >= self.max_batch_messages
            or self._queued_bytes >= self.max_batch_bytes
        )

    def _take_batch(self) -> list[_Pending]:
        batch: list[_Pending] = []
        size = 0
        while self._queue and len(batch) < self.max_batch_messages:
            item = self._queue[0]
            if batch and size + item.size > self.max_batch_bytes:
                break
            self._queue.popleft()
            self._queued_bytes -= item.size
            size += item.size
            batch.append(item)
        return batch

    async def _send(self, batch: list[_Pending]) -> None:
        live = [item for item in batch if not item.future.cancelled()]
        if not live:
            return
        encoded = [item.encoded for item in live]
        all_deduplicated = all(item.has_dedup_id for item in live)
        attempt = 0
        self.batches_sent += 1
        while True:
            self.requests_sent += 1
            try:
                results = await self.client._publish_encoded(self.topic, encoded)
            except SluiceError as exc:
                # Without a dedup id on every message only a 429 (nothing stored) is retried.
                safe = all_deduplicated or isinstance(exc, RateLimited)
                retry = is_retryable(exc) and safe and attempt < self.max_retries
                if not retry:
                    for item in live:
                        if not item.future.done():
                            item.future.set_exception(exc)
                    return
                attempt += 1
                delay = min(self.retry_max_seconds, self.retry_min_seconds * 2 ** (attempt - 1))
                delay = random.uniform(delay / 2, delay)
                retry_after = getattr(exc, "retry_after", None)
                if retry_after:
                    delay = max(delay, min(retry_after, self.retry_max_seconds))
                log.warning(
                    "publish to %s failed (%s); retry %d in %.2fs", self.topic, exc, attempt, delay
                )
                await asyncio.sleep(delay)
                continue
            for item, result in zip(live, results, strict=True):
                if not item.future.done():
                    item.future.set_result(result.offset)
            return


def _copy_outcome(source: asyncio.Future[int], target: concurrent.futures.Future[int]) -> None:
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        target.set_exception(source.exception())  # type: ignore[arg-type]
    else:
        target.set_result(source.result())


class SyncPublisher:
    """`Publisher` for code without an event loop: an `AsyncClient` and a `Publisher` run on
    an event loop in a background thread. `publish()` blocks while the buffer is full and
    returns a `concurrent.futures.Future` resolving to the offset. Options as `Publisher`;
    `base_url`/`api_key` as `Client`."""

    def __init__(
        self,
        topic: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        timeout: float = 30.0,
        **options: Any,
    ) -> None:
        from ._client import AsyncClient

        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="sluice-publisher", daemon=True
        )
        self._thread.start()

        async def make() -> tuple[AsyncClient, Publisher]:
            client = AsyncClient(base_url, api_key=api_key, timeout=timeout)
            return client, Publisher(client, topic, **options)

        self._client, self._publisher = self._call(make())
        self._closed = False

    def _call(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    @property
    def publisher(self) -> Publisher:
        return self._publisher

    def publish(
        self,
        value: Any,
        *,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        delay_seconds: int = 0,
        dedup_id: str | None = None,
    ) -> concurrent.futures.Future[int]:
        async def buffer() -> concurrent.futures.Future[int]:
            inner = await self._publisher.publish(
                value, key=key, headers=headers, delay_seconds=delay_seconds, dedup_id=dedup_id
            )
            outer: concurrent.futures.Future[int] = concurrent.futures.Future()
            inner.add_done_callback(functools.partial(_copy_outcome, target=outer))
            return outer

        return self._call(buffer())

    def flush(self) -> None:
        self._call(self._publisher.flush())

    def close(self) -> None:
        """Flush, then stop the background thread."""
        if self._closed:
            return
        self._closed = True
        try:
            self._call(self._publisher.close())
            self._call(self._client.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            if not self._thread.is_alive():
                self._loop.close()

    def __enter__(self) -> SyncPublisher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
