"""SQL for the outbox of the SQL API (revision 0005): the relay's pass and the rotation.

Applications publish, ack and nack through SQL functions (sluice.send, sluice.ack, ...)
inside their own transactions; those only write to the outbox. The relay moves what has
committed into the log (offsets assigned then, in commit order) and applies the acks, in
one function call per pass. The outbox is insert-only: its three partitions take turns, and
one is emptied by TRUNCATE (under a short lock_timeout) once all of it has been relayed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import asyncpg

# The payload on the 'sluice' channel that wakes the relays (sent at commit by the SQL API).
OUTBOX_PAYLOAD = "outbox"

# relay: one pass over at most $1 rows; relayed = -1 when another relay holds the lock.
RELAY = "SELECT relayed, more, published, settled FROM sluice.relay($1, $2)"

# outbox_parts_to_empty: partitions other than the current one that hold rows.
PARTS_TO_EMPTY = "SELECT * FROM sluice.outbox_parts_to_empty()"

# empty_outbox_part: TRUNCATE a partition whose rows have all been relayed (DDL lock).
EMPTY_PART = "SELECT sluice.empty_outbox_part($1::smallint)"

# rotate_outbox: the next partition becomes current after $1 seconds, if it is empty.
ROTATE = "SELECT sluice.rotate_outbox($1, sluice.now($2))"


@dataclass
class RelayPass:
    relayed: int  # -1: another process's relay is at work
    more: bool
    published: list[dict[str, Any]] = field(default_factory=list)
    settled: list[dict[str, Any]] = field(default_factory=list)


async def relay(conn: asyncpg.Connection, limit: int, skew: float) -> RelayPass:
    row = await conn.fetchrow(RELAY, limit, skew)
    assert row is not None
    return RelayPass(
        relayed=row["relayed"],
        more=row["more"],
        published=json.loads(row["published"]),
        settled=json.loads(row["settled"]),
    )


async def parts_to_empty(conn: asyncpg.Connection) -> list[int]:
    return [row[0] for row in await conn.fetch(PARTS_TO_EMPTY)]


async def rotate(conn: asyncpg.Connection, after_seconds: float, skew: float) -> bool:
    return bool(await conn.fetchval(ROTATE, after_seconds, skew))


async def empty_part(conn: asyncpg.Connection, part: int, lock_timeout: str) -> bool | None:
    """True: emptied; False: something in it is not relayed yet; None: its lock was not
    granted within `lock_timeout` (a transaction that wrote there is still open)."""
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('lock_timeout', $1, true)", lock_timeout)
            return bool(await conn.fetchval(EMPTY_PART, part))
    except asyncpg.LockNotAvailableError:
        return None
