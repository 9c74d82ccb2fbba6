"""sluice_client.Worker against a real `sluice serve` process: draining with failures,
acks only after the handler returned, leases kept through extends, a graceful stop,
Retry/DeadLetter, 429 and 5xx handling."""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import unique
from tests.sdk_support import sc, server  # noqa: F401 (the fixture)


class Audit(httpx.AsyncBaseTransport):
    """Real HTTP; checks that every receipt acked (in a pull's `ack` or at /ack) belongs to a
    handler that had returned (`returned`), and records pull answers. `fail_pulls` answers
    that many pulls 503 without reaching the server."""

    def __init__(self, fail_pulls: int = 0) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.returned: set[str] = set()
        self.premature: list[str] = []
        self.acks_sent = 0
        self.pulls: list[tuple[float, int]] = []  # (time, status)
        self.fail_pulls = fail_pulls

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        body = json.loads(request.content) if request.content else {}
        receipts = []
        if path.endswith("/pull"):
            receipts = body.get("ack") or []
        elif path.endswith("/ack"):
            receipts = body["receipts"]
        self.acks_sent += len(receipts)
        self.premature += [r for r in receipts if r not in self.returned]
        if path.endswith("/pull") and self.fail_pulls > 0 and not receipts:
            self.fail_pulls -= 1
            self.pulls.append((time.monotonic(), 503))
            return httpx.Response(
                503, json={"type": "x", "title": "Unavailable", "status": 503, "detail": "t"}
            )
        response = await self.inner.handle_async_request(request)
        if path.endswith("/pull"):
            self.pulls.append((time.monotonic(), response.status_code))
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def wait_for(predicate, timeout: float):
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.05)


async def setup(client: sc.AsyncClient, n: int, **sub_settings) -> str:
    topic = unique("wrk")
    await client.create_topic(topic)
    await client.create_subscription(topic, "s", start="earliest", **sub_settings)
    for start in range(0, n, 1000):
        await client.publish(topic, [{"value": i} for i in range(start, min(n, start + 1000))])
    return topic


@pytest.mark.parametrize(
    ("concurrency", "max_messages", "pullers"),
    [(32, None, 1), (40, 10, 4)],  # one pull at a time; four pulls of 10 overlapping
)
async def test_worker_drains_2000_messages_with_first_attempt_failures(
    server, concurrency, max_messages, pullers
):
    audit = Audit()
    async with sc.AsyncClient(server.base_url, transport=audit) as client:
        topic = await setup(client, 2000, retry_min_seconds=0, retry_max_seconds=0)
        attempts: collections.Counter[int] = collections.Counter()
        done: set[int] = set()
        running = 0
        most_running = 0

        async def handler(d: sc.Delivery) -> None:
            nonlocal running, most_running
            running += 1
            most_running = max(most_running, running)
            try:
                attempts[d.value] += 1
                await asyncio.sleep(random.uniform(0, 0.004))
                if d.value % 10 == 0 and d.delivery_attempt == 1:
                    raise RuntimeError("fails on its first attempt")
                done.add(d.value)
                audit.returned.add(d.receipt)
            finally:
                running -= 1

        worker = sc.Worker(
            client,
            topic,
            "s",
            handler,
            concurrency=concurrency,
            max_messages=max_messages,
            wait_seconds=1,
            handle_signals=False,
        )
        assert worker.pullers == pullers
        task = asyncio.create_task(worker.run())

        async def drained() -> bool:
            if len(done) < 2000:
                return False
            return (await client.get_subscription(topic, "s")).lag == 0

        await wait_for(drained, 45)
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
        sub = await client.get_subscription(topic, "s")
    assert done == set(range(2000))
    assert {v: n for v, n in attempts.items() if n != 1} == {v: 2 for v in range(0, 2000, 10)}
    assert audit.premature == []  # no receipt acked before its handler returned
    assert stats.succeeded == 2000 and stats.failed == 200 and stats.nacked == 200
    # A pull cut off by stop() may have applied its acks before the worker resent them
    # (then they come back stale): every receipt was acked once by the server.
    assert stats.acked + stats.stale_acks == 2000 and stats.stale_acks <= concurrency
    assert most_running <= concurrency
    assert sub.lag == 0 and sub.in_flight == 0 and sub.committed_offset == sub.head_offset + 1


