"""A process that claims vacuums `subscriptions` often, so that the subscription rows every
claim updates do not pile up dead versions; an idle process does not."""

from __future__ import annotations

import asyncio

import asyncpg

from tests.conftest import run_app
from tests.helpers import publish, pull, topic_with_subscription


async def _vacuums(db_url: str) -> int:
    conn = await asyncpg.connect(db_url)
    try:
        return int(
            await conn.fetchval(
                "SELECT vacuum_count FROM pg_stat_user_tables WHERE relname = 'subscriptions'"
            )
        )
    finally:
        await conn.close()


async def _wait_for_vacuums(db_url: str, above: int, within: float = 5.0) -> int:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while (count := await _vacuums(db_url)) <= above and loop.time() < deadline:
        await asyncio.sleep(0.05)
    return count


async def test_claims_trigger_a_vacuum_of_subscriptions_and_idleness_does_not(db_url):
    async with run_app(db_url, subscription_vacuum_seconds=0.1) as harness:
        client = harness.client
        topic = await topic_with_subscription(client)
        await publish(client, topic, *range(5))
        before = await _vacuums(db_url)
        assert len(await pull(client, topic, "s", 5)) == 5
        after = await _wait_for_vacuums(db_url, before)
        assert after > before
        # No claim since: the loop keeps still.
        await asyncio.sleep(0.5)
        assert await _vacuums(db_url) == after
        assert harness.ctx.subscription_writes == 0
        # Claims that find nothing (an idle consumer polling) write nothing: no vacuum.
        for _ in range(5):
            assert await pull(client, topic, "s", 5) == []
        assert harness.ctx.subscription_writes == 0
        await asyncio.sleep(0.5)
        assert await _vacuums(db_url) == after
