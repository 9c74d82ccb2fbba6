"""SQL for subscriptions: configuration, listing, deletion and delivery statistics."""

from __future__ import annotations

import math
from typing import Any

import asyncpg

SUB_CONFIG_COLUMNS = (
    "ack_deadline_seconds",
    "max_deliveries",
    "retry_min_seconds",
    "retry_max_seconds",
    "dead_letter_topic",
    "ordered_by_key",
    "rate_limit_per_second",
    "rate_limit_burst",
    "max_in_flight",
)
_SELECT_SUB = (
    "SELECT s.topic_id, s.sub_id, s.name, t.name AS topic, s.next_offset, s.delivered_total, "
    "s.created_at, s.updated_at, " + ", ".join(f"s.{c}" for c in SUB_CONFIG_COLUMNS) + " "
    "FROM subscriptions s JOIN topics t USING (topic_id) "
)


async def get_subscription(
    conn: asyncpg.Connection, topic: str, name: str, *, lock: str | None = None
) -> asyncpg.Record | None:
    """lock: None, 'UPDATE' or 'SHARE' (row lock on the subscription, inside a transaction)."""
    suffix = {None: "", "UPDATE": " FOR UPDATE OF s", "SHARE": " FOR SHARE OF s"}[lock]
    return await conn.fetchrow(
        _SELECT_SUB + "WHERE t.name = $1 AND s.name = $2" + suffix,
        topic,
        name,
    )


async def list_subscriptions(
    conn: asyncpg.Connection, topic_id: int, after: str | None, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        _SELECT_SUB + "WHERE s.topic_id = $1 AND ($2::text IS NULL OR s.name > $2) "
        "ORDER BY s.name LIMIT $3",
        topic_id,
        after,
        limit,
    )


async def insert_subscription(
    conn: asyncpg.Connection, topic_id: int, name: str, config: dict[str, Any], start_offset: int
) -> None:
    columns = list(SUB_CONFIG_COLUMNS)
    placeholders = ", ".join(f"${i}" for i in range(4, len(columns) + 4))
    await conn.execute(
        f"INSERT INTO subscriptions (topic_id, name, next_offset, {', '.join(columns)}, tokens) "
        f"VALUES ($1, $2, $3, {placeholders}, ${len(columns) + 4})",
        topic_id,
        name,
        start_offset,
        *[config[c] for c in columns],
        float(bucket_capacity(config["rate_limit_per_second"], config["rate_limit_burst"])),
    )


async def update_subscription(
    conn: asyncpg.Connection, topic_id: int, sub_id: int, config: dict[str, Any]
) -> None:
    columns = list(SUB_CONFIG_COLUMNS)
    assignments = ", ".join(f"{c} = ${i}" for i, c in enumerate(columns, start=3))
    await conn.execute(
        f"UPDATE subscriptions SET {assignments}, updated_at = clock_timestamp() "
        "WHERE topic_id = $1 AND sub_id = $2",
        topic_id,
        sub_id,
        *[config[c] for c in columns],
    )


async def delete_subscription(conn: asyncpg.Connection, topic_id: int, name: str) -> bool:
    """Delete the subscription, then its delivery rows.

    Two statements in one transaction: deleting the row waits for a claim in progress, and
    the second statement's fresh snapshot then sees every row that claim inserted."""
    async with conn.transaction():
        sub_id = await conn.fetchval(
            "DELETE FROM subscriptions WHERE topic_id = $1 AND name = $2 RETURNING sub_id",
            topic_id,
            name,
        )
        if sub_id is None:
            return False
        await conn.execute(
            "DELETE FROM deliveries WHERE topic_id = $1 AND sub_id = $2", topic_id, sub_id
        )
    return True


# The delivery state of subscriptions in one statement: counts by state, the log bounds,
# the delayed messages beyond the cursor (index-only) and the publish time of the lowest
# unacknowledged offset. The log is gapless within what retention kept, so what lies beyond
# the cursor is offset arithmetic, cheap with millions of messages behind.
_DELIVERY_STATES = """
WITH now AS (SELECT sluice_now($1) AS ts)
SELECT s.topic_id, s.sub_id, t.name AS topic, s.name AS subscription,
       s.next_offset AS cursor, now.ts AS now,
       d.in_flight, d.due, d.waiting, d.dead_lettered, d.lowest_pending,
       lg.oldest_offset, lg.head_offset, lg.delayed_in_log,
       (SELECT m.published_at FROM messages m
         WHERE m.topic_id = s.topic_id
           AND m.msg_offset = least(coalesce(d.lowest_pending, s.next_offset), s.next_offset)
       ) AS committed_published_at
FROM subscriptions s
JOIN topics t USING (topic_id)
CROSS JOIN now
CROSS JOIN LATERAL (
    -- `spent`: due again after its last allowed attempt; the next claim or maintenance
    -- pass parks it, so it already counts as dead-lettered, not as backlog.
    SELECT
        count(*) FILTER (WHERE y.state = 'leased' AND y.lease_until > now.ts) AS in_flight,
        count(*) FILTER (WHERE y.is_due AND NOT y.spent) AS due,
        count(*) FILTER (WHERE y.state = 'blocked' OR y.is_waiting) AS waiting,
        count(*) FILTER (WHERE y.state = 'dead' OR (y.is_due AND y.spent)) AS dead_lettered,
        min(y.msg_offset) FILTER (WHERE y.state <> 'dead' AND NOT (y.is_due AND y.spent))
            AS lowest_pending
    FROM (
        SELECT x.state, x.lease_until, x.msg_offset,
               x.state IN ('ready', 'leased') AND x.due_at <= now.ts
                   AND (x.state = 'ready' OR x.lease_until <= now.ts) AS is_due,
               x.state IN ('ready', 'leased') AND x.due_at > now.ts
                   AND (x.state = 'ready' OR x.lease_until <= now.ts) AS is_waiting,
               s.max_deliveries > 0 AND x.attempts >= s.max_deliveries AS spent
        FROM deliveries x
        WHERE x.topic_id = s.topic_id AND x.sub_id = s.sub_id
    ) y
) d
CROSS JOIN LATERAL (
    SELECT
        (SELECT m.msg_offset FROM messages m WHERE m.topic_id = s.topic_id
          ORDER BY m.msg_offset LIMIT 1) AS oldest_offset,
        (SELECT m.msg_offset FROM messages m WHERE m.topic_id = s.topic_id
          ORDER BY m.msg_offset DESC LIMIT 1) AS head_offset,
        (SELECT count(*) FROM messages m WHERE m.topic_id = s.topic_id
            AND m.msg_offset >= s.next_offset
            AND m.deliver_at IS NOT NULL AND m.deliver_at > now.ts) AS delayed_in_log
) lg
WHERE ($2::bigint IS NULL OR s.topic_id = $2) AND ($3::bigint IS NULL OR s.sub_id = $3)
ORDER BY t.name, s.name
"""


