"""The workloads (issue "Benchmarks"), each driving any Peer the same way.

Every phase uses a queue of its own. Throughput phases are closed loops: N workers each
send a request, wait for the answer, send the next; msgs/s counts what completed in the
measured window (after a warm-up), and latency is that request's round trip. The mixed
phase is open-loop (producers at a fixed rate) and its latency is publish -> delivery,
from a send time embedded in each value.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from bench.infra import CpuMeter, Postgres
from bench.peers import Delivery, Peer
from bench.peers.sluice import SluicePeer
from bench.stats import Result, percentile

clock = time.perf_counter


@dataclass(slots=True)
class Config:
    seconds: float = 10.0  # measured window of each timed phase
    warmup: float = 1.0
    size: int = 1024  # bytes of each message value (JSON text)
    producers: int = 4
    consumers: int = 4
    batch: int = 100
    prefill: int = 200_000  # consume b<batch>: messages loaded first, then drained
    prefill_single: int = 20_000  # consume b1
    prefill_batch: int = 1000
    consume_cap: float = 60.0  # upper bound of a drain, seconds
    mixed_rate: float = 1000.0  # messages/s offered in total
    mixed_batch: int = 10
    mixed_producers: int = 2
    mixed_seconds: float = 15.0
    wait_seconds: float = 5.0  # long-poll wait of mixed-phase consumers
    fanout: int = 10
    idle_polls: int = 1000
    idle_seconds: float = 10.0  # longer than Sluice's 5 s re-check period of a waiting poll
    idle_ramp: float = 5.0  # polls connect and make their first claim before CPU is measured
    idle_wakeups: int = 5
    rate_limit: float = 200.0  # ratelimit phase: the subscription's messages/s
    rate_burst: int = 50
    rate_consumers: int = 8
    max_errors: int = 200  # a phase stops early after this many failed requests
    # held-xmin (bench/held_xmin.py): traffic in blocks, a long transaction in the middle
    held_xmin_block_seconds: float = 25.0
    held_xmin_blocks_before: int = 2
    held_xmin_hold_seconds: float = 180.0
    held_xmin_blocks_after: int = 2
    held_xmin_messages: int = 100_000  # per block, all producers together
    held_xmin_mode: str = "snapshot"  # or pgdump: the transaction also locks every table
    held_xmin_producers: int = 2
    held_xmin_consumers: int = 2
    held_xmin_size: int = 200  # bytes of each value


@dataclass(slots=True)
class Context:
    cfg: Config
    postgres: Postgres
    log: Callable[[str], None]

    def meter(self, peer: Peer) -> CpuMeter:
        return CpuMeter(peer.server_pid, self.postgres.postmaster_pid)


def make_value(size: int, sent_at: float = 0.0) -> bytes:
    """A JSON object of about `size` bytes: {"t": <send time>, "pad": "xxx..."}."""
    head = b'{"t":' + repr(sent_at).encode() + b',"pad":"'
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


# ---- the closed loop -----------------------------------------------------------------------


@dataclass(slots=True)
class LoopOutcome:
    messages: int = 0
    seconds: float = 0.0
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    first_error: str | None = None
    cpu: dict[str, float | None] = field(default_factory=dict)


async def run_loop(
    workers: int,
    op: Callable[[int], Awaitable[int]],
    *,
    seconds: float,
    warmup: float,
    meter: CpuMeter,
    stop_on_empty: bool = False,
    max_errors: int = 200,
) -> LoopOutcome:
    """Run `op(worker)` (returns messages done) in `workers` closed loops for a window.

    With stop_on_empty a worker stops when op returns 0 (the queue is drained), and the
    window ends when the last worker stops.
    """
    out = LoopOutcome()
    t_measure = clock() + warmup
    t_end = t_measure + seconds

    async def start_meter() -> None:
        await asyncio.sleep(max(0.0, t_measure - clock()))
        meter.start()

    async def worker(index: int) -> None:
        while clock() < t_end and out.errors <= max_errors:
            t0 = clock()
            try:
                done = await op(index)
            except Exception as exc:
                out.errors += 1
                out.first_error = out.first_error or f"{type(exc).__name__}: {exc}"[:300]
                await asyncio.sleep(0.05)
                continue
            t1 = clock()
            if t_measure <= t1 <= t_end:
                out.latencies_ms.append((t1 - t0) * 1000)
                out.messages += done
            if done == 0 and stop_on_empty:
                return

    metering = asyncio.create_task(start_meter())
    await asyncio.gather(*(worker(i) for i in range(workers)))
    stopped = clock()
    if metering.done():
        out.cpu = meter.stop()
    else:
        metering.cancel()
    out.seconds = max(0.0, min(stopped, t_end) - t_measure)
    return out


def _result(workload: str, peer: Peer, outcome: LoopOutcome, **extra: Any) -> Result:
    result = Result(
        workload=workload,
        system=peer.name,
        messages=outcome.messages,
        seconds=outcome.seconds,
        latencies_ms=outcome.latencies_ms,
        errors=outcome.errors,
        cpu=outcome.cpu,
        **extra,
    )
    if outcome.first_error:
        result.notes.append(f"first error: {outcome.first_error}")
    return result


# ---- 1. publish / 4. fan-out -----------------------------------------------------------------


async def publish(
    ctx: Context, peer: Peer, queue: str, batch: int, subscribers: int = 1, workload: str = ""
) -> Result:
    cfg = ctx.cfg
    await peer.create_queue(queue, subscribers)
    prepared = peer.prepare([make_value(cfg.size)] * batch)

    async def op(_: int) -> int:
        await peer.publish(queue, prepared)
        return batch

    await ctx.postgres.quiesce()
    outcome = await run_loop(
        cfg.producers,
        op,
        seconds=cfg.seconds,
        warmup=cfg.warmup,
        meter=ctx.meter(peer),
        max_errors=cfg.max_errors,
    )
    result = _result(workload or f"publish b{batch}", peer, outcome)
    result.notes.append(f"{cfg.producers} producers, {cfg.size} B values")
    catch_up = getattr(peer, "catch_up", None)
    if catch_up is not None:
        # SQL publish: counted at commit; the relay moves it into the log after.
        result.notes.append(f"all in the log {await catch_up():.2f} s after the window")
    if subscribers > 1:
        result.notes.append(f"{subscribers} subscriptions")
    await peer.drop_queue(queue, subscribers)
    return result


# ---- 2. consume --------------------------------------------------------------------------------


async def prefill(ctx: Context, peer: Peer, queue: str, count: int) -> float:
    """Load `count` messages with 4 concurrent batch publishes; returns msgs/s."""
    cfg = ctx.cfg
    per_batch = min(cfg.prefill_batch, max(1, count))
    prepared = peer.prepare([make_value(cfg.size)] * per_batch)
    remaining = count
    started = clock()

    async def loader() -> None:
        nonlocal remaining
        while remaining > 0:
            n = min(per_batch, remaining)
            remaining -= n
            body = prepared if n == per_batch else peer.prepare([make_value(cfg.size)] * n)
            await peer.publish(queue, body)

    await asyncio.gather(*(loader() for _ in range(4)))
    return count / max(clock() - started, 1e-9)


async def consume(
    ctx: Context,
    peer: Peer,
    queue: str,
    batch: int,
    count: int,
    drain: bool,
    workload: str = "",
    ack_in_pull: bool = False,
) -> Result:
    """Prefill `count`, then consumers pull+ack batches. drain: run until empty (bounded
    by consume_cap) with no warm-up; else a normal timed window. ack_in_pull (Sluice only):
    each pull acknowledges the consumer's previous batch, one request per batch."""
    cfg = ctx.cfg
    await peer.create_queue(queue)
    loaded = await prefill(ctx, peer, queue, count)
    await ctx.postgres.quiesce()
    await peer.ready_to_consume(queue)
    unacked: dict[int, list[Any]] = {}  # ack_in_pull: each consumer's batch to ack next

    async def op(consumer: int) -> int:
        if ack_in_pull:
            assert isinstance(peer, SluicePeer)
            # Counted when pulled: every batch is acked by the consumer's next request, the
            # last one by the request that finds the queue empty and ends the loop.
            deliveries = await peer.pull_acking(queue, batch, unacked.pop(consumer, []))
            unacked[consumer] = [d.handle for d in deliveries]
            return len(deliveries)
        deliveries = await peer.pull(queue, batch)
        if not deliveries:
            return 0
        return await peer.ack(queue, [d.handle for d in deliveries])

    outcome = await run_loop(
        cfg.consumers,
        op,
        seconds=cfg.consume_cap if drain else cfg.seconds,
        warmup=0.0 if drain else cfg.warmup,
        meter=ctx.meter(peer),
        stop_on_empty=True,
        max_errors=cfg.max_errors,
    )
    result = _result(workload or f"consume b{batch}", peer, outcome)
    result.notes.append(f"{cfg.consumers} consumers, prefill {count:,} at {loaded:,.0f}/s")
    if ack_in_pull:
        result.notes.append("each pull acks the previous batch (one request per batch)")
        for handles in unacked.values():  # a timed window leaves the last ones unacked
            if handles:
                await peer.ack(queue, handles)
    if drain and outcome.messages < count and outcome.seconds >= cfg.consume_cap - 0.5:
        result.notes.append(f"cap {cfg.consume_cap:.0f}s hit before the drain")
    await peer.drop_queue(queue)
    return result


