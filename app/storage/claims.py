"""SQL for claiming: a pull's lease of deliverable messages (sluice.claim, one round trip).

The claim runs under the subscription's exclusive advisory lock: it counts the acks since
the last claim into the subscription's window, expires leases whose deadline passed (retry
timers, dead letters), works out the limit (rate-limit tokens, room under max_in_flight),
takes due timers, then fresh messages from the cursor, and records what it took as one
lease. Nothing is updated in place: docs/design.md, "Storage".
"""

from __future__ import annotations

import asyncpg

from sluice.records import Claim, Delivery

# claim: lease up to $3 messages of subscription $2 of topic $1 ($3 = 0 only expires
# leases); $4 overrides the ack deadline; $6 bounds how far the log is read past messages
# that cannot go out now (delayed, behind a busy key). A rate-limited subscription's bucket
# capacity (its burst, by default one second's worth) comes with it, read here rather than
# by restating the function to return it: one primary-key lookup, only when rate-limited.
CLAIM = """
SELECT c.*, CASE WHEN c.rate_limit IS NOT NULL THEN (
           SELECT coalesce(sb.rate_limit_burst, greatest(1, ceil(sb.rate_limit_per_second)))
           FROM sluice.subscriptions sb WHERE sb.topic_id = c.topic_id AND sb.sub_id = c.sub_id)
       END AS burst
FROM sluice.claim(p_topic => $1, p_subscription => $2, p_max => $3,
                  p_ack_deadline => $4, p_skew => $5, p_scan => $6) c
"""


async def claim(
    conn: asyncpg.Connection,
    topic: str,
    subscription: str,
    max_messages: int,
    ack_deadline_seconds: float | None,
    skew: float,
    scan_limit: int,
) -> Claim:
    row = await conn.fetchrow(
        CLAIM, topic, subscription, max_messages, ack_deadline_seconds, skew, scan_limit
    )
    assert row is not None
    if not row["found"]:
        return Claim(found=False)
    lease_id, seg, until = row["lease_id"], row["lease_seg"], row["lease_until"]
    messages = [
        Delivery(offset, lease_id, seg, token, attempt, until, published, key, headers, value)
        for offset, token, attempt, published, key, headers, value in zip(
            row["offsets"],
            row["tokens"],
            row["attempts"],
            row["published_at"],
            row["keys"],
            row["headers"],
            row["vals"],
            strict=True,
        )
    ]
    return Claim(
        found=True,
        topic_id=row["topic_id"],
        sub_id=row["sub_id"],
        now=row["now"],
        messages=messages,
        next_due=row["next_due"],
        burst=row["burst"],
        tokens=row["tokens_left"],
        token_wait=row["token_wait"],
        messages_available=row["available"],
        in_flight_full=row["in_flight_full"],
        expired=row["expired"],
        dead_lettered=row["dead_lettered"],
    )
