"""SQL for delivery: claiming (leasing), ack/nack/extend, dead letters, seek and redrive.

Model (docs/design.md): a subscription is a cursor over the topic log plus a `deliveries`
row for every message it has taken and not yet acknowledged. A claim runs in one short
transaction holding the subscription row lock (it moves the cursor and the token bucket),
leases rows that are due with FOR UPDATE SKIP LOCKED, then takes fresh messages from the
log. Acks delete rows with the lease token in the WHERE clause, so a stale receipt can
never touch a newer lease.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import asyncpg

from sluice.storage import log as log_sql
from sluice.storage.log import NOTIFY_CHANNEL, NewMessage
from sluice.storage.subscriptions import bucket_capacity

# Exponential backoff with jitter, clamped to [retry_min, retry_max]. `n` is the number of
# the attempt that failed; the exponent is capped so power() cannot overflow.
_BACKOFF = (
    "least({max}, greatest({min}, {min} * power(2, least({n} - 1, 30)) * (0.8 + 0.4 * random())))"
)

# How far a claim reads ahead in the log past messages it cannot deliver now (delayed, or
# behind a busy key) before it gives up for this call.
MAX_SCAN = 2000


@dataclass(slots=True)
class Delivered:
    offset: int
    token: uuid.UUID
    attempt: int
    lease_until: datetime
    published_at: datetime
    key: str | None
    headers: str | None
    value: str


@dataclass(slots=True)
class ClaimResult:
    found: bool
    topic_id: int | None = None
    messages: list[Delivered] = field(default_factory=list)
    now: datetime | None = None
    rate_limit: float | None = None
    # When nothing could be delivered: the earliest moment something may become deliverable
    # by time alone (a delay, a backoff or a lease ending), so a waiter can sleep till then.
    next_due: datetime | None = None
    # Token bucket: tokens left, and seconds until one token is available when empty.
    tokens: float | None = None
    token_wait: float | None = None
    messages_available: bool = False
    in_flight_full: bool = False
    sub_id: int | None = None
    expired: int = 0  # leases found expired (redelivered or dead-lettered) by this claim
    dead_lettered: int = 0
    # Whether the claim updated the subscription row (cursor, token bucket): such updates
    # leave dead row versions behind that the subscription vacuum loop clears.
    wrote_subscription: bool = False


def _backoff_sql(min_param: str, max_param: str, attempt: str) -> str:
    return _BACKOFF.format(min=min_param, max=max_param, n=attempt)


_LOCK_SUB = """
SELECT s.topic_id, s.sub_id, s.next_offset, s.ack_deadline_seconds, s.max_deliveries,
       s.retry_min_seconds, s.retry_max_seconds, s.dead_letter_topic, s.ordered_by_key,
       s.rate_limit_per_second, s.rate_limit_burst, s.max_in_flight, s.tokens, s.tokens_at,
       t.next_offset AS log_end, sluice_now($3) AS now
FROM subscriptions s JOIN topics t USING (topic_id)
WHERE t.name = $1 AND s.name = $2
FOR UPDATE OF s
"""

_BACKOFF_NEXT_ATTEMPT = _backoff_sql("$7::float8", "$8::float8", "d.attempts + 1")
_BACKOFF_NACK = _backoff_sql("$8::float8", "$9::float8", "d.attempts")
_BACKOFF_FIRST_ATTEMPT = _backoff_sql("$6::float8", "$7::float8", "1")
_BACKOFF_FRESH = _backoff_sql("s.retry_min_seconds", "s.retry_max_seconds", "1")
_BACKOFF_EXTEND = _backoff_sql("s.retry_min_seconds", "s.retry_max_seconds", "d.attempts")

_REDELIVER = f"""
WITH c AS (
    SELECT msg_offset, state AS prev_state FROM deliveries
    WHERE topic_id = $1 AND sub_id = $2 AND state IN ('ready', 'leased')
      AND due_at <= $3::timestamptz
      AND ($6::int = 0 OR attempts < $6::int)
    ORDER BY due_at LIMIT $4
    FOR UPDATE SKIP LOCKED
), u AS (
    UPDATE deliveries d
    SET state = 'leased', attempts = d.attempts + 1, lease_token = gen_random_uuid(),
        lease_until = $3::timestamptz + make_interval(secs => $5::float8),
        due_at = $3::timestamptz + make_interval(secs => $5::float8) + CASE
            WHEN $6::int > 0 AND d.attempts + 1 >= $6::int THEN interval '0'
            ELSE make_interval(secs => {_BACKOFF_NEXT_ATTEMPT}) END
    FROM c
    WHERE d.topic_id = $1 AND d.sub_id = $2 AND d.msg_offset = c.msg_offset
    RETURNING d.msg_offset, d.attempts, d.lease_token, d.lease_until, c.prev_state
)
SELECT u.msg_offset, u.attempts, u.lease_token, u.lease_until, u.prev_state,
       m.published_at, m.key, m.headers, m.value