async def delivery_states(
    conn: asyncpg.Connection, skew: float, topic_id: int | None = None, sub_id: int | None = None
) -> list[asyncpg.Record]:
    """One row per subscription (all of them, or the one given): topic_id, sub_id, topic,
    subscription, cursor, now, in_flight, due, waiting, dead_lettered, lowest_pending,
    oldest_offset, head_offset, delayed_in_log, committed_published_at."""
    return await conn.fetch(_DELIVERY_STATES, skew, topic_id, sub_id)


def bucket_capacity(rate: float | None, burst: int | None) -> int:
    """Token bucket size: the configured burst, else one second's worth (at least 1).

    A new subscription starts with a full bucket."""
    if not rate:
        return 0
    return burst or max(1, math.ceil(rate))


RATE_KINDS = ("delivered", "acked", "nacked", "expired", "dead_lettered")


async def add_rate_counts(
    conn: asyncpg.Connection, counts: list[tuple[int, int, list[int]]], skew: float
) -> None:
    """Add event counts [(topic_id, sub_id, [delivered, acked, nacked, expired, dead])]
    to the current 10-second bucket. Rows of deleted subscriptions are skipped."""
    if not counts:
        return
    columns = list(zip(*[[t, s, *values] for t, s, values in counts], strict=True))
    await conn.execute(
        """
        INSERT INTO subscription_rates
            (topic_id, sub_id, bucket, delivered, acked, nacked, expired, dead_lettered)
        SELECT c.topic_id, c.sub_id,
               to_timestamp(floor(extract(epoch FROM sluice_now($8)) / 10) * 10),
               c.delivered, c.acked, c.nacked, c.expired, c.dead_lettered
        FROM unnest($1::bigint[], $2::bigint[], $3::bigint[], $4::bigint[], $5::bigint[],
                    $6::bigint[], $7::bigint[])
             AS c(topic_id, sub_id, delivered, acked, nacked, expired, dead_lettered)
        WHERE EXISTS (SELECT 1 FROM subscriptions s
                      WHERE s.topic_id = c.topic_id AND s.sub_id = c.sub_id)
        ON CONFLICT (topic_id, sub_id, bucket) DO UPDATE SET
            delivered = subscription_rates.delivered + EXCLUDED.delivered,
            acked = subscription_rates.acked + EXCLUDED.acked,
            nacked = subscription_rates.nacked + EXCLUDED.nacked,
            expired = subscription_rates.expired + EXCLUDED.expired,
            dead_lettered = subscription_rates.dead_lettered + EXCLUDED.dead_lettered
        """,
        *[list(column) for column in columns],
        skew,
    )


async def recent_rates(
    conn: asyncpg.Connection, topic_id: int, sub_id: int, window_seconds: int, skew: float
) -> dict[str, float]:
    """Events per second over the last window (whole 10-second buckets)."""
    row = await conn.fetchrow(
        """
        SELECT coalesce(sum(delivered), 0) AS delivered, coalesce(sum(acked), 0) AS acked,
               coalesce(sum(nacked), 0) AS nacked, coalesce(sum(expired), 0) AS expired,
               coalesce(sum(dead_lettered), 0) AS dead_lettered
        FROM subscription_rates
        WHERE topic_id = $1 AND sub_id = $2
          AND bucket > sluice_now($4) - make_interval(secs => $3)
        """,
        topic_id,
        sub_id,
        float(window_seconds),
        skew,
    )
    assert row is not None
    return {kind: round(float(row[kind]) / window_seconds, 3) for kind in RATE_KINDS}


async def delete_old_rates(conn: asyncpg.Connection, keep_seconds: int, skew: float) -> int:
    deleted = await conn.fetchval(
        "WITH d AS (DELETE FROM subscription_rates "
        "WHERE bucket < sluice_now($2) - make_interval(secs => $1) RETURNING 1) "
        "SELECT count(*) FROM d",
        float(keep_seconds),
        skew,
    )
    return int(deleted)
