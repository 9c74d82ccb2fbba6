"""SQL for dead letters: the parked messages of a subscription, listed and re-driven."""

from __future__ import annotations

import asyncpg

from sluice.records import DeadLetter

# dead_letter_page: parked messages of a subscription from an offset on, with payloads.
DEAD_LETTER_PAGE = """
SELECT msg_offset, attempts, dead_at, published_at, key, headers, value
FROM sluice.dead_letter_page(p_topic_id => $1, p_sub_id => $2, p_from => $3, p_limit => $4)
"""

# redrive: deliver parked messages again (all, or the offsets in $3), attempts from 1.
REDRIVE = """
SELECT found, redriven FROM sluice.redrive(
    p_topic => $1, p_subscription => $2, p_offsets => $3, p_skew => $4)
"""


async def page(
    conn: asyncpg.Connection, topic_id: int, sub_id: int, from_offset: int, limit: int
) -> list[DeadLetter]:
    rows = await conn.fetch(DEAD_LETTER_PAGE, topic_id, sub_id, from_offset, limit)
    return [
        DeadLetter(
            row["msg_offset"],
            row["attempts"],
            row["dead_at"],
            row["published_at"],
            row["key"],
            row["headers"],
            row["value"],
        )
        for row in rows
    ]


async def redrive(
    conn: asyncpg.Connection, topic: str, name: str, offsets: list[int] | None, skew: float
) -> int | None:
    """How many were re-driven; None when there is no such subscription."""
    row = await conn.fetchrow(REDRIVE, topic, name, offsets, skew)
    assert row is not None
    return row["redriven"] if row["found"] else None
