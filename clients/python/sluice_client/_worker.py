"""`Worker` / `subscribe()`: a consumer loop with concurrency, lease extension, acks in the
next pull, retries and a graceful stop."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import random
import signal
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from ._client import AsyncClient
from ._errors import RateLimited, SluiceError, is_retryable
from ._models import Delivery

log = logging.getLogger("sluice_client.worker")

Handler = Callable[[Delivery], Awaitable[Any] | Any]

# On stop(), how long a pull under way may still take to bring its answer before it is
# cancelled (see _pull_until_stopped).
_ANSWER_IN_TRANSIT_SECONDS = 0.25


class Retry(Exception):
    """Raise from a handler to have the message delivered again after `delay_seconds`
    (None: the subscription's retry backoff)."""

    def __init__(self, delay_seconds: float | None = None) -> None:
        super().__init__(delay_seconds)
        self.delay_seconds = delay_seconds


class DeadLetter(Exception):
    """Raise from a handler to park the message in the subscription's dead letters now
    (a nack with `dead_letter`): listed under dead letters, re-drivable, copied to
    `dead_letter_topic`, whatever the attempt and the subscription's `max_deliveries`."""


@dataclass(slots=True)
class _Lease:
    delivery: Delivery
    extend_at: float
    runner: asyncio.Task[None] | None = None  # the runner task calling its handler, if any


@dataclass
class WorkerStats:
    received: int = 0
    succeeded: int = 0
    failed: int = 0  # handler raised (nacked)
    acked: int = 0  # acks the server applied
    stale_acks: int = 0
    nacked: int = 0  # nacks the server applied (dead letters asked for included)
    dead_lettered: int = 0  # handler raised DeadLetter
    extended: int = 0
    lost_leases: int = 0  # extends that came back stale
    given_back: int = 0  # received while stopping, or cut off by the grace period
    stale_receipts: list[str] = field(default_factory=list)


class Worker:
    """Pulls from `topic`/`subscription` and runs `handler(delivery)` on each message, at
    most `concurrency` at a time. Async handlers run on the loop, in `concurrency`
    long-lived runner tasks (not a task per message: see `_run_handlers`); plain functions
    in a thread pool of `concurrency` threads, each call in a copy of the worker's context.
    An async handler runs in its runner's context, shared with the handlers that runner
    called before: one that sets a context variable (a logging context, say) should set it
    on every call.

    - a handler that returns: the message is acked, in the `ack` field of the next pull
      (or by /ack within `ack_interval_seconds` when no pull is due, e.g. during a
      long-poll)
    - raises `Retry(delay)`: nacked with that delay; `DeadLetter()`: see DeadLetter; any
      other exception: nacked with the subscription's backoff (logged)
    - a running handler's lease is extended every `ack_deadline * extend_fraction`
    - 429: waits Retry-After; 5xx / no answer: exponential backoff with jitter
    - `stop()` (also SIGTERM/SIGINT while `run()` runs on the main thread): stop pulling,
      wait up to `grace_seconds` for running handlers, ack what finished, return. Handlers
      still running then are cancelled (async) or abandoned (threads) and their messages
      given back (nack, no delay).
    """

    def __init__(
        self,
        client: AsyncClient,
        topic: str,
        subscription: str,
        handler: Handler,
        *,
        concurrency: int = 10,
        wait_seconds: float = 20.0,
        max_messages: int | None = None,
        ack_deadline_seconds: int | None = None,
        extend_fraction: float = 0.5,
        ack_interval_seconds: float | None = None,
        grace_seconds: float = 30.0,
        handle_signals: bool = True,
        max_backoff_seconds: float = 30.0,
        pullers: int | None = None,
    ) -> None:
        if concurrency < 1:
            raise ValueError("concurrency must be >= 1")
        if pullers is not None and pullers < 1:
            raise ValueError("pullers must be >= 1")
        self.client = client
        self.topic = topic
        self.subscription = subscription
        self.handler = handler
        self.concurrency = concurrency
        self.wait_seconds = wait_seconds
        self.max_messages = min(1000, max_messages or concurrency)
        # Pulls outstanding at once: one round trip per batch leaves the server idle while
        # the answer travels; with room for several batches, several pulls overlap.
        self.pullers = pullers or max(1, min(4, -(-concurrency // self.max_messages)))
        self.ack_deadline_seconds = ack_deadline_seconds
        self.extend_fraction = extend_fraction
        self.ack_interval_seconds = ack_interval_seconds
        self.grace_seconds = grace_seconds
        self.handle_signals = handle_signals
        self.max_backoff_seconds = max_backoff_seconds
        self.stats = WorkerStats()
        self._is_async = inspect.iscoroutinefunction(handler) or inspect.iscoroutinefunction(
            getattr(handler, "__call__", None)  # noqa: B004 - async callable objects
        )
        self._stopping = asyncio.Event()
        # Receipts whose ack went out in a pull cancelled by stopping (outcome unknown).
        self._unknown_outcome: set[str] = set()
        self._slot_free = asyncio.Event()
        self._in_flight: dict[str, _Lease] = {}
        # Leases received, not yet taken by a runner; idle runners wait on their own future.
        self._ready: deque[_Lease] = deque()
        self._idle: deque[asyncio.Future[None]] = deque()
        self._waking = 0  # runners woken that have not run yet
        self._reserved = 0  # slots held for pulls under way
        self._to_ack: list[str] = []
        self._oldest_ack: float | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._executor: ThreadPoolExecutor | None = None
        self._deadline = 30
        self.running = False

    # ---- public ---------------------------------------------------------------------------

    def stop(self) -> None:
        """Stop pulling; `run()` returns once running handlers finished (or the grace
        period ended) and their acks are sent. Safe to call from a signal handler."""
        self._stopping.set()

    async def run(self) -> WorkerStats:
        sub = await self.client.get_subscription(self.topic, self.subscription)
        self._deadline = self.ack_deadline_seconds or sub.ack_deadline_seconds
        if self.ack_interval_seconds is None:
            self.ack_interval_seconds = min(1.0, self._deadline / 4)
        if not self._is_async:
            self._executor = ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="sluice-handler"
            )
        loop = asyncio.get_running_loop()
        signals: list[int] = []
        if self.handle_signals and threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGINT):
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.add_signal_handler(sig, self.stop)
                    signals.append(sig)
        self.running = True
        extender = loop.create_task(self._extend_loop())
        acker = loop.create_task(self._ack_loop())
        runners = [loop.create_task(self._run_handlers()) for _ in range(self.concurrency)]
        try:
            await self._pull_loop()
        finally:
            self._stopping.set()
            await self._drain(runners)
            for task in (extender, acker, *runners):
                task.cancel()
            await asyncio.gather(extender, acker, *runners, return_exceptions=True)
            await self._flush_acks(attempts=5)
            for sig in signals:
                loop.remove_signal_handler(sig)
            if self._executor is not None:
                self._executor.shutdown(wait=False, cancel_futures=True)
            self.running = False
        return self.stats

    # ---- pulling --------------------------------------------------------------------------

    async def _wait_or_stop(self, awaitable: Awaitable[Any]) -> None:
        stop = asyncio.ensure_future(self._stopping.wait())
        other = asyncio.ensure_future(awaitable)
        try:
            await asyncio.wait({stop, other}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stop.cancel()
            if not other.done():
                other.cancel()
            await asyncio.gather(stop, other, return_exceptions=True)

    async def _pull_loop(self) -> None:
        """`pullers` pull loops; the first fatal error stops them all and is raised."""
        if self.pullers == 1:
            await self._puller()
            return
        tasks = [asyncio.ensure_future(self._puller()) for _ in range(self.pullers)]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            self._stopping.set()  # the others give back what they hold and return
            results = await asyncio.gather(*tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                raise result

    async def _puller(self) -> None:
        # One task that ends when stop() is called, shared by every pull of this loop.
        stopped = asyncio.ensure_future(self._stopping.wait())
        try:
            await self._pull_until_stopped(stopped)
        finally:
            stopped.cancel()

    async def _pull_until_stopped(self, stopped: asyncio.Future[Any]) -> None:
        failures = 0
        while not self._stopping.is_set():
            free = self.concurrency - len(self._in_flight) - self._reserved
            if free <= 0:
                self._slot_free.clear()
                await self._wait_or_stop(self._slot_free.wait())
                continue
            want = min(free, self.max_messages)
            self._reserved += want
            try:
                acks = self._take_acks()
                pull = asyncio.ensure_future(
                    self.client.pull(
                        self.topic,
                        self.subscription,
                        max_messages=want,
                        wait_seconds=self.wait_seconds,
                        ack=acks or None,
                        ack_deadline_seconds=self.ack_deadline_seconds,
                    )
                )
                await asyncio.wait({pull, stopped}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                self._reserved -= want
                self._slot_free.set()  # what this pull did not fill is free again
            if not pull.done():
                # Stopping while the pull is under way. Its answer may be on its way already
                # (the server claimed and answered before it could see this client leave):
                # cancelled then, those leases would wait for their deadline. So it gets a
                # moment to arrive, and is given back below like any answer after stop().
                await asyncio.wait({pull}, timeout=_ANSWER_IN_TRANSIT_SECONDS)
            if not pull.done():
                # A long-poll still waiting: the server gives back what it claims for a
                # client that went away. Whether the acks were applied is unknown: resend.
                pull.cancel()
                with contextlib.suppress(asyncio.CancelledError, SluiceError):
                    result = await pull
                    self._count_acks(result.acked, result.stale)
                    await self._give_back(result.messages)
                    acks = []
                self._unknown_outcome.update(acks)
                self._requeue_acks(acks)
                return
            try:
                result = pull.result()
            except RateLimited as exc:
                if exc.acked is not None:
                    self._count_acks(exc.acked, exc.stale or [])
                else:
                    self._requeue_acks(acks)
                delay = exc.retry_after if exc.retry_after is not None else 1.0
                log.info("rate limited; retrying the pull in %.1fs", delay)
                await self._wait_or_stop(asyncio.sleep(delay))
                continue
            except SluiceError as exc:
                self._requeue_acks(acks)
                if not is_retryable(exc):
                    raise
                failures += 1
                delay = random.uniform(0, min(self.max_backoff_seconds, 0.1 * 2**failures))
                retry_after = getattr(exc, "retry_after", None)
                if retry_after:
                    delay = max(delay, retry_after)
                log.warning("pull failed (%s); retrying in %.2fs", exc, delay)
                await self._wait_or_stop(asyncio.sleep(delay))
                continue
            failures = 0
            self._count_acks(result.acked, result.stale)
            if self._stopping.is_set():
                await self._give_back(result.messages)
                return
            self.stats.received += len(result.messages)
            extend_at = time.monotonic() + self._deadline * self.extend_fraction
            in_flight, ready = self._in_flight, self._ready
            for delivery in result.messages:
                lease = _Lease(delivery, extend_at)
                in_flight[delivery.receipt] = lease
                ready.append(lease)
            self._wake_runner()

    # ---- handling -------------------------------------------------------------------------

    def _wake_runner(self) -> None:
        """Wake one idle runner when leases are waiting, unless one is already on its way."""
        if self._waking:
            return
        while self._ready and self._idle:
            waiter = self._idle.popleft()
            if not waiter.done():  # a runner cancelled while idle left its future behind
                waiter.set_result(None)
                self._waking += 1
                return

    async def _run_handlers(self) -> None:
        """One of `concurrency` runners: takes the next lease and calls its handler, until
        cancelled when the worker stops.

        A task per message (what this replaced) was the largest item of the Worker's own
        work on a message (creating, scheduling and collecting it; client CPU per message
        17-19 us with it, 11.5-13.5 us with runners on Python 3.11: bench/RESULTS.md run
        25). Runners wake
        each other in a chain instead: a runner that takes a lease wakes one more runner
        when more are waiting and none is on its way already, before it calls the handler.
        A handler that waits (I/O, a thread) thus lets the next runner take the next lease
        on the next turn of the loop, up to `concurrency` at once, while handlers that do
        not wait let their runner go on with the next lease itself: a batch of them costs
        one wake-up, not one per message."""
        ready, idle = self._ready, self._idle
        loop = asyncio.get_running_loop()
        this = asyncio.current_task()
        while True:
            if not ready:
                waiter = loop.create_future()
                idle.append(waiter)
                try:
                    await waiter
                finally:
                    if waiter.done() and not waiter.cancelled():
                        self._waking -= 1
                continue
            lease = ready.popleft()
            self._wake_runner()
            lease.runner = this
            try:
                await self._handle(lease)
            except Exception:  # the handler's own errors are handled in _handle
                log.exception("settling offset %d failed", lease.delivery.offset)
            lease.runner = None

    async def _handle(self, lease: _Lease) -> None:
        delivery = lease.delivery
        try:
            try:
                if self._is_async:
                    await self.handler(delivery)
                else:
                    await self._call_in_thread(delivery)
            except Retry as exc:
                self.stats.failed += 1
                await self._nack(delivery, exc.delay_seconds)
            except DeadLetter:
                self.stats.dead_lettered += 1
                await self._nack(delivery, None, dead_letter=True)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if task is None or task.cancelling():
                    raise  # the worker is stopping this runner
                # The handler raised it of its own (a cancelled future it awaited): a
                # failure like any other, which must not end the runner.
                self.stats.failed += 1
                log.warning("handler cancelled itself on offset %d; nacking", delivery.offset)
                await self._nack(delivery, None)
            except Exception:
                self.stats.failed += 1
                log.exception("handler failed on offset %d; nacking", delivery.offset)
                await self._nack(delivery, None)
            else:
                self.stats.succeeded += 1
                if self._oldest_ack is None:
                    self._oldest_ack = time.monotonic()
                self._to_ack.append(delivery.receipt)
        finally:
            self._in_flight.pop(delivery.receipt, None)
            self._slot_free.set()

    async def _call_in_thread(self, delivery: Delivery) -> None:
        assert self._executor is not None
        ctx = contextvars.copy_context()
        call = functools.partial(ctx.run, self.handler, delivery)
        result = await asyncio.get_running_loop().run_in_executor(self._executor, call)
        if inspect.isawaitable(result):
            await result

    async def _nack(
        self,
        delivery: Delivery,
        delay: float | None,
        attempts: int = 3,
        dead_letter: bool = False,
    ) -> None:
        for attempt in range(attempts):
            try:
                result = await self.client.nack(
                    self.topic,
                    self.subscription,
                    [delivery.receipt],
                    delay_seconds=delay,
                    dead_letter=dead_letter,
                )
                self.stats.nacked += result.nacked
                return
            except SluiceError as exc:
                if not is_retryable(exc) or attempt == attempts - 1:
                    log.warning("nack of offset %d failed: %s", delivery.offset, exc)
                    return
                await asyncio.sleep(0.2 * 2**attempt)

    async def _give_back(self, deliveries: list[Delivery]) -> None:
        if not deliveries:
            return
        self.stats.given_back += len(deliveries)
        with contextlib.suppress(SluiceError):
            await self.client.nack(
                self.topic, self.subscription, [d.receipt for d in deliveries], delay_seconds=0
            )

    # ---- acks and leases ------------------------------------------------------------------

    def _take_acks(self) -> list[str]:
        acks, self._to_ack = self._to_ack[:1000], self._to_ack[1000:]
        self._oldest_ack = time.monotonic() if self._to_ack else None
        return acks

    def _requeue_acks(self, acks: list[str]) -> None:
        if acks:
            self._to_ack[:0] = acks
            self._oldest_ack = self._oldest_ack or time.monotonic()

    def _count_acks(self, acked: int | None, stale: list[str]) -> None:
        if acked is not None:
            if self._unknown_outcome and stale:
                # Resent after a pull cut off by stopping: the server applies a pull's acks
                # before it waits, so "stale" now means that pull applied them (their lease
                # would have had to expire within the shutdown to mean anything else).
                applied_before = [r for r in stale if r in self._unknown_outcome]
                acked += len(applied_before)
                stale = [r for r in stale if r not in self._unknown_outcome]
                self._unknown_outcome.difference_update(applied_before)
            self.stats.acked += acked
            self.stats.stale_acks += len(stale)
            self.stats.stale_receipts.extend(stale[:100])

    async def _flush_acks(self, attempts: int = 1) -> None:
        attempt = 0
        while self._to_ack:
            acks = self._take_acks()
            try:
                result = await self.client.ack(self.topic, self.subscription, acks)
            except asyncio.CancelledError:
                self._requeue_acks(acks)  # the final flush sends them again
                raise
            except SluiceError as exc:
                self._requeue_acks(acks)
                attempt += 1
                if not is_retryable(exc) or attempt >= attempts:
                    log.warning("ack of %d receipts failed: %s", len(acks), exc)
                    return
                await asyncio.sleep(min(2.0, 0.2 * 2**attempt))
                continue
            self._count_acks(result.acked, result.stale)

    async def _ack_loop(self) -> None:
        interval = self.ack_interval_seconds or 1.0
        while True:
            await asyncio.sleep(interval / 2)
            if self._oldest_ack is not None and time.monotonic() - self._oldest_ack >= interval:
                await self._flush_acks()

    async def _extend_loop(self) -> None:
        step = self._deadline * self.extend_fraction
        while True:
            now = time.monotonic()
            soon = now + self._deadline * 0.1
            due = [r for r, lease in self._in_flight.items() if lease.extend_at <= soon][:1000]
            if due:
                try:
                    result = await self.client.extend(
                        self.topic, self.subscription, due, ack_deadline_seconds=self._deadline
                    )
                except SluiceError as exc:
                    log.warning("extending %d leases failed: %s", len(due), exc)
                    await asyncio.sleep(min(0.5, step / 4))
                    continue
                self.stats.extended += result.extended
                for receipt in due:
                    lease = self._in_flight.get(receipt)
                    if lease is not None:
                        lease.extend_at = now + step
                if result.stale:
                    self.stats.lost_leases += len(result.stale)
                    log.warning(
                        "%d leases were lost before they could be extended", len(result.stale)
                    )
            upcoming = min((lease.extend_at for lease in self._in_flight.values()), default=None)
            pause = min(step / 2, 1.0) if upcoming is None else upcoming - time.monotonic()
            await asyncio.sleep(max(0.02, min(pause, step / 2, 1.0)))

    async def _drain(self, runners: list[asyncio.Task[None]]) -> None:
        """Let the runners finish every lease received (running or waiting for a runner)
        within the grace period; then cancel the handlers still running and give back the
        messages not handled."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_seconds
        while self._in_flight and any(not task.done() for task in runners):
            self._slot_free.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_free.wait(), remaining)
        if not self._in_flight:
            return
        cut = [lease.delivery for lease in self._in_flight.values()]
        running = sum(lease.runner is not None for lease in self._in_flight.values())
        log.warning(
            "%d handlers still running after the grace period, %d not started",
            running,
            len(cut) - running,
        )
        self._ready.clear()
        for task in runners:
            task.cancel()
        await asyncio.gather(*runners, return_exceptions=True)
        await self._give_back(cut)


async def subscribe(
    topic: str,
    subscription: str,
    handler: Handler,
    *,
    concurrency: int = 10,
    client: AsyncClient | None = None,
    **options: Any,
) -> WorkerStats:
    """Run a `Worker` until it is stopped (SIGTERM/SIGINT); a client is made from
    SLUICE_URL / SLUICE_API_KEY when none is given."""
    own = client is None
    client = client or AsyncClient()
    try:
        worker = Worker(client, topic, subscription, handler, concurrency=concurrency, **options)
        return await worker.run()
    finally:
        if own:
            await client.aclose()