async def test_a_slow_handler_keeps_its_lease_through_extends(server):
    audit = Audit()
    async with sc.AsyncClient(server.base_url, transport=audit) as client:
        topic = await setup(client, 3, ack_deadline_seconds=2)
        calls: list[tuple[int, int]] = []

        async def handler(d: sc.Delivery) -> None:
            calls.append((d.value, d.delivery_attempt))
            await asyncio.sleep(5)  # 2.5 x the ack deadline
            audit.returned.add(d.receipt)

        # free slots keep the worker pulling: an expired lease would come back to it
        worker = sc.Worker(
            client, topic, "s", handler, concurrency=6, wait_seconds=1, handle_signals=False
        )
        task = asyncio.create_task(worker.run())

        async def acked() -> bool:
            return worker.stats.acked == 3

        await wait_for(acked, 15)
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
        sub = await client.get_subscription(topic, "s")
    assert sorted(calls) == [(0, 1), (1, 1), (2, 1)]  # never redelivered
    assert stats.extended >= 6 and stats.lost_leases == 0
    assert audit.premature == []
    assert sub.lag == 0 and sub.delivered_total == 3 and sub.rates_per_second.expired == 0


async def test_stop_mid_batch_finishes_running_handlers_and_loses_nothing(server):
    audit = Audit()
    async with sc.AsyncClient(server.base_url, transport=audit) as client:
        topic = await setup(client, 40)
        started: set[int] = set()
        finished: set[int] = set()

        async def slow(d: sc.Delivery) -> None:
            started.add(d.value)
            await asyncio.sleep(0.5)
            finished.add(d.value)
            audit.returned.add(d.receipt)

        worker = sc.Worker(
            client, topic, "s", slow, concurrency=10, wait_seconds=1, handle_signals=False
        )
        task = asyncio.create_task(worker.run())

        async def busy() -> bool:
            return len(started) >= 10

        await wait_for(busy, 10)
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
        assert started == finished and len(finished) >= 10  # running handlers finished
        assert stats.acked == len(finished) and stats.stale_acks == 0
        sub = await client.get_subscription(topic, "s")
        assert sub.in_flight == 0 and sub.lag == 40 - len(finished)

        # a second worker gets exactly the rest
        second: list[int] = []

        async def fast(d: sc.Delivery) -> None:
            second.append(d.value)
            audit.returned.add(d.receipt)

        worker2 = sc.Worker(
            client, topic, "s", fast, concurrency=10, wait_seconds=1, handle_signals=False
        )
        task2 = asyncio.create_task(worker2.run())

        async def all_done() -> bool:
            return len(finished) + len(second) >= 40 and worker2.stats.acked == len(second)

        await wait_for(all_done, 10)
        worker2.stop()
        await asyncio.wait_for(task2, 10)
        sub = await client.get_subscription(topic, "s")
    assert sorted([*finished, *second]) == list(range(40))  # nothing lost, nothing twice
    assert sub.lag == 0
    assert audit.premature == []


