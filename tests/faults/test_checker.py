"""The fault checker itself, run against the app in-process (fast): it passes a sound
queue having really probed, and it cannot pass by silently skipping probes it could not
send."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.conftest import unique
from tests.faults.checker import GaveUp, QueueChecker

BASE = "http://sluice.test"


class ProbeBlocker(httpx.AsyncBaseTransport):
    """Passes everything to the app, except that an ack naming a receipt already acked (a
    double-ack probe) answers 503, as a server that is down would."""

    def __init__(self, app: object) -> None:
        self.inner = httpx.ASGITransport(app=app)  # type: ignore[arg-type]
        self.acked: set[str] = set()
        self.blocked = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.method == "POST" and request.url.path.endswith("/ack"):
            receipts = json.loads(request.content)["receipts"]
            if self.acked.intersection(receipts):
                self.blocked += 1
                return httpx.Response(503, json={"detail": "down"})
            response = await self.inner.handle_async_request(request)
            await response.aread()
            stale = set(json.loads(response.content)["stale"])
            self.acked.update(r for r in receipts if r not in stale)
            return response
        return await self.inner.handle_async_request(request)


async def run_checker(transport: httpx.AsyncBaseTransport, **options: object) -> QueueChecker:
    checker = QueueChecker(BASE, unique("chk"), "workers", seed=7, **options)  # type: ignore[arg-type]
    await checker.client.aclose()
    checker.client = httpx.AsyncClient(transport=transport, base_url=BASE, timeout=30)
    await checker.setup(ack_deadline_seconds=30)
    checker.start(producers=2, consumers=2)
    return checker


async def test_checker_passes_a_sound_queue_and_its_probes_ran(harness):
    checker = await run_checker(httpx.ASGITransport(app=harness.app), double_ack_probe_rate=0.2)
    try:
        await checker.wait_progress(published=200, acked=200)
        figures = await checker.drain(timeout=60, quiet_seconds=0.5)
    finally:
        await checker.aclose()
    checker.assert_sound("in-process")
    assert figures.double_ack_probes > 0, figures.report()
    assert figures.stale_probes == figures.double_ack_probes + figures.earlier_attempt_probes


async def test_checker_fails_when_its_probes_cannot_be_sent(harness):
    blocker = ProbeBlocker(harness.app)
    checker = await run_checker(blocker, double_ack_probe_rate=0.5, patience_seconds=1.0)
    try:
        with pytest.raises(GaveUp):
            await checker.wait_progress(published=200, acked=200, timeout=30)
            await checker.drain(timeout=30, quiet_seconds=0.5)
    finally:
        await checker.aclose()
    assert blocker.blocked > 0
