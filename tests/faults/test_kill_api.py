"""kill -9 of the API process at random moments under load: nothing acknowledged is lost."""

from __future__ import annotations

import asyncio
import random

import pytest

from tests.conftest import unique
from tests.faults.checker import QueueChecker

KILLS = 4


@pytest.mark.timeout(240)
async def test_kill9_of_the_api_under_load_loses_nothing(db_url, sluice_servers):
    server = sluice_servers(db_url)
    checker = QueueChecker(lambda: server.base_url, unique("kill"), "workers", overrun_rate=0.03)
    rng = random.Random()
    try:
        # Short lease and backoff so that leases orphaned by a kill come back quickly.
        await checker.setup(ack_deadline_seconds=3, retry_min_seconds=0.2, retry_max_seconds=1)
        checker.start(producers=3, consumers=4)
        killed_pids = []
        for _ in range(KILLS):
            # Kill only while work is really flowing through this server instance.
            await checker.wait_progress(published=30, acked=30)
            await asyncio.sleep(rng.uniform(0.0, 1.5))
            killed_pids.append(server.pid)
            server.kill9()
            await asyncio.sleep(rng.uniform(0.05, 0.5))
            await asyncio.to_thread(server.start_ready)
        await checker.wait_progress(published=30, acked=30)
        figures = await checker.drain(timeout=120, quiet_seconds=4.5)
    finally:
        await checker.aclose()

    checker.assert_sound(f"kill -9 x{KILLS}")
    assert len(set(killed_pids)) == KILLS
    # The kills hit clients mid-conversation (otherwise this test proved nothing).
    assert sum(figures.retried.values()) > 0, figures.report()
    assert figures.stale_probes + figures.expired_probes > 0, figures.report()
