-- Sluice revision 0017: a claim reads the timers only once one may be due.
--
-- Every claim read the subscription's timers after its frontier (step 4: the due ones; step
-- 8, when nothing went out: the next one's due time). Timers live in the segment of their
-- newest message, so the read is a merge of every partition's index: with 44 partitions a
-- claim of one message cost about 1.5 times what it costs with 4, and those two reads were
-- most of the difference (bench/RESULTS.md run 32). Most claims have no timer to find:
-- a subscription whose consumers ack has none at all.
--
-- The state row now carries `timer_wake`, a time no later than the due time of any timer
-- after the frontier (a lower bound: early is safe, it only costs a read that finds nothing
-- due). A claim reads the timers only once that time has come, and then sets it to the
-- due time of the first timer it leaves ('infinity' when none is left). Whoever writes a
-- timer makes sure the bound holds:
--   * the claim itself (expired leases' retries, the rest of a split timer, delayed
--     messages) lowers it in the state row it writes;
--   * sluice.settle writes no state row (it holds the subscription's lock shared, beside
--     other settles), but every timer it writes comes with a lease event in the same
--     transaction: a nack, give-back or dead letter, or under key ordering an ack (which may
--     release its key's next message). The claim counts those events anyway (step 1) and
--     lowers the wake to the event's time, before which none of its timers is due;
--   * everything else that writes timers (seek, redrive, key ordering switched, retention
--     releasing a key's head) writes a state row through sluice.save_state or another
--     INSERT that leaves `timer_wake` to its default, '-infinity': the next claim reads the
--     timers. Rows from before this revision get that default too.
-- The frontier, the epoch, what a read takes and in which order: unchanged. A claim of one
-- message with 44 partitions: ~610 -> ~380 us of backend CPU, what it costs with 4
-- (bench/RESULTS.md run 33).

ALTER TABLE sluice.sub_states ADD COLUMN timer_wake timestamptz NOT NULL DEFAULT '-infinity';
COMMENT ON COLUMN sluice.sub_states.timer_wake IS
    'No timer after the frontier is due before this (revision 0017); the default makes the next claim read them';

-- The claim as of revision 0015 with the changes above (steps 1, 2, 4, 7 and 8), and one
-- "not found" answer for both of its lookups (before and after the lock).
CREATE OR REPLACE FUNCTION sluice.claim(
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
    v_event_seg integer;
    v_event_segs integer[] := '{}';
    v_timers_read boolean := false;
    v_timer_rows integer := 0;
    v_written_due timestamptz := 'infinity';
BEGIN
    SELECT sb.topic_id, sb.sub_id INTO s
    FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
    WHERE t.name = p_topic AND sb.name = p_subscription;
    IF FOUND THEN
        PERFORM pg_advisory_xact_lock(1397510914, (s.sub_id % 2147483647)::int);
        -- The configuration as of now that we hold the lock (a change takes it exclusively).
        SELECT sb.*, t.retention_floor, t.name AS topic_name INTO s
        FROM sluice.subscriptions sb JOIN sluice.topics t USING (topic_id)
        WHERE sb.topic_id = s.topic_id AND sb.sub_id = s.sub_id;
    END IF;
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
        -- One segment at a time: a scalar segment prunes to its partition (0015). Each
        -- segment once, told apart by array assignments (no statement of their own).
        FOREACH v_event_seg IN ARRAY st.win_seg LOOP
        CONTINUE WHEN v_event_seg = ANY(v_event_segs);
        v_event_segs := v_event_segs || v_event_seg;
        FOR r IN SELECT ev.lease_id, ev.kind, cardinality(ev.offsets) AS n, ev.lease_until,
                        ev.event_id, ev.at
                 FROM sluice.lease_events ev
                 WHERE ev.topic_id = s.topic_id AND ev.sub_id = s.sub_id
                   AND ev.lease_id = ANY(st.win_lease) AND ev.seg = v_event_seg
                   AND ev.event_id > st.event_id LOOP
            i := array_position(nx.win_lease, r.lease_id);
            IF i IS NOT NULL THEN
                IF r.kind = 'extend' THEN
                    nx.win_check[i] := least(nx.win_check[i], r.lease_until);
                ELSE
                    nx.win_done[i] := nx.win_done[i] + r.n;
                END IF;
            END IF;
            -- A nack, give-back or dead letter (under key ordering, an ack too: it may
            -- release its key's next message) may have written a timer, due no earlier
            -- than the event: the timers are read once that time comes (step 4).
            IF r.kind <> 'extend' AND (r.kind <> 'ack' OR s.ordered_by_key) THEN
                nx.timer_wake := least(nx.timer_wake, r.at);
            END IF;
            nx.event_id := greatest(nx.event_id, r.event_id);
        END LOOP;
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
                IF r.expired > 0 THEN
                    -- Its retries are timers (and a dead letter may release a key's next).
                    nx.timer_wake := least(nx.timer_wake, v_now);
                END IF;
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
        -- The window's segments, as step 1 found them (0015).
        FOREACH v_event_seg IN ARRAY v_event_segs LOOP
            nx.event_id := greatest(nx.event_id, (
                SELECT max(ev.event_id) FROM sluice.lease_events ev
                WHERE ev.topic_id = s.topic_id AND ev.sub_id = s.sub_id
                  AND ev.event_id > nx.event_id AND ev.lease_id = ANY(st.win_lease)
                  AND ev.seg = v_event_seg));
        END LOOP;
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

    -- 4. Due timers, in due order (redeliveries, ended delays, released keys), only once
    --    one may be due: nx.timer_wake is never later than any timer after the frontier
    --    (the state row's `timer_wake`, revision 0017). The read runs on to the first timer
    --    it leaves, whose due time is the next wake.
    IF v_left > 0 AND nx.timer_wake <= v_now THEN
        v_timers_read := true;
        nx.timer_wake := 'infinity';  -- unless a timer is left (below)
        FOR tm IN SELECT * FROM sluice.timers t
                  WHERE t.topic_id = s.topic_id AND t.sub_id = s.sub_id
                    AND (t.due_at, t.timer_id) > (st.timer_due, st.timer_id)
                  ORDER BY t.due_at, t.timer_id LIMIT 1001 LOOP
            IF tm.due_at > v_now OR v_left <= 0 OR v_timer_rows >= 1000 THEN
                nx.timer_wake := tm.due_at;
                EXIT;
            END IF;
            v_timer_rows := v_timer_rows + 1;
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
                v_written_due := least(v_written_due, tm.due_at);
            END IF;
            l_off := l_off || v_take;
            v_sorted := false;
            SELECT l_att || coalesce(array_agg(x.a + 1 ORDER BY x.i), '{}') INTO l_att
            FROM unnest(v_take_att) WITH ORDINALITY x(a, i);
            l_seg := greatest(l_seg, tm.seg);
            v_left := v_left - cardinality(v_take);
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
                    v_written_due := least(v_written_due, r.deliver_at);
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

    -- The timers written here count too. When nothing went out and step 4 did not read
    -- the timers though one may be due (no room, no tokens, an expiry-only claim), the
    -- wake is made exact: step 8 reports it.
    nx.timer_wake := least(nx.timer_wake, v_written_due);
    IF cardinality(l_off) = 0 AND NOT v_timers_read AND nx.timer_wake <= v_now THEN
        nx.timer_wake := coalesce(
            (SELECT t.due_at FROM sluice.timers t
             WHERE t.topic_id = s.topic_id AND t.sub_id = s.sub_id
               AND (t.due_at, t.timer_id) > (nx.timer_due, nx.timer_id)
             ORDER BY t.due_at, t.timer_id LIMIT 1), 'infinity');
    END IF;

    -- 7. A new state row only when something changed.
    IF nx.cursor <> st.cursor OR nx.timer_id <> st.timer_id OR nx.event_id <> st.event_id
       OR nx.timer_wake IS DISTINCT FROM st.timer_wake
       OR nx.win_lease IS DISTINCT FROM st.win_lease OR nx.win_done IS DISTINCT FROM st.win_done
       OR nx.win_check IS DISTINCT FROM st.win_check OR nx.win_low IS DISTINCT FROM st.win_low
       OR cardinality(l_off) > 0 THEN
        nx.state_id := nextval('sluice.state_ids');
        INSERT INTO sluice.sub_states SELECT nx.*;
    END IF;

    -- 8. When nothing went out: is anything deliverable, and when to look again.
    IF cardinality(l_off) = 0 THEN
        -- The next timer's due time (or an earlier one: a look that finds nothing due).
        v_next := CASE WHEN nx.timer_wake < 'infinity' THEN nx.timer_wake END;
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