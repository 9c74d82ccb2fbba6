"""A long transaction elsewhere in the database holds back the xmin horizon (PITFALLS: bloat
and vacuum): VACUUM can remove no row version that died after its snapshot. Sluice writes
nothing per message or per request that could die (insert-only storage, segments dropped
whole), so while a few thousand messages go through:

- dead row versions in Sluice's tables stay far below one per request, never one per
  message;
- no request waits on a lock for more than a second, also when the transaction holds
  ACCESS SHARE on every table (pg_dump does), while maintenance tries to drop a segment;
- delivery stays sound (the checker: nothing lost, nothing acked comes back).

Counts, not timings: the assertions hold on a busy two-core machine."""

from __future__ import annotations

import asyncio
import contextlib
import re
import time

import asyncpg
import pytest

from sluice.storage.db import plain_url
from tests.conftest import unique
from tests.faults.checker import QueueChecker

MESSAGES = 3000
_NOT_REMOVABLE = re.compile(r"(\d+) are dead but not yet removable")


async def _not_removable(url: str) -> int:
    """VACUUM (VERBOSE) every Sluice table: the dead row versions it had to leave."""
    conn = await asyncpg.connect(plain_url(url))
    notices: list[str] = []
    conn.add_log_listener(lambda _conn, message: notices.append(str(message)))
    try:
        tables = await conn.fetch(
            "SELECT c.oid::regclass::text AS name FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = 'sluice' AND c.relkind = 'r'"
        )
        for table in tables:
            # A segment's partition dropped since the list has no rows left to count.
            with contextlib.suppress(asyncpg.UndefinedTableError):
                await conn.execute(f"VACUUM (VERBOSE) {table['name']}")
        await asyncio.sleep(0.2)  # log listeners are called soon, not at once
    finally:
        await conn.close()
    found = [int(m) for n in notices for m in _NOT_REMOVABLE.findall(n)]
    assert found, notices[:5]
    return sum(found)


class LockWaits:
    """Samples pg_stat_activity: every backend of the database waiting on a lock, and for
    how many consecutive samples (5 per second) it was seen waiting."""

    def __init__(self, url: str) -> None:
        self._url = url
        self.seen: dict[tuple[int, object], list[float]] = {}
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        conn = await asyncpg.connect(plain_url(self._url))
        try:
            while True:
                rows = await conn.fetch(
                    "SELECT pid, query_start FROM pg_stat_activity "
                    "WHERE datname = current_database() AND wait_event_type = 'Lock' "
                    "AND pid <> pg_backend_pid()"
                )
                now = time.monotonic()
                for row in rows:
                    self.seen.setdefault((row["pid"], row["query_start"]), []).append(now)
                await asyncio.sleep(0.2)
        finally:
            await conn.close()

    def start(self) -> None:
        self._task = asyncio.create_task(self._sample())

    async def stop(self) -> None:
        assert self._task is not None
        self._task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self._task

    def longer_than(self, seconds: float) -> int:
        return sum(1 for times in self.seen.values() if times[-1] - times[0] > seconds)


async def _hold_while_traffic(url: str, server_url: str, lock_every_table: bool) -> dict:
    checker = QueueChecker(
        server_url,
        unique("held"),
        "workers",
        batch_size=50,
        max_messages=100,
        publish_pause=0.0,
        double_ack_probe_rate=0.02,
    )
    holder = await asyncpg.connect(plain_url(url))
    waits = LockWaits(url)
    try:
        await checker.setup(ack_deadline_seconds=30)
        # A segment maintenance will want to drop (a lane in no use moves to a new one, its
        # old empty segment is droppable at once): the drop needs ACCESS EXCLUSIVE locks.
        await holder.execute("SELECT sluice.open_segment(3, clock_timestamp())")
        await holder.execute("CREATE TABLE IF NOT EXISTS public.report (x int)")
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT count(*) FROM public.report")  # the snapshot
        if lock_every_table:
            tables = await holder.fetch(
                "SELECT c.oid::regclass::text AS name FROM pg_class c "
                "JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'sluice' AND c.relkind IN ('r', 'p')"
            )
            for table in tables:
                await holder.execute(f"LOCK TABLE {table['name']} IN ACCESS SHARE MODE")
        waits.start()
        requests_before = checker.requests
        checker.start(producers=2, consumers=2)
        await checker.wait_progress(published=MESSAGES, acked=MESSAGES, timeout=150)
        await checker.stop_producers()
        requests = checker.requests - requests_before
        dead = await _not_removable(url)
        droppable = await holder.fetchval("SELECT count(*) FROM sluice.droppable_segments()")
        await waits.stop()
        await holder.execute("COMMIT")
        await checker.drain(timeout=90, quiet_seconds=1.0)
    finally:
        await holder.close()
        await checker.aclose()
    checker.assert_sound("held xmin")
    return {
        "messages": len(checker.published),
        "requests": requests,
        "dead": dead,
        "waits_over_1s": waits.longer_than(1.0),
        "lock_waits": len(waits.seen),
        "droppable": droppable,
    }


@pytest.mark.timeout(300)
@pytest.mark.parametrize("lock_every_table", [False, True], ids=["snapshot", "pg_dump"])
async def test_a_held_xmin_horizon_leaves_no_dead_rows_and_blocks_nothing(
    fresh_db_url, sluice_servers, lock_every_table
):
    server = sluice_servers(
        fresh_db_url, env={"SLUICE_MAINTENANCE_INTERVAL_SECONDS": "1"}
    )  # migrates the empty database
    figures = await _hold_while_traffic(fresh_db_url, server.base_url, lock_every_table)
    print(f"\nheld xmin ({'pg_dump-like' if lock_every_table else 'snapshot'}): {figures}")
    assert figures["messages"] >= MESSAGES
    # Not a row version per message: far fewer than one per request.
    assert figures["dead"] < figures["requests"] / 10, figures
    assert figures["waits_over_1s"] == 0, figures
    # The drop really was held back by the locks (else this shows nothing), and done after.
    if lock_every_table:
        assert figures["droppable"] >= 1, figures
        conn = await asyncpg.connect(plain_url(fresh_db_url))
        try:
            deadline = time.monotonic() + 30
            while await conn.fetchval("SELECT count(*) FROM sluice.droppable_segments()"):
                assert time.monotonic() < deadline, "the segment was never dropped"
                await asyncio.sleep(0.5)
        finally:
            await conn.close()
