"""Prometheus metrics: event counters, HTTP request metrics, and the exposition.

Counters and the request histogram live in each process. Under `sluice serve --workers N`
the CLI points PROMETHEUS_MULTIPROC_DIR at a fresh directory before the workers start, so
prometheus_client keeps every process's values in files there and a scrape answered by
any worker adds up all of them (MultiProcessCollector). The gauges per subscription
(backlog, lag, ...) are not process state: the answering process reads them from Postgres
at scrape time (app.queue.gauges) and hands them to render().

This module knows nothing of the queue or the database: the queue reports events to its
listeners (app.queue.rates), and app.main subscribes the functions below.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector

from sluice.records import EventKind

if TYPE_CHECKING:
    from sluice.records import Published, SubscriptionGauges

log = logging.getLogger("sluice.metrics")

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

# Our own registry: the metrics of this module, not whatever else imported prometheus_client.
REGISTRY = CollectorRegistry(auto_describe=True)

PUBLISHED = Counter(
    "sluice_messages_published",
    "Messages stored by publish (duplicates excluded)",
    ["topic"],
    registry=REGISTRY,
)
DUPLICATES = Counter(
    "sluice_messages_duplicate",
    "Published messages not stored again because their dedup_id was seen",
    ["topic"],
    registry=REGISTRY,
)
CONTENDED = Counter(
    "sluice_publish_contended",
    "Publish groups that found this topic's lock held by another transaction (another "
    "process's publish, the SQL API's relay) and left its requests to a writer of their "
    "own",
    ["topic"],
    registry=REGISTRY,
)
_EVENT_HELP = {
    EventKind.DELIVERED: "Messages delivered by pull (every attempt)",
    EventKind.ACKED: "Messages acknowledged",
    EventKind.NACKED: "Messages negatively acknowledged",
    EventKind.EXPIRED: "Leases that ended without ack",
    EventKind.DEAD_LETTERED: "Messages parked as dead letters",
}
EVENTS = {
    kind: Counter(
        f"sluice_messages_{kind}", help_text, ["topic", "subscription"], registry=REGISTRY
    )
    for kind, help_text in _EVENT_HELP.items()
}

REQUESTS = Counter(
    "sluice_http_requests",
    "HTTP requests by method, route template and status",
    ["method", "route", "status"],
    registry=REGISTRY,
)
# Long-polls wait up to 20 s: buckets reach beyond that.
LATENCY = Histogram(
    "sluice_http_request_duration_seconds",
    "HTTP request duration by method, route template and status (long-polls included)",
    ["method", "route", "status"],
    buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30),
    registry=REGISTRY,
)
IN_PROGRESS = Gauge(
    "sluice_http_requests_in_progress",
    "HTTP requests being handled (waiting long-polls included)",
    registry=REGISTRY,
    multiprocess_mode="livesum",
)


# ---- counting on the hot paths ----------------------------------------------------------
# A Prometheus counter's inc() checks its labels and takes a lock, a few calls each: the
# counts of one single-message publish (its request, the in-progress gauge up and down, the
# messages published) cost ~12% of its server CPU (bench/RESULTS.md run 28). In one process,
# the default, they are added to plain dicts instead, and each scrape adds those to the
# metrics before it reads them (flush_pending, called by render), so a scrape is as exact as
# before; the in-progress gauge reads a plain int. Under --workers N a scrape answered by one
# worker reads every worker's files, so there each count goes to its metric at once.
# Decided at import: `sluice serve --workers N` sets the variable before its workers start.
_DEFERRED = not os.environ.get(MULTIPROC_ENV)

_pending_published: dict[str, int] = {}
_pending_duplicates: dict[str, int] = {}
_pending_events: dict[tuple[str, str, str], int] = {}
_pending_requests: dict[tuple[str, str, int], int] = {}


class _InProgress:
    """HTTP requests being handled in this process (the gauge's value in one process)."""

    count = 0


if _DEFERRED:
    IN_PROGRESS.set_function(lambda: _InProgress.count)


def request_started() -> None:
    if _DEFERRED:
        _InProgress.count += 1
    else:
        IN_PROGRESS.inc()


def request_finished() -> None:
    if _DEFERRED:
        _InProgress.count -= 1
    else:
        IN_PROGRESS.dec()


def observe_event(topic: str, subscription: str, kind: str, count: int) -> None:
    """A RateRecorder listener: delivered/acked/nacked/expired/dead_lettered events."""
    if kind not in EVENTS:
        return
    if _DEFERRED:
        key = (kind, topic, subscription)
        _pending_events[key] = _pending_events.get(key, 0) + count
    else:
        EVENTS[kind].labels(topic, subscription).inc(count)


def observe_published(topic: str, published: Sequence[Published]) -> None:
    duplicates = sum(1 for p in published if p.duplicate)
    stored = len(published) - duplicates
    if _DEFERRED:
        if stored:
            _pending_published[topic] = _pending_published.get(topic, 0) + stored
        if duplicates:
            _pending_duplicates[topic] = _pending_duplicates.get(topic, 0) + duplicates
        return
    if stored:
        PUBLISHED.labels(topic).inc(stored)
    if duplicates:
        DUPLICATES.labels(topic).inc(duplicates)


def observe_contended(topic: str) -> None:
    CONTENDED.labels(topic).inc()  # rare: no deferral needed


# (method, route template, status) -> that label set's counter and histogram. A bounded
# set (templates, not paths), never removed: looked up here rather than through
# .labels(), which converts, validates and locks on every request.
_REQUEST_SERIES: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _request_series(key: tuple[str, str, int]) -> tuple[Any, Any]:
    series = _REQUEST_SERIES.get(key)
    if series is None:
        labels = (key[0], key[1], str(key[2]))
        series = _REQUEST_SERIES[key] = (REQUESTS.labels(*labels), LATENCY.labels(*labels))
    return series


def observe_request(method: str, route: str, status: int, seconds: float) -> None:
    key = (method, route, status)
    series = _REQUEST_SERIES.get(key) or _request_series(key)
    # The histogram has no way to add many observations at once: each goes in now.
    series[1].observe(seconds)
    if _DEFERRED:
        _pending_requests[key] = _pending_requests.get(key, 0) + 1
    else:
        series[0].inc()


def flush_pending() -> None:
    """Add the counts kept in plain dicts to their metrics (before a scrape reads them)."""
    global _pending_published, _pending_duplicates, _pending_events, _pending_requests
    published, _pending_published = _pending_published, {}
    duplicates, _pending_duplicates = _pending_duplicates, {}
    events, _pending_events = _pending_events, {}
    requests, _pending_requests = _pending_requests, {}
    for topic, count in published.items():
        PUBLISHED.labels(topic).inc(count)
    for topic, count in duplicates.items():
        DUPLICATES.labels(topic).inc(count)
    for (kind, topic, subscription), count in events.items():
        EVENTS[kind].labels(topic, subscription).inc(count)
    for key, count in requests.items():
        _request_series(key)[0].inc(count)


def process_exit() -> None:
    """At shutdown: drop this process's live gauges from the multiprocess directory."""
    path = os.environ.get(MULTIPROC_ENV)
    if path and os.path.isdir(path):
        mark_process_dead(os.getpid(), path)


# ---- gauges from the database -----------------------------------------------------------

GAUGES = {
    "backlog": "Messages deliverable now",
    "lag": "Unacknowledged messages (backlog + in_flight + delayed)",
    "in_flight": "Leased, not yet acknowledged messages",
    "delayed": "Messages waiting for a delay or a retry backoff",
    "dead_lettered": "Messages parked in the dead-letter set",
    "oldest_unacked_age_seconds": "Age of the oldest unacknowledged message (0 when none)",
}


class _Fixed(Collector):
    """Hands out metric families computed before the scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        return iter(self._families)


class _Delegate(Collector):
    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        return self._registry.collect()


def database_families(gauges: Sequence[SubscriptionGauges] | None) -> list[Metric]:
    """The gauge families; `sluice_database_up` 0 and nothing else when `gauges` is None
    (the database could not be read)."""
    up = GaugeMetricFamily(
        "sluice_database_up", "Whether this scrape could read the queue state from Postgres"
    )
    up.add_metric([], 0 if gauges is None else 1)
    families: list[Metric] = [up]
    if gauges is None:
        return families
    by_name = {
        name: GaugeMetricFamily(
            f"sluice_subscription_{name}", help_text, labels=["topic", "subscription"]
        )
        for name, help_text in GAUGES.items()
    }
    for sub in gauges:
        counts = sub.counts
        values = {
            "backlog": counts.backlog,
            "lag": counts.lag,
            "in_flight": counts.in_flight,
            "delayed": counts.delayed,
            "dead_lettered": counts.dead_lettered,
            "oldest_unacked_age_seconds": counts.oldest_unacked_age_seconds or 0.0,
        }
        for name, family in by_name.items():
            family.add_metric([sub.topic, sub.subscription], values[name])
    families.extend(by_name.values())
    return families


def render(gauges: Sequence[SubscriptionGauges] | None, accept: str | None) -> tuple[bytes, str]:
    """The exposition (body, content type), in the format the Accept header asks for."""
    flush_pending()
    registry = CollectorRegistry(auto_describe=False)
    path = os.environ.get(MULTIPROC_ENV)
    if path:
        MultiProcessCollector(registry, path)
    else:
        registry.register(_Delegate(REGISTRY))
    registry.register(_Fixed(database_families(gauges)))
    encoder, content_type = choose_encoder(accept or "")
    return encoder(registry), content_type
