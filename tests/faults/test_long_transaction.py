"""A long-open transaction elsewhere in the database (PITFALLS: bloat and vacuum) holds back
the xmin horizon. Delivery must go on meanwhile, and once it ends, dead tuples of the queue
tables are cleaned up: they stay bounded under steady publish/ack traffic."""

from __future__ import annotations

import asyncio
import re
import time

import asyncpg
import pytest

from sluice.storage.db import plain_url
from tests.conftest import unique
from tests.faults.checker import QueueChecker

LONG_TX_SECONDS = 12.0
TABLES = ("messages", "deliveries", "subscriptions")
_NOT_REMOVABLE = re.compile(r"(\d+) are dead but not yet removable")


async def _dead_tuples(url: str) -> dict[str, int]:
    conn = await asyncpg.connect(plain_url(url))
    try:
        rows = await conn.fetch(
            "SELECT relname, n_dead_tup FROM pg_stat_user_tables WHERE relname = ANY($1)",
            list(TABLES),
        )
    finally:
        await conn.close()
    return {r["relname"]: r["n_dead_tup"] for r in rows}


async def _vacuum(url: str) -> dict[str, int]:
    """VACUUM (VERBOSE) each queue table; returns the dead tuples it could not remove."""
    conn = await asyncpg.connect(plain_url(url))
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(str(message)))
    result = {}
    try:
        for table in TABLES:
            notices.clear()
            await conn.execute(f"VACUUM (VERBOSE) {table}")
            await asyncio.sleep(0.05)  # log listeners are called soon, not at once
            found = [int(m) for n in notices for m in _NOT_REMOVABLE.findall(n)]
            assert found, f"no VACUUM VERBOSE figures for {table}: {notices}"
            result[table] = sum(found)
    finally:
        await conn.close()
    return result


@pytest.mark.timeout(180)
async def test_long_transaction_does_not_stop_delivery_and_dead_tuples_stay_bounded(
    fresh_db_url, sluice_servers
):
    server = sluice_servers(fresh_db_url)  # migrates the empty database
    checker = QueueChecker(
        server.base_url,
        unique("longtx"),
        "workers",
        batch_size=20,
        max_messages=100,
        publish_pause=0.1,
        double_ack_probe_rate=0.02,
    )
    holder = await asyncpg.connect(plain_url(fresh_db_url))
    try:
        await checker.setup(ack_deadline_seconds=30)
        checker.start(producers=2, consumers=2)
        await checker.wait_progress(published=200, acked=200)

        base_p, base_a, began = len(checker.published), len(checker.acked_at), time.monotonic()
        await asyncio.sleep(2.0)
        base_rate = (len(checker.acked_at) - base_a) / (time.monotonic() - began)
        assert len(checker.published) > base_p

        # An idle-in-transaction session with an xid: vacuum cannot remove anything newer.
        long_tx = holder.transaction()
        await long_tx.start()
        await holder.fetchval("SELECT txid_current()")
        tx_p, tx_a, tx_began = len(checker.published), len(checker.acked_at), time.monotonic()
        lags = []
        while time.monotonic() - tx_began < LONG_TX_SECONDS:
            await asyncio.sleep(2.0)
            lags.append(await checker.lag())
        tx_seconds = time.monotonic() - tx_began
        published_during = len(checker.published) - tx_p
        acked_during = len(checker.acked_at) - tx_a
        dead_during = await _dead_tuples(fresh_db_url)
        stuck_during = await _vacuum(fresh_db_url)
        await long_tx.rollback()

        # Traffic goes on; the next vacuum pass may remove everything that was held back.
        await asyncio.sleep(2.0)
        stuck_after = await _vacuum(fresh_db_url)
        await asyncio.sleep(1.5)  # let backends flush their pending table statistics
        dead_after = await _dead_tuples(fresh_db_url)
        await asyncio.sleep(1.0)
        await checker.drain(timeout=90, quiet_seconds=1.0)
    finally:
        await holder.close()
        await checker.aclose()

    tx_rate = acked_during / tx_seconds
    print(
        f"\nlong transaction {tx_seconds:.1f}s: published {published_during}, acked "
        f"{acked_during} ({tx_rate:.0f}/s; before it {base_rate:.0f}/s); lag samples {lags}"
        f"\nn_dead_tup while open: {dead_during}; VACUUM could not remove: {stuck_during}"
        f"\nafter it ended: VACUUM could not remove: {stuck_after}; n_dead_tup: {dead_after}"
    )
    checker.assert_sound("long transaction")
    # Delivery went on: consumers kept up with the producers while the transaction was open.
    assert published_during > 0
    assert acked_during >= 0.7 * published_during, (acked_during, published_during)
    assert max(lags) < max(500, published_during // 4), lags
    # The long transaction really held vacuum back (otherwise this test shows nothing) ...
    assert stuck_during["deliveries"] > 100, stuck_during
    # ... and once it ended, vacuum removed what had piled up.
    assert stuck_after["deliveries"] < max(200, stuck_during["deliveries"] // 10), stuck_after
    for table in TABLES:
        assert dead_after.get(table, 0) < 2000, dead_after
