"""The SDK under faults: the server killed -9 and restarted under a running Worker and
Publisher; SIGTERM to a worker process in the middle of a batch."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, unique
from tests.faults.procs import SluiceServer
from tests.sdk_support import sc

MESSAGES = 1500


async def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached in {timeout}s")
        await asyncio.sleep(0.05)


def restart_on_the_same_port(server: SluiceServer) -> None:
    """kill -9 by PID, then start again on the same port (the clients keep their URL)."""
    port = server.port
    server.kill9()
    time.sleep(0.5)
    server.start()
    server.wait_ready(60)
    assert server.port == port


@pytest.mark.timeout(180)
@pytest.mark.parametrize("transport", ["aiohttp", "httpx"])  # the default, and without it
async def test_kill9_and_restart_of_the_server_under_a_worker_and_a_publisher(
    db_url, sluice_servers, transport
):
    server = sluice_servers(db_url)
    topic = unique("sdkkill")
    processed: list[int] = []

    async def handler(d: sc.Delivery) -> None:
        await asyncio.sleep(0.002)
        processed.append(d.value)

    async with sc.AsyncClient(server.base_url, timeout=10, transport=transport) as client:
        assert client.transport_name == transport
        await client.create_topic(topic)
        # A short lease: deliveries whose ack died with the server come back soon.
        await client.create_subscription(
            topic,
            "s",
            start="earliest",
            ack_deadline_seconds=3,
            retry_min_seconds=0,
            retry_max_seconds=1,
        )
        worker = sc.Worker(
            client,
            topic,
            "s",
            handler,
            concurrency=8,
            wait_seconds=1,
            handle_signals=False,
            max_backoff_seconds=1,
        )
        worker_task = asyncio.create_task(worker.run())
        publisher = sc.Publisher(
            client, topic, linger_seconds=0.005, max_retries=60, retry_max_seconds=1
        )
        futures: list[asyncio.Future[int]] = []

        async def produce() -> None:
            # Paced, so that publishing is under way before, during and after the outage.
            for i in range(MESSAGES):
                futures.append(await publisher.publish(i))
                if i % 50 == 49:
                    await asyncio.sleep(0.1)

        producer = asyncio.create_task(produce())

        async def flowing() -> bool:
            return len(processed) >= 200 and len(futures) >= 300

        await wait_until(flowing, 30, "work flowing before the kill")
        killed_pid = server.pid
        requests_before = publisher.requests_sent - publisher.batches_sent
        await asyncio.to_thread(restart_on_the_same_port, server)
        assert server.pid != killed_pid
        processed_at_restart = len(processed)

        await asyncio.wait_for(producer, 60)
        await asyncio.wait_for(publisher.close(), 60)
        offsets = [f.result() for f in futures]  # raises if any future failed

        async def all_processed() -> bool:
            if not set(range(MESSAGES)) <= set(processed):
                return False
            sub = await client.get_subscription(topic, "s")
            return sub.lag == 0 and sub.in_flight == 0

        await wait_until(all_processed, 60, "every message processed and acked")
        # The same worker, never restarted, went on after the outage.
        assert not worker_task.done()
        worker.stop()
        stats = await asyncio.wait_for(worker_task, 15)

        stored: list[sc.Message] = []
        async for page in client.browse_pages(topic, limit=1000):
            stored.extend(page.messages)

    # The outage was seen: the publisher retried batches.
    assert publisher.requests_sent - publisher.batches_sent > requests_before
    assert len(processed) > processed_at_restart
    # Every future resolved to its own offset; the retries stored nothing twice.
    assert len(set(offsets)) == MESSAGES
    assert sorted(m.value for m in stored) == list(range(MESSAGES))
    assert sorted(m.offset for m in stored) == sorted(offsets)
    # At least once: everything processed; a redelivery only for leases the kill cut off.
    assert set(processed) == set(range(MESSAGES))
    assert stats.succeeded == len(processed)


WORKER_SCRIPT = textwrap.dedent(
    """
    import asyncio, sys, time
    sys.path.insert(0, {client_path!r})
    import sluice_client as sc

    record = open(sys.argv[1], "a", buffering=1)

    async def main() -> None:
        # "done" is written when the handler returns: the worker acks exactly those (stats
        # says how many acks the server applied).
        def handler(d: sc.Delivery) -> None:
            record.write(f"start {{d.value}}\\n")
            time.sleep(0.3)
            record.write(f"done {{d.value}} {{d.receipt}}\\n")

        stats = await sc.subscribe(
            sys.argv[2], "s", handler, concurrency=8, wait_seconds=1, grace_seconds=10
        )
        record.write(f"stats {{stats.acked}} {{stats.stale_acks}} {{stats.given_back}}\\n")

    asyncio.run(main())
    """
)


def read_record(path: Path) -> list[list[str]]:
    return [line.split() for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.timeout(120)
async def test_sigterm_to_a_worker_process_mid_batch_loses_nothing_and_acks_once(
    db_url, sluice_servers, tmp_path
):
    server = sluice_servers(db_url)
    topic = unique("sdkterm")
    n = 60
    async with sc.AsyncClient(server.base_url) as client:
        await client.create_topic(topic)
        await client.create_subscription(topic, "s", start="earliest", ack_deadline_seconds=30)
        await client.publish(topic, [{"value": i} for i in range(n)])

        script = tmp_path / "worker.py"
        script.write_text(WORKER_SCRIPT.format(client_path=str(ROOT / "clients" / "python")))
        first = tmp_path / "first.txt"
        proc = subprocess.Popen(
            [sys.executable, str(script), str(first), topic],
            env={**os.environ, "SLUICE_URL": server.base_url},
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:

            async def mid_batch() -> bool:
                lines = read_record(first) if first.exists() else []
                started = {w[1] for w in lines if w[0] == "start"}
                finished = {w[1] for w in lines if w[0] == "done"}
                # Some handlers done (acked or about to be), others running right now.
                return len(finished) >= 8 and len(started - finished) > 0

            await wait_until(mid_batch, 30, "the worker process mid-batch")
            signalled = time.monotonic()
            os.kill(proc.pid, signal.SIGTERM)
            code = await asyncio.to_thread(proc.wait, 20)
            stopped_in = time.monotonic() - signalled
            stderr = proc.stderr.read().decode() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(5)
        assert code == 0, stderr
        assert stopped_in < 12  # the handlers' 0.3 s, not the 10 s grace period

        lines = read_record(first)
        started = [w[1] for w in lines if w[0] == "start"]
        done = {int(w[1]) for w in lines if w[0] == "done"}
        acked, stale, given_back = (int(x) for x in next(w for w in lines if w[0] == "stats")[1:])
        # Every handler that started finished (the grace period), and each was acked once.
        assert {int(v) for v in started} == done
        assert acked == len(done) and stale == 0 and given_back >= 0
        sub = await client.get_subscription(topic, "s")
        assert sub.in_flight == 0 and sub.lag == n - len(done)

        # A second worker (in this process) gets exactly the rest.
        second: list[int] = []

        async def handler(d: sc.Delivery) -> None:
            second.append(d.value)

        worker = sc.Worker(
            client, topic, "s", handler, concurrency=8, wait_seconds=1, handle_signals=False
        )
        task = asyncio.create_task(worker.run())

        async def rest_done() -> bool:
            return len(second) >= n - len(done) and worker.stats.acked == len(second)

        await wait_until(rest_done, 30, "the second worker draining the rest")
        await asyncio.sleep(0.5)  # anything processed twice would show up now
        worker.stop()
        await asyncio.wait_for(task, 10)
        sub = await client.get_subscription(topic, "s")
    assert not done & set(second)  # nothing acked by the first was processed again
    assert sorted([*done, *second]) == list(range(n))  # nothing lost
    assert sub.lag == 0
