-- Sluice storage, revision 0004: everything written per message or per request is
-- insert-only, and goes away only by dropping whole segments (partitions). Why and how:
-- docs/design.md, "Storage". Every table leads with the topic (Citus: distribute by topic).
--
-- Vocabulary of this file:
--   segment   a partition of every per-message table (LIST on `seg`); segments belong to a
--             retention lane and are dropped whole once every message in them has expired.
--   lease     one row per claim: the messages it handed out, their attempt numbers, the
--             fencing secret (token of offset o = md5(secret || o)) and the ack deadline.
--   lease event  ack / nack / expired / dead / released / extend of some members of a lease,
--             one row per request and lease.
--   window    the leases of a subscription whose members are not all settled, kept in the
--             subscription's state row with per-lease counts.
--   timer     messages that become deliverable at a time: a delay, a retry backoff, a
--             redrive, the next message of a key. Consumed in (due_at, timer_id) order up to
--             the subscription's timer frontier.
--   key FIFO  ordered_by_key: every keyed message enters its key's FIFO; only the head (the
--             first unresolved entry) may be delivered.
-- Subscription state (cursor, frontiers, window, token bucket) is a new row per change, the
-- newest wins. Writers of one subscription meet at a transaction-scoped advisory lock:
-- claims, seek, redrive and configuration take it exclusively, ack / nack / extend shared.

CREATE SCHEMA IF NOT EXISTS sluice;
-- Functions may name functions defined further down (as pg_dump's output does).
SET LOCAL check_function_bodies = off;

-- The database clock, shifted by `skew` seconds (tests move time instead of sleeping; in
-- production skew is 0). Times come from Postgres, never from API hosts.
CREATE FUNCTION sluice.now(skew double precision) RETURNS timestamptz
LANGUAGE sql VOLATILE PARALLEL SAFE
AS $$ SELECT clock_timestamp() + make_interval(secs => skew) $$;

-- ---- retention lanes and segments ---------------------------------------------------------

-- Topics are grouped by retention into lanes, each with its own segment length, so a topic
-- that keeps messages for an hour never shares a segment with one that keeps them a week:
-- disk is given back within about a lane's length after retention, whatever the neighbours.
CREATE FUNCTION sluice.lane_of(retention_seconds integer) RETURNS integer
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT CASE WHEN retention_seconds <= 3600 THEN 0
                WHEN retention_seconds <= 86400 THEN 1
                WHEN retention_seconds <= 604800 THEN 2
                ELSE 3 END
$$;

CREATE FUNCTION sluice.lane_period(lane integer) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT (ARRAY[interval '10 minutes', interval '3 hours', interval '1 day',
                  interval '10 days'])[lane + 1]
$$;

CREATE SEQUENCE sluice.segment_ids;

CREATE TABLE sluice.segments (
    seg       integer PRIMARY KEY,
    lane      integer NOT NULL,
    opened_at timestamptz NOT NULL,
    closed_at timestamptz          -- NULL while it is the lane's segment for new messages
);

-- The tables partitioned by segment, in the order maintenance locks them.
CREATE FUNCTION sluice.segmented_tables() RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ARRAY['messages', 'sub_states', 'leases', 'lease_events', 'timers',
                 'dead_letters', 'key_waits', 'key_done']
$$;

-- ---- configuration ------------------------------------------------------------------------

CREATE TABLE sluice.topics (
    topic_id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name                 text NOT NULL UNIQUE,
    retention_seconds    integer NOT NULL,
    dedup_window_seconds integer NOT NULL,
    max_message_bytes    integer NOT NULL,
    -- Offsets below it have expired (retention), moved by the maintenance pass: readers
    -- treat them as gone at once; their segment is dropped later.
    retention_floor      bigint NOT NULL DEFAULT 0,
    created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at           timestamptz NOT NULL DEFAULT clock_timestamp()
);

-- Where each topic's offsets live: its first offset in each segment it wrote to. A topic's
-- segments only grow with its offsets, so "the segment of offset o" is one index look-up.
CREATE TABLE sluice.topic_segments (
    topic_id     bigint NOT NULL,
    seg          integer NOT NULL,
    first_offset bigint NOT NULL,
    PRIMARY KEY (topic_id, seg)
);
CREATE INDEX topic_segments_by_offset ON sluice.topic_segments (topic_id, first_offset);

CREATE TABLE sluice.subscriptions (
    topic_id              bigint NOT NULL REFERENCES sluice.topics ON DELETE CASCADE,
    sub_id                bigint GENERATED ALWAYS AS IDENTITY,
    name                  text NOT NULL,
    ack_deadline_seconds  integer NOT NULL,
    max_deliveries        integer NOT NULL,
    retry_min_seconds     double precision NOT NULL,
    retry_max_seconds     double precision NOT NULL,
    dead_letter_topic     text,
    ordered_by_key        boolean NOT NULL,
    rate_limit_per_second double precision,
    rate_limit_burst      integer,
    max_in_flight         integer,
    created_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic_id, sub_id),
    UNIQUE (topic_id, name)
);

-- Event counts per subscription in 10-second buckets (rates across processes). Each
-- process adds its counts about once a second: a write per process and second, not per
-- message or request.
CREATE TABLE sluice.subscription_rates (
    topic_id      bigint NOT NULL,
    sub_id        bigint NOT NULL,
    bucket        timestamptz NOT NULL,
    delivered     bigint NOT NULL DEFAULT 0,
    acked         bigint NOT NULL DEFAULT 0,
    nacked        bigint NOT NULL DEFAULT 0,
    expired       bigint NOT NULL DEFAULT 0,
    dead_lettered bigint NOT NULL DEFAULT 0,
    PRIMARY KEY (topic_id, sub_id, bucket),
    FOREIGN KEY (topic_id, sub_id) REFERENCES sluice.subscriptions ON DELETE CASCADE
);

-- ---- the per-message tables (partitioned by segment) ---------------------------------------

CREATE TABLE sluice.messages (
    topic_id     bigint NOT NULL,
    msg_offset   bigint NOT NULL,
    seg          integer NOT NULL,
    published_at timestamptz NOT NULL,
    deliver_at   timestamptz,
    key          text,
    headers      text,
    dedup_id     text,
    value        text NOT NULL,
    PRIMARY KEY (topic_id, msg_offset, seg)
) PARTITION BY LIST (seg);
CREATE INDEX messages_by_time ON sluice.messages (topic_id, published_at);
CREATE INDEX messages_by_dedup ON sluice.messages (topic_id, dedup_id) WHERE dedup_id IS NOT NULL;
-- Only delayed messages: the stats count those beyond a cursor cheaply.
CREATE INDEX messages_delayed ON sluice.messages (topic_id, msg_offset) INCLUDE (deliver_at)
    WHERE deliver_at IS NOT NULL;

CREATE SEQUENCE sluice.state_ids;
CREATE TABLE sluice.sub_states (
    topic_id        bigint NOT NULL,
    sub_id          bigint NOT NULL,
    state_id        bigint NOT NULL,
    seg             integer NOT NULL,
    epoch           integer NOT NULL,          -- bumped by seek: older leases and timers are void
    key_gen         integer NOT NULL,          -- bumped by seek and by ordering on/off
    cursor          bigint NOT NULL,           -- next offset of the log to read
    timer_due       timestamptz NOT NULL,      -- timers consumed up to (timer_due, timer_id)
    timer_id        bigint NOT NULL,
    event_id        bigint NOT NULL,           -- lease events counted into the window up to
    win_lease       bigint[] NOT NULL,         -- the window: leases not yet settled, with
    win_seg         integer[] NOT NULL,        --   their segment, size, settled count and the
    win_size        integer[] NOT NULL,        --   next time a member's deadline may pass
    win_done        integer[] NOT NULL,
    win_check       timestamptz[] NOT NULL,
    win_low         bigint[] NOT NULL,         --   and its lowest open offset (retention)
    tokens          double precision NOT NULL, -- token bucket of the rate limit
    tokens_at       timestamptz NOT NULL,
    delivered_total bigint NOT NULL,
    PRIMARY KEY (topic_id, sub_id, state_id, seg)
) PARTITION BY LIST (seg);

CREATE SEQUENCE sluice.lease_ids;
CREATE TABLE sluice.leases (
    topic_id    bigint NOT NULL,
    sub_id      bigint NOT NULL,
    lease_id    bigint NOT NULL,
    seg         integer NOT NULL,
    epoch       integer NOT NULL,
    offsets     bigint[] NOT NULL,
    attempts    integer[] NOT NULL,
    secret      uuid NOT NULL,
    tokens      uuid[],                        -- explicit tokens (leases migrated from 0003)
    untils      timestamptz[],                 -- explicit deadlines (idem)
    leased_at   timestamptz NOT NULL,
    lease_until timestamptz NOT NULL,
    PRIMARY KEY (topic_id, sub_id, lease_id, seg)
) PARTITION BY LIST (seg);

CREATE SEQUENCE sluice.event_ids;
CREATE TABLE sluice.lease_events (
    topic_id    bigint NOT NULL,
    sub_id      bigint NOT NULL,
    lease_id    bigint NOT NULL,
    seg         integer NOT NULL,
    event_id    bigint NOT NULL,
    kind        text NOT NULL
                CHECK (kind IN ('ack', 'nack', 'expired', 'dead', 'released', 'extend')),
    offsets     bigint[] NOT NULL,
    at          timestamptz NOT NULL,
    lease_until timestamptz,                   -- extend: the new deadline
    PRIMARY KEY (topic_id, sub_id, lease_id, event_id, seg)
) PARTITION BY LIST (seg);

CREATE SEQUENCE sluice.timer_ids;
CREATE TABLE sluice.timers (
    topic_id bigint NOT NULL,
    sub_id   bigint NOT NULL,
    due_at   timestamptz NOT NULL,
    timer_id bigint NOT NULL,
    seg      integer NOT NULL,
    epoch    integer NOT NULL,
    offsets  bigint[] NOT NULL,
    attempts integer[] NOT NULL,               -- deliveries so far of each
    PRIMARY KEY (topic_id, sub_id, due_at, timer_id, seg)
) PARTITION BY LIST (seg);

CREATE SEQUENCE sluice.dead_letter_ids;
CREATE TABLE sluice.dead_letters (
    topic_id   bigint NOT NULL,
    sub_id     bigint NOT NULL,
    msg_offset bigint NOT NULL,
    event_id   bigint NOT NULL,
    seg        integer NOT NULL,
    kind       text NOT NULL CHECK (kind IN ('dead', 'redriven', 'dropped')),
    attempts   integer NOT NULL,
    at         timestamptz NOT NULL,
    PRIMARY KEY (topic_id, sub_id, msg_offset, event_id, seg)
) PARTITION BY LIST (seg);

CREATE SEQUENCE sluice.wait_ids;
CREATE TABLE sluice.key_waits (
    topic_id   bigint NOT NULL,
    sub_id     bigint NOT NULL,
    key_gen    integer NOT NULL,
    key        text NOT NULL,
    wait_id    bigint NOT NULL,
    seg        integer NOT NULL,
    msg_offset bigint NOT NULL,
    attempts   integer NOT NULL,               -- deliveries so far when it entered
    PRIMARY KEY (topic_id, sub_id, key_gen, key, wait_id, seg)
) PARTITION BY LIST (seg);
CREATE INDEX key_waits_by_offset ON sluice.key_waits (topic_id, sub_id, key_gen, msg_offset);

CREATE TABLE sluice.key_done (
    topic_id bigint NOT NULL,
    sub_id   bigint NOT NULL,
    key_gen  integer NOT NULL,
    key      text NOT NULL,
    wait_id  bigint NOT NULL,
    seg      integer NOT NULL,
    -- The last head of the key resolved so far: every entry up to it is resolved.
    prefix   bigint NOT NULL,
    PRIMARY KEY (topic_id, sub_id, key_gen, key, wait_id, seg)
) PARTITION BY LIST (seg);
CREATE INDEX key_done_prefix ON sluice.key_done (topic_id, sub_id, key_gen, key, prefix);

CREATE TABLE sluice.api_keys (
    id          bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text,
    secret_hash text NOT NULL UNIQUE,
    scopes      text[] NOT NULL CHECK (cardinality(scopes) > 0),
    created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
    revoked_at  timestamptz
);

-- ---- segments: open and drop ---------------------------------------------------------------