FROM u JOIN messages m ON m.topic_id = $1 AND m.msg_offset = u.msg_offset
ORDER BY u.msg_offset
"""

_SCAN_LOG = """
SELECT msg_offset, deliver_at, key FROM messages
WHERE topic_id = $1 AND msg_offset >= $2
ORDER BY msg_offset LIMIT $3
"""

_BUSY_KEYS = """
SELECT DISTINCT key FROM deliveries
WHERE topic_id = $1 AND sub_id = $2 AND key = ANY($3::text[]) AND state <> 'dead'
"""

# Inserts every message the claim took from the log; returns the payloads of those leased.
_TAKE_FROM_LOG = f"""
WITH ins AS (
    INSERT INTO deliveries
        (topic_id, sub_id, msg_offset, state, due_at, lease_until, lease_token, attempts, key)
    SELECT $1, $2, r.off, r.state,
           CASE WHEN r.state = 'leased'
                THEN $3::timestamptz + make_interval(secs => $4::float8) + CASE
                    WHEN $5::int = 1 THEN interval '0'
                    ELSE make_interval(secs => {_BACKOFF_FIRST_ATTEMPT}) END
                ELSE coalesce(r.due, $3::timestamptz) END,
           CASE WHEN r.state = 'leased'
                THEN $3::timestamptz + make_interval(secs => $4::float8) END,
           r.token,
           CASE WHEN r.state = 'leased' THEN 1 ELSE 0 END,
           r.key
    FROM unnest($8::bigint[], $9::text[], $10::timestamptz[], $11::uuid[], $12::text[])
         AS r(off, state, due, token, key)
    RETURNING msg_offset, attempts, lease_token, lease_until
)
SELECT ins.msg_offset, ins.attempts, ins.lease_token, ins.lease_until,
       m.published_at, m.key, m.headers, m.value
FROM ins JOIN messages m ON m.topic_id = $1 AND m.msg_offset = ins.msg_offset
WHERE ins.lease_token IS NOT NULL
ORDER BY ins.msg_offset
"""

_SAVE_SUB = """
UPDATE subscriptions
SET next_offset = $3, tokens = $4, tokens_at = $5, delivered_total = delivered_total + $6
WHERE topic_id = $1 AND sub_id = $2
"""


def _first_due(topic_id: str, sub_id: str, now: str) -> str:
    """SQL: the due time of the subscription's earliest row due for (re)delivery, or NULL.

    Always written in due order with LIMIT 1, so that Postgres walks the due index from the
    subscription's start up to `now` and stops there. Plain EXISTS forms were planned as
    sequential scans or anti joins over the due rows of every subscription once the table
    statistics showed many leased rows (generic plans cannot tell subscriptions apart)."""
    return f"""(SELECT d.due_at FROM deliveries d
        WHERE d.topic_id = {topic_id} AND d.sub_id = {sub_id}
          AND d.state IN ('ready', 'leased') AND d.due_at <= {now}
        ORDER BY d.due_at LIMIT 1)"""


# The next moment something changes by time alone: a row becoming due (delay, backoff,
# expiry) or, for a subscription at its in-flight cap, a lease ending. Only future times:
# rows already due but not claimable (locked by a concurrent ack) must not cause a spin.
_NEXT_DUE = """
SELECT (SELECT due_at FROM deliveries
         WHERE topic_id = $1 AND sub_id = $2 AND state IN ('ready', 'leased') AND due_at > $4
         ORDER BY due_at LIMIT 1) AS next_due,
       -- A lease ending after $4 is due after it too (due_at >= lease_until): the range
       -- condition on due_at keeps this on the due index.
       CASE WHEN $3 THEN (SELECT min(lease_until) FROM deliveries
         WHERE topic_id = $1 AND sub_id = $2 AND state IN ('ready', 'leased') AND due_at > $4
           AND state = 'leased' AND lease_until > $4)
       END AS next_lease_end
"""

# due_at >= lease_until for leases, so the due_at range keeps the count on the due index.
_IN_FLIGHT = """
SELECT count(*) FROM deliveries
WHERE topic_id = $1 AND sub_id = $2 AND state IN ('ready', 'leased') AND due_at > $3
  AND state = 'leased' AND lease_until > $3
"""

_HAS_DUE = f"SELECT {_first_due('$1', '$2', '$3')} IS NOT NULL"

# Lock-free look (one round trip) when the one-statement fresh claim (_CLAIM_FRESH, tried
# first) leased nothing; it picks the way on:
# - idle: nothing new in the log and nothing due, so nothing to lease. The claim skips the
#   subscription row lock (which serialises claims) and writes nothing; re-checks of many
#   idle long-polls stay cheap and parallel. Rate-limited subscriptions always take the full
#   claim (it refills their token bucket).
# - fresh after all: messages arrived (or the cursor moved) since the first try: try again.
# - otherwise the full claim transaction.
_PROBE = f"""
WITH n AS (SELECT sluice_now($3) AS now)
SELECT s.topic_id, s.sub_id, n.now, s.next_offset < t.next_offset AS log_ahead,
       s.rate_limit_per_second IS NULL AND s.max_in_flight IS NULL AND NOT s.ordered_by_key
           AS unlimited,
       s.rate_limit_per_second IS NULL AS no_bucket,
       {_first_due("s.topic_id", "s.sub_id", "n.now")} IS NOT NULL AS has_due
