"""The Python SDK (clients/python) under the bench: a `Worker` with a trivial handler
draining a prefilled subscription, and a `Publisher` with linger fed as fast as it takes
messages. Compared, in the same run, with the bench's own aiohttp load generator on the
same work (`consume b100 ack-in-pull` / `consume b100`, `publish b100`): the issue's
targets are >= 0.7x of each (bench/RESULTS.md, run 21)."""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from bench import workloads as w
from bench.infra import ROOT
from bench.peers.sluice import SluicePeer
from bench.stats import Result

try:
    from sluice_client import AsyncClient, Delivery, Publisher, Worker
except ImportError:  # not installed: the checkout's own copy (a distribution of its own)
    sys.path.insert(0, str(ROOT / "clients" / "python"))
    from sluice_client import AsyncClient, Delivery, Publisher, Worker

clock = w.clock


def transport_suffix(transport: str) -> str:
    """Rows of the SDK over AsyncClient(transport="aiohttp") say so (the client's default
    when httpx-aiohttp is installed); rows without a suffix are over httpx's own."""
    return " (aiohttp transport)" if transport == "aiohttp" else ""


def worker_label(batch: int, transport: str = "httpx") -> str:
    return f"sdk worker b{batch}" + transport_suffix(transport)


def _client(peer: SluicePeer, transport: str) -> AsyncClient:
    return AsyncClient(peer.base_url, timeout=60, transport=transport)  # type: ignore[arg-type]


async def worker_drain(
    ctx: w.Context,
    peer: SluicePeer,
    queue: str,
    count: int,
    concurrency: int,
    batch: int,
    transport: str = "httpx",
) -> Result:
    """Prefill `count` (as `consume`), then one Worker drains it with a handler that does
    nothing; timed from the worker's start until run() returned (its last acks included)."""
    cfg = ctx.cfg
    await peer.create_queue(queue)
    loaded = await w.prefill(ctx, peer, queue, count)
    await ctx.postgres.quiesce()
    processed = 0
    all_done = asyncio.Event()

    async def handler(_: Delivery) -> None:
        nonlocal processed
        processed += 1
        if processed >= count:
            all_done.set()

    notes: list[str] = []
    async with _client(peer, transport) as client:
        worker = Worker(
            client,
            queue,
            "s0",
            handler,
            concurrency=concurrency,
            max_messages=batch,
            wait_seconds=1,
            handle_signals=False,
        )
        meter = ctx.meter(peer)
        meter.start()
        started = clock()
        task = asyncio.create_task(worker.run())
        try:
            await asyncio.wait_for(all_done.wait(), cfg.consume_cap)
        except TimeoutError:
            notes.append(f"cap {cfg.consume_cap:.0f}s hit before the drain")
        worker.stop()
        stats = await task
        seconds = clock() - started
        cpu = meter.stop()
    result = Result(
        workload=worker_label(batch, transport),
        system=peer.name,
        messages=processed,
        seconds=seconds,
        cpu=cpu,
        errors=stats.failed,
    )
    result.notes.append(
        f"1 Worker, concurrency {concurrency}, {worker.pullers} pulls of up to {batch} at once, "
        "acks in the next "
        f"pull; prefill {count:,} at {loaded:,.0f}/s; acked {stats.acked:,} "
        f"(+{stats.stale_acks} resent after the stop cut a pull short)"
    )
    result.notes.extend(notes)
    return result


def publisher_label(linger: float, in_flight: int, transport: str = "httpx") -> str:
    return (
        f"sdk publisher linger {linger * 1000:g}ms"
        + (f" x{in_flight} in flight" if in_flight > 1 else "")
        + transport_suffix(transport)
    )


async def publisher_linger(
    ctx: w.Context,
    peer: SluicePeer,
    queue: str,
    linger: float,
    max_batch: int,
    in_flight: int,
    transport: str = "httpx",
) -> Result:
    """One Publisher (`in_flight` batches under way at most; 1 keeps their order) fed by
    one coroutine as fast as it takes messages; a message counts when its future resolved
    inside the measured window."""
    cfg = ctx.cfg
    await peer.create_queue(queue)
    value: dict[str, Any] = {"t": 0.0, "pad": "x" * max(0, cfg.size - 20)}  # ~size B of JSON
    await ctx.postgres.quiesce()
    t_measure = clock() + cfg.warmup
    t_end = t_measure + cfg.seconds
    counted = 0
    failed = 0

    def settled(future: asyncio.Future[int]) -> None:
        nonlocal counted, failed
        if future.cancelled() or future.exception() is not None:
            failed += 1
        elif t_measure <= clock() <= t_end:
            counted += 1

    meter = ctx.meter(peer)
    async with _client(peer, transport) as client:
        publisher = Publisher(
            client,
            queue,
            linger_seconds=linger,
            max_batch_messages=max_batch,
            max_buffered=20_000,
            max_in_flight_batches=in_flight,
        )

        async def start_meter() -> None:
            await asyncio.sleep(max(0.0, t_measure - clock()))
            meter.start()

        metering = asyncio.create_task(start_meter())
        while clock() < t_end:
            future = await publisher.publish(value)
            future.add_done_callback(settled)
        await publisher.close()
        await metering
        cpu = meter.stop()
    result = Result(
        workload=publisher_label(linger, in_flight, transport),
        system=peer.name,
        messages=counted,
        seconds=cfg.seconds,
        cpu=cpu,
        errors=failed,
    )
    result.notes.append(
        f"1 Publisher, batches of up to {max_batch}, {publisher.batches_sent:,} batches, "
        f"{cfg.size} B values, dedup ids on"
    )
    return result