-- A new segment for a lane: a table per segmented table, attached as a partition. ATTACH
-- takes SHARE UPDATE EXCLUSIVE on the parent (never in the way of reads and writes, nor of
-- a pg_dump); CREATE TABLE ... PARTITION OF would take ACCESS EXCLUSIVE. The caller sets a
-- short lock_timeout.
CREATE FUNCTION sluice.open_segment(p_lane integer, p_now timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    v_seg integer := nextval('sluice.segment_ids');
    v_table text;
    v_part text;
BEGIN
    FOREACH v_table IN ARRAY sluice.segmented_tables() LOOP
        v_part := format('%s_%s', v_table, lpad(v_seg::text, 6, '0'));
        EXECUTE format('CREATE TABLE sluice.%I (LIKE sluice.%I INCLUDING DEFAULTS INCLUDING CONSTRAINTS, '
                       'CHECK (seg = %s))', v_part, v_table, v_seg);
        EXECUTE format('ALTER TABLE sluice.%I ATTACH PARTITION sluice.%I FOR VALUES IN (%s)',
                       v_table, v_part, v_seg);
    END LOOP;
    UPDATE sluice.segments SET closed_at = p_now WHERE lane = p_lane AND closed_at IS NULL;
    INSERT INTO sluice.segments (seg, lane, opened_at) VALUES (v_seg, p_lane, p_now);
    RETURN v_seg;
END $$;

-- Segments whose every message has expired: for each topic that wrote there, either a later
-- segment of that topic starts at or below its retention floor, or everything the topic
-- ever published has expired and its next messages go to a later segment (or the topic is
-- gone).
CREATE FUNCTION sluice.droppable_segments() RETURNS SETOF integer
LANGUAGE sql STABLE AS $$
    SELECT g.seg FROM sluice.segments g
    WHERE g.closed_at IS NOT NULL
      AND NOT EXISTS (
          SELECT 1 FROM sluice.topic_segments ts JOIN sluice.topics t USING (topic_id)
          WHERE ts.seg = g.seg
            AND NOT EXISTS (SELECT 1 FROM sluice.topic_segments later
                            WHERE later.topic_id = ts.topic_id AND later.seg > g.seg
                              AND later.first_offset <= t.retention_floor)
            AND NOT (t.retention_floor >= sluice.next_offset(t.topic_id)
                     AND sluice.write_segment(t.topic_id, sluice.lane_of(t.retention_seconds))
                         > g.seg))
    ORDER BY g.seg
$$;

-- Drop a segment: every parent locked (fixed order, under the caller's lock_timeout), the
-- newest state of each subscription that lives there carried to a live segment, then the
-- partitions dropped.
CREATE FUNCTION sluice.drop_segment(p_seg integer) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_table text;
    v_target integer;
BEGIN
    IF NOT EXISTS (SELECT 1 FROM sluice.segments WHERE seg = p_seg AND closed_at IS NOT NULL) THEN
        RETURN false;
    END IF;
    FOREACH v_table IN ARRAY sluice.segmented_tables() LOOP
        EXECUTE format('LOCK TABLE sluice.%I IN ACCESS EXCLUSIVE MODE', v_table);
    END LOOP;
    -- Checked again now that nothing else can write: a publish may have come in between.
    IF p_seg NOT IN (SELECT sluice.droppable_segments()) THEN
        RETURN false;
    END IF;
    SELECT max(seg) INTO v_target FROM sluice.segments WHERE closed_at IS NULL;
    INSERT INTO sluice.sub_states
    SELECT x.topic_id, x.sub_id, nextval('sluice.state_ids'), v_target, x.epoch, x.key_gen,
           x.cursor, x.timer_due, x.timer_id, x.event_id, x.win_lease, x.win_seg,
           x.win_size, x.win_done, x.win_check, x.win_low, x.tokens, x.tokens_at, x.delivered_total
    FROM sluice.subscriptions s
    CROSS JOIN LATERAL (SELECT * FROM sluice.sub_states z
                        WHERE z.topic_id = s.topic_id AND z.sub_id = s.sub_id
                        ORDER BY z.state_id DESC LIMIT 1) x
    WHERE x.seg = p_seg;
    FOREACH v_table IN ARRAY sluice.segmented_tables() LOOP
        EXECUTE format('DROP TABLE sluice.%I', format('%s_%s', v_table, lpad(p_seg::text, 6, '0')));
    END LOOP;
    DELETE FROM sluice.topic_segments WHERE seg = p_seg;
    DELETE FROM sluice.segments WHERE seg = p_seg;
    RETURN true;
END $$;

-- ---- small helpers -------------------------------------------------------------------------

-- The segment holding offset `p_offset` of a topic (0 when before any: every segment id is
-- above 0, so `seg >= seg_of(...)` still covers everything).
CREATE FUNCTION sluice.seg_of(p_topic_id bigint, p_offset bigint) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT seg FROM sluice.topic_segments
                     WHERE topic_id = p_topic_id AND first_offset <= p_offset
                     ORDER BY first_offset DESC LIMIT 1), 0)
$$;

-- The segment a topic's next messages go to: its lane's open segment, or the topic's own
-- newest segment when that is later (its retention moved it to another lane).
CREATE FUNCTION sluice.write_segment(p_topic_id bigint, p_lane integer) RETURNS integer
LANGUAGE sql STABLE AS $$
    SELECT coalesce(
        greatest((SELECT seg FROM sluice.segments WHERE lane = p_lane AND closed_at IS NULL
                  ORDER BY seg DESC LIMIT 1),
                 (SELECT seg FROM sluice.topic_segments WHERE topic_id = p_topic_id
                  ORDER BY seg DESC LIMIT 1)),
        (SELECT max(seg) FROM sluice.segments WHERE closed_at IS NULL))
$$;

-- Exponential backoff with jitter, clamped to [retry_min, retry_max]; `attempt` is the
-- number of the attempt that failed. The exponent is capped so power() cannot overflow.
CREATE FUNCTION sluice.backoff(retry_min double precision, retry_max double precision,
                               attempt integer) RETURNS interval
LANGUAGE sql VOLATILE AS $$
    SELECT make_interval(secs => least(retry_max, greatest(retry_min,
        retry_min * power(2, least(greatest(attempt, 1) - 1, 30)) * (0.8 + 0.4 * random()))))
$$;

-- The retry delay of a lease's members that expired: the same backoff with a jitter drawn
-- once per lease from its secret, so the stats can tell "waiting for its retry" from "due"
-- before the next claim has looked, and all members with the same attempt retry together.
CREATE FUNCTION sluice.lease_jitter(p_secret uuid) RETURNS double precision
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT ('x' || substr(md5(p_secret::text || ':jitter'), 1, 8))::bit(32)::bigint
           / 4294967296.0
$$;
CREATE FUNCTION sluice.retry_delay(retry_min double precision, retry_max double precision,
                                   attempt integer, jitter double precision) RETURNS interval
LANGUAGE sql IMMUTABLE PARALLEL SAFE AS $$
    SELECT make_interval(secs => least(retry_max, greatest(retry_min,
        retry_min * power(2, least(greatest(attempt, 1) - 1, 30)) * (0.8 + 0.4 * jitter))))
$$;

-- Transaction-scoped advisory locks, in key spaces of their own (two int4 keys: a class
-- and the id; ids wrap into int4, where a collision only serialises a little more).
CREATE FUNCTION sluice.lock_topic(p_topic_id bigint) RETURNS void
LANGUAGE sql VOLATILE AS $$ SELECT pg_advisory_xact_lock(1397511169, (p_topic_id % 2147483647)::int) $$;
CREATE FUNCTION sluice.lock_subscription(p_sub_id bigint, p_exclusive boolean) RETURNS void
LANGUAGE plpgsql VOLATILE AS $$
BEGIN
    IF p_exclusive THEN
        PERFORM pg_advisory_xact_lock(1397510914, (p_sub_id % 2147483647)::int);
    ELSE
        PERFORM pg_advisory_xact_lock_shared(1397510914, (p_sub_id % 2147483647)::int);
    END IF;
END $$;
CREATE FUNCTION sluice.lock_lease(p_lease_id bigint) RETURNS void
LANGUAGE sql VOLATILE AS $$ SELECT pg_advisory_xact_lock(1397509123, (p_lease_id % 2147483647)::int) $$;

-- The newest state row of a subscription.
CREATE FUNCTION sluice.state_of(p_topic_id bigint, p_sub_id bigint) RETURNS sluice.sub_states
LANGUAGE sql STABLE AS $$
    SELECT * FROM sluice.sub_states WHERE topic_id = p_topic_id AND sub_id = p_sub_id
    ORDER BY state_id DESC LIMIT 1
$$;

-- Store a new state row (the old ones stay until their segment is dropped).
CREATE FUNCTION sluice.save_state(st sluice.sub_states) RETURNS void
LANGUAGE sql VOLATILE AS $$
    INSERT INTO sluice.sub_states
    SELECT st.topic_id, st.sub_id, nextval('sluice.state_ids'), st.seg, st.epoch, st.key_gen,
           st.cursor, st.timer_due, st.timer_id, st.event_id, st.win_lease, st.win_seg,
           st.win_size, st.win_done, st.win_check, st.win_low, st.tokens, st.tokens_at, st.delivered_total
$$;

-- A timer: `p_offsets` become deliverable at `p_due` (attempts so far in `p_attempts`).
CREATE FUNCTION sluice.add_timer(p_topic_id bigint, p_sub_id bigint, p_epoch integer,
                                 p_due timestamptz, p_offsets bigint[], p_attempts integer[])
RETURNS void LANGUAGE sql VOLATILE AS $$
    INSERT INTO sluice.timers (topic_id, sub_id, due_at, timer_id, seg, epoch, offsets, attempts)
    SELECT p_topic_id, p_sub_id, p_due, nextval('sluice.timer_ids'),
           sluice.seg_of(p_topic_id, (SELECT max(o) FROM unnest(p_offsets) o)), p_epoch,
           p_offsets, p_attempts
    WHERE cardinality(p_offsets) > 0
$$;

-- ---- publishing ----------------------------------------------------------------------------

