"""SQL for subscriptions: configuration, delivery numbers, seek, and event rates."""

from __future__ import annotations

import math
from datetime import datetime

import asyncpg

from sluice.records import (
    SUBSCRIPTION_FIELDS,
    DeliveryState,
    EventKind,
    Subscription,
    SubscriptionConfig,
)

_CONFIG = ", ".join(f"s.{name}" for name in SUBSCRIPTION_FIELDS)

# get_subscription: one subscription by topic and name.
GET_SUBSCRIPTION = f"""
SELECT s.topic_id, s.sub_id, t.name AS topic, s.name, {_CONFIG}, s.created_at, s.updated_at
FROM sluice.subscriptions s JOIN sluice.topics t USING (topic_id)
WHERE t.name = $1 AND s.name = $2
"""

# list_subscriptions: up to $3 subscriptions of a topic by name, after $2 (NULL: first).
LIST_SUBSCRIPTIONS = f"""
SELECT s.topic_id, s.sub_id, t.name AS topic, s.name, {_CONFIG}, s.created_at, s.updated_at
FROM sluice.subscriptions s JOIN sluice.topics t USING (topic_id)
WHERE s.topic_id = $1 AND ($2::text IS NULL OR s.name > $2)
ORDER BY s.name LIMIT $3
"""

# create_subscription: a new subscription (NULL when one of that name exists already: two
# creations racing meet at the unique name, and the loser updates instead).
CREATE_SUBSCRIPTION = f"""
INSERT INTO sluice.subscriptions (topic_id, name, {", ".join(SUBSCRIPTION_FIELDS)})
VALUES ($1, $2, {", ".join(f"${i}" for i in range(3, 3 + len(SUBSCRIPTION_FIELDS)))})
ON CONFLICT (topic_id, name) DO NOTHING
RETURNING sub_id
"""

# start_offset: where a new subscription starts: the head ('latest'), or the oldest
# retained message ('earliest'; the head when nothing is retained).
START_OFFSET = """
SELECT CASE WHEN $2 = 'earliest'
            THEN coalesce(sluice.oldest_offset($1), sluice.next_offset($1))
            ELSE sluice.next_offset($1) END
"""

# init_state: the first state row of a subscription: cursor at $3, a full token bucket $4.
INIT_STATE = """
SELECT sluice.init_state(p_topic_id => $1, p_sub_id => $2, p_start => $3, p_tokens => $4,
                         p_skew => $5)
"""

# lock_subscription: the subscription's exclusive advisory lock, to the end of the
# transaction (claims, seek and redrive take it too).
LOCK_SUBSCRIPTION = "SELECT sluice.lock_subscription($1, true)"

# update_subscription: set every setting (the caller merged the changes into the old ones).
UPDATE_SUBSCRIPTION = f"""
UPDATE sluice.subscriptions SET
    {", ".join(f"{name} = ${i}" for i, name in enumerate(SUBSCRIPTION_FIELDS, start=3))},
    updated_at = clock_timestamp()
WHERE topic_id = $1 AND sub_id = $2
"""

# change_key_order: ordered_by_key turned on ($3 true: what is pending enters its key's
# FIFO) or off (what waits behind a key is released).
CHANGE_KEY_ORDER = """
SELECT sluice.change_key_order(p_topic_id => $1, p_sub_id => $2, p_on => $3, p_skew => $4)
"""

# delete_subscription: the configuration (its state rows go with their segments).
DELETE_SUBSCRIPTION = """
DELETE FROM sluice.subscriptions WHERE topic_id = $1 AND name = $2 RETURNING sub_id
"""

# seek: move the subscription ($3 offset, or $4 time, or $5 'earliest' / 'latest').
SEEK = """
SELECT found, target FROM sluice.seek_subscription(
    p_topic => $1, p_subscription => $2, p_offset => $3, p_time => $4, p_to => $5, p_skew => $6)
"""

# delivery_states: the raw delivery numbers of every subscription, or of one topic's, or of
# one subscription.
DELIVERY_STATES = """
SELECT * FROM sluice.subscription_stats(p_topic_id => $2, p_sub_id => $3, p_skew => $1)
"""

# add_rate_counts: add event counts to the current 10-second bucket (rows of deleted
# subscriptions are skipped).
ADD_RATE_COUNTS = """
INSERT INTO sluice.subscription_rates
    (topic_id, sub_id, bucket, delivered, acked, nacked, expired, dead_lettered)
SELECT c.topic_id, c.sub_id,
       to_timestamp(floor(extract(epoch FROM sluice.now($8)) / 10) * 10),
       c.delivered, c.acked, c.nacked, c.expired, c.dead_lettered
FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
            $6::bigint[], $7::bigint[])
     AS c(topic_id, sub_id, delivered, acked, nacked, expired, dead_lettered)
WHERE EXISTS (SELECT 1 FROM sluice.subscriptions s
              WHERE s.topic_id = c.topic_id AND s.sub_id = c.sub_id)
ON CONFLICT (topic_id, sub_id, bucket) DO UPDATE SET
    delivered = subscription_rates.delivered + EXCLUDED.delivered,
    acked = subscription_rates.acked + EXCLUDED.acked,
    nacked = subscription_rates.nacked + EXCLUDED.nacked,
    expired = subscription_rates.expired + EXCLUDED.expired,
    dead_lettered = subscription_rates.dead_lettered + EXCLUDED.dead_lettered
"""

