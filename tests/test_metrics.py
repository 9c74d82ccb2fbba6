"""GET /metrics: Prometheus text that parses, counters that follow the traffic, gauges read
from the database, request metrics by route template, and multi-process aggregation."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections import defaultdict
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.parser import text_string_to_metric_families

from sluice.records import NewMessage
from sluice.storage import subscriptions as subs_sql
from tests.conftest import run_app, unique
from tests.helpers import (
    ack,
    create_subscription,
    create_topic,
    nack,
    publish,
    pull,
    stats,
    sub_path,
    topic_lock_held,
    topic_path,
)

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sample's value; 0 when the series does not exist (yet)."""
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def series(samples: Samples, name: str) -> list[dict[str, str]]:
    return [dict(labels) for (n, labels) in samples if n == name]


async def scrape(client: httpx.AsyncClient) -> Samples:
    r = await client.get("/metrics")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain"), r.headers
    return parse(r.text)


async def test_metrics_is_prometheus_text_that_parses(client):
    r = await client.get("/metrics")
    assert r.status_code == 200
    families = {f.name: f.type for f in text_string_to_metric_families(r.text)}
    assert families["sluice_messages_published"] == "counter"
    assert families["sluice_http_request_duration_seconds"] == "histogram"
    assert families["sluice_database_up"] == "gauge"
    assert value(parse(r.text), "sluice_database_up") == 1


async def test_openmetrics_when_asked(client):
    r = await client.get("/metrics", headers={"accept": "application/openmetrics-text"})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


async def test_counters_follow_publish_pull_ack_nack(client):
    topic = unique("m")
    await create_topic(client, topic)
    await create_subscription(client, topic, "s", start="earliest", max_deliveries=0)
    before = await scrape(client)

    await publish(client, topic, 1, 2, 3)
    await publish(client, topic, "again", dedup_id="d1")
    await publish(client, topic, "again", dedup_id="d1")  # a duplicate: not stored again
    got = await pull(client, topic, "s", 10)
    assert len(got) == 4
    await ack(client, topic, "s", [m["receipt"] for m in got[:3]])
    await nack(client, topic, "s", [got[3]["receipt"]], delay_seconds=0)

    after = await scrape(client)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("sluice_messages_published_total", topic=topic) == 4
    assert delta("sluice_messages_duplicate_total", topic=topic) == 1
    labels = {"topic": topic, "subscription": "s"}
    assert delta("sluice_messages_delivered_total", **labels) == 4
    assert delta("sluice_messages_acked_total", **labels) == 3
    assert delta("sluice_messages_nacked_total", **labels) == 1
    assert delta("sluice_messages_dead_lettered_total", **labels) == 0


async def test_a_publish_group_finding_a_topic_locked_is_counted(client, harness):
    """sluice_publish_contended_total{topic}: a group of two topics' publishes while another
    transaction (another process's publish, the relay) holds one topic's lock."""
    busy, free = unique("contended"), unique("free")
    for name in (busy, free):
        await create_topic(client, name)
    before = await scrape(client)
    publisher = harness.ctx.publisher
    message = NewMessage(value='"v"', key=None, headers=None, delay_seconds=0, dedup_id=None)
    async with topic_lock_held(harness.ctx.pool, busy):
        # Queued in one loop turn: one group of both topics; the free one is answered.
        waiting = asyncio.create_task(publisher.publish(busy, [message], [3]))
        await asyncio.wait_for(publisher.publish(free, [message], [3]), 5)
    await asyncio.wait_for(waiting, 5)
    after = await scrape(client)
    name = "sluice_publish_contended_total"
    assert value(after, name, topic=busy) - value(before, name, topic=busy) == 1
    assert value(after, name, topic=free) == 0


