"""create_app(): the FastAPI application and its lifespan (pool, listener, background tasks)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from sluice import metrics
from sluice.api.access import install_auth, start_auth
from sluice.api.hot_paths import install_hot_paths
from sluice.api.limits import LimitBodyMiddleware
from sluice.api.observability import ObservabilityMiddleware
from sluice.api.problems import install_problem_handlers
from sluice.api.responses import JSONBody
from sluice.api.routes import consuming, docs, health, sqs, subscriptions, topics, ui
from sluice.api.routes import metrics as metrics_route
from sluice.queue.clock import Clock
from sluice.queue.context import QueueContext
from sluice.queue.maintenance import maintenance_loop
from sluice.queue.publisher import Publisher
from sluice.queue.rates import RateRecorder
from sluice.queue.relay import Relay
from sluice.queue.waiters import WaiterHub
from sluice.settings import Settings, get_settings
from sluice.storage import migrate
from sluice.storage.db import create_pool, split_pool_size
from sluice.storage.listener import Listener

log = logging.getLogger("sluice")

DESCRIPTION = """
Sluice is an HTTP message queue on PostgreSQL. Producers publish to **topics** (append-only
logs with commit-ordered offsets); each **subscription** is a consumer group that leases
messages with an ack deadline, retries with backoff, parks dead letters and can replay.

Errors are RFC 9457 `application/problem+json`.
"""


# Collect the youngest generation after this many new container objects instead of 700.
GC_GEN0_THRESHOLD = 50_000


def _settle_garbage_collector() -> None:
    """Profiling the publish path showed the cyclic garbage collector taking a quarter of the
    server's time: a 100-message publish allocates thousands of objects, so generation-0
    collections ran several times per request, and the older generations kept re-walking
    everything built at start-up (FastAPI routes, pydantic schemas). Freezing what exists
    once start-up is done takes those objects out of every later collection, and a higher
    generation-0 threshold makes collections rarer. Reference counting still frees almost
    everything at once; only cycles wait longer."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_GEN0_THRESHOLD, older, oldest)


def _chain_sigterm(hub: WaiterHub) -> None:
    """On SIGTERM, end waiting long-polls now, then let uvicorn's own handler drain."""
    loop = asyncio.get_running_loop()
    previous = signal.getsignal(signal.SIGTERM)

    def handler(signum: int, frame: Any) -> None:
        loop.call_soon_threadsafe(hub.close)
        if callable(previous):
            previous(signum, frame)

    with contextlib.suppress(ValueError):  # not the main thread (e.g. under a test runner)
        signal.signal(signal.SIGTERM, handler)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    embedded = None
    url = settings.database_url
    if url is None:
        from sluice.embedded import start_embedded

        url, embedded = await asyncio.to_thread(start_embedded, settings.data_dir)
    await migrate.upgrade(url)
    main_size, claim_size = split_pool_size(settings.db_pool_size)
    pool = await create_pool(url, main_size)
    claim_pool = await create_pool(url, claim_size, durable_commits=False)
    await start_auth(app, pool)
    hub = WaiterHub()
    clock: Clock = app.state.clock
    ctx = QueueContext(
        pool=pool,
        claim_pool=claim_pool,
        settings=settings,
        clock=clock,
        hub=hub,
        publisher=Publisher(pool, clock),
        rates=RateRecorder(),
    )
    ctx.rates.listeners.append(metrics.observe_event)
    ctx.rates.publish_listeners.append(metrics.observe_published)
    ctx.publisher.contended_listeners.append(metrics.observe_contended)
    relay = Relay(ctx)

    def on_reconnect() -> None:
        hub.wake_all()
        relay.wake()  # notifications may have been lost meanwhile

    listener = Listener(
        url,
        hub.notify,
        on_reconnect,
        settings.listener_keepalive_seconds,
        relay.wake,
        on_interest=hub.wake_topics,
        linger_seconds=settings.listener_linger_seconds,
        on_outbox_declared=relay.wake,
    )
    relay.declare_waiting = listener.want_outbox
    hub.on_topic_waited = listener.topic_waited
    hub.on_topic_unwaited = listener.topic_unwaited
    listener.start()
    app.state.ctx = ctx
    app.state.listener = listener
    app.state.head_revision = migrate.head_revision()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(listener.connected.wait(), 10)
    maintenance = asyncio.create_task(maintenance_loop(ctx), name="sluice-maintenance")
    rate_flusher = asyncio.create_task(ctx.rates.run(pool, lambda: clock.skew), name="sluice-rates")
    background = [maintenance, rate_flusher]
    if settings.sql_relay:
        background.append(asyncio.create_task(relay.run(), name="sluice-relay"))
    _chain_sigterm(hub)
    _settle_garbage_collector()
    try:
        yield
    finally:
        hub.close()
        for task in background:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await listener.stop()
        await ctx.publisher.close()
        await claim_pool.close()
        await pool.close()
        metrics.process_exit()
        if embedded is not None:
            from sluice.embedded import stop_embedded

            await asyncio.to_thread(stop_embedded, embedded)


# FastAPI's native OpenTelemetry instrumentation asks the global OpenTelemetry providers on
# every request whether one was set up (environment lookups included): ~2% of a
# single-message publish under wrk with none set up (bench/RESULTS.md run 25). Sluice's
# own observability is Prometheus and its access log; FastAPI's spans and metrics stay on
# when OpenTelemetry is configured through the environment (OTEL_* or
# FASTAPI_OTEL_AUTO_CONFIGURE), which is how `opentelemetry-instrument sluice serve` does it.
_NO_TELEMETRY: dict[str, Any] = {"tracing": False, "metrics": False, "logs": False}


def _opentelemetry_configured() -> bool:
    return any(
        name.startswith("OTEL_") or name == "FASTAPI_OTEL_AUTO_CONFIGURE" for name in os.environ
    )


def create_app(settings: Settings | None = None, clock: Clock | None = None) -> FastAPI:
    settings = settings or get_settings()
    app = FastAPI(
        title="Sluice",
        version="0.1.0",
        description=DESCRIPTION,
        lifespan=lifespan,
        default_response_class=JSONBody,
        # FastAPI's own /docs and /redoc load their assets from a CDN: ours serve them.
        docs_url=None,
        redoc_url=None,
        telemetry=None if _opentelemetry_configured() else _NO_TELEMETRY,
    )
    app.state.settings = settings
    app.state.clock = clock or Clock()
    install_problem_handlers(app)
    for module in (health, topics, subscriptions, consuming, metrics_route, ui, docs, sqs):
        app.include_router(module.router)
    install_hot_paths(app)
    app.add_middleware(LimitBodyMiddleware, max_bytes=settings.max_body_bytes)
    install_auth(app)  # outermost: unauthenticated requests are refused before parsing
    app.add_middleware(ObservabilityMiddleware)  # outside even that: logs/counts 401s too
    _problem_only_errors(app)
    return app


def _problem_only_errors(app: FastAPI) -> None:
    """Error answers are documented as application/problem+json only (what we send)."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = generate()
        for item in schema.get("paths", {}).values():
            for operation in item.values():
                for code, response in operation.get("responses", {}).items():
                    content = response.get("content", {})
                    if code[0] in "45" and "application/problem+json" in content:
                        content.pop("application/json", None)
        schemas = schema.get("components", {}).get("schemas", {})
        for unused in ("HTTPValidationError", "ValidationError"):
            schemas.pop(unused, None)
        return schema

    app.openapi = openapi  # type: ignore[method-assign]