async def test_retry_and_dead_letter_with_a_sync_handler(server):
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 3, max_deliveries=3, retry_min_seconds=0, retry_max_seconds=0)
        calls: collections.Counter[int] = collections.Counter()
        retried_at: list[float] = []
        threads: set[str] = set()

        def handler(d: sc.Delivery) -> None:  # a plain function: runs in a thread
            threads.add(threading.current_thread().name)
            calls[d.value] += 1
            if d.value == 1 and d.delivery_attempt == 1:
                retried_at.append(time.monotonic())
                raise sc.Retry(0.5)
            if d.value == 1:
                retried_at.append(time.monotonic())
            if d.value == 2:
                raise sc.DeadLetter()

        worker = sc.Worker(
            client, topic, "s", handler, concurrency=4, wait_seconds=1, handle_signals=False
        )
        task = asyncio.create_task(worker.run())

        async def settled() -> bool:
            sub = await client.get_subscription(topic, "s")
            return sub.dead_lettered == 1 and sub.lag == 0 and worker.stats.acked == 2

        await wait_for(settled, 15)
        worker.stop()
        await asyncio.wait_for(task, 10)
        parked = await client.dead_letters(topic, "s")
    assert [m.value for m in parked.messages] == [2]
    assert parked.messages[0].delivery_attempts == 1  # parked at once (nack dead_letter)
    assert calls == {0: 1, 1: 2, 2: 1}
    assert retried_at[1] - retried_at[0] >= 0.45
    assert threads and all(name.startswith("sluice-handler") for name in threads)


async def test_dead_letter_parks_even_with_unlimited_deliveries(server):
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 0, max_deliveries=0)
        await client.create_topic(topic + "-dlq")
        await client.update_subscription(topic, "s", dead_letter_topic=topic + "-dlq")
        await client.publish(topic, [{"value": v} for v in ("ok", "poison", "ok2")])
        calls: collections.Counter[str] = collections.Counter()

        async def handler(d: sc.Delivery) -> None:
            calls[d.value] += 1
            if d.value == "poison":
                raise sc.DeadLetter()

        worker = sc.Worker(
            client, topic, "s", handler, concurrency=3, wait_seconds=1, handle_signals=False
        )
        task = asyncio.create_task(worker.run())

        async def settled() -> bool:
            sub = await client.get_subscription(topic, "s")
            return sub.dead_lettered == 1 and sub.lag == 0 and worker.stats.acked == 2

        await wait_for(settled, 15)
        await asyncio.sleep(0.3)  # a redelivery (there must be none) would show up now
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
        parked = await client.dead_letters(topic, "s")
        copies = await client.browse(topic + "-dlq")
    assert calls == {"ok": 1, "poison": 1, "ok2": 1}
    assert [(m.value, m.delivery_attempts) for m in parked.messages] == [("poison", 1)]
    assert [m.value for m in copies.messages] == ["poison"]
    assert stats.dead_lettered == 1 and stats.nacked == 1 and stats.failed == 0


async def test_worker_honours_retry_after_on_429_and_backs_off_on_503(server):
    audit = Audit(fail_pulls=3)
    async with sc.AsyncClient(server.base_url, transport=audit) as client:
        topic = await setup(client, 4, rate_limit_per_second=2, rate_limit_burst=1)
        done: list[int] = []

        async def handler(d: sc.Delivery) -> None:
            done.append(d.value)
            audit.returned.add(d.receipt)

        worker = sc.Worker(
            client, topic, "s", handler, concurrency=2, wait_seconds=0, handle_signals=False
        )
        task = asyncio.create_task(worker.run())

        async def all_acked() -> bool:
            return worker.stats.acked == 4

        await wait_for(all_acked, 20)
        worker.stop()
        await asyncio.wait_for(task, 10)
    assert sorted(done) == [0, 1, 2, 3]
    statuses = [s for _, s in audit.pulls]
    assert statuses[:3] == [503, 503, 503] and 429 in statuses
    for (t0, s0), (t1, _) in zip(audit.pulls, audit.pulls[1:], strict=False):
        if s0 == 429:
            assert t1 - t0 >= 0.9  # Retry-After (whole seconds) was honoured
    assert audit.premature == []


async def test_sigterm_stops_the_worker_gracefully(server):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 5)
        finished: list[int] = []

        async def handler(d: sc.Delivery) -> None:
            await asyncio.sleep(0.5)
            finished.append(d.value)

        worker = sc.Worker(client, topic, "s", handler, concurrency=5, wait_seconds=1)
        task = asyncio.create_task(worker.run())

        async def busy() -> bool:
            return worker.stats.received == 5

        await wait_for(busy, 10)
        assert signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
        os.kill(os.getpid(), signal.SIGTERM)
        stats = await asyncio.wait_for(task, 10)
        sub = await client.get_subscription(topic, "s")
    assert sorted(finished) == [0, 1, 2, 3, 4] and stats.acked == 5
    assert sub.lag == 0


