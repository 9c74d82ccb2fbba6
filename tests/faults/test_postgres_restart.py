"""Postgres goes away under load (clean stop, then a crash) and comes back: the service
recovers by itself: pool, LISTEN connection, long-polls; nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from tests.conftest import unique
from tests.faults.checker import QueueChecker


async def _readyz(client: httpx.AsyncClient, base_url: str) -> int | None:
    try:
        return (await client.get(base_url + "/readyz", timeout=5)).status_code
    except httpx.HTTPError:
        return None


async def _wait_status(
    client: httpx.AsyncClient, base_url: str, status: int, timeout: float
) -> float:
    began = time.monotonic()
    seen: list[int | None] = []
    while time.monotonic() - began < timeout:
        code = await _readyz(client, base_url)
        seen.append(code)
        if code == status:
            return time.monotonic() - began
        await asyncio.sleep(0.1)
    raise AssertionError(f"/readyz never answered {status} in {timeout}s; saw {seen[-10:]}")


async def _long_poll_wakes_on_publish(client: httpx.AsyncClient, base_url: str) -> float:
    """A long-poll parked in memory is woken by a publish; returns the latency."""
    topic = unique("wake")
    assert (await client.put(f"{base_url}/v1/topics/{topic}", json={})).status_code == 201
    sub = f"{base_url}/v1/topics/{topic}/subscriptions/s"
    assert (await client.put(sub, json={})).status_code == 201
    poll = asyncio.create_task(
        client.post(sub + "/pull", json={"max_messages": 1, "wait_seconds": 20}, timeout=30)
    )
    await asyncio.sleep(0.5)  # let it park
    assert not poll.done(), poll.result().text
    published_at = time.monotonic()
    r = await client.post(
        f"{base_url}/v1/topics/{topic}/messages", json={"messages": [{"value": 1}]}
    )
    assert r.status_code == 201, r.text
    answer = await poll
    latency = time.monotonic() - published_at
    assert answer.status_code == 200, answer.text
    assert [m["value"] for m in answer.json()["messages"]] == [1]
    return latency


@pytest.mark.timeout(240)
async def test_postgres_restart_under_load(own_pg, sluice_servers):
    url = await own_pg.create_database("faults")
    # The safety re-check and the listener's keepalive query are 30 s here: a long-poll
    # answered within seconds after the restart proves the LISTEN connection was re-made
    # because its loss was noticed at once, not by a periodic probe.
    env = {"SLUICE_POLL_RECHECK_SECONDS": "30", "SLUICE_LISTENER_KEEPALIVE_SECONDS": "30"}
    server = sluice_servers(url, env=env)
    base = server.base_url
    checker = QueueChecker(base, unique("pgr"), "workers", overrun_rate=0.03)
    outages = []
    async with httpx.AsyncClient() as client:
        try:
            await checker.setup(ack_deadline_seconds=4, retry_min_seconds=0.2, retry_max_seconds=1)
            wake_before = await _long_poll_wakes_on_publish(client, base)
            checker.start(producers=2, consumers=3)
            for mode in ("fast", "immediate"):  # a clean shutdown, then a crash
                await checker.wait_progress(published=50, acked=50)
                stopped_at = time.monotonic()
                await asyncio.to_thread(own_pg.stop, mode)
                to_503 = await _wait_status(client, base, 503, timeout=15)
                during = []  # /readyz stays 503 for as long as Postgres is down
                while time.monotonic() - stopped_at < 2.0:
                    during.append(await _readyz(client, base))
                    await asyncio.sleep(0.1)
                assert during and set(during) == {503}, during
                await asyncio.to_thread(own_pg.start)
                to_200 = await _wait_status(client, base, 200, timeout=45)
                # Ready means ready: a long-poll parked right now is woken by a publish.
                wake = await _long_poll_wakes_on_publish(client, base)
                outages.append((mode, round(to_503, 2), round(to_200, 2), round(wake, 3)))
                # Work flows again through the same server process.
                await checker.wait_progress(published=50, acked=50, timeout=60)
            wake_after = await _long_poll_wakes_on_publish(client, base)
            figures = await checker.drain(timeout=120, quiet_seconds=5.5)
        finally:
            await checker.aclose()

    print(
        f"\noutages (mode, s to 503, s to 200 after restart, wake-up s): {outages}; "
        f"long-poll wake-up before {wake_before:.3f}s, after {wake_after:.3f}s"
    )
    checker.assert_sound("postgres restart")
    assert server.running(), server.log_tail()
    for mode, _, _, wake in outages:
        assert wake < 2.0, f"after the {mode} restart a long-poll woke only after {wake}s"
    assert wake_after < 2.0, f"long-poll woke after {wake_after:.1f}s"
    assert sum(figures.retried.values()) > 0, figures.report()
    assert figures.stale_probes + figures.expired_probes > 0, figures.report()
