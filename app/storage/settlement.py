"""SQL for settling receipts: ack, nack, extend, give back (sluice.settle, one round trip).

A receipt applies only while its lease is current, its token is the one of its offset, the
message is not settled yet and its deadline has not passed; the check is in the function,
so a stale or forged receipt never touches anything. What was applied is recorded as one
lease event per request and lease (insert-only).
"""

from __future__ import annotations

import asyncpg

from sluice.records import Receipt, Settled, Settlement

# settle: apply receipts ($4 leases, $5 their segments, $6 offsets, $7 tokens) of
# subscription $3 of topic $2 as $1; $8 is the nack delay or the new ack deadline.
SETTLE = """
SELECT * FROM sluice.settle(p_kind => $1, p_topic => $2, p_subscription => $3,
                            p_lease_ids => $4, p_segs => $5, p_offsets => $6, p_tokens => $7,
                            p_seconds => $8, p_skew => $9)
"""


async def settle(
    conn: asyncpg.Connection,
    kind: Settlement,
    topic: str,
    subscription: str,
    receipts: list[Receipt],
    seconds: float | None,
    skew: float,
) -> Settled:
    row = await conn.fetchrow(
        SETTLE,
        kind.value,
        topic,
        subscription,
        [r.lease_id for r in receipts],
        [r.seg for r in receipts],
        [r.offset for r in receipts],
        [r.token for r in receipts],
        seconds,
        skew,
    )
    assert row is not None
    if not row["found"]:
        return Settled(found=False)
    applied = {
        (offset, token.hex)
        for offset, token in zip(row["applied_offsets"], row["applied_tokens"], strict=True)
    }
    return Settled(
        found=True,
        topic_id=row["topic_id"],
        sub_id=row["sub_id"],
        applied=applied,
        lease_until=row["lease_until"],
        dead_lettered=row["parked"],
    )