@pytest.mark.parametrize("pullers", [1, 3])
async def test_fatal_errors_end_run_with_the_exception(server, pullers):
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 0)

        async def handler(d: sc.Delivery) -> None:
            pass

        with pytest.raises(sc.NotFound):
            await sc.Worker(client, topic, "missing", handler, handle_signals=False).run()
        worker = sc.Worker(
            client, topic, "s", handler, wait_seconds=0.2, handle_signals=False, pullers=pullers
        )
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.3)
        await client.delete_subscription(topic, "s")
        with pytest.raises(sc.NotFound):
            await asyncio.wait_for(task, 5)
        assert not worker.running


async def test_subscribe_reads_the_environment_and_stops_on_sigint(server, monkeypatch):
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("signal handlers need the main thread")
    monkeypatch.setenv("SLUICE_URL", server.base_url)
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 3)
    seen: list[int] = []

    def handler(d: sc.Delivery) -> None:
        seen.append(d.value)
        if len(seen) == 3:
            os.kill(os.getpid(), signal.SIGINT)

    stats = await asyncio.wait_for(
        sc.subscribe(topic, "s", handler, concurrency=1, wait_seconds=1), 15
    )
    assert sorted(seen) == [0, 1, 2] and stats.acked == 3


async def test_stop_ends_an_idle_long_poll_at_once(server):
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 0)

        async def handler(d: sc.Delivery) -> None:
            pass

        worker = sc.Worker(client, topic, "s", handler, wait_seconds=20, handle_signals=False)
        task = asyncio.create_task(worker.run())
        await asyncio.sleep(0.5)  # the long-poll is waiting
        started = time.monotonic()
        worker.stop()
        await asyncio.wait_for(task, 5)
        assert time.monotonic() - started < 2
        # the cancelled long-poll holds nothing: a message published now is deliverable
        await client.publish(topic, [{"value": "after"}])
        pulled = await client.pull(topic, "s", max_messages=1, wait_seconds=2)
        assert [d.value for d in pulled] == ["after"]


@pytest.mark.parametrize("kind", ["async", "sync"])
async def test_handlers_run_concurrently_up_to_the_limit(server, kind):
    """`concurrency` handlers that wait (here: for each other) all run at once, and never
    more: the runners hand leases to each other as soon as a handler waits."""
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 30)
        lock = threading.Lock()
        running = 0
        most_running = 0
        all_in = threading.Event()

        def enter() -> None:
            nonlocal running, most_running
            with lock:
                running += 1
                most_running = max(most_running, running)
                if running >= 8:
                    all_in.set()

        def leave() -> None:
            nonlocal running
            with lock:
                running -= 1

        async def async_handler(d: sc.Delivery) -> None:
            enter()
            try:
                deadline = time.monotonic() + 5
                while not all_in.is_set() and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            finally:
                leave()

        def sync_handler(d: sc.Delivery) -> None:
            enter()
            try:
                all_in.wait(5)
            finally:
                leave()

        handler = async_handler if kind == "async" else sync_handler
        worker = sc.Worker(
            client, topic, "s", handler, concurrency=8, wait_seconds=1, handle_signals=False
        )
        task = asyncio.create_task(worker.run())
        started = time.monotonic()
        await wait_for(lambda: asyncio.sleep(0, all_in.is_set()), 10)
        reached_in = time.monotonic() - started
        await wait_for(lambda: asyncio.sleep(0, worker.stats.succeeded == 30), 10)
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
    assert most_running == 8
    assert reached_in < 4  # not one at a time (each would wait its 5 s)
    assert stats.succeeded == 30 and stats.acked == 30


