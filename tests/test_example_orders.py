"""examples/orders: an insert trigger publishes each order in the order's transaction, and a
consumer writes the invoice and acks in one transaction. Killed (SIGKILL) between the two,
the consumer leaves nothing behind; restarted, it invoices every committed order exactly
once, and the rolled-back order never."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time

import asyncpg
import httpx

from sluice.storage import migrate
from sluice.storage.db import plain_url
from tests.conftest import ROOT

EXAMPLE = ROOT / "examples" / "orders"


def start_consumer(url: str, base_url: str, **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(EXAMPLE / "consumer.py")],
        env={**os.environ, "DATABASE_URL": url, "SLUICE_URL": base_url, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def read_until(proc: subprocess.Popen[str], marker: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    assert proc.stdout is not None
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        seen.append(line)
        if line.startswith(marker):
            return line
    raise AssertionError(f"no {marker!r} from the consumer: {''.join(seen)[-2000:]}")


async def test_orders_are_invoiced_exactly_once_across_a_consumer_crash(
    fresh_db_url: str, server_factory
) -> None:
    await migrate.upgrade(fresh_db_url)
    url = plain_url(fresh_db_url)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute((EXAMPLE / "schema.sql").read_text())
        server = server_factory(url=fresh_db_url)
        async with httpx.AsyncClient(base_url=server.base_url) as http:
            assert (await http.put("/v1/topics/orders", json={})).status_code == 201
            r = await http.put(
                "/v1/topics/orders/subscriptions/invoicing",
                json={"ack_deadline_seconds": 2, "retry_min_seconds": 1, "retry_max_seconds": 1},
            )
            assert r.status_code == 201, r.text
        for n in range(10):
            await conn.execute(
                "INSERT INTO orders (customer, total) VALUES ($1, $2)", f"c{n % 3}", n + 0.5
            )
        tx = conn.transaction()
        await tx.start()
        lost = await conn.fetchval(
            "INSERT INTO orders (customer, total) VALUES ('nobody', 1) RETURNING id"
        )
        await tx.rollback()
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO orders (customer, total) SELECT 'bulk', g FROM generate_series(1, 5) g"
            )
        committed = await conn.fetchval("SELECT array_agg(id ORDER BY id) FROM orders")
        assert len(committed) == 15 and lost not in committed

        first = start_consumer(url, server.base_url, PAUSE_BEFORE_COMMIT="3")
        try:
            paused = read_until(first, "PAUSED", 30)
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait(10)
        paused_order = int(paused.split()[1])
        # Killed with the invoice written and the ack recorded, both uncommitted: neither
        # is there (the two invoiced before it are).
        await asyncio.sleep(0.5)
        assert (
            await conn.fetchval("SELECT count(*) FROM invoices WHERE order_id = $1", paused_order)
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM invoices") == 2

        second = start_consumer(url, server.base_url, IDLE_EXIT_SECONDS="5")
        try:
            read_until(second, "done", 90)
        finally:
            second.kill()
            second.wait(10)
        rows = await conn.fetch(
            "SELECT order_id, count(*) AS n FROM invoices GROUP BY order_id ORDER BY order_id"
        )
        assert [(r["order_id"], r["n"]) for r in rows] == [(i, 1) for i in committed]
    finally:
        await conn.close()