# recent_rates: event counts of a subscription over the last $3 seconds (whole buckets).
RECENT_RATES = """
SELECT coalesce(sum(delivered), 0) AS delivered, coalesce(sum(acked), 0) AS acked,
       coalesce(sum(nacked), 0) AS nacked, coalesce(sum(expired), 0) AS expired,
       coalesce(sum(dead_lettered), 0) AS dead_lettered
FROM sluice.subscription_rates
WHERE topic_id = $1 AND sub_id = $2 AND bucket > sluice.now($4) - make_interval(secs => $3)
"""

# delete_old_rates: buckets older than $1 seconds.
DELETE_OLD_RATES = """
WITH d AS (DELETE FROM sluice.subscription_rates
           WHERE bucket < sluice.now($2) - make_interval(secs => $1) RETURNING 1)
SELECT count(*) FROM d
"""


def _subscription(row: asyncpg.Record) -> Subscription:
    config = SubscriptionConfig(**{name: row[name] for name in SUBSCRIPTION_FIELDS})
    return Subscription(
        row["topic_id"],
        row["sub_id"],
        row["topic"],
        row["name"],
        config,
        row["created_at"],
        row["updated_at"],
    )


async def get_subscription(conn: asyncpg.Connection, topic: str, name: str) -> Subscription | None:
    row = await conn.fetchrow(GET_SUBSCRIPTION, topic, name)
    return None if row is None else _subscription(row)


async def list_subscriptions(
    conn: asyncpg.Connection, topic_id: int, after: str | None, limit: int
) -> list[Subscription]:
    rows = await conn.fetch(LIST_SUBSCRIPTIONS, topic_id, after, limit)
    return [_subscription(row) for row in rows]


async def create_subscription(
    conn: asyncpg.Connection,
    topic_id: int,
    name: str,
    config: SubscriptionConfig,
    start: str,
    skew: float,
) -> int | None:
    """The new subscription's id, starting at `start` ('earliest' or 'latest'); None when
    a subscription of that name exists (inside the caller's transaction)."""
    values = [getattr(config, field) for field in SUBSCRIPTION_FIELDS]
    sub_id = await conn.fetchval(CREATE_SUBSCRIPTION, topic_id, name, *values)
    if sub_id is None:
        return None
    start_offset = await conn.fetchval(START_OFFSET, topic_id, start)
    tokens = bucket_capacity(config.rate_limit_per_second, config.rate_limit_burst)
    await conn.execute(INIT_STATE, topic_id, sub_id, start_offset, float(tokens), skew)
    return sub_id


async def lock_subscription(conn: asyncpg.Connection, sub_id: int) -> None:
    await conn.execute(LOCK_SUBSCRIPTION, sub_id)


async def update_subscription(
    conn: asyncpg.Connection, topic_id: int, sub_id: int, config: SubscriptionConfig
) -> None:
    values = [getattr(config, field) for field in SUBSCRIPTION_FIELDS]
    await conn.execute(UPDATE_SUBSCRIPTION, topic_id, sub_id, *values)


async def change_key_order(
    conn: asyncpg.Connection, topic_id: int, sub_id: int, ordered: bool, skew: float
) -> None:
    await conn.execute(CHANGE_KEY_ORDER, topic_id, sub_id, ordered, skew)


async def delete_subscription(conn: asyncpg.Connection, topic_id: int, name: str) -> bool:
    return await conn.fetchval(DELETE_SUBSCRIPTION, topic_id, name) is not None


async def seek(
    conn: asyncpg.Connection,
    topic: str,
    name: str,
    offset: int | None,
    time: datetime | None,
    to: str | None,
    skew: float,
) -> int | None:
    """The offset the subscription now starts from; None when there is no subscription."""
    row = await conn.fetchrow(SEEK, topic, name, offset, time, to, skew)
    assert row is not None
    return row["target"] if row["found"] else None


async def delivery_states(
    conn: asyncpg.Connection, skew: float, topic_id: int | None = None, sub_id: int | None = None
) -> list[DeliveryState]:
    rows = await conn.fetch(DELIVERY_STATES, skew, topic_id, sub_id)
    return [DeliveryState(**dict(row)) for row in rows]


def bucket_capacity(rate: float | None, burst: int | None) -> int:
    """Token bucket size: the configured burst, else one second's worth (at least 1).
    A new subscription starts with a full bucket."""
    if not rate:
        return 0
    return burst or max(1, math.ceil(rate))


RATE_KINDS = tuple(kind.value for kind in EventKind)


async def add_rate_counts(
    conn: asyncpg.Connection, counts: list[tuple[int, int, list[int]]], skew: float
) -> None:
    """Add event counts [(topic_id, sub_id, [one per RATE_KINDS])] to the current bucket."""
    if not counts:
        return
    columns = list(zip(*[[t, s, *values] for t, s, values in counts], strict=True))
    await conn.execute(ADD_RATE_COUNTS, *[list(column) for column in columns], skew)


async def recent_rates(
    conn: asyncpg.Connection, topic_id: int, sub_id: int, window_seconds: int, skew: float
) -> dict[str, float]:
    """Events per second over the last window (whole 10-second buckets)."""
    row = await conn.fetchrow(RECENT_RATES, topic_id, sub_id, float(window_seconds), skew)
    assert row is not None
    return {kind: round(float(row[kind]) / window_seconds, 3) for kind in RATE_KINDS}


async def delete_old_rates(conn: asyncpg.Connection, keep_seconds: int, skew: float) -> int:
    return int(await conn.fetchval(DELETE_OLD_RATES, float(keep_seconds), skew))
