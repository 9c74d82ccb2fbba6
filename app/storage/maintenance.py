"""SQL for the maintenance pass: retention floors, deadlines nobody pulls for, segments.

Nothing here deletes rows one by one: messages and delivery state go away by dropping whole
segments (partitions). Statements that need an ACCESS EXCLUSIVE lock (dropping a segment)
run under a short lock_timeout and are retried at a later pass: a maintenance lock must
never wait in line behind a long transaction (pg_dump holds ACCESS SHARE on every table
until it ends), or every query of the table would queue behind it.
"""

from __future__ import annotations

import asyncpg

# Only one process at a time runs a maintenance pass (others skip it).
MAINTENANCE_LOCK_KEY = 0x51C3_0002

# How long a DDL statement of the pass may wait for its lock before it gives up until the
# next pass; queries of the table wait behind it at most that long.
DDL_LOCK_TIMEOUT = "100ms"

# try_lock / unlock: the pass's session-level advisory lock.
TRY_LOCK = "SELECT pg_try_advisory_lock($1)"
UNLOCK = "SELECT pg_advisory_unlock($1)"

# advance_retention: move every topic's retention floor up; (topic_id, expired) per topic
# whose floor moved.
ADVANCE_RETENTION = "SELECT topic_id, expired FROM sluice.advance_retention(p_skew => $1)"

# subscriptions_to_expire: subscriptions with a lease whose deadline may have passed.
SUBSCRIPTIONS_TO_EXPIRE = "SELECT topic, subscription FROM sluice.subscriptions_to_expire($1)"

# lanes_to_rotate: retention lanes in use whose open segment has run its length.
LANES_TO_ROTATE = "SELECT * FROM sluice.lanes_to_rotate(sluice.now($1))"

# open_segment: a new segment for a lane (DDL: CREATE TABLE + ATTACH PARTITION).
OPEN_SEGMENT = "SELECT sluice.open_segment($1, sluice.now($2))"

# droppable_segments: segments whose every message has expired.
DROPPABLE_SEGMENTS = "SELECT * FROM sluice.droppable_segments()"

# drop_segment: drop a segment's partitions (DDL under ACCESS EXCLUSIVE locks).
DROP_SEGMENT = "SELECT sluice.drop_segment($1)"

# set_lock_timeout: for the rest of the transaction.
SET_LOCK_TIMEOUT = "SELECT set_config('lock_timeout', $1, true)"


async def try_lock(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(TRY_LOCK, MAINTENANCE_LOCK_KEY))


async def unlock(conn: asyncpg.Connection) -> None:
    await conn.execute(UNLOCK, MAINTENANCE_LOCK_KEY)


async def advance_retention(conn: asyncpg.Connection, skew: float) -> dict[int, int]:
    rows = await conn.fetch(ADVANCE_RETENTION, skew)
    return {row["topic_id"]: row["expired"] for row in rows}


async def subscriptions_to_expire(conn: asyncpg.Connection, skew: float) -> list[tuple[str, str]]:
    return [
        (r["topic"], r["subscription"]) for r in await conn.fetch(SUBSCRIPTIONS_TO_EXPIRE, skew)
    ]


async def lanes_to_rotate(conn: asyncpg.Connection, skew: float) -> list[int]:
    return [row[0] for row in await conn.fetch(LANES_TO_ROTATE, skew)]


async def droppable_segments(conn: asyncpg.Connection) -> list[int]:
    return [row[0] for row in await conn.fetch(DROPPABLE_SEGMENTS)]


async def open_segment(conn: asyncpg.Connection, lane: int, skew: float) -> bool:
    """False when a lock was not granted within DDL_LOCK_TIMEOUT (try again later)."""
    return await _ddl(conn, OPEN_SEGMENT, lane, skew)


async def drop_segment(conn: asyncpg.Connection, seg: int) -> bool:
    """False when a lock was not granted within DDL_LOCK_TIMEOUT (try again later)."""
    return await _ddl(conn, DROP_SEGMENT, seg)


async def _ddl(conn: asyncpg.Connection, statement: str, *args: object) -> bool:
    try:
        async with conn.transaction():
            await conn.execute(SET_LOCK_TIMEOUT, DDL_LOCK_TIMEOUT)
            await conn.execute(statement, *args)
    except asyncpg.LockNotAvailableError:
        return False
    return True