FROM subscriptions s JOIN topics t USING (topic_id), n
WHERE t.name = $1 AND s.name = $2
"""

# The whole claim of fresh log messages in one statement (one round trip): find and lock the
# subscription row by name, read the log from the cursor, insert the deliveries rows
# (leased, or ready at their delivery time for delayed messages), move the cursor, and
# return the leased messages with their payloads.
# It applies only when the subscription has no flow control and no key ordering, nothing is
# due for redelivery and the log is ahead of the cursor; otherwise the WHERE clause leaves
# the row unlocked and nothing comes back, and claim() looks closer (the probe). An idle
# subscription is therefore never locked here: idle long-polls re-check in parallel.
# Under READ COMMITTED the locked row is re-checked after a concurrent claim commits, so
# the cursor used is always the newest; messages are read from the statement's snapshot,
# so anything the snapshot does not see stays beyond the new cursor for the next claim.
_CLAIM_FRESH = f"""
WITH n AS (
    -- Materialised once (sluice_now is volatile): a plain value the due-index scan below
    -- can start and stop at, instead of a filter over every entry of the subscription.
    SELECT sluice_now($5) AS now
), s AS (
    SELECT s.topic_id, s.sub_id, s.next_offset, s.max_deliveries, s.retry_min_seconds,
           s.retry_max_seconds,
           coalesce($4::float8, s.ack_deadline_seconds::float8) AS deadline, n.now,
           gen_random_uuid()::text AS secret
    FROM subscriptions s JOIN topics t USING (topic_id), n
    WHERE t.name = $1 AND s.name = $2 AND s.next_offset < t.next_offset
      AND s.rate_limit_per_second IS NULL AND s.max_in_flight IS NULL AND NOT s.ordered_by_key
      -- nothing due for redelivery (now as an InitPlan value: an index bound)
      AND {_first_due("s.topic_id", "s.sub_id", "(SELECT now FROM n)")} IS NULL
    FOR UPDATE OF s
), fresh AS (
    -- LATERAL with its own ORDER BY/LIMIT: an index range scan from the cursor that stops
    -- after $3 rows, however long the backlog behind it.
    -- The payload is read here, in the same index scan, and handed back from this CTE:
    -- joining `messages` again for it cost a second index look-up per message (a fifth of
    -- the statement).
    SELECT m.msg_offset, coalesce(m.deliver_at > s.now, false) AS delayed, m.deliver_at,
           m.published_at, m.key, m.headers, m.value
    FROM s CROSS JOIN LATERAL (
        SELECT msg_offset, deliver_at, published_at, key, headers, value FROM messages
        WHERE topic_id = s.topic_id AND msg_offset >= s.next_offset
        ORDER BY msg_offset LIMIT $3
    ) m
), ins AS (
    INSERT INTO deliveries
        (topic_id, sub_id, msg_offset, state, due_at, lease_until, lease_token, attempts)
    SELECT s.topic_id, s.sub_id, f.msg_offset,
           CASE WHEN f.delayed THEN 'ready' ELSE 'leased' END,
           CASE WHEN f.delayed THEN f.deliver_at
                WHEN s.max_deliveries = 1 THEN s.now + make_interval(secs => s.deadline)
                ELSE s.now + make_interval(secs => s.deadline)
                     + make_interval(secs => {_BACKOFF_FRESH}) END,
           CASE WHEN f.delayed THEN NULL ELSE s.now + make_interval(secs => s.deadline) END,
           -- The fencing token: MD5 of the claim's random secret and the offset. One random
           -- draw per claim instead of per row (gen_random_uuid() was a quarter of the
           -- claim's time), yet tokens stay distinct per row, which acks rely on, and
           -- cannot be derived without the 128-bit secret, which never leaves Postgres.
           CASE WHEN f.delayed THEN NULL ELSE md5(s.secret || f.msg_offset::text)::uuid END,
           CASE WHEN f.delayed THEN 0 ELSE 1 END
    FROM s, fresh f
    RETURNING topic_id, msg_offset, attempts, lease_token, lease_until
), moved AS (
    UPDATE subscriptions u
    SET next_offset = (SELECT max(msg_offset) + 1 FROM fresh),
        delivered_total = u.delivered_total + (SELECT count(*) FROM fresh WHERE NOT delayed)
    FROM s
    WHERE u.topic_id = s.topic_id AND u.sub_id = s.sub_id AND EXISTS (SELECT 1 FROM fresh)
)
SELECT s.topic_id, s.sub_id, s.now, i.msg_offset, i.attempts, i.lease_token, i.lease_until,
       f.published_at, f.key, f.headers, f.value
FROM s
JOIN ins i ON i.lease_token IS NOT NULL
JOIN fresh f ON f.msg_offset = i.msg_offset
ORDER BY i.msg_offset
"""


def _record(row: Mapping[str, Any]) -> Delivered:
    return Delivered(
        offset=row["msg_offset"],
        token=row["lease_token"],
        attempt=row["attempts"],
        lease_until=row["lease_until"],
        published_at=row["published_at"],
        key=row["key"],
        headers=row["headers"],
        value=row["value"],
    )


async def claim_fresh(
    conn: asyncpg.Connection,
    topic: str,
    subscription: str,
    max_messages: int,
    ack_deadline_seconds: int | None,
    skew: float,
) -> ClaimResult | None:
    """The one-statement claim when it applies and leases something, else None."""
    rows = await conn.fetch(
        _CLAIM_FRESH, topic, subscription, max_messages, ack_deadline_seconds, skew
    )
    if not rows:
        return None
    first = rows[0]
    return ClaimResult(
        found=True,
        topic_id=first["topic_id"],
        sub_id=first["sub_id"],
        now=first["now"],
        messages=[_record(row) for row in rows],
        wrote_subscription=True,
    )


async def claim(
    conn: asyncpg.Connection,
    topic: str,
    subscription: str,
    max_messages: int,
    ack_deadline_seconds: int | None,
    skew: float,
) -> ClaimResult:
    # Most pulls of a busy subscription are served by the one-statement claim; only when it
    # does not apply (or found only delayed messages) does the claim look closer.
    fresh = await claim_fresh(conn, topic, subscription, max_messages, ack_deadline_seconds, skew)
    if fresh is not None:
        return fresh
    probe = await conn.fetchrow(_PROBE, topic, subscription, skew)
    if probe is None:
        return ClaimResult(found=False)
    topic_id, sub_id, now = probe["topic_id"], probe["sub_id"], probe["now"]
    if probe["no_bucket"] and not probe["has_due"] and not probe["log_ahead"]:
        # Only now look for the next due time: that index walk starts at `now` and steps
        # over the entries of leases acked since the last vacuum, so a busy pull that
        # does not need it must not pay for it.
        due = await conn.fetchrow(_NEXT_DUE, topic_id, sub_id, False, now)
        assert due is not None
        return ClaimResult(
            found=True, topic_id=topic_id, sub_id=sub_id, now=now, next_due=due["next_due"]
        )
    if probe["unlimited"] and not probe["has_due"]:
        # Messages arrived since the first try, or a concurrent claim moved the cursor: one
        # more try; if it still leases nothing (only delayed messages were there), the full
        # claim below works out when to look again.
        fresh = await claim_fresh(
            conn, topic, subscription, max_messages, ack_deadline_seconds, skew
        )
        if fresh is not None:
            return fresh
    async with conn.transaction():
        # This path may dead-letter and publish copies to a dead-letter topic: commit it
        # durably even on the claim pool (whose sessions do not wait for the WAL flush).
        await conn.execute("SET LOCAL synchronous_commit = on")
        sub = await conn.fetchrow(_LOCK_SUB, topic, subscription, skew)
        if sub is None:
            return ClaimResult(found=False)
        topic_id, sub_id, now = sub["topic_id"], sub["sub_id"], sub["now"]
        deadline = float(ack_deadline_seconds or sub["ack_deadline_seconds"])
        result = ClaimResult(found=True, topic_id=topic_id, sub_id=sub_id, now=now)
        limit = max_messages

        tokens: float | None = None
        rate = sub["rate_limit_per_second"]
        if rate:
            burst = bucket_capacity(rate, sub["rate_limit_burst"])
            result.rate_limit = rate
            elapsed = max(0.0, (now - sub["tokens_at"]).total_seconds())
            tokens = min(float(burst), sub["tokens"] + rate * elapsed)
            limit = min(limit, int(tokens))

        if sub["max_in_flight"] is not None:
            in_flight = await conn.fetchval(_IN_FLIGHT, topic_id, sub_id, now)
            room = sub["max_in_flight"] - in_flight
            if room <= 0:
                result.in_flight_full = True
            limit = min(limit, room)

        dead = await dead_letter_due(conn, sub, now)
        result.dead_lettered = len(dead)
        result.expired = sum(1 for r in dead if r["prev_state"] == "leased")

        delivered: list[Delivered] = []
        cursor = sub["next_offset"]
        if limit > 0:
            rows = await conn.fetch(
                _REDELIVER,
                topic_id,
                sub_id,
                now,
                limit,
                deadline,
                sub["max_deliveries"],
                sub["retry_min_seconds"],
                sub["retry_max_seconds"],
            )
            delivered.extend(_record(r) for r in rows)
            result.expired += sum(1 for r in rows if r["prev_state"] == "leased")
            if len(delivered) < limit and cursor < sub["log_end"]:
                fresh, cursor = await _take_from_log(
                    conn, sub, now, limit - len(delivered), deadline
                )
                delivered.extend(fresh)

        if tokens is not None:
            tokens -= len(delivered)
            result.tokens = tokens
            if tokens < 1:
                result.token_wait = (1 - tokens) / rate
        if delivered or cursor != sub["next_offset"] or tokens is not None:
            await conn.execute(
                _SAVE_SUB,
                topic_id,
                sub_id,
                cursor,
                tokens if tokens is not None else sub["tokens"],
                now if tokens is not None else sub["tokens_at"],
                len(delivered),
            )
            result.wrote_subscription = True
        result.messages = delivered
        if not delivered:
            more_log = cursor < sub["log_end"]
            result.messages_available = more_log or bool(
                await conn.fetchval(_HAS_DUE, topic_id, sub_id, now)
            )
            if limit > 0 and more_log:
                # The read-ahead limit stopped us with more of the log to look at.
                result.next_due = now
            else:
                due = await conn.fetchrow(_NEXT_DUE, topic_id, sub_id, result.in_flight_full, now)
                assert due is not None
                candidates = [t for t in (due["next_due"], due["next_lease_end"]) if t]
                result.next_due = min(candidates) if candidates else None
        return result


async def _take_from_log(
    conn: asyncpg.Connection, sub: asyncpg.Record, now: datetime, wanted: int, deadline: float
) -> tuple[list[Delivered], int]:
    """Read the log from the cursor; lease up to `wanted` messages. Returns (leased, cursor).

    Delayed messages get a `ready` row due at their delivery time, and with ordered_by_key
    a message whose key is still pending gets a `blocked` row, so the cursor can always
    move on past them.
    """
    topic_id, sub_id = sub["topic_id"], sub["sub_id"]
    ordered = sub["ordered_by_key"]
    cursor = sub["next_offset"]
    offsets: list[int] = []
    states: list[str] = []
    dues: list[datetime | None] = []
    tokens: list[uuid.UUID | None] = []
    keys: list[str | None] = []
    leased = 0
    scanned = 0
    busy: set[str] = set()
    while leased < wanted and scanned < MAX_SCAN and cursor < sub["log_end"]:
        batch = wanted - leased if not ordered else max(2 * (wanted - leased), 100)
        rows = await conn.fetch(_SCAN_LOG, topic_id, cursor, min(batch, MAX_SCAN - scanned))
        if not rows:
            break
        if ordered:
            candidate_keys = list({r["key"] for r in rows if r["key"] is not None} - busy)
            if candidate_keys:
                found = await conn.fetch(_BUSY_KEYS, topic_id, sub_id, candidate_keys)
                busy.update(r["key"] for r in found)
        for row in rows:
            if leased >= wanted:
                break
            key = row["key"] if ordered else None
            deliver_at = row["deliver_at"]
            if key is not None and key in busy:
                # Held back even if also delayed: its delay is honoured when it is released.
                state, due, token = "blocked", None, None
            elif deliver_at is not None and deliver_at > now:
                state, due, token = "ready", deliver_at, None
            else:
                state, due, token = "leased", None, uuid.uuid4()
                leased += 1
            if key is not None:
                busy.add(key)
            offsets.append(row["msg_offset"])
            states.append(state)
            dues.append(due)
            tokens.append(token)
            keys.append(key)
            cursor = row["msg_offset"] + 1
        scanned += len(rows)
    if not offsets:
        return [], cursor
    rows = await conn.fetch(
        _TAKE_FROM_LOG,
        topic_id,
        sub_id,
        now,
        deadline,
        sub["max_deliveries"],
        sub["retry_min_seconds"],
        sub["retry_max_seconds"],
        offsets,
        states,
        dues,
        tokens,
        keys,
    )
    return [_record(r) for r in rows], cursor


# ---- dead letters -----------------------------------------------------------------------

_DEAD_LETTER_DUE = """
UPDATE deliveries d
SET state = 'dead', dead_at = $3::timestamptz, lease_token = NULL, lease_until = NULL
FROM (SELECT msg_offset, state AS prev_state FROM deliveries
      WHERE topic_id = $1 AND sub_id = $2 AND state IN ('ready', 'leased')
        AND due_at <= $3::timestamptz AND attempts >= $4
      ORDER BY due_at LIMIT 1000 FOR UPDATE SKIP LOCKED) c
WHERE d.topic_id = $1 AND d.sub_id = $2 AND d.msg_offset = c.msg_offset
RETURNING d.msg_offset, d.attempts, d.key, c.prev_state
"""

# Release the next message of each key, but only when no message of the key is leased or
# waiting (a re-driven earlier message waits behind one in flight), and not before the
# message's own delay ends.
_PROMOTE_NEXT_OF_KEYS = """
UPDATE deliveries d SET state = 'ready', due_at = greatest($4::timestamptz,
    (SELECT m.deliver_at FROM messages m WHERE m.topic_id = $1 AND m.msg_offset = d.msg_offset))
FROM (SELECT key, min(msg_offset) AS msg_offset FROM deliveries
      WHERE topic_id = $1 AND sub_id = $2 AND key = ANY($3::text[]) AND state <> 'dead'
      GROUP BY key HAVING bool_and(state = 'blocked')) head
WHERE d.topic_id = $1 AND d.sub_id = $2 AND d.msg_offset = head.msg_offset
  AND d.state = 'blocked'
"""


# ordered_by_key turned off: messages held back behind their key become deliverable.
_RELEASE_BLOCKED = """
UPDATE deliveries d SET state = 'ready', due_at = greatest(sluice_now($3),
    (SELECT m.deliver_at FROM messages m WHERE m.topic_id = $1 AND m.msg_offset = d.msg_offset))
WHERE d.topic_id = $1 AND d.sub_id = $2 AND d.state = 'blocked'
"""


async def release_blocked(
    conn: asyncpg.Connection, topic_id: int, sub_id: int, skew: float
) -> None:
    await conn.execute(_RELEASE_BLOCKED, topic_id, sub_id, skew)


# ordered_by_key turned on: rows taken while it was off carry no key. Give them their key,
# then hold back every waiting row that has an earlier pending row of the same key, so
# from now on a key has at most its head deliverable (leases already out stay out).
_ADOPT_KEYS = """
UPDATE deliveries d SET key = m.key
FROM messages m
WHERE d.topic_id = $1 AND d.sub_id = $2 AND d.state <> 'dead' AND d.key IS NULL
  AND m.topic_id = d.topic_id AND m.msg_offset = d.msg_offset AND m.key IS NOT NULL
"""
_BLOCK_BEHIND_KEYS = """
UPDATE deliveries d SET state = 'blocked'
WHERE d.topic_id = $1 AND d.sub_id = $2 AND d.state = 'ready' AND d.key IS NOT NULL
  AND EXISTS (SELECT 1 FROM deliveries e
              WHERE e.topic_id = d.topic_id AND e.sub_id = d.sub_id AND e.key = d.key
                AND e.state <> 'dead' AND e.msg_offset < d.msg_offset)
"""


async def adopt_key_order(conn: asyncpg.Connection, topic_id: int, sub_id: int) -> None:
    """Needs the subscription row locked (no claim may run meanwhile)."""
    await conn.execute(_ADOPT_KEYS, topic_id, sub_id)
    await conn.execute(_BLOCK_BEHIND_KEYS, topic_id, sub_id)


_DEAD_PAYLOADS = """
SELECT msg_offset, key, headers, value FROM messages
WHERE topic_id = $1 AND msg_offset = ANY($2::bigint[]) ORDER BY msg_offset
"""


async def dead_letter_due(
    conn: asyncpg.Connection, sub: asyncpg.Record, now: datetime
) -> list[asyncpg.Record]:
    """Park messages whose last allowed lease expired. Needs the subscription row locked."""
    if sub["max_deliveries"] == 0:
        return []
    rows = await conn.fetch(
        _DEAD_LETTER_DUE, sub["topic_id"], sub["sub_id"], now, sub["max_deliveries"]
    )
    await after_dead(conn, sub, rows, now)
    return rows


async def after_dead(
    conn: asyncpg.Connection, sub: asyncpg.Record, rows: list[asyncpg.Record], now: datetime
) -> None:
    """Copy newly dead-lettered messages to the dead-letter topic and unblock their keys."""
    if not rows:
        return
    keys = [r["key"] for r in rows if r["key"] is not None]
    if keys:
        await conn.execute(_PROMOTE_NEXT_OF_KEYS, sub["topic_id"], sub["sub_id"], keys, now)
    target_name = sub["dead_letter_topic"]
    if not target_name:
        return
    origin = await conn.fetchval("SELECT name FROM topics WHERE topic_id = $1", sub["topic_id"])
    subscription = await conn.fetchval(
        "SELECT name FROM subscriptions WHERE topic_id = $1 AND sub_id = $2",
        sub["topic_id"],
        sub["sub_id"],
    )
    attempts = {r["msg_offset"]: r["attempts"] for r in rows}
    payloads = await conn.fetch(_DEAD_PAYLOADS, sub["topic_id"], list(attempts))
    copies = []
    for p in payloads:
        headers = _json_loads_headers(p["headers"])
        headers.update(
            {
                "sluice-origin-topic": origin,
                "sluice-origin-offset": str(p["msg_offset"]),
                "sluice-origin-subscription": subscription,
                "sluice-delivery-attempts": str(attempts[p["msg_offset"]]),
            }
        )
        copies.append(NewMessage(p["value"], p["key"], _json_dumps(headers), 0, None))
    # A dead-letter topic deleted meanwhile: append finds no row and the copy is skipped
    # (the message stays parked in the subscription's dead-letter set).
    await log_sql.append(conn, target_name, copies, 0.0)


def _json_loads_headers(text: str | None) -> dict[str, str]:
    import orjson

    return {} if text is None else dict(orjson.loads(text))


def _json_dumps(value: Any) -> str:
    import orjson

    return orjson.dumps(value).decode()


# ---- ack / nack / extend ----------------------------------------------------------------

_SUB_BY_NAME = """
SELECT s.topic_id, s.sub_id, s.ordered_by_key, s.max_in_flight, s.max_deliveries,
       s.retry_min_seconds, s.retry_max_seconds, s.dead_letter_topic
FROM subscriptions s JOIN topics t USING (topic_id)
WHERE t.name = $1 AND s.name = $2
"""

# Receipts name rows by primary key: `msg_offset = ANY($3)` makes that the plan whatever
# the (fast-changing) statistics of `deliveries` say. The token check is `= ANY($4)` too,
# not a join with the receipt pairs (that join re-scans the receipts per row): a lease
# token is random and belongs to exactly one lease of one row, so "offset given and token
# given" is the same test as "this (offset, token) pair given". A lease_token is only ever
# set on a leased row (every other transition clears it), so matching it is also the state
# check; naming the state would let the planner pick the partial claim index instead.
# Unordered subscriptions ack in this one statement. Ordered ones need the subscription
# row locked first (see ack()), so the DELETE skips them and the caller takes the slow path.
_ACK = f"""
WITH s AS ({_SUB_BY_NAME}), d AS (
    DELETE FROM deliveries d
    USING s
    WHERE NOT s.ordered_by_key
      AND d.topic_id = s.topic_id AND d.sub_id = s.sub_id
      AND d.msg_offset = ANY($3::bigint[]) AND d.lease_token = ANY($4::uuid[])
      AND d.lease_until > sluice_now($5)
    RETURNING d.msg_offset, d.lease_token AS token
)
SELECT s.topic_id, s.sub_id, s.ordered_by_key, s.max_in_flight,
       ARRAY(SELECT msg_offset FROM d) AS done, ARRAY(SELECT token FROM d) AS done_tokens
FROM s
"""

_ACK_LOCKED = """
DELETE FROM deliveries d
WHERE d.topic_id = $1 AND d.sub_id = $2
  AND d.msg_offset = ANY($3::bigint[]) AND d.lease_token = ANY($4::uuid[])
  AND d.lease_until > $5::timestamptz
RETURNING d.msg_offset, d.key, d.lease_token AS token
"""

_NACK_LOCKED = f"""
UPDATE deliveries d
SET state = CASE WHEN $6::int > 0 AND d.attempts >= $6::int THEN 'dead' ELSE 'ready' END,
    due_at = $5::timestamptz + make_interval(secs => coalesce($7::float8, {_BACKOFF_NACK})),
    dead_at = CASE WHEN $6::int > 0 AND d.attempts >= $6::int THEN $5::timestamptz END,
    lease_token = NULL, lease_until = NULL
FROM unnest($3::bigint[], $4::uuid[]) AS r(off, token)
WHERE d.topic_id = $1 AND d.sub_id = $2 AND d.msg_offset = r.off
  AND d.msg_offset = ANY($3::bigint[])
  AND d.lease_token = r.token AND d.lease_until > $5::timestamptz
RETURNING d.msg_offset, d.state, d.attempts, d.key, r.token
"""

_EXTEND = f"""
WITH s AS ({_SUB_BY_NAME}), u AS (
    UPDATE deliveries d
    SET lease_until = sluice_now($5) + make_interval(secs => $6::float8),
        due_at = sluice_now($5) + make_interval(secs => $6::float8) + CASE
            WHEN s.max_deliveries > 0 AND d.attempts >= s.max_deliveries THEN interval '0'
            ELSE make_interval(secs => {_BACKOFF_EXTEND}) END
    FROM s
    WHERE d.topic_id = s.topic_id AND d.sub_id = s.sub_id
      AND d.msg_offset = ANY($3::bigint[]) AND d.lease_token = ANY($4::uuid[])
      AND d.lease_until > sluice_now($5)
    RETURNING d.msg_offset, d.lease_until, d.lease_token AS token
)
SELECT s.topic_id, s.sub_id, ARRAY(SELECT msg_offset FROM u) AS done,
       ARRAY(SELECT token FROM u) AS done_tokens,
       (SELECT max(lease_until) FROM u) AS lease_until
FROM s
"""


@dataclass(slots=True)
class Settled:
    """Outcome of ack/nack/extend: which offsets were applied (None: no subscription)."""

    found: bool
    done: list[int] = field(default_factory=list)
    # The token of the receipt applied for each offset in `done` (same order): a request
    # may name one offset with several receipts, and only one of them is current.
    done_tokens: list[uuid.UUID] = field(default_factory=list)
    topic_id: int | None = None
    sub_id: int | None = None
    dead_lettered: int = 0
    wake: int = 0  # how many waiting pulls the change may satisfy
    lease_until: datetime | None = None


async def ack(
    conn: asyncpg.Connection,
    topic: str,
    subscription: str,
    offsets: list[int],
    tokens: list[str],
    skew: float,
) -> Settled:
    row = await conn.fetchrow(_ACK, topic, subscription, offsets, tokens, skew)
    if row is None:
        return Settled(found=False)
    if not row["ordered_by_key"]:
        done = list(row["done"])
        wake = len(done) if row["max_in_flight"] is not None else 0
        return Settled(
            found=True,
            done=done,
            done_tokens=list(row["done_tokens"]),
            topic_id=row["topic_id"],
            sub_id=row["sub_id"],
            wake=wake,
        )
    # Ordered: lock the subscription (shared with other acks, exclusive with claims) so a
    # claim cannot add a `blocked` row for a key whose head we are about to release.
    async with conn.transaction():
        sub = await _lock_shared(conn, topic, subscription, skew)
        if sub is None:
            return Settled(found=False)
        rows = await conn.fetch(
            _ACK_LOCKED, sub["topic_id"], sub["sub_id"], offsets, tokens, sub["now"]
        )
        keys = list({r["key"] for r in rows if r["key"] is not None})
        if keys:
            await conn.execute(
                _PROMOTE_NEXT_OF_KEYS, sub["topic_id"], sub["sub_id"], keys, sub["now"]
            )
        return Settled(
            found=True,
            done=[r["msg_offset"] for r in rows],
            done_tokens=[r["token"] for r in rows],
            topic_id=sub["topic_id"],
            sub_id=sub["sub_id"],
            wake=len(rows),
        )


async def _lock_shared(
    conn: asyncpg.Connection, topic: str, subscription: str, skew: float
) -> asyncpg.Record | None:
    return await conn.fetchrow(
        _SUB_BY_NAME.replace("SELECT s.topic_id", "SELECT sluice_now($3) AS now, s.topic_id")
        + " FOR SHARE OF s",
        topic,
        subscription,
        skew,
    )


async def nack(
    conn: asyncpg.Connection,
    topic: str,
    subscription: str,
    offsets: list[int],
    tokens: list[str],
    delay_seconds: float | None,
    skew: float,
) -> Settled:
    async with conn.transaction():
        sub = await _lock_shared(conn, topic, subscription, skew)
        if sub is None:
            return Settled(found=False)
        rows = await conn.fetch(
            _NACK_LOCKED,
            sub["topic_id"],
            sub["sub_id"],
            offsets,
            tokens,
            sub["now"],
            sub["max_deliveries"],
            delay_seconds,
            sub["retry_min_seconds"],
            sub["retry_max_seconds"],
        )
        dead = [r for r in rows if r["state"] == "dead"]
        await after_dead(conn, sub, dead, sub["now"])
        return Settled(
            found=True,
            done=[r["msg_offset"] for r in rows],
            done_tokens=[r["token"] for r in rows],
            topic_id=sub["topic_id"],
            sub_id=sub["sub_id"],
            wake=len(rows) - len(dead),
            dead_lettered=len(dead),
        )


async def extend(
    conn: asyncpg.Connection,
    topic: str,
    subscription: str,
    offsets: list[int],
    tokens: list[str],
    ack_deadline_seconds: float,
    skew: float,
) -> Settled:
    row = await conn.fetchrow(
        _EXTEND, topic, subscription, offsets, tokens, skew, ack_deadline_seconds
    )
    if row is None:
        return Settled(found=False)
    return Settled(
        found=True,
        done=list(row["done"]),
        done_tokens=list(row["done_tokens"]),
        topic_id=row["topic_id"],
        sub_id=row["sub_id"],
        lease_until=row["lease_until"],
    )


# ---- seek, dead-letter listing and redrive ----------------------------------------------


async def lock_subscription(
    conn: asyncpg.Connection, topic: str, subscription: str, skew: float
) -> asyncpg.Record | None:
    return await conn.fetchrow(_LOCK_SUB, topic, subscription, skew)


async def seek(conn: asyncpg.Connection, sub: asyncpg.Record, target: int) -> None:
    """Move the cursor: below `target` counts as acknowledged, from it on is pending again.

    Dead letters below the target stay parked (they remain listable and re-drivable).
    """
    await conn.execute(
        "DELETE FROM deliveries WHERE topic_id = $1 AND sub_id = $2 "
        "AND (state <> 'dead' OR msg_offset >= $3)",
        sub["topic_id"],
        sub["sub_id"],
        target,
    )
    await conn.execute(
        "UPDATE subscriptions SET next_offset = $3 WHERE topic_id = $1 AND sub_id = $2",
        sub["topic_id"],
        sub["sub_id"],
        target,
    )


async def log_bounds(conn: asyncpg.Connection, topic_id: int) -> tuple[int | None, int]:
    """(oldest retained offset or None, next offset to be assigned)."""
    row = await conn.fetchrow(
        "SELECT (SELECT msg_offset FROM messages WHERE topic_id = $1 ORDER BY msg_offset "
        "LIMIT 1) AS oldest, (SELECT next_offset FROM topics WHERE topic_id = $1) AS log_end",
        topic_id,
    )
    assert row is not None
    return row["oldest"], row["log_end"]


async def list_dead_letters(
    conn: asyncpg.Connection, topic_id: int, sub_id: int, from_offset: int, limit: int
) -> list[asyncpg.Record]:
    return await conn.fetch(
        """
        SELECT d.msg_offset, d.attempts, d.dead_at, m.published_at, m.key, m.headers, m.value
        FROM deliveries d
        JOIN messages m ON m.topic_id = d.topic_id AND m.msg_offset = d.msg_offset
        WHERE d.topic_id = $1 AND d.sub_id = $2 AND d.state = 'dead' AND d.msg_offset >= $3
        ORDER BY d.msg_offset LIMIT $4
        """,
        topic_id,
        sub_id,
        from_offset,
        limit,
    )


async def redrive(conn: asyncpg.Connection, sub: asyncpg.Record, offsets: list[int] | None) -> int:
    """Make dead letters deliverable again with a fresh attempt count.

    For ordered subscriptions they re-enter as blocked and the head of each key is then
    released, so key order holds for re-driven messages too.
    """
    state = "blocked" if sub["ordered_by_key"] else "ready"
    rows = await conn.fetch(
        """
        UPDATE deliveries SET state = CASE WHEN key IS NULL THEN 'ready' ELSE $4 END,
            attempts = 0, due_at = $3, dead_at = NULL
        WHERE topic_id = $1 AND sub_id = $2 AND state = 'dead'
          AND ($5::bigint[] IS NULL OR msg_offset = ANY($5::bigint[]))
        RETURNING key
        """,
        sub["topic_id"],
        sub["sub_id"],
        sub["now"],
        state,
        offsets,
    )
    keys = list({r["key"] for r in rows if r["key"] is not None})
    if keys:
        await conn.execute(_PROMOTE_NEXT_OF_KEYS, sub["topic_id"], sub["sub_id"], keys, sub["now"])
    return len(rows)


async def notify(conn: asyncpg.Connection, topic_id: int, count: int) -> None:
    await conn.execute("SELECT pg_notify($1, $2)", NOTIFY_CHANNEL, f"{topic_id}:{count}")


def seconds_between(later: datetime, earlier: datetime) -> float:
    return (later - earlier) / timedelta(seconds=1)