-- Append messages to a topic, offsets in commit order: the topic's advisory lock is held
-- until commit, and the next offset is read from the log after taking it, so the next
-- publisher of the topic gets its offsets only once these are visible to everybody. No row
-- is updated: the lock leaves no row version behind (a counter row would, per publish).
-- Without dedup ids the messages take consecutive offsets from `first_offset` (the arrays
-- are NULL). With dedup ids, an id seen within the window (or earlier in the batch) takes
-- no offset and answers the original one: `offsets` and `duplicates` say, per message.
CREATE FUNCTION sluice.append_messages(
    p_topic_id bigint, p_values text[], p_keys text[], p_headers text[],
    p_delays integer[], p_dedup_ids text[], p_now timestamptz,
    OUT first_offset bigint, OUT offsets bigint[], OUT duplicates boolean[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_floor bigint;
    v_window integer;
    v_seg integer;
    v_last_seg integer;
    v_last_first bigint;
    v_head bigint;
    v_next bigint;
    v_count bigint;
BEGIN
    PERFORM pg_advisory_xact_lock(1397511169, (p_topic_id % 2147483647)::int);
    -- Everything that decides where the messages go, in one statement (a fresh snapshot,
    -- taken after the lock): the topic, its newest segment and newest offset there, its
    -- lane's open segment.
    SELECT tp.retention_floor, tp.dedup_window_seconds, ts.seg, ts.first_offset,
           (SELECT m.msg_offset FROM sluice.messages m
            WHERE m.topic_id = p_topic_id AND m.seg = ts.seg ORDER BY m.msg_offset DESC LIMIT 1),
           (SELECT g.seg FROM sluice.segments g
            WHERE g.lane = sluice.lane_of(tp.retention_seconds) AND g.closed_at IS NULL
            ORDER BY g.seg DESC LIMIT 1)
    INTO v_floor, v_window, v_last_seg, v_last_first, v_head, v_seg
    FROM sluice.topics tp
    LEFT JOIN LATERAL (SELECT x.seg, x.first_offset FROM sluice.topic_segments x
                       WHERE x.topic_id = p_topic_id ORDER BY x.seg DESC LIMIT 1) ts ON true
    WHERE tp.topic_id = p_topic_id;
    v_next := greatest(v_floor, coalesce(v_head + 1, v_last_first, 0));
    v_seg := coalesce(greatest(v_seg, v_last_seg),
                      (SELECT max(g.seg) FROM sluice.segments g WHERE g.closed_at IS NULL));
    IF v_last_seg IS NULL OR v_seg <> v_last_seg THEN
        INSERT INTO sluice.topic_segments (topic_id, seg, first_offset)
        VALUES (p_topic_id, v_seg, v_next);
    END IF;
    IF p_dedup_ids IS NULL THEN
        INSERT INTO sluice.messages
            (topic_id, msg_offset, seg, published_at, deliver_at, key, headers, dedup_id, value)
        SELECT p_topic_id, v_next + m.ord - 1, v_seg, p_now,
               CASE WHEN m.delay > 0 THEN p_now + make_interval(secs => m.delay) END,
               m.key, m.headers, NULL, m.value
        FROM unnest(p_values, p_keys, p_headers, p_delays)
             WITH ORDINALITY AS m(value, key, headers, delay, ord);
        PERFORM pg_notify('sluice', p_topic_id::text || ':' || cardinality(p_values)::text);
        first_offset := v_next;
        RETURN;
    END IF;
    WITH m AS (
        SELECT * FROM unnest(p_values, p_keys, p_headers, p_delays, p_dedup_ids)
                 WITH ORDINALITY AS m(value, key, headers, delay, dedup_id, ord)
    ), seen AS (
        -- Earlier messages with these ids, within the window and still retained.
        SELECT DISTINCT ON (x.dedup_id) x.dedup_id, x.msg_offset FROM sluice.messages x
        WHERE x.topic_id = p_topic_id
          AND x.dedup_id IN (SELECT dedup_id FROM m WHERE dedup_id IS NOT NULL)
          AND x.published_at > p_now - make_interval(secs => v_window)
          AND x.msg_offset >= v_floor
        ORDER BY x.dedup_id, x.msg_offset
    ), firsts AS (
        SELECT m.dedup_id, min(m.ord) AS ord FROM m
        WHERE m.dedup_id IS NOT NULL AND m.dedup_id NOT IN (SELECT dedup_id FROM seen)
        GROUP BY m.dedup_id
    ), fresh AS (
        SELECT m.*, v_next + row_number() OVER (ORDER BY m.ord) - 1 AS new_offset FROM m
        WHERE m.dedup_id IS NULL OR m.ord IN (SELECT ord FROM firsts)
    ), ins AS (
        INSERT INTO sluice.messages
            (topic_id, msg_offset, seg, published_at, deliver_at, key, headers, dedup_id, value)
        SELECT p_topic_id, f.new_offset, v_seg, p_now,
               CASE WHEN f.delay > 0 THEN p_now + make_interval(secs => f.delay) END,
               f.key, f.headers, f.dedup_id, f.value
        FROM fresh f
        RETURNING 1
    )
    SELECT array_agg(coalesce(f.new_offset, s.msg_offset, ff.new_offset) ORDER BY m.ord),
           array_agg(f.new_offset IS NULL ORDER BY m.ord),
           (SELECT count(*) FROM ins)
    INTO offsets, duplicates, v_count
    FROM m
    LEFT JOIN fresh f ON f.ord = m.ord
    LEFT JOIN seen s ON s.dedup_id = m.dedup_id
    LEFT JOIN firsts fi ON fi.dedup_id = m.dedup_id
    LEFT JOIN fresh ff ON ff.ord = fi.ord;
    IF v_count > 0 THEN
        PERFORM pg_notify('sluice', p_topic_id::text || ':' || v_count::text);
    END IF;
END $$;

-- The HTTP publish: one call per combined group of requests (app.queue.publisher). Returns
-- status 'ok' with the first offset (no dedup ids: consecutive offsets) or the offsets
-- and duplicate flags per message, or 'no_topic' / 'too_large' and nothing stored.
CREATE FUNCTION sluice.publish_batch(
    p_topic text, p_values text[], p_keys text[], p_headers text[], p_delays integer[],
    p_dedup_ids text[], p_largest integer, p_skew double precision,
    OUT status text, OUT first_offset bigint, OUT offsets bigint[], OUT duplicates boolean[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    v_topic_id bigint;
    v_max integer;
BEGIN
    SELECT t.topic_id, t.max_message_bytes INTO v_topic_id, v_max
    FROM sluice.topics t WHERE t.name = p_topic;
    IF v_topic_id IS NULL THEN
        status := 'no_topic';
    ELSIF p_largest > v_max THEN
        status := 'too_large';
    ELSE
        status := 'ok';
        SELECT a.first_offset, a.offsets, a.duplicates INTO first_offset, offsets, duplicates
        FROM sluice.append_messages(v_topic_id, p_values, p_keys, p_headers, p_delays,
                                    p_dedup_ids, sluice.now(p_skew)) a;
    END IF;
END $$;

-- The next offset of a topic: one past its newest message, never below its retention floor.
CREATE FUNCTION sluice.next_offset(p_topic_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_floor bigint;
    v_seg integer;
    v_first bigint;
BEGIN
    SELECT retention_floor INTO v_floor FROM sluice.topics WHERE topic_id = p_topic_id;
    SELECT seg, first_offset INTO v_seg, v_first FROM sluice.topic_segments
    WHERE topic_id = p_topic_id ORDER BY seg DESC LIMIT 1;
    RETURN greatest(coalesce(v_floor, 0), coalesce(
        (SELECT m.msg_offset + 1 FROM sluice.messages m
         WHERE m.topic_id = p_topic_id AND m.seg = v_seg ORDER BY m.msg_offset DESC LIMIT 1),
        v_first, 0));
END $$;

-- The oldest retained offset of a topic (NULL when nothing is retained).
CREATE FUNCTION sluice.oldest_offset(p_topic_id bigint) RETURNS bigint
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_floor bigint;
BEGIN
    SELECT retention_floor INTO v_floor FROM sluice.topics WHERE topic_id = p_topic_id;
    RETURN (SELECT m.msg_offset FROM sluice.messages m
            WHERE m.topic_id = p_topic_id AND m.msg_offset >= v_floor
              AND m.seg >= sluice.seg_of(p_topic_id, v_floor)
            ORDER BY m.msg_offset LIMIT 1);
END $$;

-- ---- key ordering: one FIFO per key ------------------------------------------------------

-- The last head of a key resolved so far (0 when none): its entries up to it are resolved.
CREATE FUNCTION sluice.key_prefix(p_topic_id bigint, p_sub_id bigint, p_key_gen integer,
                                  p_key text) RETURNS bigint
LANGUAGE sql STABLE AS $$
    SELECT coalesce((SELECT d.prefix FROM sluice.key_done d
                     WHERE d.topic_id = p_topic_id AND d.sub_id = p_sub_id
                       AND d.key_gen = p_key_gen AND d.key = p_key
                     ORDER BY d.prefix DESC LIMIT 1), 0)
$$;

-- The head of a key: its first unresolved entry whose message is retained.
CREATE FUNCTION sluice.key_head(p_topic_id bigint, p_sub_id bigint, p_key_gen integer,
                                p_key text, p_floor bigint) RETURNS sluice.key_waits
LANGUAGE sql STABLE AS $$
    SELECT w.* FROM sluice.key_waits w
    WHERE w.topic_id = p_topic_id AND w.sub_id = p_sub_id AND w.key_gen = p_key_gen
      AND w.key = p_key
      AND w.wait_id > sluice.key_prefix(p_topic_id, p_sub_id, p_key_gen, p_key)
      AND w.msg_offset >= p_floor
      AND NOT EXISTS (SELECT 1 FROM sluice.key_done d
                      WHERE d.topic_id = p_topic_id AND d.sub_id = p_sub_id
                        AND d.key_gen = p_key_gen AND d.key = p_key AND d.wait_id = w.wait_id)
    ORDER BY w.wait_id LIMIT 1
$$;

-- The unresolved entry of a message in its key's FIFO (NULL when it has none).
CREATE FUNCTION sluice.key_entry(p_topic_id bigint, p_sub_id bigint, p_key_gen integer,
                                 p_offset bigint) RETURNS sluice.key_waits
LANGUAGE sql STABLE AS $$
    SELECT w.* FROM sluice.key_waits w
    WHERE w.topic_id = p_topic_id AND w.sub_id = p_sub_id AND w.key_gen = p_key_gen
      AND w.msg_offset = p_offset
      AND NOT EXISTS (SELECT 1 FROM sluice.key_done d
                      WHERE d.topic_id = p_topic_id AND d.sub_id = p_sub_id
                        AND d.key_gen = p_key_gen AND d.key = w.key AND d.wait_id = w.wait_id)
    ORDER BY w.wait_id DESC LIMIT 1
$$;

-- Whether a message may be delivered under key ordering: it has no unresolved entry (no
-- key, or taken before ordering was on), or its entry is its key's head.
CREATE FUNCTION sluice.key_may_deliver(p_topic_id bigint, p_sub_id bigint, p_key_gen integer,
                                       p_offset bigint, p_floor bigint) RETURNS boolean
LANGUAGE plpgsql STABLE AS $$
DECLARE
    e sluice.key_waits;
BEGIN
    e := sluice.key_entry(p_topic_id, p_sub_id, p_key_gen, p_offset);
    RETURN e.wait_id IS NULL
        OR (sluice.key_head(p_topic_id, p_sub_id, p_key_gen, e.key, p_floor)).wait_id = e.wait_id;
END $$;

-- A message enters its key's FIFO; true when it is the head (nothing of the key before it).
CREATE FUNCTION sluice.key_enter(p_topic_id bigint, p_sub_id bigint, p_key_gen integer,
                                 p_key text, p_offset bigint, p_attempts integer,
                                 p_floor bigint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_head boolean;
BEGIN
    v_head := (sluice.key_head(p_topic_id, p_sub_id, p_key_gen, p_key, p_floor)).wait_id IS NULL;
    INSERT INTO sluice.key_waits
        (topic_id, sub_id, key_gen, key, wait_id, seg, msg_offset, attempts)
    VALUES (p_topic_id, p_sub_id, p_key_gen, p_key, nextval('sluice.wait_ids'),
            sluice.seg_of(p_topic_id, p_offset), p_offset, p_attempts);
    RETURN v_head;
END $$;

-- Make the head of a key deliverable: a timer at its delivery time. 1 when there is one.
CREATE FUNCTION sluice.key_activate(p_topic_id bigint, p_sub_id bigint, p_key_gen integer,
                                    p_epoch integer, p_key text, p_floor bigint,
                                    p_now timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    h sluice.key_waits;
    v_due timestamptz;
BEGIN
    h := sluice.key_head(p_topic_id, p_sub_id, p_key_gen, p_key, p_floor);
    IF h.wait_id IS NULL THEN
        RETURN 0;
    END IF;
    SELECT greatest(p_now, m.deliver_at) INTO v_due FROM sluice.messages m
    WHERE m.topic_id = p_topic_id AND m.msg_offset = h.msg_offset AND m.seg = h.seg;
    PERFORM sluice.add_timer(p_topic_id, p_sub_id, p_epoch, coalesce(v_due, p_now),
                             ARRAY[h.msg_offset], ARRAY[h.attempts]);
    RETURN 1;
END $$;

-- A message is done with (acked or dead-lettered): its entry is resolved, and when it was
-- its key's head the next entry becomes deliverable. Returns how many were released (0/1).
CREATE FUNCTION sluice.key_resolve(p_topic_id bigint, p_sub_id bigint, p_key_gen integer,
                                   p_epoch integer, p_offset bigint, p_floor bigint,
                                   p_now timestamptz) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    e sluice.key_waits;
    v_head_id bigint;
    v_prefix bigint;
BEGIN
    e := sluice.key_entry(p_topic_id, p_sub_id, p_key_gen, p_offset);
    IF e.wait_id IS NULL THEN
        RETURN 0;
    END IF;
    v_head_id := (sluice.key_head(p_topic_id, p_sub_id, p_key_gen, e.key, p_floor)).wait_id;
    v_prefix := CASE WHEN v_head_id = e.wait_id THEN e.wait_id
                     ELSE sluice.key_prefix(p_topic_id, p_sub_id, p_key_gen, e.key) END;
    INSERT INTO sluice.key_done (topic_id, sub_id, key_gen, key, wait_id, seg, prefix)
    VALUES (p_topic_id, p_sub_id, p_key_gen, e.key, e.wait_id, e.seg, v_prefix);
    IF v_head_id IS DISTINCT FROM e.wait_id THEN
        RETURN 0;
    END IF;
    RETURN sluice.key_activate(p_topic_id, p_sub_id, p_key_gen, p_epoch, e.key, p_floor, p_now);
END $$;

-- ---- dead letters --------------------------------------------------------------------------

-- Park messages after their last allowed attempt: listed and re-drivable; released from
-- their key's FIFO; copied to the dead-letter topic when one is configured and the copy
-- fits that topic's limits (size, 64 headers) -- else the copy is skipped, the message
-- stays parked. Returns the number of copies skipped.
CREATE FUNCTION sluice.park(p_topic_id bigint, p_sub_id bigint, p_epoch integer,
                            p_key_gen integer, p_offsets bigint[], p_attempts integer[],
                            p_now timestamptz, p_floor bigint) RETURNS integer
LANGUAGE plpgsql AS $$
DECLARE
    s record;
    v_offset bigint;
    v_target sluice.topics;
    v_values text[];
    v_keys text[];
    v_headers text[];
    v_skipped integer := 0;
BEGIN
    IF cardinality(p_offsets) = 0 THEN
        RETURN 0;
    END IF;
    -- Claims commit without waiting for the WAL flush (losing one only means delivering
    -- again); parking a message and its copy must be durable.
    PERFORM set_config('synchronous_commit', 'on', true);
    SELECT sb.ordered_by_key, sb.dead_letter_topic, sb.name AS sub_name, t.name AS topic_name
    INTO s FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE sb.topic_id = p_topic_id AND sb.sub_id = p_sub_id;
    INSERT INTO sluice.dead_letters (topic_id, sub_id, msg_offset, event_id, seg, kind, attempts, at)
    SELECT p_topic_id, p_sub_id, x.o, nextval('sluice.dead_letter_ids'),
           sluice.seg_of(p_topic_id, x.o), 'dead', x.a, p_now
    FROM unnest(p_offsets, p_attempts) x(o, a);
    IF s.ordered_by_key THEN
        FOREACH v_offset IN ARRAY p_offsets LOOP
            PERFORM sluice.key_resolve(p_topic_id, p_sub_id, p_key_gen, p_epoch, v_offset,
                                       p_floor, p_now);
        END LOOP;
    END IF;
    IF s.dead_letter_topic IS NULL THEN
        RETURN 0;
    END IF;
    SELECT * INTO v_target FROM sluice.topics WHERE name = s.dead_letter_topic;
    IF v_target.topic_id IS NULL THEN
        RETURN cardinality(p_offsets);  -- deleted meanwhile: the messages stay parked
    END IF;
    WITH copies AS (
        SELECT m.msg_offset, m.key, m.value,
               (coalesce(m.headers::jsonb, '{}'::jsonb) || jsonb_build_object(
                   'sluice-origin-topic', s.topic_name,
                   'sluice-origin-offset', m.msg_offset::text,
                   'sluice-origin-subscription', s.sub_name,
                   'sluice-delivery-attempts', x.a::text))::text AS headers
        FROM unnest(p_offsets, p_attempts) x(o, a)
        JOIN sluice.messages m ON m.topic_id = p_topic_id AND m.msg_offset = x.o
                              AND m.seg = sluice.seg_of(p_topic_id, x.o)
    ), fitting AS (
        SELECT * FROM copies c
        WHERE (SELECT count(*) FROM jsonb_object_keys(c.headers::jsonb)) <= 64
          AND octet_length(c.value) + coalesce(octet_length(c.key), 0)
              + octet_length(c.headers) <= v_target.max_message_bytes
    )
    SELECT array_agg(value ORDER BY msg_offset), array_agg(key ORDER BY msg_offset),
           array_agg(headers ORDER BY msg_offset),
           cardinality(p_offsets) - count(*)
    INTO v_values, v_keys, v_headers, v_skipped FROM fitting;
    IF cardinality(v_values) > 0 THEN
        PERFORM sluice.append_messages(v_target.topic_id, v_values, v_keys, v_headers,
                                       NULL, NULL, p_now);
    END IF;
    RETURN v_skipped;
END $$;

-- ---- leases: expiry ------------------------------------------------------------------------

-- Look at a lease of the window whose check time has come: members below the retention
-- floor are released, members whose deadline passed expire (retry after a backoff, or
-- parked after their last attempt; under key ordering only a key's head retries, the rest
-- wait in their FIFO). Returns how many members it settled, when to look again (NULL:
-- nothing left open), and how many expired and were parked. A lease whose segment is gone
-- answers settled = NULL: drop it from the window.
CREATE FUNCTION sluice.expire_lease(p_topic_id bigint, p_sub_id bigint, p_lease_id bigint,
                                    p_seg integer, p_now timestamptz, p_floor bigint,
                                    p_key_gen integer)
RETURNS TABLE (settled integer, next_check timestamptz, expired integer, parked integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    l sluice.leases;
    s sluice.subscriptions;
    v_below bigint[];
    v_exp bigint[];
    v_exp_att integer[];
    v_exp_until timestamptz[];
    v_next timestamptz;
    v_dead bigint[] := '{}';
    v_dead_att integer[] := '{}';
    v_retry bigint[] := '{}';
    v_retry_att integer[] := '{}';
    v_retry_until timestamptz[] := '{}';
    v_attempt integer;
    i integer;
BEGIN
    SELECT * INTO l FROM sluice.leases
    WHERE topic_id = p_topic_id AND sub_id = p_sub_id AND lease_id = p_lease_id AND seg = p_seg;
    IF NOT FOUND THEN
        RETURN QUERY SELECT NULL::integer, NULL::timestamptz, 0, 0;
        RETURN;
    END IF;
    SELECT * INTO s FROM sluice.subscriptions WHERE topic_id = p_topic_id AND sub_id = p_sub_id;
    WITH member AS (
        SELECT x.o, x.a, x.i FROM unnest(l.offsets, l.attempts) WITH ORDINALITY x(o, a, i)
    ), done AS (
        SELECT DISTINCT y.o FROM sluice.lease_events e, unnest(e.offsets) y(o)
        WHERE e.topic_id = p_topic_id AND e.sub_id = p_sub_id AND e.lease_id = p_lease_id
          AND e.seg = p_seg AND e.kind <> 'extend'
    ), ext AS (
        -- The newest extension of each member wins (an extension may also shorten).
        SELECT DISTINCT ON (y.o) y.o, e.lease_until AS u
        FROM sluice.lease_events e, unnest(e.offsets) y(o)
        WHERE e.topic_id = p_topic_id AND e.sub_id = p_sub_id AND e.lease_id = p_lease_id
          AND e.seg = p_seg AND e.kind = 'extend'
        ORDER BY y.o, e.event_id DESC
    ), open AS (
        SELECT m.o, m.a, coalesce(ext.u, l.untils[m.i], l.lease_until) AS until
        FROM member m LEFT JOIN ext ON ext.o = m.o
        WHERE m.o NOT IN (SELECT o FROM done)
    )
    SELECT array_agg(o) FILTER (WHERE o < p_floor),
           array_agg(o ORDER BY o) FILTER (WHERE o >= p_floor AND until <= p_now),
           array_agg(a ORDER BY o) FILTER (WHERE o >= p_floor AND until <= p_now),
           array_agg(until ORDER BY o) FILTER (WHERE o >= p_floor AND until <= p_now),
           min(until) FILTER (WHERE o >= p_floor AND until > p_now)
    INTO v_below, v_exp, v_exp_att, v_exp_until, v_next
    FROM open;
    IF v_below IS NOT NULL THEN
        INSERT INTO sluice.lease_events (topic_id, sub_id, lease_id, seg, event_id, kind, offsets, at)
        VALUES (p_topic_id, p_sub_id, p_lease_id, p_seg, nextval('sluice.event_ids'),
                'released', v_below, p_now);
    END IF;
    IF v_exp IS NOT NULL THEN
        INSERT INTO sluice.lease_events (topic_id, sub_id, lease_id, seg, event_id, kind, offsets, at)
        VALUES (p_topic_id, p_sub_id, p_lease_id, p_seg, nextval('sluice.event_ids'),
                'expired', v_exp, p_now);
        FOR i IN 1 .. cardinality(v_exp) LOOP
            v_attempt := v_exp_att[i];
            IF s.ordered_by_key AND NOT sluice.key_may_deliver(
                    p_topic_id, p_sub_id, p_key_gen, v_exp[i], p_floor) THEN
                CONTINUE;  -- waits in its key's FIFO, with the attempts it has
            ELSIF s.max_deliveries > 0 AND v_attempt >= s.max_deliveries THEN
                v_dead := v_dead || v_exp[i];
                v_dead_att := v_dead_att || v_attempt;
            ELSE
                v_retry := v_retry || v_exp[i];
                v_retry_att := v_retry_att || v_attempt;
                v_retry_until := v_retry_until || v_exp_until[i];
            END IF;
        END LOOP;
        -- One timer per attempt number: members that failed the same number of times
        -- retry together after the same backoff.
        INSERT INTO sluice.timers (topic_id, sub_id, due_at, timer_id, seg, epoch, offsets, attempts)
        SELECT p_topic_id, p_sub_id, greatest(p_now, g.due), nextval('sluice.timer_ids'),
               sluice.seg_of(p_topic_id, g.top), l.epoch, g.offs, g.atts
        FROM (SELECT x.u + sluice.retry_delay(s.retry_min_seconds, s.retry_max_seconds, x.a,
                                              sluice.lease_jitter(l.secret)) AS due,
                     max(x.o) AS top, array_agg(x.o ORDER BY x.o) AS offs,
                     array_agg(x.a ORDER BY x.o) AS atts
              FROM unnest(v_retry, v_retry_att, v_retry_until) x(o, a, u) GROUP BY 1) g;
        PERFORM sluice.park(p_topic_id, p_sub_id, l.epoch, p_key_gen, v_dead, v_dead_att,
                            p_now, p_floor);
    END IF;
    RETURN QUERY SELECT coalesce(cardinality(v_below), 0) + coalesce(cardinality(v_exp), 0),
                        v_next, coalesce(cardinality(v_exp), 0), cardinality(v_dead);
END $$;

-- ---- claiming ------------------------------------------------------------------------------

-- A pull's claim, under the subscription's exclusive lock: count the lease events since
-- the last claim into the window, expire leases whose deadline passed, work out how many
-- messages may go out (max_messages, rate-limit tokens, room under max_in_flight), take
-- due timers in due order, then fresh messages from the cursor (delayed ones become
-- timers, keyed ones of an ordered subscription enter their key's FIFO and only heads go
-- out). What was taken becomes one lease; a new state row is written only when something
-- changed, so idle long-polls re-checking write nothing. p_max = 0 only expires leases.
CREATE FUNCTION sluice.claim(
    p_topic text, p_subscription text, p_max integer, p_ack_deadline double precision,
    p_skew double precision, p_scan integer)
RETURNS TABLE (
    found boolean, topic_id bigint, sub_id bigint, now timestamptz,
    lease_id bigint, lease_seg integer, lease_until timestamptz,
    offsets bigint[], tokens uuid[], attempts integer[],
    published_at timestamptz[], keys text[], headers text[], vals text[],
    next_due timestamptz, tokens_left double precision, token_wait double precision,
    rate_limit double precision, available boolean, in_flight_full boolean,
    expired integer, dead_lettered integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s record;
    st sluice.sub_states;
    nx sluice.sub_states;
    v_now timestamptz;
    v_floor bigint;
    v_deadline double precision;
    v_limit integer;
    v_left integer;
    v_tokens double precision;
    v_burst double precision;
    v_room integer;
    v_full boolean := false;
    v_expired integer := 0;
    v_parked integer := 0;
    v_events bigint;
    r record;
    tm sluice.timers;
    v_take bigint[];
    v_take_att integer[];
    v_rest bigint[];
    v_rest_att integer[];
    l_off bigint[] := '{}';
    l_att integer[] := '{}';
    l_seg integer := 0;
    l_pub timestamptz[] := '{}';
    l_key text[] := '{}';
    l_hdr text[] := '{}';
    l_val text[] := '{}';
    v_cursor bigint;
    v_cursor_seg integer;
    v_chunk integer;
    v_got integer;
    v_scanned integer := 0;
    v_more_log boolean := false;
    v_lease_id bigint;
    v_secret uuid;
    v_until timestamptz;
    v_next timestamptz;
    v_available boolean;
    v_token_wait double precision;
    v_expiry boolean := false;
    v_complete boolean := false;
    v_sorted boolean := true;
    i integer;
BEGIN
    SELECT sb.topic_id, sb.sub_id INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE t.name = p_topic AND sb.name = p_subscription;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::bigint,
            NULL::integer, NULL::timestamptz, NULL::bigint[], NULL::uuid[], NULL::integer[],
            NULL::timestamptz[], NULL::text[], NULL::text[], NULL::text[], NULL::timestamptz,
            NULL::double precision, NULL::double precision, NULL::double precision, false,
            false, 0, 0;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock(1397510914, (s.sub_id % 2147483647)::int);
    -- The configuration as of now that we hold the lock (a change takes it exclusively).
    SELECT sb.*, t.retention_floor, t.name AS topic_name INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE sb.topic_id = s.topic_id AND sb.sub_id = s.sub_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::timestamptz, NULL::bigint,
            NULL::integer, NULL::timestamptz, NULL::bigint[], NULL::uuid[], NULL::integer[],
            NULL::timestamptz[], NULL::text[], NULL::text[], NULL::text[], NULL::timestamptz,
            NULL::double precision, NULL::double precision, NULL::double precision, false,
            false, 0, 0;
        RETURN;
    END IF;
    v_now := sluice.now(p_skew);
    v_floor := s.retention_floor;
    v_deadline := coalesce(p_ack_deadline, s.ack_deadline_seconds::double precision);
    st := sluice.state_of(s.topic_id, s.sub_id);
    nx := st;

    -- 1. Count the lease events written since the last claim (acks, nacks, ...) into the
    --    window; leases with every member settled leave it (below).
    IF cardinality(st.win_lease) > 0 THEN
        FOR r IN SELECT ev.lease_id, ev.kind, cardinality(ev.offsets) AS n, ev.lease_until,
                        ev.event_id
                 FROM sluice.lease_events ev
                 WHERE ev.topic_id = s.topic_id AND ev.sub_id = s.sub_id
                   AND ev.lease_id = ANY(st.win_lease) AND ev.seg = ANY(st.win_seg)
                   AND ev.event_id > st.event_id LOOP
            i := array_position(nx.win_lease, r.lease_id);
            IF i IS NOT NULL THEN
                IF r.kind = 'extend' THEN
                    nx.win_check[i] := least(nx.win_check[i], r.lease_until);
                ELSE
                    nx.win_done[i] := nx.win_done[i] + r.n;
                END IF;
            END IF;
            nx.event_id := greatest(nx.event_id, r.event_id);
        END LOOP;
    END IF;

    -- 2. Leases whose check time has come (a deadline may have passed), or with members
    --    retention has taken (they leave the window, and in_flight, at once).
    FOR i IN 1 .. cardinality(nx.win_lease) LOOP
        IF nx.win_check[i] <= v_now OR nx.win_low[i] < v_floor THEN
            SELECT * INTO r FROM sluice.expire_lease(s.topic_id, s.sub_id, nx.win_lease[i],
                                                     nx.win_seg[i], v_now, v_floor, st.key_gen);
            IF r.settled IS NULL THEN
                nx.win_done[i] := nx.win_size[i];  -- its segment is gone
            ELSE
                nx.win_done[i] := nx.win_done[i] + r.settled;
                nx.win_check[i] := coalesce(r.next_check, 'infinity');
                nx.win_low[i] := greatest(nx.win_low[i], v_floor);
                v_expired := v_expired + r.expired;
                v_parked := v_parked + r.parked;
                v_expiry := true;
            END IF;
        END IF;
        v_complete := v_complete OR nx.win_done[i] >= nx.win_size[i];
    END LOOP;
    IF v_complete THEN
        SELECT coalesce(array_agg(x.lease ORDER BY x.ord) FILTER (WHERE x.done < x.size), '{}'),
               coalesce(array_agg(x.seg ORDER BY x.ord) FILTER (WHERE x.done < x.size), '{}'),
               coalesce(array_agg(x.size ORDER BY x.ord) FILTER (WHERE x.done < x.size), '{}'),
               coalesce(array_agg(x.done ORDER BY x.ord) FILTER (WHERE x.done < x.size), '{}'),
               coalesce(array_agg(x.check_at ORDER BY x.ord) FILTER (WHERE x.done < x.size),
                        '{}'),
               coalesce(array_agg(x.low ORDER BY x.ord) FILTER (WHERE x.done < x.size), '{}')
        INTO nx.win_lease, nx.win_seg, nx.win_size, nx.win_done, nx.win_check, nx.win_low
        FROM unnest(nx.win_lease, nx.win_seg, nx.win_size, nx.win_done, nx.win_check,
                    nx.win_low) WITH ORDINALITY x(lease, seg, size, done, check_at, low, ord);
    END IF;
    -- Our own events (expiries) are counted already: the frontier passes them.
    IF v_expiry THEN
        nx.event_id := greatest(nx.event_id, (SELECT max(ev.event_id) FROM sluice.lease_events ev
            WHERE ev.topic_id = s.topic_id AND ev.sub_id = s.sub_id AND ev.event_id > nx.event_id
              AND ev.lease_id = ANY(st.win_lease) AND ev.seg = ANY(st.win_seg)));
    END IF;

    -- 3. How many may go out now.
    v_limit := greatest(p_max, 0);
    IF s.rate_limit_per_second IS NOT NULL THEN
        v_burst := coalesce(s.rate_limit_burst::double precision,
                            greatest(1, ceil(s.rate_limit_per_second)));
        v_tokens := least(v_burst, st.tokens + s.rate_limit_per_second
                          * greatest(0, extract(epoch FROM v_now - st.tokens_at)));
        v_limit := least(v_limit, floor(v_tokens)::integer);
    END IF;
    IF s.max_in_flight IS NOT NULL THEN
        SELECT s.max_in_flight - coalesce(sum(x.size - x.done), 0) INTO v_room
        FROM unnest(nx.win_size, nx.win_done) x(size, done);
        v_full := v_room <= 0;
        v_limit := least(v_limit, greatest(v_room, 0));
    END IF;
    v_left := v_limit;

    -- 4. Due timers, in due order (redeliveries, ended delays, released keys).
    IF v_left > 0 THEN
        FOR tm IN SELECT * FROM sluice.timers t
                  WHERE t.topic_id = s.topic_id AND t.sub_id = s.sub_id
                    AND (t.due_at, t.timer_id) > (st.timer_due, st.timer_id)
                    AND t.due_at <= v_now
                  ORDER BY t.due_at, t.timer_id LIMIT 1000 LOOP
            nx.timer_due := tm.due_at;
            nx.timer_id := tm.timer_id;
            CONTINUE WHEN tm.epoch <> st.epoch;  -- from before a seek
            SELECT coalesce(array_agg(x.o ORDER BY x.o), '{}'),
                   coalesce(array_agg(x.a ORDER BY x.o), '{}')
            INTO v_take, v_take_att
            FROM unnest(tm.offsets, tm.attempts) x(o, a)
            WHERE x.o >= v_floor
              AND (NOT s.ordered_by_key
                   OR sluice.key_may_deliver(s.topic_id, s.sub_id, st.key_gen, x.o, v_floor));
            IF cardinality(v_take) > v_left THEN
                -- Take what fits; the rest stays due as a timer of its own (after this one
                -- in the order, so the frontier can pass this one).
                v_rest := v_take[v_left + 1:];
                v_rest_att := v_take_att[v_left + 1:];
                v_take := v_take[1:v_left];
                v_take_att := v_take_att[1:v_left];
                PERFORM sluice.add_timer(s.topic_id, s.sub_id, st.epoch, tm.due_at, v_rest,
                                         v_rest_att);
            END IF;
            l_off := l_off || v_take;
            v_sorted := false;
            SELECT l_att || coalesce(array_agg(x.a + 1 ORDER BY x.i), '{}') INTO l_att
            FROM unnest(v_take_att) WITH ORDINALITY x(a, i);
            l_seg := greatest(l_seg, tm.seg);
            v_left := v_left - cardinality(v_take);
            EXIT WHEN v_left <= 0;
        END LOOP;
    END IF;

    -- 5. Fresh messages from the cursor. The log is read in the statement's snapshot and
    --    offsets are commit-ordered, so what it does not see yet lies beyond the cursor.
    v_cursor := greatest(st.cursor, v_floor);
    IF v_left > 0 THEN
        v_cursor_seg := sluice.seg_of(s.topic_id, v_cursor);
        LOOP
            EXIT WHEN v_left <= 0 OR v_scanned >= p_scan;
            v_chunk := least(CASE WHEN s.ordered_by_key THEN greatest(2 * v_left, 100)
                                  ELSE v_left END, p_scan - v_scanned);
            v_got := 0;
            FOR r IN SELECT m.msg_offset, m.seg, m.deliver_at, m.key, m.published_at, m.headers,
                            m.value FROM sluice.messages m
                     WHERE m.topic_id = s.topic_id AND m.msg_offset >= v_cursor
                       AND m.seg >= v_cursor_seg
                     ORDER BY m.msg_offset LIMIT v_chunk LOOP
                v_got := v_got + 1;
                v_cursor := r.msg_offset + 1;
                IF s.ordered_by_key AND r.key IS NOT NULL THEN
                    CONTINUE WHEN NOT sluice.key_enter(s.topic_id, s.sub_id, st.key_gen, r.key,
                                                       r.msg_offset, 0, v_floor);
                END IF;
                IF r.deliver_at > v_now THEN
                    PERFORM sluice.add_timer(s.topic_id, s.sub_id, st.epoch, r.deliver_at,
                                             ARRAY[r.msg_offset], ARRAY[0]);
                    CONTINUE;
                END IF;
                l_off := l_off || r.msg_offset;
                l_att := l_att || 1;
                l_seg := greatest(l_seg, r.seg);
                l_pub := l_pub || r.published_at;
                l_key := l_key || r.key;
                l_hdr := l_hdr || r.headers;
                l_val := l_val || r.value;
                v_left := v_left - 1;
                EXIT WHEN v_left <= 0;
            END LOOP;
            v_scanned := v_scanned + v_got;
            EXIT WHEN v_got < v_chunk;
        END LOOP;
        v_more_log := v_left > 0 AND v_scanned >= p_scan;
        nx.cursor := v_cursor;
    END IF;

    -- 6. What was taken becomes one lease.
    IF cardinality(l_off) > 0 THEN
        v_lease_id := nextval('sluice.lease_ids');
        v_secret := gen_random_uuid();
        v_until := v_now + make_interval(secs => v_deadline);
        IF NOT v_sorted THEN
            SELECT array_agg(x.o ORDER BY x.o), array_agg(x.a ORDER BY x.o) INTO l_off, l_att
            FROM unnest(l_off, l_att) x(o, a);
        END IF;
        INSERT INTO sluice.leases (topic_id, sub_id, lease_id, seg, epoch, offsets, attempts,
                                   secret, leased_at, lease_until)
        VALUES (s.topic_id, s.sub_id, v_lease_id, l_seg, st.epoch, l_off, l_att, v_secret,
                v_now, v_until);
        nx.win_lease := nx.win_lease || v_lease_id;
        nx.win_seg := nx.win_seg || l_seg;
        nx.win_size := nx.win_size || cardinality(l_off);
        nx.win_done := nx.win_done || 0;
        nx.win_check := nx.win_check || v_until;
        nx.win_low := nx.win_low || l_off[1];
        nx.delivered_total := nx.delivered_total + cardinality(l_off);
    END IF;
    IF v_tokens IS NOT NULL THEN
        v_tokens := v_tokens - cardinality(l_off);
        IF cardinality(l_off) > 0 THEN
            nx.tokens := v_tokens;
            nx.tokens_at := v_now;
        END IF;
        IF v_tokens < 1 THEN
            v_token_wait := (1 - v_tokens) / s.rate_limit_per_second;
        END IF;
    END IF;

    -- 7. A new state row only when something changed.
    IF nx.cursor <> st.cursor OR nx.timer_id <> st.timer_id OR nx.event_id <> st.event_id
       OR nx.win_lease IS DISTINCT FROM st.win_lease OR nx.win_done IS DISTINCT FROM st.win_done
       OR nx.win_check IS DISTINCT FROM st.win_check OR nx.win_low IS DISTINCT FROM st.win_low
       OR cardinality(l_off) > 0 THEN
        nx.state_id := nextval('sluice.state_ids');
        INSERT INTO sluice.sub_states SELECT nx.*;
    END IF;

    -- 8. When nothing went out: is anything deliverable, and when to look again.
    IF cardinality(l_off) = 0 THEN
        SELECT t.due_at INTO v_next FROM sluice.timers t
        WHERE t.topic_id = s.topic_id AND t.sub_id = s.sub_id
          AND (t.due_at, t.timer_id) > (nx.timer_due, nx.timer_id)
        ORDER BY t.due_at, t.timer_id LIMIT 1;
        v_available := v_more_log OR coalesce(v_next <= v_now, false)
            OR greatest(nx.cursor, v_floor) < sluice.next_offset(s.topic_id)
            OR EXISTS (SELECT 1 FROM unnest(nx.win_check) c WHERE c <= v_now);
        IF p_max > 0 AND v_limit > 0 AND v_more_log THEN
            v_next := v_now;  -- the read-ahead bound stopped us with more of the log to see
        ELSE
            v_next := least(v_next, (SELECT min(c) FROM unnest(nx.win_check) c));
        END IF;
    END IF;

    IF v_sorted THEN
        -- Fresh messages only: their payloads were read with them.
        RETURN QUERY
        SELECT true, s.topic_id, s.sub_id, v_now, v_lease_id, l_seg, v_until, l_off,
               ARRAY(SELECT md5(v_secret::text || o::text)::uuid FROM unnest(l_off) o),
               l_att, l_pub, l_key, l_hdr, l_val, v_next, v_tokens, v_token_wait,
               s.rate_limit_per_second, coalesce(v_available, false), v_full, v_expired,
               v_parked;
        RETURN;
    END IF;
    -- Redeliveries too: the payloads, in offset order (the subquery's order is the
    -- aggregates' order).
    RETURN QUERY
    SELECT true, s.topic_id, s.sub_id, v_now, v_lease_id, l_seg, v_until,
           l_off, coalesce(array_agg(md5(v_secret::text || m.msg_offset::text)::uuid), '{}'),
           l_att,
           coalesce(array_agg(m.published_at), '{}'),
           coalesce(array_agg(m.key), '{}'),
           coalesce(array_agg(m.headers), '{}'),
           coalesce(array_agg(m.value), '{}'),
           v_next, v_tokens, v_token_wait, s.rate_limit_per_second, coalesce(v_available, false),
           v_full, v_expired, v_parked
    FROM (SELECT x.msg_offset, x.published_at, x.key, x.headers, x.value
          FROM sluice.messages x
          WHERE x.topic_id = s.topic_id AND x.msg_offset = ANY(l_off)
            AND x.seg <= l_seg AND x.seg >= sluice.seg_of(s.topic_id, l_off[1])
          ORDER BY x.msg_offset) m;
END $$;

-- ---- settling: ack, nack, extend, give back -------------------------------------------------

-- Apply receipts (lease, offset, token) of one subscription, under its shared lock and
-- each lease's own lock. A receipt applies only while its lease is of the current epoch,
-- its token is the one of its offset, the member is not settled yet and its deadline has
-- not passed: a stale receipt (expired, redelivered, already acked, forged) never touches
-- anything. One lease event per request and lease records what was applied.
--   ack       done for good (key ordering: the next message of the key is released)
--   nack      deliverable again after p_seconds (NULL: the backoff), or parked after the
--             last attempt
--   extend    the deadline becomes now + p_seconds
--   give_back deliverable again at once, the attempt not counted (the client went away
--             before it could see the messages)
-- Returns the applied receipts as (offset, lease, token) triples.
CREATE FUNCTION sluice.settle(
    p_kind text, p_topic text, p_subscription text, p_lease_ids bigint[], p_segs integer[],
    p_offsets bigint[], p_tokens uuid[], p_seconds double precision, p_skew double precision)
RETURNS TABLE (found boolean, topic_id bigint, sub_id bigint,
               applied_offsets bigint[], applied_leases bigint[], applied_tokens uuid[],
               lease_until timestamptz, parked integer, wake integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s record;
    st sluice.sub_states;
    l sluice.leases;
    v_now timestamptz;
    v_lease record;
    v_ok_off bigint[];
    v_ok_tok uuid[];
    v_ok_att integer[];
    a_off bigint[] := '{}';
    a_lease bigint[] := '{}';
    a_tok uuid[] := '{}';
    v_until timestamptz;
    v_dead bigint[];
    v_dead_att integer[];
    v_parked integer := 0;
    v_wake integer := 0;
    v_offset bigint;
    v_settled bigint[];
    v_ext_off bigint[];
    v_ext_until timestamptz[];
    v_event record;
BEGIN
    SELECT sb.topic_id, sb.sub_id INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE t.name = p_topic AND sb.name = p_subscription;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::bigint[], NULL::bigint[],
                            NULL::uuid[], NULL::timestamptz, 0, 0;
        RETURN;
    END IF;
    PERFORM pg_advisory_xact_lock_shared(1397510914, (s.sub_id % 2147483647)::int);
    -- The configuration as of now that we hold the lock (a change takes it exclusively).
    SELECT sb.*, t.retention_floor INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE sb.topic_id = s.topic_id AND sb.sub_id = s.sub_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint, NULL::bigint[], NULL::bigint[],
                            NULL::uuid[], NULL::timestamptz, 0, 0;
        RETURN;
    END IF;
    v_now := sluice.now(p_skew);
    st := sluice.state_of(s.topic_id, s.sub_id);
    IF 0 = ANY(p_lease_ids) THEN
        -- Receipts from before revision 0004 name no lease: the one it carried over.
        SELECT array_agg(CASE WHEN x.lid = 0 THEN -s.sub_id ELSE x.lid END ORDER BY x.i),
               array_agg(CASE WHEN x.lid = 0 THEN coalesce(
                             (SELECT l0.seg FROM sluice.leases l0
                              WHERE l0.topic_id = s.topic_id AND l0.sub_id = s.sub_id
                                AND l0.lease_id = -s.sub_id), 0)
                         ELSE x.seg END ORDER BY x.i)
        INTO p_lease_ids, p_segs
        FROM unnest(p_lease_ids, p_segs) WITH ORDINALITY x(lid, seg, i);
    END IF;
    IF p_kind = 'extend' THEN
        v_until := v_now + make_interval(secs => p_seconds);
    END IF;
    FOR v_lease IN SELECT DISTINCT x.lease_id, x.seg FROM unnest(p_lease_ids, p_segs) x(lease_id, seg)
                   ORDER BY x.lease_id LOOP
        PERFORM pg_advisory_xact_lock(1397509123, (v_lease.lease_id % 2147483647)::int);
        SELECT * INTO l FROM sluice.leases x
        WHERE x.topic_id = s.topic_id AND x.sub_id = s.sub_id AND x.lease_id = v_lease.lease_id
          AND x.seg = v_lease.seg;
        CONTINUE WHEN NOT FOUND OR l.epoch <> st.epoch;
        -- What the lease's events settled already, and each member's newest extension
        -- (usually nothing at all: one index probe).
        -- (A loop, not aggregates: those cost more to set up than the rows they read.)
        v_settled := '{}';
        v_ext_off := '{}';
        v_ext_until := '{}';
        FOR v_event IN SELECT e.kind, e.offsets, e.lease_until FROM sluice.lease_events e
                       WHERE e.topic_id = l.topic_id AND e.sub_id = l.sub_id
                         AND e.lease_id = l.lease_id AND e.seg = l.seg
                       ORDER BY e.event_id DESC LOOP
            IF v_event.kind = 'extend' THEN
                v_ext_off := v_ext_off || v_event.offsets;
                v_ext_until := v_ext_until
                    || array_fill(v_event.lease_until, ARRAY[cardinality(v_event.offsets)]);
            ELSE
                v_settled := v_settled || v_event.offsets;
            END IF;
        END LOOP;
        -- A receipt applies when its token is the one of its offset in this lease, and the
        -- member is neither settled nor past its deadline (its newest extension's, if any).
        -- A receipt given twice applies once.
        SELECT array_agg(x.o ORDER BY x.o), array_agg(x.t ORDER BY x.o),
               array_agg(l.attempts[x.i] ORDER BY x.o)
        INTO v_ok_off, v_ok_tok, v_ok_att
        FROM (SELECT DISTINCT ON (v.o) v.o, v.t, v.i
              FROM (SELECT r.o, r.t, array_position(l.offsets, r.o) AS i
                    FROM unnest(p_lease_ids, p_offsets, p_tokens) r(lid, o, t)
                    WHERE r.lid = l.lease_id) v
              WHERE v.i IS NOT NULL
                AND v.t = coalesce(l.tokens[v.i], md5(l.secret::text || v.o::text)::uuid)
              ORDER BY v.o) x
        WHERE x.o >= s.retention_floor AND NOT (x.o = ANY(v_settled))
          AND coalesce(v_ext_until[array_position(v_ext_off, x.o)], l.untils[x.i],
                       l.lease_until) > v_now;
        CONTINUE WHEN v_ok_off IS NULL;
        INSERT INTO sluice.lease_events
            (topic_id, sub_id, lease_id, seg, event_id, kind, offsets, at, lease_until)
        VALUES (l.topic_id, l.sub_id, l.lease_id, l.seg, nextval('sluice.event_ids'),
                CASE p_kind WHEN 'give_back' THEN 'released' ELSE p_kind END,
                v_ok_off, v_now, v_until);
        a_off := a_off || v_ok_off;
        a_lease := a_lease || array_fill(l.lease_id, ARRAY[cardinality(v_ok_off)]);
        a_tok := a_tok || v_ok_tok;
        IF p_kind = 'ack' THEN
            IF s.ordered_by_key THEN
                FOREACH v_offset IN ARRAY v_ok_off LOOP
                    v_wake := v_wake + sluice.key_resolve(s.topic_id, s.sub_id, st.key_gen,
                                                          st.epoch, v_offset,
                                                          s.retention_floor, v_now);
                END LOOP;
            ELSIF s.max_in_flight IS NOT NULL THEN
                v_wake := v_wake + cardinality(v_ok_off);  -- room for waiting pulls
            END IF;
        ELSIF p_kind IN ('nack', 'give_back') THEN
            -- Parked after the last attempt (a give-back never counts as one).
            SELECT array_agg(x.o) FILTER (WHERE p_kind = 'nack' AND s.max_deliveries > 0
                                                AND x.a >= s.max_deliveries),
                   array_agg(x.a) FILTER (WHERE p_kind = 'nack' AND s.max_deliveries > 0
                                                AND x.a >= s.max_deliveries)
            INTO v_dead, v_dead_att FROM unnest(v_ok_off, v_ok_att) x(o, a);
            INSERT INTO sluice.timers (topic_id, sub_id, due_at, timer_id, seg, epoch, offsets, attempts)
            SELECT s.topic_id, s.sub_id, g.due, nextval('sluice.timer_ids'),
                   sluice.seg_of(s.topic_id, g.top), st.epoch, g.offs, g.atts
            FROM (SELECT CASE WHEN p_kind = 'give_back' THEN v_now
                              ELSE v_now + coalesce(make_interval(secs => p_seconds),
                                                    sluice.backoff(s.retry_min_seconds,
                                                                   s.retry_max_seconds, x.a))
                         END AS due,
                         max(x.o) AS top, array_agg(x.o ORDER BY x.o) AS offs,
                         array_agg(CASE WHEN p_kind = 'give_back' THEN x.a - 1 ELSE x.a END
                                   ORDER BY x.o) AS atts
                  FROM unnest(v_ok_off, v_ok_att) x(o, a)
                  WHERE NOT (p_kind = 'nack' AND s.max_deliveries > 0 AND x.a >= s.max_deliveries)
                    AND (NOT s.ordered_by_key
                         OR sluice.key_may_deliver(s.topic_id, s.sub_id, st.key_gen, x.o,
                                                   s.retention_floor))
                  GROUP BY 1) g;
            IF v_dead IS NOT NULL THEN
                PERFORM sluice.park(s.topic_id, s.sub_id, st.epoch, st.key_gen, v_dead,
                                    v_dead_att, v_now, s.retention_floor);
                v_parked := v_parked + cardinality(v_dead);
            END IF;
            v_wake := v_wake + cardinality(v_ok_off) - coalesce(cardinality(v_dead), 0);
        END IF;
    END LOOP;
    IF v_wake > 0 THEN
        PERFORM pg_notify('sluice', s.topic_id::text || ':' || v_wake::text);
    END IF;
    RETURN QUERY SELECT true, s.topic_id, s.sub_id, a_off, a_lease, a_tok, v_until, v_parked, v_wake;
END $$;

-- ---- subscriptions: create, seek, redrive, key ordering on and off -------------------------

-- The first state of a new subscription: its cursor at `p_start`, a full token bucket.
CREATE FUNCTION sluice.init_state(p_topic_id bigint, p_sub_id bigint, p_start bigint,
                                  p_tokens double precision, p_skew double precision)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    t sluice.topics;
BEGIN
    SELECT * INTO t FROM sluice.topics WHERE topic_id = p_topic_id;
    INSERT INTO sluice.sub_states
    VALUES (p_topic_id, p_sub_id, nextval('sluice.state_ids'),
            sluice.write_segment(p_topic_id, sluice.lane_of(t.retention_seconds)), 0, 0,
            p_start, '-infinity', 0, 0, '{}', '{}', '{}', '{}', '{}', '{}', p_tokens,
            sluice.now(p_skew), 0);
END $$;

-- Move a subscription: messages from `target` on are pending again, earlier ones count as
-- acknowledged. Leases and timers of the old epoch are void (their receipts turn stale);
-- dead letters at or after the target are dropped, earlier ones stay parked. The target
-- is clamped to the retained log (an offset past the head seeks to the head, one below
-- the oldest retained message to the oldest).
CREATE FUNCTION sluice.seek_subscription(p_topic text, p_subscription text, p_offset bigint,
                                         p_time timestamptz, p_to text, p_skew double precision)
RETURNS TABLE (found boolean, topic_id bigint, target bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s record;
    st sluice.sub_states;
    v_now timestamptz;
    v_head bigint;
    v_oldest bigint;
    v_target bigint;
BEGIN
    SELECT sb.topic_id, sb.sub_id INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE t.name = p_topic AND sb.name = p_subscription;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    PERFORM sluice.lock_subscription(s.sub_id, true);
    -- The configuration as of now that we hold the lock (a change takes it exclusively).
    SELECT sb.*, t.retention_floor INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE sb.topic_id = s.topic_id AND sb.sub_id = s.sub_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, NULL::bigint;
        RETURN;
    END IF;
    v_now := sluice.now(p_skew);
    st := sluice.state_of(s.topic_id, s.sub_id);
    v_head := sluice.next_offset(s.topic_id);
    v_oldest := coalesce(sluice.oldest_offset(s.topic_id), v_head);
    IF p_offset IS NOT NULL THEN
        v_target := greatest(least(p_offset, v_head), v_oldest);
    ELSIF p_time IS NOT NULL THEN
        v_target := coalesce((SELECT m.msg_offset FROM sluice.messages m
                              WHERE m.topic_id = s.topic_id AND m.published_at >= p_time
                                AND m.msg_offset >= s.retention_floor
                              ORDER BY m.published_at, m.msg_offset LIMIT 1), v_head);
    ELSIF p_to = 'earliest' THEN
        v_target := v_oldest;
    ELSE
        v_target := v_head;
    END IF;
    INSERT INTO sluice.dead_letters (topic_id, sub_id, msg_offset, event_id, seg, kind, attempts, at)
    SELECT d.topic_id, d.sub_id, d.msg_offset, nextval('sluice.dead_letter_ids'), d.seg,
           'dropped', d.attempts, v_now
    FROM (SELECT DISTINCT ON (x.msg_offset) x.* FROM sluice.dead_letters x
          WHERE x.topic_id = s.topic_id AND x.sub_id = s.sub_id AND x.msg_offset >= v_target
          ORDER BY x.msg_offset, x.event_id DESC) d
    WHERE d.kind = 'dead';
    st.epoch := st.epoch + 1;
    st.key_gen := st.key_gen + 1;
    st.cursor := v_target;
    st.win_lease := '{}'; st.win_seg := '{}'; st.win_size := '{}'; st.win_done := '{}';
    st.win_check := '{}'; st.win_low := '{}';
    PERFORM sluice.save_state(st);
    PERFORM pg_notify('sluice', s.topic_id::text || ':1000');
    RETURN QUERY SELECT true, s.topic_id, v_target;
END $$;

-- Deliver parked messages again (all, or the offsets given), attempts counted from 1
-- again. Under key ordering they join the end of their key's FIFO.
CREATE FUNCTION sluice.redrive(p_topic text, p_subscription text, p_offsets bigint[],
                               p_skew double precision)
RETURNS TABLE (found boolean, topic_id bigint, redriven integer)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    s record;
    st sluice.sub_states;
    v_now timestamptz;
    r record;
    v_free bigint[] := '{}';
    v_count integer := 0;
BEGIN
    SELECT sb.topic_id, sb.sub_id INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE t.name = p_topic AND sb.name = p_subscription;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, 0;
        RETURN;
    END IF;
    PERFORM sluice.lock_subscription(s.sub_id, true);
    -- The configuration as of now that we hold the lock (a change takes it exclusively).
    SELECT sb.*, t.retention_floor INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE sb.topic_id = s.topic_id AND sb.sub_id = s.sub_id;
    IF NOT FOUND THEN
        RETURN QUERY SELECT false, NULL::bigint, 0;
        RETURN;
    END IF;
    v_now := sluice.now(p_skew);
    st := sluice.state_of(s.topic_id, s.sub_id);
    FOR r IN
        SELECT d.msg_offset, d.seg, m.key, m.deliver_at FROM (
            SELECT DISTINCT ON (x.msg_offset) x.* FROM sluice.dead_letters x
            WHERE x.topic_id = s.topic_id AND x.sub_id = s.sub_id
              AND x.msg_offset >= s.retention_floor
              AND (p_offsets IS NULL OR x.msg_offset = ANY(p_offsets))
            ORDER BY x.msg_offset, x.event_id DESC) d
        JOIN sluice.messages m ON m.topic_id = d.topic_id AND m.msg_offset = d.msg_offset
                              AND m.seg = d.seg
        WHERE d.kind = 'dead'
        ORDER BY d.msg_offset
    LOOP
        INSERT INTO sluice.dead_letters (topic_id, sub_id, msg_offset, event_id, seg, kind, attempts, at)
        VALUES (s.topic_id, s.sub_id, r.msg_offset, nextval('sluice.dead_letter_ids'), r.seg,
                'redriven', 0, v_now);
        v_count := v_count + 1;
        IF s.ordered_by_key AND r.key IS NOT NULL THEN
            IF sluice.key_enter(s.topic_id, s.sub_id, st.key_gen, r.key, r.msg_offset, 0,
                                s.retention_floor) THEN
                PERFORM sluice.add_timer(s.topic_id, s.sub_id, st.epoch,
                                         greatest(v_now, r.deliver_at), ARRAY[r.msg_offset],
                                         ARRAY[0]);
            END IF;
        ELSE
            v_free := v_free || r.msg_offset;
            IF cardinality(v_free) >= 1000 THEN
                PERFORM sluice.add_timer(s.topic_id, s.sub_id, st.epoch, v_now, v_free,
                                         array_fill(0, ARRAY[cardinality(v_free)]));
                v_free := '{}';
            END IF;
        END IF;
    END LOOP;
    PERFORM sluice.add_timer(s.topic_id, s.sub_id, st.epoch, v_now, v_free,
                             array_fill(0, ARRAY[cardinality(v_free)]));
    IF v_count > 0 THEN
        PERFORM pg_notify('sluice', s.topic_id::text || ':' || v_count::text);
    END IF;
    RETURN QUERY SELECT true, s.topic_id, v_count;
END $$;

-- The messages a subscription still owes something (in flight, or waiting in a timer),
-- with their attempts so far: what key ordering must adopt or release when it changes.
CREATE FUNCTION sluice.pending_members(p_topic_id bigint, p_sub_id bigint, p_floor bigint)
RETURNS TABLE (msg_offset bigint, attempts integer, in_flight boolean)
LANGUAGE sql STABLE AS $$
    WITH st AS (SELECT * FROM sluice.state_of(p_topic_id, p_sub_id))
    SELECT m.o, m.a, true
    FROM st, unnest(st.win_lease, st.win_seg) w(lease_id, seg)
    JOIN sluice.leases l ON l.topic_id = p_topic_id AND l.sub_id = p_sub_id
                        AND l.lease_id = w.lease_id AND l.seg = w.seg
    CROSS JOIN LATERAL unnest(l.offsets, l.attempts) m(o, a)
    WHERE m.o >= p_floor
      AND m.o NOT IN (SELECT y.o FROM sluice.lease_events e, unnest(e.offsets) y(o)
                      WHERE e.topic_id = p_topic_id AND e.sub_id = p_sub_id
                        AND e.lease_id = l.lease_id AND e.seg = l.seg AND e.kind <> 'extend')
    UNION ALL
    SELECT m.o, m.a, false
    FROM st, sluice.timers t CROSS JOIN LATERAL unnest(t.offsets, t.attempts) m(o, a)
    WHERE t.topic_id = p_topic_id AND t.sub_id = p_sub_id AND t.epoch = st.epoch
      AND (t.due_at, t.timer_id) > (st.timer_due, st.timer_id) AND m.o >= p_floor
$$;

-- ordered_by_key turned on or off (the configuration row is already updated). On: what is
-- pending enters its key's FIFO in offset order (leases already out stay out; from now on
-- only a key's head is delivered). Off: everything held back behind a key is released.
CREATE FUNCTION sluice.change_key_order(p_topic_id bigint, p_sub_id bigint, p_on boolean,
                                        p_skew double precision)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    st sluice.sub_states;
    v_floor bigint;
    v_now timestamptz;
    r record;
    v_free bigint[];
    v_free_att integer[];
BEGIN
    PERFORM sluice.lock_subscription(p_sub_id, true);
    v_now := sluice.now(p_skew);
    SELECT retention_floor INTO v_floor FROM sluice.topics WHERE topic_id = p_topic_id;
    st := sluice.state_of(p_topic_id, p_sub_id);
    IF p_on THEN
        st.key_gen := st.key_gen + 1;
        FOR r IN SELECT p.msg_offset, p.attempts, m.key
                 FROM sluice.pending_members(p_topic_id, p_sub_id, v_floor) p
                 JOIN sluice.messages m ON m.topic_id = p_topic_id AND m.msg_offset = p.msg_offset
                                       AND m.seg = sluice.seg_of(p_topic_id, p.msg_offset)
                 WHERE m.key IS NOT NULL
                 ORDER BY p.msg_offset LOOP
            PERFORM sluice.key_enter(p_topic_id, p_sub_id, st.key_gen, r.key, r.msg_offset,
                                     r.attempts, v_floor);
        END LOOP;
    ELSE
        -- Unresolved entries that are neither in flight nor in a timer wait only for their
        -- key: release them now.
        SELECT array_agg(w.msg_offset ORDER BY w.msg_offset),
               array_agg(w.attempts ORDER BY w.msg_offset)
        INTO v_free, v_free_att
        FROM sluice.key_waits w
        WHERE w.topic_id = p_topic_id AND w.sub_id = p_sub_id AND w.key_gen = st.key_gen
          AND w.msg_offset >= v_floor
          AND NOT EXISTS (SELECT 1 FROM sluice.key_done d
                          WHERE d.topic_id = p_topic_id AND d.sub_id = p_sub_id
                            AND d.key_gen = st.key_gen AND d.key = w.key
                            AND d.wait_id = w.wait_id)
          AND w.msg_offset NOT IN (SELECT p.msg_offset
                                   FROM sluice.pending_members(p_topic_id, p_sub_id, v_floor) p);
        IF v_free IS NOT NULL THEN
            PERFORM sluice.add_timer(p_topic_id, p_sub_id, st.epoch, v_now, v_free, v_free_att);
            PERFORM pg_notify('sluice', p_topic_id::text || ':' || cardinality(v_free)::text);
        END IF;
        st.key_gen := st.key_gen + 1;
    END IF;
    PERFORM sluice.save_state(st);
END $$;

-- ---- reading: stats, browse, dead letters ------------------------------------------------

-- The delivery numbers of subscriptions (all, or the one given), computed from the state
-- row, the window's leases, the pending timers and key FIFOs, and the log by offset
-- arithmetic (the log is gapless between the retention floor and the head).
--   in_flight  leased and not past the deadline
--   due        deliverable now: expired leases and due timers (not after a last attempt)
--   waiting    timers not yet due, and messages held back behind their key
--   spent      expired on their last attempt: parked at the next claim, counted as dead
CREATE FUNCTION sluice.subscription_stats(p_topic_id bigint, p_sub_id bigint,
                                          p_skew double precision)
RETURNS TABLE (topic_id bigint, sub_id bigint, topic text, subscription text, cursor bigint,
               now timestamptz, in_flight bigint, due bigint, waiting bigint,
               dead_lettered bigint, lowest_pending bigint, oldest_offset bigint,
               head_offset bigint, delayed_in_log bigint, committed_published_at timestamptz,
               delivered_total bigint)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    s record;
    st sluice.sub_states;
    v_now timestamptz := sluice.now(p_skew);
    v_floor bigint;
    v_cursor bigint;
    v_head bigint;
    v_oldest bigint;
    w record;
    tm record;
    v_fifo_n bigint;
    v_fifo_low bigint;
    v_dead bigint;
    v_delayed bigint;
    v_lowest bigint;
    v_committed_at timestamptz;
BEGIN
    FOR s IN SELECT sb.topic_id, sb.sub_id, sb.name, sb.max_deliveries, sb.ordered_by_key,
                    t.name AS topic_name, t.retention_floor
             FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
             WHERE (p_topic_id IS NULL OR sb.topic_id = p_topic_id)
               AND (p_sub_id IS NULL OR sb.sub_id = p_sub_id)
             ORDER BY t.name, sb.name LOOP
        st := sluice.state_of(s.topic_id, s.sub_id);
        v_floor := s.retention_floor;
        v_cursor := greatest(st.cursor, v_floor);
        v_head := sluice.next_offset(s.topic_id) - 1;
        v_oldest := sluice.oldest_offset(s.topic_id);
        IF v_oldest IS NULL THEN
            v_head := NULL;
        END IF;
        -- Window members: in flight, due (expired), spent.
        SELECT count(*) FILTER (WHERE x.until > v_now) AS in_flight,
               count(*) FILTER (WHERE x.until <= v_now AND NOT x.spent AND x.may
                                  AND x.retry_at <= v_now) AS due,
               count(*) FILTER (WHERE x.until <= v_now AND NOT x.spent
                                  AND (NOT x.may OR x.retry_at > v_now)) AS held,
               count(*) FILTER (WHERE x.until <= v_now AND x.spent) AS spent,
               min(x.o) FILTER (WHERE NOT (x.until <= v_now AND x.spent)) AS lowest
        INTO w
        FROM (
            SELECT m.o, coalesce(ext.u, l.untils[m.i], l.lease_until) AS until,
                   coalesce(ext.u, l.untils[m.i], l.lease_until)
                       + sluice.retry_delay(sb.retry_min_seconds, sb.retry_max_seconds, m.a,
                                            sluice.lease_jitter(l.secret)) AS retry_at,
                   s.max_deliveries > 0 AND m.a >= s.max_deliveries
                       AND (NOT s.ordered_by_key
                            OR sluice.key_may_deliver(s.topic_id, s.sub_id, st.key_gen, m.o, v_floor))
                       AS spent,
                   NOT s.ordered_by_key
                       OR sluice.key_may_deliver(s.topic_id, s.sub_id, st.key_gen, m.o, v_floor)
                       AS may
            FROM unnest(st.win_lease, st.win_seg) wl(lease_id, seg)
            JOIN sluice.leases l ON l.topic_id = s.topic_id AND l.sub_id = s.sub_id
                                AND l.lease_id = wl.lease_id AND l.seg = wl.seg
            JOIN sluice.subscriptions sb ON sb.topic_id = s.topic_id AND sb.sub_id = s.sub_id
            CROSS JOIN LATERAL unnest(l.offsets, l.attempts) WITH ORDINALITY m(o, a, i)
            LEFT JOIN LATERAL (
                SELECT e.lease_until AS u FROM sluice.lease_events e, unnest(e.offsets) y(o)
                WHERE e.topic_id = l.topic_id AND e.sub_id = l.sub_id AND e.lease_id = l.lease_id
                  AND e.seg = l.seg AND e.kind = 'extend' AND y.o = m.o
                ORDER BY e.event_id DESC LIMIT 1) ext ON true
            WHERE m.o >= v_floor
              AND m.o NOT IN (SELECT y.o FROM sluice.lease_events e, unnest(e.offsets) y(o)
                              WHERE e.topic_id = l.topic_id AND e.sub_id = l.sub_id
                                AND e.lease_id = l.lease_id AND e.seg = l.seg
                                AND e.kind <> 'extend')
        ) x;
        -- Pending timers (under key ordering, members that are not their key's head wait).
        SELECT count(*) FILTER (WHERE x.due_at <= v_now AND x.may) AS due,
               count(*) FILTER (WHERE x.due_at > v_now OR NOT x.may) AS waiting,
               min(x.o) AS lowest
        INTO tm
        FROM (
            SELECT t.due_at, m.o,
                   NOT s.ordered_by_key
                       OR sluice.key_may_deliver(s.topic_id, s.sub_id, st.key_gen, m.o, v_floor)
                       AS may
            FROM sluice.timers t CROSS JOIN LATERAL unnest(t.offsets) m(o)
            WHERE t.topic_id = s.topic_id AND t.sub_id = s.sub_id AND t.epoch = st.epoch
              AND (t.due_at, t.timer_id) > (st.timer_due, st.timer_id) AND m.o >= v_floor
        ) x;
        -- Held back behind their key: unresolved FIFO entries neither in flight nor in a
        -- timer (those were counted above).
        v_fifo_n := 0;
        v_fifo_low := NULL;
        IF s.ordered_by_key THEN
            SELECT count(*), min(k.msg_offset) INTO v_fifo_n, v_fifo_low
            FROM sluice.key_waits k
            WHERE k.topic_id = s.topic_id AND k.sub_id = s.sub_id AND k.key_gen = st.key_gen
              AND k.msg_offset >= v_floor
              AND NOT EXISTS (SELECT 1 FROM sluice.key_done d
                              WHERE d.topic_id = k.topic_id AND d.sub_id = k.sub_id
                                AND d.key_gen = k.key_gen AND d.key = k.key
                                AND d.wait_id = k.wait_id)
              AND k.msg_offset NOT IN (SELECT p.msg_offset FROM sluice.pending_members(
                                           s.topic_id, s.sub_id, v_floor) p);
        END IF;
        SELECT count(*) INTO v_dead FROM (
            SELECT DISTINCT ON (x.msg_offset) x.kind FROM sluice.dead_letters x
            WHERE x.topic_id = s.topic_id AND x.sub_id = s.sub_id AND x.msg_offset >= v_floor
            ORDER BY x.msg_offset, x.event_id DESC) d
        WHERE d.kind = 'dead';
        SELECT count(*) INTO v_delayed FROM sluice.messages m
        WHERE m.topic_id = s.topic_id AND m.msg_offset >= v_cursor
          AND m.deliver_at IS NOT NULL AND m.deliver_at > v_now
          AND m.seg >= sluice.seg_of(s.topic_id, v_cursor);
        v_lowest := least(w.lowest, tm.lowest, v_fifo_low);
        SELECT m.published_at INTO v_committed_at FROM sluice.messages m
        WHERE m.topic_id = s.topic_id AND m.msg_offset = least(coalesce(v_lowest, v_cursor), v_cursor)
          AND m.seg = sluice.seg_of(s.topic_id, least(coalesce(v_lowest, v_cursor), v_cursor));
        RETURN QUERY SELECT s.topic_id, s.sub_id, s.topic_name, s.name, v_cursor, v_now,
            w.in_flight, w.due + tm.due, w.held + tm.waiting + v_fifo_n,
            v_dead + w.spent, v_lowest, v_oldest, v_head, v_delayed, v_committed_at,
            st.delivered_total;
    END LOOP;
END $$;

CREATE FUNCTION sluice.browse(p_topic_id bigint, p_from bigint, p_limit integer)
RETURNS TABLE (msg_offset bigint, published_at timestamptz, deliver_at timestamptz, key text,
               headers text, value text)
LANGUAGE plpgsql STABLE AS $$
#variable_conflict use_column
DECLARE
    v_from bigint;
BEGIN
    SELECT greatest(p_from, t.retention_floor) INTO v_from FROM sluice.topics t
    WHERE t.topic_id = p_topic_id;
    RETURN QUERY
    SELECT m.msg_offset, m.published_at, m.deliver_at, m.key, m.headers, m.value
    FROM sluice.messages m
    WHERE m.topic_id = p_topic_id AND m.msg_offset >= v_from
      AND m.seg >= sluice.seg_of(p_topic_id, v_from)
    ORDER BY m.msg_offset LIMIT p_limit;
END $$;

CREATE FUNCTION sluice.dead_letter_page(p_topic_id bigint, p_sub_id bigint, p_from bigint,
                                        p_limit integer)
RETURNS TABLE (msg_offset bigint, attempts integer, dead_at timestamptz,
               published_at timestamptz, key text, headers text, value text)
LANGUAGE sql STABLE AS $$
    SELECT d.msg_offset, d.attempts, d.at, m.published_at, m.key, m.headers, m.value
    FROM (SELECT DISTINCT ON (x.msg_offset) x.* FROM sluice.dead_letters x
          WHERE x.topic_id = p_topic_id AND x.sub_id = p_sub_id
            AND x.msg_offset >= greatest(p_from, (SELECT retention_floor FROM sluice.topics
                                                  WHERE topic_id = p_topic_id))
          ORDER BY x.msg_offset, x.event_id DESC) d
    JOIN sluice.messages m ON m.topic_id = d.topic_id AND m.msg_offset = d.msg_offset
                          AND m.seg = d.seg
    WHERE d.kind = 'dead'
    ORDER BY d.msg_offset LIMIT p_limit
$$;

-- Head, oldest retained offset and the offset published a minute ago (publish rate).
CREATE FUNCTION sluice.log_stats(p_topic_id bigint, p_skew double precision)
RETURNS TABLE (oldest_offset bigint, head_offset bigint, minute_ago_offset bigint)
LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_oldest bigint := sluice.oldest_offset(p_topic_id);
BEGIN
    RETURN QUERY
    SELECT v_oldest,
           CASE WHEN v_oldest IS NULL THEN NULL ELSE sluice.next_offset(p_topic_id) - 1 END,
           (SELECT m.msg_offset FROM sluice.messages m
            WHERE m.topic_id = p_topic_id AND m.msg_offset >= v_oldest
              AND m.published_at >= sluice.now(p_skew) - interval '60 seconds'
            ORDER BY m.published_at, m.msg_offset LIMIT 1);
END $$;

-- ---- maintenance ---------------------------------------------------------------------------

-- Move each topic's retention floor up to its first message published within retention
-- (or past its newest message when all have expired). Readers treat offsets below it as
-- gone at once. Under key ordering, a key whose head has just expired releases its next
-- message. Returns the topics whose floor moved, with how far.
CREATE FUNCTION sluice.advance_retention(p_skew double precision)
RETURNS TABLE (topic_id bigint, expired bigint)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    t record;
    v_now timestamptz := sluice.now(p_skew);
    v_floor bigint;
    sb record;
    st sluice.sub_states;
    k record;
BEGIN
    FOR t IN SELECT * FROM sluice.topics ORDER BY topic_id LOOP
        v_floor := coalesce(
            (SELECT m.msg_offset FROM sluice.messages m
             WHERE m.topic_id = t.topic_id AND m.msg_offset >= t.retention_floor
               AND m.published_at >= v_now - make_interval(secs => t.retention_seconds)
             ORDER BY m.published_at, m.msg_offset LIMIT 1),
            sluice.next_offset(t.topic_id));
        CONTINUE WHEN v_floor <= t.retention_floor;
        UPDATE sluice.topics x SET retention_floor = v_floor WHERE x.topic_id = t.topic_id;
        FOR sb IN SELECT * FROM sluice.subscriptions x
                  WHERE x.topic_id = t.topic_id AND x.ordered_by_key LOOP
            PERFORM sluice.lock_subscription(sb.sub_id, true);
            st := sluice.state_of(sb.topic_id, sb.sub_id);
            FOR k IN SELECT DISTINCT w.key FROM sluice.key_waits w
                     WHERE w.topic_id = sb.topic_id AND w.sub_id = sb.sub_id
                       AND w.key_gen = st.key_gen
                       AND w.msg_offset >= t.retention_floor AND w.msg_offset < v_floor LOOP
                IF (sluice.key_head(sb.topic_id, sb.sub_id, st.key_gen, k.key,
                                    t.retention_floor)).msg_offset < v_floor THEN
                    PERFORM sluice.key_activate(sb.topic_id, sb.sub_id, st.key_gen, st.epoch,
                                                k.key, v_floor, v_now);
                END IF;
            END LOOP;
        END LOOP;
        RETURN QUERY SELECT t.topic_id, v_floor - t.retention_floor;
    END LOOP;
END $$;

-- Subscriptions with a lease whose check time has come (for the maintenance pass, so
-- deadlines pass and dead letters park even while nobody pulls).
CREATE FUNCTION sluice.subscriptions_to_expire(p_skew double precision)
RETURNS TABLE (topic text, subscription text)
LANGUAGE sql STABLE AS $$
    SELECT t.name, sb.name FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    CROSS JOIN LATERAL sluice.state_of(sb.topic_id, sb.sub_id) st
    WHERE EXISTS (SELECT 1 FROM unnest(st.win_check) c WHERE c <= sluice.now(p_skew))
$$;

-- Lanes whose open segment has run its length (or that have none) and are in use.
CREATE FUNCTION sluice.lanes_to_rotate(p_now timestamptz)
RETURNS SETOF integer LANGUAGE sql STABLE AS $$
    SELECT l.lane FROM generate_series(0, 3) l(lane)
    WHERE NOT EXISTS (SELECT 1 FROM sluice.segments g
                      WHERE g.lane = l.lane AND g.closed_at IS NULL
                        AND g.opened_at + sluice.lane_period(l.lane) > p_now)
      AND (EXISTS (SELECT 1 FROM sluice.topics t WHERE sluice.lane_of(t.retention_seconds) = l.lane)
           OR NOT EXISTS (SELECT 1 FROM sluice.segments g
                          WHERE g.lane = l.lane AND g.closed_at IS NULL))
$$;