async def test_requests_in_progress_counts_waiting_long_polls(client):
    """Two long-polls through the hot path and one through the app's own stack (another
    Content-Type), then the scrape itself; once they have answered, only the scrape."""
    topic = unique("inprog")
    await create_topic(client, topic)
    await create_subscription(client, topic, "s")
    body = b'{"max_messages": 1, "wait_seconds": 1}'
    url = sub_path(topic, "s") + "/pull"

    async def long_poll(content_type: str) -> None:
        r = await client.post(url, content=body, headers={"content-type": content_type})
        assert r.status_code == 200, r.text

    polls = [
        asyncio.create_task(long_poll("application/json")),
        asyncio.create_task(long_poll("application/json")),
        asyncio.create_task(long_poll("application/json; charset=utf-8")),
    ]
    await asyncio.sleep(0.3)
    assert value(await scrape(client), "sluice_http_requests_in_progress") == 4
    await asyncio.gather(*polls)
    assert value(await scrape(client), "sluice_http_requests_in_progress") == 1


async def test_expired_and_dead_lettered_are_counted(harness):
    client = harness.client
    topic = unique("m")
    await create_topic(client, topic)
    await create_subscription(
        client, topic, "s", start="earliest", max_deliveries=1, ack_deadline_seconds=5
    )
    await publish(client, topic, "x")
    before = await scrape(client)
    assert len(await pull(client, topic, "s", 1)) == 1
    harness.clock.advance(3600)  # the lease ends; one attempt was all it had
    assert await pull(client, topic, "s", 1) == []
    labels = {"topic": topic, "subscription": "s"}
    after = await scrape(client)
    expired = value(after, "sluice_messages_expired_total", **labels) - value(
        before, "sluice_messages_expired_total", **labels
    )
    dead = value(after, "sluice_messages_dead_lettered_total", **labels) - value(
        before, "sluice_messages_dead_lettered_total", **labels
    )
    assert (await stats(client, topic, "s"))["dead_lettered"] == 1
    assert dead == 1
    assert expired in (0, 1)  # dead-lettered at expiry: counted as expired or not, not twice
    assert value(after, "sluice_subscription_dead_lettered", **labels) == 1


async def test_gauges_show_backlog_and_in_flight(client):
    topic = unique("m")
    await create_topic(client, topic)
    await create_subscription(client, topic, "s", start="earliest")
    await publish(client, topic, *range(5))
    await pull(client, topic, "s", 2)
    samples = await scrape(client)
    labels = {"topic": topic, "subscription": "s"}
    assert value(samples, "sluice_subscription_backlog", **labels) == 3
    assert value(samples, "sluice_subscription_in_flight", **labels) == 2
    assert value(samples, "sluice_subscription_lag", **labels) == 5
    assert value(samples, "sluice_subscription_delayed", **labels) == 0
    assert value(samples, "sluice_subscription_dead_lettered", **labels) == 0
    # Published a moment ago (the clock has not been moved).
    assert 0 <= value(samples, "sluice_subscription_oldest_unacked_age_seconds", **labels) < 10
    assert labels in series(samples, "sluice_subscription_oldest_unacked_age_seconds")


async def test_gauges_equal_the_subscription_stats_in_every_state(harness):
    """The one-query gauges and GET …/subscriptions/{sub} agree, whatever the state."""
    client = harness.client
    topic = unique("m")
    await create_topic(client, topic)
    subs = {
        "fresh": {},
        "leased": {},
        "nacked": {"retry_min_seconds": 60, "retry_max_seconds": 60},
        "dead": {"max_deliveries": 1},
        "acked": {},
    }
    for name, config in subs.items():
        await create_subscription(client, topic, name, start="earliest", **config)
    await publish(client, topic, *range(4), key="k")
    await publish(client, topic, "later", delay_seconds=600)
    await publish(client, topic, "unkeyed")
    await pull(client, topic, "leased", 2)
    got = await pull(client, topic, "nacked", 3)
    await nack(client, topic, "nacked", [got[0]["receipt"]])
    got = await pull(client, topic, "dead", 1)
    await nack(client, topic, "dead", [got[0]["receipt"]])
    got = await pull(client, topic, "acked", 10)
    await ack(client, topic, "acked", [m["receipt"] for m in got])
    harness.clock.advance(1.5)  # ages move; nothing else changes state

    samples = await scrape(client)
    fields = ("backlog", "in_flight", "delayed", "lag", "dead_lettered")
    seen = set()
    for name in subs:
        expected = await stats(client, topic, name)
        labels = {"topic": topic, "subscription": name}
        got_values = {f: value(samples, f"sluice_subscription_{f}", **labels) for f in fields}
        assert got_values == {f: expected[f] for f in fields}, name
        seen.add(tuple(expected[f] for f in fields))
        age = value(samples, "sluice_subscription_oldest_unacked_age_seconds", **labels)
        if expected["oldest_unacked_age_seconds"] is None:
            assert age == 0
        else:
            assert abs(age - expected["oldest_unacked_age_seconds"]) < 2, name
    assert len(seen) == len(subs), "the subscriptions should all be in different states"


