-- Sluice revision 0018: an ack's cost follows its receipts, not the size of their lease.
--
-- sluice.settle matched each receipt to its lease member with array_position(l.offsets, o)
-- and checked it against what the lease's events settled with `o = ANY(v_settled)`: two
-- linear searches per receipt, so an ack of 100 receipts cost in proportion to the lease's
-- size. Pulls that arrive together share one claim (app/queue/claim_groups.py), so a
-- consumer's 100 messages are often one share of a lease of several hundred, acked share by
-- share: an ack of 100 took 530 us of backend CPU on a lease of 100, 1,320 on a lease of
-- 400 and 2,840 on a lease of 1,000 (bench/RESULTS.md run 33). The receipts are now joined
-- to the lease's members, to its settled offsets and to its members' newest extensions
-- (set operations the planner hashes or merges): 550 / 590-640 / 750-760 us.
-- What applies is unchanged: a receipt whose token is its member's, neither settled nor past
-- its deadline (its newest extension's, which may also shorten it), within retention; a
-- receipt given twice applies once.
--
-- The function as revision 0014 left it (0006's body with 0014's edit), with that statement
-- changed.

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
               array_agg(x.a ORDER BY x.o)
        INTO v_ok_off, v_ok_tok, v_ok_att
        FROM (SELECT DISTINCT ON (r.o) r.o, r.t, m.a
              FROM unnest(p_lease_ids, p_offsets, p_tokens) r(lid, o, t)
              JOIN unnest(l.offsets, l.attempts, l.tokens, l.untils) m(o, a, tok, u)
                ON m.o = r.o
              LEFT JOIN (SELECT DISTINCT ON (e.o) e.o, e.u
                         FROM unnest(v_ext_off, v_ext_until) WITH ORDINALITY e(o, u, k)
                         ORDER BY e.o, e.k) ext ON ext.o = r.o
              WHERE r.lid = l.lease_id
                AND r.t = coalesce(m.tok, md5(l.secret::text || r.o::text)::uuid)
                AND r.o >= s.retention_floor
                AND NOT EXISTS (SELECT 1 FROM unnest(v_settled) d(o) WHERE d.o = r.o)
                AND coalesce(ext.u, m.u, l.lease_until) > v_now
              ORDER BY r.o) x;
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
    -- Only while some process declares waiters on the bucket (revision 0014).
    IF v_wake > 0
       AND NOT pg_try_advisory_xact_lock(1397511171, (s.topic_id % 256)::int) THEN
        PERFORM pg_notify('sluice', s.topic_id::text || ':' || v_wake::text);
    END IF;
    RETURN QUERY SELECT true, s.topic_id, s.sub_id, a_off, a_lease, a_tok, v_until, v_parked, v_wake;
END $$;