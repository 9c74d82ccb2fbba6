-- Sluice revision 0005: publish, ack and nack from SQL, inside the caller's own transaction,
-- and read-only views for reporting. Why and how: docs/design.md, "SQL API".
--
-- A SQL publish must not hold a topic lock until the application commits (that would stall
-- every other publisher of the topic for as long as the application's transaction runs), so
-- it only writes to an outbox. A relay in every Sluice process (one at a time) moves what
-- committed into the log with the normal append, under the topic lock for an instant: the
-- offsets are assigned after the commit, in the order the relay commits, and stay in commit
-- order across SQL and HTTP publishers. Acks and nacks go the same way: checked at call
-- time (a stale receipt is reported at once, so the consumer can roll back), applied by the
-- relay as of the time of the call once the transaction has committed.
--
-- Which outbox rows has the relay moved? Every row records the transaction that wrote it
-- (xid8, assigned before the row's seq is drawn). A relay pass reads, in one statement,
-- its snapshot and the rows with seq above its cursor or written by a transaction that may
-- have been in progress at its previous pass: in the xip list of that pass's snapshot, or
-- from the snapshot's xmax (one past the newest completed xid) up to a bound the pass took
-- after it. A transaction whose xid is above that bound drew its seqs after every seq
-- visible in the snapshot, so above the cursor. A row has been relayed exactly when its seq
-- is at most the cursor and its transaction is visible in the snapshot of the newest pass
-- (docs/design.md proves it). The outbox is insert-only: three partitions in rotation, each
-- emptied by TRUNCATE once everything in it has been relayed (PgQ's rotation).

SET LOCAL check_function_bodies = off;

-- CACHE 1 (the default), which the proof above needs: seqs are drawn in call order.
CREATE SEQUENCE sluice.outbox_ids;

CREATE TABLE sluice.outbox (
    topic_id  bigint NOT NULL,                  -- 0 for the relay's own marks
    seq       bigint NOT NULL,
    part      smallint NOT NULL,
    xid       xid8 NOT NULL,                    -- the transaction that wrote the row
    kind      text NOT NULL CHECK (kind IN ('message', 'ack', 'nack', 'relayed')),
    at        timestamptz NOT NULL,             -- when it was called (acks apply as of then)
    -- message
    value     text,
    key       text,
    headers   text,
    dedup_id  text,
    delay     integer,
    -- ack / nack: the receipts that were valid at the call, decoded
    sub_id    bigint,
    lease_ids bigint[],
    segs      integer[],
    offsets   bigint[],
    tokens    uuid[],
    seconds   double precision,                 -- nack: the delay (NULL: the backoff)
    -- relayed: where the relay's pass got to
    cursor    bigint,
    snap      pg_snapshot,
    bound     xid8,                             -- every xid below it was assigned by then
    PRIMARY KEY (topic_id, seq, part)
) PARTITION BY LIST (part);
CREATE TABLE sluice.outbox_0 PARTITION OF sluice.outbox FOR VALUES IN (0);
CREATE TABLE sluice.outbox_1 PARTITION OF sluice.outbox FOR VALUES IN (1);
CREATE TABLE sluice.outbox_2 PARTITION OF sluice.outbox FOR VALUES IN (2);
CREATE INDEX outbox_by_seq ON sluice.outbox (seq);
CREATE INDEX outbox_by_xid ON sluice.outbox (xid);
CREATE INDEX outbox_marks ON sluice.outbox (seq) WHERE kind = 'relayed';

-- The partition new rows go to. One row, updated once per rotation (not per message).
CREATE TABLE sluice.outbox_current (
    only_row boolean PRIMARY KEY DEFAULT true CHECK (only_row),
    part     smallint NOT NULL,
    since    timestamptz NOT NULL
);
INSERT INTO sluice.outbox_current (part, since) VALUES (0, clock_timestamp());

-- The clock of the SQL API: the database's, shifted by the session setting
-- sluice.clock_skew_seconds (tests move time instead of sleeping; unset in production).
-- Only for sessions of Sluice's own role: an application role must not move the time its
-- acks are judged at.
CREATE FUNCTION sluice.sql_now() RETURNS timestamptz
LANGUAGE sql VOLATILE AS $$
    SELECT sluice.now(CASE
        WHEN pg_has_role(session_user, (SELECT nspowner FROM pg_namespace
                                        WHERE nspname = 'sluice'), 'MEMBER')
        THEN coalesce(nullif(current_setting('sluice.clock_skew_seconds', true), ''),
                      '0')::double precision
        ELSE 0 END)
$$;

-- ---- publish ------------------------------------------------------------------------------

-- Publish messages to a topic inside the caller's transaction: delivered once it commits,
-- never if it rolls back. Checked now, as the HTTP API checks them: the topic exists, 1..1000
-- messages, values not null, keys up to 256 characters, headers an object of at most 64
-- string values, dedup ids 1..128 characters, delays 0..900 s, each message within the
-- topic's max_message_bytes. Returns the outbox ids of the messages; their offsets are
-- assigned when the relay moves them into the log, after the commit.
CREATE FUNCTION sluice.send_batch(
    p_topic text, p_values jsonb[], p_keys text[] DEFAULT NULL, p_headers jsonb[] DEFAULT NULL,
    p_dedup_ids text[] DEFAULT NULL, p_delay_seconds integer[] DEFAULT NULL)
RETURNS bigint[]
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
DECLARE
    v_topic sluice.topics;
    v_n integer := coalesce(cardinality(p_values), 0);
    v_bad text;
    v_ids bigint[];
    v_at timestamptz := sluice.sql_now();
BEGIN
    SELECT * INTO v_topic FROM sluice.topics WHERE name = p_topic;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'topic "%" does not exist', p_topic
            USING ERRCODE = 'no_data_found', HINT = 'Create it first: PUT /v1/topics/{topic}.';
    END IF;
    IF v_n < 1 OR v_n > 1000 THEN
        RAISE EXCEPTION 'a batch holds 1..1000 messages, not %', v_n
            USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOREACH v_bad IN ARRAY ARRAY['p_keys', 'p_headers', 'p_dedup_ids', 'p_delay_seconds'] LOOP
        IF coalesce(cardinality(CASE v_bad WHEN 'p_keys' THEN p_keys::text[]
                                           WHEN 'p_headers' THEN p_headers::text[]
                                           WHEN 'p_dedup_ids' THEN p_dedup_ids
                                           ELSE p_delay_seconds::text[] END), v_n) <> v_n THEN
            RAISE EXCEPTION '% has not one element per value', v_bad
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    -- The transaction id first, the seqs after it: the relay's bookkeeping relies on it.
    PERFORM pg_current_xact_id();
    -- One pass over the messages: stored and checked together (each value rendered as text
    -- once). A problem raises below, and the rows go with the failed statement.
    WITH m AS (
        SELECT x.i, x.value::text AS v, x.key, x.headers, x.dedup_id, x.delay
        FROM unnest(p_values, p_keys, p_headers, p_dedup_ids, p_delay_seconds)
             WITH ORDINALITY AS x(value, key, headers, dedup_id, delay, i)
    ), ins AS (
        INSERT INTO sluice.outbox (topic_id, seq, part, xid, kind, at, value, key, headers,
                                   dedup_id, delay)
        SELECT v_topic.topic_id, nextval('sluice.outbox_ids'), c.part, pg_current_xact_id(),
               'message', v_at, m.v, m.key, m.headers::text, m.dedup_id, nullif(m.delay, 0)
        FROM m CROSS JOIN sluice.outbox_current c
        ORDER BY m.i
        RETURNING seq
    )
    SELECT (SELECT array_agg(seq ORDER BY seq) FROM ins),
           (SELECT format('message %s: %s', p.i - 1, p.problem) FROM (
                SELECT m.i, CASE
                    WHEN m.v IS NULL THEN 'value is null'
                    WHEN char_length(m.key) > 256 THEN 'key longer than 256 characters'
                    WHEN m.headers IS NOT NULL AND jsonb_typeof(m.headers) <> 'object'
                        THEN 'headers must be an object of strings'
                    WHEN m.headers IS NOT NULL AND (SELECT count(*) FROM jsonb_each(m.headers)) > 64
                        THEN 'at most 64 headers'
                    WHEN m.headers IS NOT NULL AND EXISTS (
                            SELECT 1 FROM jsonb_each(m.headers) h
                            WHERE jsonb_typeof(h.value) <> 'string'
                               OR char_length(h.key) NOT BETWEEN 1 AND 256
                               OR char_length(h.value #>> '{}') > 4096)
                        THEN 'headers must map names of 1..256 characters to strings of at most 4096'
                    WHEN char_length(m.dedup_id) NOT BETWEEN 1 AND 128
                        THEN 'dedup_id must be 1..128 characters'
                    WHEN coalesce(m.delay, 0) NOT BETWEEN 0 AND 900
                        THEN 'delay_seconds must be 0..900'
                    WHEN octet_length(m.v) + coalesce(octet_length(m.key), 0)
                         + coalesce(octet_length(m.headers::text), 0) > v_topic.max_message_bytes
                        THEN format('larger than the topic''s max_message_bytes (%s)',
                                    v_topic.max_message_bytes)
                    END AS problem
                FROM m) p
            WHERE p.problem IS NOT NULL ORDER BY p.i LIMIT 1)
    INTO v_ids, v_bad;
    IF v_bad IS NOT NULL THEN
        RAISE EXCEPTION '%', v_bad USING ERRCODE = 'invalid_parameter_value';
    END IF;
    -- Delivered at commit (and only then): the relays of every process wake up.
    PERFORM pg_notify('sluice', 'outbox');
    RETURN v_ids;
END $$;

CREATE FUNCTION sluice.send(
    p_topic text, p_value jsonb, p_key text DEFAULT NULL, p_headers jsonb DEFAULT NULL,
    p_dedup_id text DEFAULT NULL, p_delay_seconds integer DEFAULT 0)
RETURNS bigint
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT (sluice.send_batch(p_topic, ARRAY[p_value], ARRAY[p_key], ARRAY[p_headers],
                              ARRAY[p_dedup_id], ARRAY[p_delay_seconds]))[1]
$$;

-- ---- ack / nack ---------------------------------------------------------------------------

-- A receipt as the HTTP API hands it out (base64url of offset, lease, segment, token; or of
-- offset and token for receipts from before revision 0004). NULL when it is not one.
CREATE FUNCTION sluice.decode_receipt(p_receipt text,
    OUT msg_offset bigint, OUT lease_id bigint, OUT seg integer, OUT token uuid)
LANGUAGE plpgsql IMMUTABLE AS $$
DECLARE
    b bytea;
BEGIN
    IF p_receipt IS NULL OR p_receipt !~ '^[A-Za-z0-9_-]*$'
       OR char_length(p_receipt) NOT IN (32, 48) THEN
        RETURN;
    END IF;
    b := decode(translate(p_receipt, '-_', '+/'), 'base64');
    msg_offset := ('x' || encode(substr(b, 1, 8), 'hex'))::bit(64)::bigint;
    IF octet_length(b) = 36 THEN
        lease_id := ('x' || encode(substr(b, 9, 8), 'hex'))::bit(64)::bigint;
        seg := ('x' || encode(substr(b, 17, 4), 'hex'))::bit(32)::integer;
        token := encode(substr(b, 21, 16), 'hex')::uuid;
    ELSE
        lease_id := 0;
        seg := 0;
        token := encode(substr(b, 9, 16), 'hex')::uuid;
    END IF;
END $$;

-- Whether each receipt would apply at `p_now`: its lease is current, the token is the one of
-- its offset, the message is retained and not settled, its deadline has not passed. The
-- same rules as sluice.settle, read-only and without its locks.
CREATE FUNCTION sluice.receipts_apply(p_topic_id bigint, p_sub_id bigint, p_lease_ids bigint[],
    p_segs integer[], p_offsets bigint[], p_tokens uuid[], p_now timestamptz)
RETURNS boolean[]
LANGUAGE sql STABLE AS $$
    SELECT array_agg(coalesce((
        SELECT r.t = coalesce(l.tokens[i.i], md5(l.secret::text || r.o::text)::uuid)
               AND r.o >= t.retention_floor
               AND NOT EXISTS (SELECT 1 FROM sluice.lease_events e
                               WHERE e.topic_id = l.topic_id AND e.sub_id = l.sub_id
                                 AND e.lease_id = l.lease_id AND e.seg = l.seg
                                 AND e.kind <> 'extend' AND r.o = ANY(e.offsets))
               AND coalesce((SELECT e.lease_until FROM sluice.lease_events e
                             WHERE e.topic_id = l.topic_id AND e.sub_id = l.sub_id
                               AND e.lease_id = l.lease_id AND e.seg = l.seg
                               AND e.kind = 'extend' AND r.o = ANY(e.offsets)
                             ORDER BY e.event_id DESC LIMIT 1),
                            l.untils[i.i], l.lease_until) > p_now
        FROM sluice.leases l
        CROSS JOIN LATERAL (SELECT array_position(l.offsets, r.o) AS i) i
        JOIN sluice.topics t ON t.topic_id = l.topic_id
        WHERE l.topic_id = p_topic_id AND l.sub_id = p_sub_id
          AND l.lease_id = CASE WHEN r.lid = 0 THEN -p_sub_id ELSE r.lid END
          AND (r.lid = 0 OR l.seg = r.seg)
          AND l.epoch = (sluice.state_of(p_topic_id, p_sub_id)).epoch
          AND i.i IS NOT NULL), false) ORDER BY r.n)
    FROM unnest(p_lease_ids, p_segs, p_offsets, p_tokens) WITH ORDINALITY r(lid, seg, o, t, n)
$$;

-- Record an ack or nack of receipts, to apply when the caller's transaction commits. Each
-- receipt comes back with `applies`: false when it is stale or not a receipt (nothing to
-- do for it; a consumer that needs the ack may roll back). The ack takes effect if and only
-- if the transaction commits, as of the time of this call: commit before the ack deadline,
-- or a claim made after the deadline may hand the message out again first (at-least-once).
CREATE FUNCTION sluice.settle_later(p_kind text, p_topic text, p_subscription text,
                                    p_receipts text[], p_seconds double precision)
RETURNS TABLE (receipt text, applies boolean)
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
#variable_conflict use_column
DECLARE
    v_topic_id bigint;
    v_sub_id bigint;
    v_now timestamptz := sluice.sql_now();
    v_ok boolean[];
BEGIN
    SELECT s.topic_id, s.sub_id INTO v_topic_id, v_sub_id
    FROM sluice.subscriptions s JOIN sluice.topics t USING (topic_id)
    WHERE t.name = p_topic AND s.name = p_subscription;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'subscription "%" of topic "%" does not exist', p_subscription, p_topic
            USING ERRCODE = 'no_data_found';
    END IF;
    IF coalesce(cardinality(p_receipts), 0) NOT BETWEEN 1 AND 1000 THEN
        RAISE EXCEPTION 'give 1..1000 receipts' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    IF p_seconds IS NOT NULL AND NOT p_seconds BETWEEN 0 AND 43200 THEN
        RAISE EXCEPTION 'delay_seconds must be 0..43200' USING ERRCODE = 'invalid_parameter_value';
    END IF;
    v_ok := (SELECT sluice.receipts_apply(v_topic_id, v_sub_id, array_agg(coalesce(d.lease_id, -1) ORDER BY r.n),
                                          array_agg(d.seg ORDER BY r.n),
                                          array_agg(d.msg_offset ORDER BY r.n),
                                          array_agg(d.token ORDER BY r.n), v_now)
             FROM unnest(p_receipts) WITH ORDINALITY r(receipt, n)
             LEFT JOIN LATERAL sluice.decode_receipt(r.receipt) d ON true);
    IF true = ANY(v_ok) THEN
        PERFORM pg_current_xact_id();
        INSERT INTO sluice.outbox (topic_id, seq, part, xid, kind, at, sub_id, lease_ids, segs,
                                   offsets, tokens, seconds)
        SELECT v_topic_id, nextval('sluice.outbox_ids'), c.part, pg_current_xact_id(), p_kind,
               v_now, v_sub_id, array_agg(d.lease_id ORDER BY r.n),
               array_agg(d.seg ORDER BY r.n), array_agg(d.msg_offset ORDER BY r.n),
               array_agg(d.token ORDER BY r.n), p_seconds
        FROM unnest(p_receipts, v_ok) WITH ORDINALITY r(receipt, ok, n)
        CROSS JOIN LATERAL sluice.decode_receipt(r.receipt) d
        CROSS JOIN sluice.outbox_current c
        WHERE r.ok
        GROUP BY c.part;
        PERFORM pg_notify('sluice', 'outbox');
    END IF;
    RETURN QUERY SELECT r.receipt, r.ok FROM unnest(p_receipts, v_ok) r(receipt, ok);
END $$;

CREATE FUNCTION sluice.ack(p_topic text, p_subscription text, p_receipts text[])
RETURNS TABLE (receipt text, applies boolean)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM sluice.settle_later('ack', p_topic, p_subscription, p_receipts, NULL)
$$;

CREATE FUNCTION sluice.nack(p_topic text, p_subscription text, p_receipts text[],
                            p_delay_seconds double precision DEFAULT NULL)
RETURNS TABLE (receipt text, applies boolean)
LANGUAGE sql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
    SELECT * FROM sluice.settle_later('nack', p_topic, p_subscription, p_receipts,
                                      p_delay_seconds)
$$;

-- ---- the relay ----------------------------------------------------------------------------

-- One pass: move what committed in the outbox into the log (offsets assigned now, in commit
-- order) and apply the acks and nacks, at most `p_limit` rows. One relay at a time (a
-- transaction-scoped try-lock): `relayed` is -1 when another one holds it. `more`: rows are
-- left for another pass. `published` / `settled`: what was done, for the process's rates.
CREATE FUNCTION sluice.relay(p_limit integer, p_skew double precision,
    OUT relayed integer, OUT more boolean, OUT published jsonb, OUT settled jsonb)
LANGUAGE plpgsql AS $$
DECLARE
    v_cursor bigint := 0;
    v_snap pg_snapshot;
    v_bound xid8;
    v_pending xid8[];
    v_unlisted xid8;
    v_new_snap pg_snapshot;
    v_seqs bigint[];
    v_row record;
    v_done record;
    v_dedup text[];
BEGIN
    published := '[]';
    settled := '[]';
    more := false;
    IF NOT pg_try_advisory_xact_lock(1397511170, 0) THEN
        relayed := -1;
        RETURN;
    END IF;
    SELECT o.cursor, o.snap, o.bound INTO v_cursor, v_snap, v_bound FROM sluice.outbox o
    WHERE o.kind = 'relayed' ORDER BY o.seq DESC LIMIT 1;
    v_cursor := coalesce(v_cursor, 0);
    v_pending := coalesce((SELECT array_agg(x) FROM pg_snapshot_xip(v_snap) x), '{}');
    -- In progress at that snapshot but not in its xip list: xids from its xmax (one past the
    -- newest *completed* xid) up to the bound the pass took after it.
    v_unlisted := pg_snapshot_xmax(v_snap);
    -- The snapshot and the rows it sees, in one statement.
    SELECT pg_current_snapshot(), array_agg(c.seq ORDER BY c.seq)
    INTO v_new_snap, v_seqs
    FROM (SELECT u.seq FROM (
              (SELECT o.seq FROM sluice.outbox o
               WHERE o.seq > v_cursor AND o.kind <> 'relayed' ORDER BY o.seq LIMIT p_limit + 1)
              UNION ALL
              (SELECT o.seq FROM sluice.outbox o
               WHERE o.xid = ANY(v_pending) AND o.seq <= v_cursor AND o.kind <> 'relayed')
              UNION ALL
              (SELECT o.seq FROM sluice.outbox o
               WHERE o.xid >= v_unlisted AND o.xid < v_bound AND o.seq <= v_cursor
                 AND o.kind <> 'relayed')) u
          ORDER BY u.seq LIMIT p_limit + 1) c;
    v_seqs := coalesce(v_seqs, '{}');
    IF cardinality(v_seqs) > p_limit THEN
        more := true;
        v_seqs := v_seqs[1:p_limit];
    END IF;
    relayed := cardinality(v_seqs);
    -- Every xid below this one was assigned by now, after the snapshot above.
    v_bound := CASE WHEN cardinality(v_seqs) > 0 THEN pg_current_xact_id() END;
    IF relayed = 0 THEN
        -- Nothing new, and no mark either (an idle pass writes nothing): the previous mark
        -- still holds, since a transaction in progress now that was not at its snapshot
        -- draws its seqs above its cursor.
        RETURN;
    END IF;
    -- Messages: per topic, in outbox order. A topic deleted since is skipped.
    FOR v_row IN
        SELECT o.topic_id, t.name, array_agg(o.value ORDER BY o.seq) AS vals,
               array_agg(o.key ORDER BY o.seq) AS keys,
               array_agg(o.headers ORDER BY o.seq) AS headers,
               array_agg(o.delay ORDER BY o.seq) AS delays,
               array_agg(o.dedup_id ORDER BY o.seq) AS dedups,
               count(*) AS n, bool_or(o.dedup_id IS NOT NULL) AS any_dedup
        FROM sluice.outbox o JOIN sluice.topics t USING (topic_id)
        WHERE o.seq = ANY(v_seqs) AND o.kind = 'message'
        GROUP BY o.topic_id, t.name ORDER BY o.topic_id
    LOOP
        v_dedup := CASE WHEN v_row.any_dedup THEN v_row.dedups END;
        SELECT a.offsets, a.duplicates, a.first_offset INTO v_done
        FROM sluice.append_messages(v_row.topic_id, v_row.vals, v_row.keys, v_row.headers,
                                    v_row.delays, v_dedup, sluice.now(p_skew)) a;
        published := published || jsonb_build_object(
            'topic', v_row.name,
            'offsets', CASE WHEN v_dedup IS NULL
                            THEN to_jsonb(ARRAY(SELECT generate_series(v_done.first_offset,
                                                                      v_done.first_offset + v_row.n - 1)))
                            ELSE to_jsonb(v_done.offsets) END,
            'duplicates', CASE WHEN v_dedup IS NULL THEN to_jsonb(array_fill(false, ARRAY[v_row.n::int]))
                               ELSE to_jsonb(v_done.duplicates) END);
    END LOOP;
    -- Acks and nacks, in the order they were made, each as of its own time.
    FOR v_row IN
        SELECT o.*, t.name AS topic, s.name AS subscription
        FROM sluice.outbox o JOIN sluice.topics t USING (topic_id)
        JOIN sluice.subscriptions s ON s.topic_id = o.topic_id AND s.sub_id = o.sub_id
        WHERE o.seq = ANY(v_seqs) AND o.kind IN ('ack', 'nack')
        ORDER BY o.seq
    LOOP
        SELECT cardinality(x.applied_offsets) AS n, x.parked INTO v_done
        FROM sluice.settle(v_row.kind, v_row.topic, v_row.subscription, v_row.lease_ids,
                           v_row.segs, v_row.offsets, v_row.tokens, v_row.seconds,
                           extract(epoch FROM v_row.at - clock_timestamp())::double precision) x;
        settled := settled || jsonb_build_object(
            'topic_id', v_row.topic_id, 'sub_id', v_row.sub_id, 'topic', v_row.topic,
            'subscription', v_row.subscription, 'kind', v_row.kind,
            'applied', coalesce(v_done.n, 0), 'dead_lettered', coalesce(v_done.parked, 0),
            'stale', cardinality(v_row.offsets) - coalesce(v_done.n, 0));
    END LOOP;
    INSERT INTO sluice.outbox (topic_id, seq, part, xid, kind, at, cursor, snap, bound)
    SELECT 0, nextval('sluice.outbox_ids'), c.part, pg_current_xact_id(), 'relayed',
           sluice.now(p_skew),
           greatest(v_cursor, coalesce(v_seqs[cardinality(v_seqs)], v_cursor)), v_new_snap,
           v_bound
    FROM sluice.outbox_current c;
END $$;

-- ---- rotation -----------------------------------------------------------------------------

-- The partitions other than the current one that hold rows (candidates for emptying).
CREATE FUNCTION sluice.outbox_parts_to_empty() RETURNS SETOF smallint
LANGUAGE sql STABLE AS $$
    SELECT p::smallint FROM generate_series(0, 2) p
    WHERE p <> (SELECT part FROM sluice.outbox_current)
      AND EXISTS (SELECT 1 FROM sluice.outbox o WHERE o.part = p)
$$;

-- Empty a partition by TRUNCATE, if everything in it has been relayed and the relay's newest
-- mark is elsewhere. Takes ACCESS EXCLUSIVE on that partition only (under the caller's
-- lock_timeout: a transaction that wrote there and is still open keeps it, and then the
-- next maintenance pass tries again). True when it was emptied.
CREATE FUNCTION sluice.empty_outbox_part(p_part smallint) RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    v_mark sluice.outbox;
BEGIN
    IF p_part = (SELECT part FROM sluice.outbox_current) THEN
        RETURN false;
    END IF;
    EXECUTE format('LOCK TABLE sluice.outbox_%s IN ACCESS EXCLUSIVE MODE', p_part);
    SELECT * INTO v_mark FROM sluice.outbox o WHERE o.kind = 'relayed'
    ORDER BY o.seq DESC LIMIT 1;
    IF v_mark.part = p_part OR EXISTS (
        SELECT 1 FROM sluice.outbox o
        WHERE o.part = p_part AND o.kind <> 'relayed'
          AND NOT (v_mark.seq IS NOT NULL AND o.seq <= v_mark.cursor
                   AND pg_visible_in_snapshot(o.xid, v_mark.snap))) THEN
        RETURN false;
    END IF;
    EXECUTE format('TRUNCATE sluice.outbox_%s', p_part);
    RETURN true;
END $$;

-- Make the next partition current once the current one has been so for `p_seconds`, holds
-- rows, and the next one is empty. True when it rotated.
CREATE FUNCTION sluice.rotate_outbox(p_seconds double precision, p_now timestamptz)
RETURNS boolean
LANGUAGE plpgsql AS $$
DECLARE
    c sluice.outbox_current;
BEGIN
    SELECT * INTO c FROM sluice.outbox_current;
    -- An idle outbox does not rotate (nothing to give back, and no row version either).
    IF c.since > p_now - make_interval(secs => p_seconds)
       OR NOT EXISTS (SELECT 1 FROM sluice.outbox o WHERE o.part = c.part)
       OR EXISTS (SELECT 1 FROM sluice.outbox o WHERE o.part = (c.part + 1) % 3) THEN
        RETURN false;
    END IF;
    UPDATE sluice.outbox_current SET part = (c.part + 1) % 3, since = p_now;
    RETURN true;
END $$;

-- ---- read-only views (for reporting and for joins with business tables) ------------------

-- Every retained message of every topic. Filter by topic (and offset): that is an index scan.
CREATE VIEW sluice.topic_messages AS
SELECT t.name AS topic, m.msg_offset AS "offset", m.published_at, m.deliver_at, m.key,
       m.headers::jsonb AS headers, m.value::jsonb AS value
FROM sluice.topics t
JOIN sluice.messages m ON m.topic_id = t.topic_id AND m.msg_offset >= t.retention_floor;

-- Per topic: its settings and the extent of its retained log.
CREATE VIEW sluice.topic_stats AS
SELECT t.name AS topic, t.retention_seconds, t.dedup_window_seconds, t.max_message_bytes,
       l.oldest_offset, l.head_offset,
       CASE WHEN l.oldest_offset IS NULL THEN 0
            ELSE l.head_offset - l.oldest_offset + 1 END AS retained,
       t.created_at
FROM sluice.topics t
CROSS JOIN LATERAL sluice.log_stats(t.topic_id, 0) l;

-- Per subscription: where it is and what it holds, as GET .../stats counts it (computed
-- when read: filter by topic and subscription when there are many).
CREATE VIEW sluice.subscription_stats AS
SELECT x.topic, x.subscription, x.cursor, x.in_flight, x.due, x.waiting, x.dead_lettered,
       x.oldest_offset, x.head_offset, x.delivered_total, x.now AS measured_at
FROM sluice.subscriptions s
CROSS JOIN LATERAL sluice.subscription_stats(s.topic_id, s.sub_id, 0) x;

-- Messages parked as dead letters (not redriven or dropped since), with their value.
CREATE VIEW sluice.dead_letter_messages AS
SELECT t.name AS topic, s.name AS subscription, d.msg_offset AS "offset", d.attempts,
       d.at AS dead_lettered_at, m.published_at, m.key, m.headers::jsonb AS headers,
       m.value::jsonb AS value
FROM sluice.subscriptions s
JOIN sluice.topics t ON t.topic_id = s.topic_id
CROSS JOIN LATERAL (
    SELECT DISTINCT ON (x.msg_offset) x.* FROM sluice.dead_letters x
    WHERE x.topic_id = s.topic_id AND x.sub_id = s.sub_id AND x.msg_offset >= t.retention_floor
    ORDER BY x.msg_offset, x.event_id DESC) d
JOIN sluice.messages m ON m.topic_id = d.topic_id AND m.msg_offset = d.msg_offset
                      AND m.seg = d.seg
WHERE d.kind = 'dead';

-- ---- privileges ---------------------------------------------------------------------------

-- Nothing of Sluice's is anybody's but its owner's until granted (`sluice sql-grant`):
-- the functions meant for applications run as their owner (SECURITY DEFINER, with a fixed
-- search_path) and check their input, so a role needs no privilege on any table.
REVOKE ALL ON ALL FUNCTIONS IN SCHEMA sluice FROM PUBLIC;
ALTER DEFAULT PRIVILEGES IN SCHEMA sluice REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC;