async def test_gauges_are_absent_for_deleted_subscriptions(client):
    topic = unique("m")
    await create_topic(client, topic)
    await create_subscription(client, topic, "gone")
    labels = {"topic": topic, "subscription": "gone"}
    assert labels in series(await scrape(client), "sluice_subscription_backlog")
    assert (await client.delete(sub_path(topic, "gone"))).status_code == 204
    assert labels not in series(await scrape(client), "sluice_subscription_backlog")


async def test_request_metrics_use_route_templates(client):
    topic = unique("m")
    await create_topic(client, topic)
    before = await scrape(client)
    await publish(client, topic, "a")
    await publish(client, topic, "b")
    r = await client.post(topic_path(unique("missing")) + "/messages", json={"messages": []})
    assert r.status_code in (404, 422)
    assert (await client.get("/no/such/path/" + unique())).status_code == 404
    after = await scrape(client)

    route = "/v1/topics/{topic}/messages"
    labels = {"method": "POST", "route": route, "status": "201"}
    assert (
        value(after, "sluice_http_requests_total", **labels)
        - value(before, "sluice_http_requests_total", **labels)
        == 2
    )
    count = "sluice_http_request_duration_seconds_count"
    assert value(after, count, **labels) - value(before, count, **labels) == 2
    inf_bucket = value(after, "sluice_http_request_duration_seconds_bucket", **labels, le="+Inf")
    assert inf_bucket == value(after, count, **labels)
    assert value(after, "sluice_http_request_duration_seconds_sum", **labels) > 0
    # No raw paths: neither the topic names nor the unknown path appear in any label.
    routes = {labels["route"] for labels in series(after, "sluice_http_requests_total")}
    assert route in routes and "<unmatched>" in routes
    assert all("{" in r or not r.startswith("/v1/topics/") for r in routes), routes
    assert not any(topic in r or "such" in r for r in routes), routes


async def test_answers_given_before_routing_are_labelled_by_template(db_url):
    """413 from the body limit (before routing) and 405 still name the route template."""
    async with run_app(db_url, max_body_bytes=1000) as h:
        topic = unique("m")
        big = {"messages": [{"value": "x" * 5000}]}
        assert (await h.client.post(topic_path(topic) + "/messages", json=big)).status_code == 413
        assert (await h.client.patch(topic_path(topic), json={})).status_code == 405
        samples = await scrape(h.client)
    route = "/v1/topics/{topic}/messages"
    assert value(samples, "sluice_http_requests_total", method="POST", route=route, status="413")
    labels = {"method": "PATCH", "route": "/v1/topics/{topic}", "status": "405"}
    assert value(samples, "sluice_http_requests_total", **labels)


async def test_metrics_survive_a_database_failure(client, monkeypatch):
    async def broken(conn, skew, topic_id=None, sub_id=None):
        raise OSError("connection refused")

    monkeypatch.setattr(subs_sql, "delivery_states", broken)
    samples = await scrape(client)
    assert value(samples, "sluice_database_up") == 0
    assert not series(samples, "sluice_subscription_backlog")
    assert series(samples, "sluice_http_requests_total")


def test_metrics_is_documented_as_text(client_free=None):
    from sluice.cli import openapi_document

    operation = openapi_document()["paths"]["/metrics"]["get"]
    assert "text/plain" in operation["responses"]["200"]["content"]


# ---- several worker processes ---------------------------------------------------------------