# ---- 3. mixed steady state ---------------------------------------------------------------------


async def mixed(ctx: Context, peer: Peer, queue: str) -> Result:
    cfg = ctx.cfg
    await peer.create_queue(queue)
    await ctx.postgres.quiesce()
    t_measure = clock() + cfg.warmup
    t_stop_producing = t_measure + cfg.mixed_seconds
    sent_measured = 0
    received: list[float] = []
    publish_ms: list[float] = []
    errors = 0
    first_error: str | None = None
    stop = asyncio.Event()
    all_received = asyncio.Event()
    producing = True
    meter = ctx.meter(peer)

    def failed(exc: Exception) -> None:
        nonlocal errors, first_error
        errors += 1
        first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]

    per_producer = cfg.mixed_rate / cfg.mixed_producers
    interval = cfg.mixed_batch / per_producer

    async def send(values: list[bytes], sent: float) -> None:
        nonlocal sent_measured
        try:
            await peer.publish(queue, peer.prepare(values))
            if t_measure <= sent < t_stop_producing:  # the same test as the consumers'
                sent_measured += len(values)
                publish_ms.append((clock() - sent) * 1000)
        except Exception as exc:
            failed(exc)

    async def producer(index: int) -> None:
        # Open loop: a batch leaves on schedule even while earlier ones are still in
        # flight, so a slow system cannot lower the rate offered to it (up to 100 in flight).
        in_flight: set[asyncio.Task[None]] = set()
        due = clock() + interval * index / cfg.mixed_producers  # spread the producers out
        while due < t_stop_producing:
            await asyncio.sleep(max(0.0, due - clock()))
            due += interval
            in_flight = {t for t in in_flight if not t.done()}
            if len(in_flight) >= 100:
                await asyncio.wait(in_flight, return_when=asyncio.FIRST_COMPLETED)
            now = clock()
            values = [make_value(cfg.size, now) for _ in range(cfg.mixed_batch)]
            in_flight.add(asyncio.create_task(send(values, now)))
        if in_flight:
            await asyncio.wait(in_flight)

    async def consumer() -> None:
        while not stop.is_set():
            try:
                deliveries = await peer.pull(queue, cfg.batch, cfg.wait_seconds)
                now = clock()
                for d in deliveries:
                    sent = d.sent_at()
                    if t_measure <= sent < t_stop_producing:
                        received.append((now - sent) * 1000)
                if not producing and len(received) >= sent_measured:
                    all_received.set()
                if deliveries:
                    await peer.ack(queue, [d.handle for d in deliveries])
            except Exception as exc:
                failed(exc)
                await asyncio.sleep(0.05)

    async def start_meter() -> None:
        await asyncio.sleep(max(0.0, t_measure - clock()))
        meter.start()

    consumers = [asyncio.create_task(consumer()) for _ in range(cfg.consumers)]
    metering = asyncio.create_task(start_meter())
    await asyncio.gather(*(producer(i) for i in range(cfg.mixed_producers)))
    cpu = meter.stop() if metering.done() else {}
    producing = False
    if len(received) < sent_measured:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(all_received.wait(), cfg.wait_seconds + 3)
    stop.set()
    _, pending = await asyncio.wait(consumers, timeout=cfg.wait_seconds + 5)
    for task in pending:
        task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task

    result = Result(
        workload="mixed e2e",
        system=peer.name,
        messages=len(received),
        seconds=cfg.mixed_seconds,
        latencies_ms=received,
        errors=errors,
        cpu=cpu,
        latency_kind="e2e",
        throughput=False,
    )
    result.notes.append(
        f"{cfg.mixed_rate:.0f} msg/s offered in batches of {cfg.mixed_batch}, "
        f"{cfg.consumers} long-polling consumers (wait {cfg.wait_seconds:g}s)"
    )
    p50, p99 = percentile(publish_ms, 50) or 0, percentile(publish_ms, 99) or 0
    result.notes.append(f"publish p50/p99 {p50:.1f}/{p99:.1f} ms")
    if len(received) < sent_measured:
        result.notes.append(f"{sent_measured - len(received)} not delivered in time")
    if first_error:
        result.notes.append(f"first error: {first_error}")
    await peer.drop_queue(queue)
    return result


