-- Sluice revision 0006: a nack can ask for a dead letter now ("dead_letter": true on
-- POST .../nack; kind 'dead_letter' of sluice.settle). The handler of a consumer knows that
-- a message will never succeed (it cannot be parsed, it names something that does not
-- exist): it should not have to nack it max_deliveries times to get it parked.
--
-- The same path as a nack on the last allowed attempt, so nothing new is stored: one lease
-- event 'nack' for the members applied (the lease is settled), and sluice.park (a
-- dead-letter row per message, the key's next message released, the copy to
-- dead_letter_topic). No timer is written for them. It parks whatever the subscription's
-- max_deliveries (0, unlimited retries, included): it is asked for explicitly. Only this
-- function changes; its signature, owner and privileges stay (CREATE OR REPLACE).

-- Apply receipts (lease, offset, token) of one subscription, under its shared lock and
-- each lease's own lock. A receipt applies only while its lease is of the current epoch,
-- its token is the one of its offset, the member is not settled yet and its deadline has
-- not passed: a stale receipt (expired, redelivered, already acked, forged) never touches
-- anything. One lease event per request and lease records what was applied.
--   ack       done for good (key ordering: the next message of the key is released)
--   nack      deliverable again after p_seconds (NULL: the backoff), or parked after the
--             last attempt
--   dead_letter  parked now, whatever the attempt (recorded as a nack, as the parking
--             nack of the last attempt is)
--   extend    the deadline becomes now + p_seconds
--   give_back deliverable again at once, the attempt not counted (the client went away
--             before it could see the messages)
-- Returns the applied receipts as (offset, lease, token) triples.
CREATE OR REPLACE FUNCTION sluice.settle(
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
                CASE p_kind WHEN 'give_back' THEN 'released' WHEN 'dead_letter' THEN 'nack'
                            ELSE p_kind END,
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
        ELSIF p_kind IN ('nack', 'give_back', 'dead_letter') THEN
            -- Parked after the last attempt (a give-back never counts as one), or when asked.
            SELECT array_agg(x.o) FILTER (WHERE p_kind = 'dead_letter'
                                                OR (p_kind = 'nack' AND s.max_deliveries > 0
                                                    AND x.a >= s.max_deliveries)),
                   array_agg(x.a) FILTER (WHERE p_kind = 'dead_letter'
                                                OR (p_kind = 'nack' AND s.max_deliveries > 0
                                                    AND x.a >= s.max_deliveries))
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
                  WHERE p_kind <> 'dead_letter'
                    AND NOT (p_kind = 'nack' AND s.max_deliveries > 0 AND x.a >= s.max_deliveries)
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