async def _publish_on_fresh_connections(base_url: str, topic: str, requests: int) -> None:
    """Each request on a new connection, many at once, so the workers share them."""

    async def one(i: int) -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=10) as c:
            r = await c.post(topic_path(topic) + "/messages", json={"messages": [{"value": i}]})
            assert r.status_code == 201, r.text

    for start in range(0, requests, 20):
        await asyncio.gather(*(one(i) for i in range(start, min(start + 20, requests))))


def _per_process_published(directory: Path, topic: str) -> dict[str, float]:
    """sluice_messages_published_total of each worker, from its own files."""
    by_pid: dict[str, list[Path]] = defaultdict(list)
    for path in directory.glob("*.db"):
        by_pid[path.stem.rsplit("_", 1)[1]].append(path)
    result = {}
    for pid, files in by_pid.items():
        alone = directory / f"pid-{pid}"
        alone.mkdir()
        for f in files:
            shutil.copy(f, alone / f.name)
        registry = CollectorRegistry()
        MultiProcessCollector(registry, str(alone))
        samples = parse(generate_latest(registry).decode())
        result[pid] = value(samples, "sluice_messages_published_total", topic=topic)
        shutil.rmtree(alone)
    return result


async def test_counts_of_two_workers_add_up(server_factory, tmp_path):
    directory = tmp_path / "prom"
    directory.mkdir()
    server = server_factory(workers=2, env={"PROMETHEUS_MULTIPROC_DIR": str(directory)})
    topic = unique("mw")
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
        assert (await c.put(topic_path(topic), json={})).status_code == 201
        assert (await c.put(sub_path(topic, "s"), json={"start": "earliest"})).status_code == 201
    total = 0
    per_process: dict[str, float] = {}
    while total < 400:  # until both workers have served some (almost always at once)
        await _publish_on_fresh_connections(server.base_url, topic, 40)
        total += 40
        per_process = _per_process_published(directory, topic)
        if sum(1 for v in per_process.values() if v > 0) >= 2:
            break
    busy = {pid: v for pid, v in per_process.items() if v > 0}
    assert len(busy) == 2, f"one worker served every request: {per_process}"
    assert sum(busy.values()) == total

    # Whichever worker answers the scrape, it reports the sum of both, and the gauges
    # (read from the database) once.
    for _ in range(6):
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
            samples = await scrape(c)
        assert value(samples, "sluice_messages_published_total", topic=topic) == total
        routes = {"method": "POST", "route": "/v1/topics/{topic}/messages", "status": "201"}
        # One message per request, on a server of this test alone.
        assert value(samples, "sluice_http_requests_total", **routes) == total
        labels = {"topic": topic, "subscription": "s"}
        assert series(samples, "sluice_subscription_backlog").count(labels) == 1
        assert value(samples, "sluice_subscription_backlog", **labels) == total


async def test_serve_with_workers_sets_up_multiprocess_metrics(server_factory):
    """Without PROMETHEUS_MULTIPROC_DIR given, `sluice serve --workers 2` makes its own."""
    server = server_factory(workers=2)
    topic = unique("mw")
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
        assert (await c.put(topic_path(topic), json={})).status_code == 201
    await _publish_on_fresh_connections(server.base_url, topic, 60)
    for _ in range(6):  # fresh connections: the scrapes land on both workers
        async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as c:
            samples = await scrape(c)
        assert value(samples, "sluice_messages_published_total", topic=topic) == 60


@pytest.mark.parametrize("configured", [False, True])
def test_fastapis_opentelemetry_runs_only_when_opentelemetry_is_configured(monkeypatch, configured):
    """FastAPI's native OpenTelemetry instrumentation costs every request a look at the
    global providers: off unless OpenTelemetry is configured through the environment."""
    from sluice.main import create_app
    from tests.conftest import make_settings

    for name in list(os.environ):
        if name.startswith("OTEL_") or name == "FASTAPI_OTEL_AUTO_CONFIGURE":
            monkeypatch.delenv(name)
    if configured:
        monkeypatch.setenv("OTEL_SERVICE_NAME", "sluice")
    app = create_app(make_settings("postgresql://unused@localhost:1/unused"))
    telemetry = app._telemetry  # FastAPI's resolved configuration
    assert (telemetry["tracing"], telemetry["metrics"], telemetry["logs"]) == (configured,) * 3