# ---- 5. idle long-polls (Sluice only) ------------------------------------------------------------


async def idle_long_polls(ctx: Context, peer: SluicePeer, queue: str) -> Result:
    """N long-polls wait on one subscription: CPU while idle, then wake-up latency."""
    cfg = ctx.cfg
    await peer.create_queue(queue)
    errors = 0
    first_error: str | None = None
    stop = asyncio.Event()
    arrived: asyncio.Queue[tuple[float, Delivery]] = asyncio.Queue()
    started = 0

    async def poller() -> None:
        nonlocal errors, first_error, started
        started += 1
        while not stop.is_set():
            try:
                deliveries = await peer.pull(queue, 1, 20)
            except Exception as exc:
                errors += 1
                first_error = first_error or f"{type(exc).__name__}: {exc}"[:300]
                await asyncio.sleep(0.5)
                continue
            now = clock()
            for d in deliveries:
                arrived.put_nowait((now, d))

    tasks = [asyncio.create_task(poller()) for _ in range(cfg.idle_polls)]
    try:
        await asyncio.sleep(cfg.idle_ramp)
        meter = ctx.meter(peer)
        meter.start()
        await asyncio.sleep(cfg.idle_seconds)
        cpu = meter.stop()
        connections = await peer.database_connections()

        wake_ms: list[float] = []
        for _ in range(cfg.idle_wakeups):
            t0 = clock()
            await peer.publish(queue, peer.prepare([make_value(cfg.size, t0)]))
            try:
                got_at, delivery = await asyncio.wait_for(arrived.get(), 10)
            except TimeoutError:
                errors += 1
                first_error = first_error or "a wake-up took more than 10 s"
                continue
            wake_ms.append((got_at - delivery.sent_at()) * 1000)
            await peer.ack(queue, [delivery.handle])
            await asyncio.sleep(0.2)
    finally:
        stop.set()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    result = Result(
        workload=f"idle {cfg.idle_polls} long-polls",
        system=peer.name,
        messages=len(wake_ms),
        seconds=0.0,
        latencies_ms=wake_ms,
        errors=errors,
        cpu=cpu,
        latency_kind="wake",
        throughput=False,
    )
    result.notes.append(
        f"cpu over {cfg.idle_seconds:g}s idle; {connections} db connections while waiting; "
        f"{len(wake_ms)} wake-ups"
    )
    if started < cfg.idle_polls:
        result.notes.append(f"only {started} polls started")
    if first_error:
        result.notes.append(f"first error: {first_error}")
    return result


