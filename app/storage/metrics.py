"""SQL for /metrics: the delivery state of every subscription, in one statement.

The counts are the ones `subscriptions.delivery_stats` gives for one subscription (same
filters, same clock), taken for all subscriptions at once so a scrape costs one round trip.
"""

from __future__ import annotations

import asyncpg

_ALL_SUBSCRIPTIONS = """
WITH now AS (SELECT sluice_now($1) AS ts)
SELECT t.name AS topic, s.name AS subscription, s.next_offset AS cursor, now.ts AS now,
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
    SELECT
        count(*) FILTER (WHERE x.state = 'leased' AND x.lease_until > now.ts) AS in_flight,
        count(*) FILTER (WHERE x.state IN ('ready', 'leased') AND x.due_at <= now.ts
                           AND (x.state = 'ready' OR x.lease_until <= now.ts)) AS due,
        count(*) FILTER (WHERE x.state = 'blocked'
                            OR (x.state IN ('ready', 'leased') AND x.due_at > now.ts
                                AND (x.state = 'ready' OR x.lease_until <= now.ts)))
            AS waiting,
        count(*) FILTER (WHERE x.state = 'dead') AS dead_lettered,
        min(x.msg_offset) FILTER (WHERE x.state <> 'dead') AS lowest_pending
    FROM deliveries x
    WHERE x.topic_id = s.topic_id AND x.sub_id = s.sub_id
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
ORDER BY t.name, s.name
"""


async def all_subscription_states(conn: asyncpg.Connection, skew: float) -> list[asyncpg.Record]:
    """One row per subscription: topic, subscription, cursor, now, the delivery counts
    (in_flight, due, waiting, dead_lettered, lowest_pending), the log bounds
    (oldest_offset, head_offset), delayed_in_log and the publish time of the lowest
    unacked offset (committed_published_at; null when there is none)."""
    return await conn.fetch(_ALL_SUBSCRIPTIONS, skew)