async def test_handlers_still_running_after_the_grace_period_are_cut_and_given_back(server):
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 5)
        started: set[int] = set()
        cancelled: set[int] = set()

        async def stuck(d: sc.Delivery) -> None:
            started.add(d.value)
            try:
                await asyncio.sleep(60)
            except asyncio.CancelledError:
                cancelled.add(d.value)
                raise

        worker = sc.Worker(
            client,
            topic,
            "s",
            stuck,
            concurrency=5,
            wait_seconds=1,
            grace_seconds=0.5,
            handle_signals=False,
        )
        task = asyncio.create_task(worker.run())
        await wait_for(lambda: asyncio.sleep(0, len(started) == 5), 10)
        stop_at = time.monotonic()
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
        stopped_in = time.monotonic() - stop_at
        sub = await client.get_subscription(topic, "s")
    assert cancelled == started == set(range(5))
    assert 0.4 < stopped_in < 5
    assert stats.given_back == 5 and stats.succeeded == 0 and stats.acked == 0
    assert sub.in_flight == 0 and sub.lag == 5  # given back: deliverable again at once


async def test_a_handler_that_raises_cancelled_error_itself_is_a_failure_not_a_stop(server):
    """A handler may raise CancelledError of its own (it awaited a future someone else
    cancelled): its message is nacked and retried, and its runner goes on with the next
    messages (with concurrency 1 there is no other runner)."""
    async with sc.AsyncClient(server.base_url) as client:
        topic = await setup(client, 5, retry_min_seconds=0, retry_max_seconds=0)
        handled: list[tuple[int, int]] = []

        async def handler(d: sc.Delivery) -> None:
            handled.append((d.value, d.delivery_attempt))
            if d.value == 0 and d.delivery_attempt == 1:
                cancelled = asyncio.get_running_loop().create_future()
                cancelled.cancel()
                await cancelled

        worker = sc.Worker(
            client, topic, "s", handler, concurrency=1, wait_seconds=1, handle_signals=False
        )
        task = asyncio.create_task(worker.run())
        await wait_for(lambda: asyncio.sleep(0, worker.stats.succeeded == 5), 15)
        worker.stop()
        stats = await asyncio.wait_for(task, 10)
    assert stats.failed == 1 and stats.nacked == 1 and stats.succeeded == 5
    assert sorted(handled) == [(0, 1), (0, 2), (1, 1), (2, 1), (3, 1), (4, 1)]


class AnswerInTransit(httpx.AsyncBaseTransport):
    """Real HTTP; each pull's answer, read whole, reaches the Worker 0.1 s late (as an
    answer does that the server sent just before the client stopped)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport()
        self.pull_answered = asyncio.Event()

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        response = await self.inner.handle_async_request(request)
        if request.url.path.endswith("/pull"):
            await response.aread()
            self.pull_answered.set()
            await asyncio.sleep(0.1)
        return response

    async def aclose(self) -> None:
        await self.inner.aclose()


async def test_a_pull_answered_as_the_worker_stops_is_given_back(server):
    """stop() while a pull's answer is on its way: the server already leased those messages
    and cannot know the client is leaving; the Worker takes the answer and gives them back
    rather than leaving them leased until their deadline."""
    transport = AnswerInTransit()
    async with sc.AsyncClient(server.base_url, transport=transport) as client:
        topic = await setup(client, 3)

        async def handler(d: sc.Delivery) -> None:
            raise AssertionError("no handler runs: the answer comes after stop()")

        worker = sc.Worker(client, topic, "s", handler, wait_seconds=1, handle_signals=False)
        task = asyncio.create_task(worker.run())
        await asyncio.wait_for(transport.pull_answered.wait(), 10)
        worker.stop()
        stats = await asyncio.wait_for(task, 5)
        assert stats.given_back == 3 and stats.received == 0
        sub = await client.get_subscription(topic, "s")
        assert sub.in_flight == 0 and sub.backlog == 3