# ---- 7. rate-limit accuracy (Sluice only) -------------------------------------------------------


async def rate_limit_accuracy(ctx: Context, peer: SluicePeer, queue: str) -> Result:
    """Consumers drain a big backlog through a rate-limited subscription for the measured
    window; delivered messages are compared with rate x time + burst (SPEC: within 10%)."""
    cfg = ctx.cfg
    await peer.request("PUT", f"/v1/topics/{queue}", b"{}")
    sub = f"/v1/topics/{queue}/subscriptions/limited"
    r = await peer.request(
        "PUT",
        sub,
        orjson.dumps(
            {
                "start": "earliest",
                "rate_limit_per_second": cfg.rate_limit,
                "rate_limit_burst": cfg.rate_burst,
            }
        ),
    )
    if r.status_code >= 300:
        raise RuntimeError(f"PUT {sub}: {r.status_code} {r.content[:300]!r}")
    backlog = int((cfg.rate_limit * cfg.seconds + cfg.rate_burst) * 1.5) + 100
    await prefill(ctx, peer, queue, backlog)

    delivered = 0
    errors = 0
    latencies: list[float] = []
    start = clock()
    stop_at = start + cfg.seconds

    async def consumer() -> None:
        nonlocal delivered, errors
        while (left := stop_at - clock()) > 0:
            t0 = clock()
            r = await peer.request(
                "POST",
                sub + "/pull",
                orjson.dumps({"max_messages": 50, "wait_seconds": round(min(2.0, left), 2)}),
            )
            if clock() > stop_at:
                return  # answered after the window: not counted
            if r.status_code == 429:
                await asyncio.sleep(min(1.0, float(r.headers.get("Retry-After", "1"))) / 4)
                continue
            if r.status_code != 200:
                errors += 1
                continue
            messages = r.json()["messages"]
            latencies.append((clock() - t0) * 1000)
            delivered += len(messages)
            if messages:
                receipts = [m["receipt"] for m in messages]
                await peer.request("POST", sub + "/ack", orjson.dumps({"receipts": receipts}))

    meter = ctx.meter(peer)
    meter.start()
    await asyncio.gather(*(consumer() for _ in range(cfg.rate_consumers)))
    cpu = meter.stop()
    # Only answers that arrived inside the window were counted, so the window is the time.
    elapsed = stop_at - start
    expected = cfg.rate_limit * elapsed + cfg.rate_burst
    result = Result(
        workload=f"rate limit {cfg.rate_limit:g}/s",
        system=peer.name,
        messages=delivered,
        seconds=elapsed,
        latencies_ms=latencies,
        errors=errors,
        cpu=cpu,
    )
    result.notes.append(
        f"{cfg.rate_consumers} consumers; delivered {delivered} vs rate x time + burst "
        f"{expected:.0f} ({(delivered - expected) / expected * 100:+.1f}%)"
    )
    return result
