"""Readiness: the database answers and its schema is the one this code expects."""

from __future__ import annotations

import asyncio

from sluice.queue.context import QueueContext
from sluice.storage import migrate

# /readyz answers within this, whatever the database does.
READY_TIMEOUT_SECONDS = 2.0


async def schema_revision(ctx: QueueContext) -> str | None:
    """The schema revision the database is at (raises when it cannot be read in time)."""
    async with asyncio.timeout(READY_TIMEOUT_SECONDS), ctx.pool.acquire() as conn:
        return await migrate.current_revision(conn)
