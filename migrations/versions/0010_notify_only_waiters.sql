-- Sluice revision 0010: a publish notifies only when some process has a long-poll waiting
-- for its topic. Only sluice.append_messages changes (CREATE OR REPLACE: its signature,
-- owner and privileges stay); what it stores and answers is unchanged.
--
-- Why. A transaction that has sent a NOTIFY takes, at commit, a lock shared by the whole
-- cluster (the heavyweight lock on "database 0" that keeps the notification queue in commit
-- order) and holds it until its commit has been flushed: the commits of notifying
-- transactions, of every database of the server, take turns. Most publishes have nobody to
-- wake (consumers are working through a backlog, or there are none yet), and the
-- notification then also costs the listening processes a delivery each.
--
-- How. Each process's listener connection holds a session-level shared advisory lock,
-- key (1397511171, topic_id % 256), while that process has a long-poll waiting on a topic
-- of that bucket (and for a while after its last one left). A publish tries to take the same
-- key exclusively for the rest of its transaction: when it cannot, somebody waits (or
-- another publish of the same bucket is committing) and it notifies as before. When it can,
-- nobody waits, and a listener that asks for the key now waits for this transaction to end:
-- the claim its long-polls run once the key is theirs sees these messages. The appends run
-- only in Sluice's own short transactions (an HTTP or SQS publish, the SQL API's relay, a
-- dead letter), never in an application's, so a listener waits at most for one of them.
-- The 256 buckets bound the locks a process holds; topics of one bucket wake each other's
-- listeners, which is what every publish did before. bench/RESULTS.md run 30 has figures;
-- docs/design.md ("Long polling without connections") the listener's side.

-- Append messages to a topic, offsets in commit order: the topic's advisory lock is held
-- until commit, and the next offset is read from the log after taking it, so the next
-- publisher of the topic gets its offsets only once these are visible to everybody. No row
-- is updated: the lock leaves no row version behind (a counter row would, per publish).
-- Without dedup ids the messages take consecutive offsets from `first_offset` (the arrays
-- are NULL). With dedup ids, an id seen within the window (or earlier in the batch) takes
-- no offset and answers the original one: `offsets` and `duplicates` say, per message.
CREATE OR REPLACE FUNCTION sluice.append_messages(
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
    v_all_new boolean;
    v_dedup_segs integer[];
BEGIN
    PERFORM pg_advisory_xact_lock(1397511169, (p_topic_id % 2147483647)::int);
    -- Everything that decides where the messages go, in one statement (a fresh snapshot,
    -- taken after the lock): the topic, its newest segment and newest offset there, its
    -- lane's open segment.
    SELECT tp.retention_floor, tp.dedup_window_seconds, ts.seg, ts.first_offset,
           sluice.newest_offset_in(p_topic_id, ts.seg),
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
    IF p_dedup_ids IS NOT NULL THEN
        -- The segments that can hold a message of the dedup window: the topic's own (not
        -- every partition of the table), from the segment of its newest message published
        -- 5 minutes before the window began on. A message's offset can be below that one's
        -- only if it took its publish time earlier still: offsets follow publish times to
        -- within one publish's wait for the topic's lock, seconds at most.
        v_dedup_segs := ARRAY(
            SELECT ts.seg FROM sluice.topic_segments ts
            WHERE ts.topic_id = p_topic_id
              AND ts.seg >= coalesce(
                    (SELECT x.seg FROM sluice.messages x
                     WHERE x.topic_id = p_topic_id
                       AND x.published_at <= p_now - make_interval(secs => v_window)
                                                   - interval '5 minutes'
                     ORDER BY x.published_at DESC LIMIT 1),
                    0)
              AND ts.seg >= sluice.seg_of(p_topic_id, v_floor));
        -- The common case first: ids all distinct and none seen (one probe per id, up to
        -- the first hit). Then the messages take consecutive offsets as without ids.
        SELECT (SELECT count(i) = count(DISTINCT i) FROM unnest(p_dedup_ids) i)
           AND NOT EXISTS (
                SELECT FROM unnest(p_dedup_ids) i
                CROSS JOIN unnest(v_dedup_segs) s(seg)
                CROSS JOIN LATERAL (
                    SELECT x.msg_offset, x.published_at FROM sluice.messages x
                    WHERE x.topic_id = p_topic_id AND x.seg = s.seg AND x.dedup_id = i
                    OFFSET 0) hit
                WHERE i IS NOT NULL
                  AND hit.published_at > p_now - make_interval(secs => v_window)
                  AND hit.msg_offset >= v_floor)
        INTO v_all_new;
    END IF;
    IF p_dedup_ids IS NULL OR v_all_new THEN
        INSERT INTO sluice.messages
            (topic_id, msg_offset, seg, published_at, deliver_at, key, headers, dedup_id, value)
        SELECT p_topic_id, v_next + m.ord - 1, v_seg, p_now,
               CASE WHEN m.delay > 0 THEN p_now + make_interval(secs => m.delay) END,
               m.key, m.headers, m.dedup_id, m.value
        FROM unnest(p_values, p_keys, p_headers, p_delays, p_dedup_ids)
             WITH ORDINALITY AS m(value, key, headers, delay, dedup_id, ord);
        IF NOT pg_try_advisory_xact_lock(1397511171, (p_topic_id % 256)::int) THEN
            PERFORM pg_notify('sluice', p_topic_id::text || ':' || cardinality(p_values)::text);
        END IF;
        first_offset := v_next;
        IF p_dedup_ids IS NOT NULL THEN
            offsets := ARRAY(SELECT generate_series(v_next, v_next + cardinality(p_values) - 1));
            duplicates := array_fill(false, ARRAY[cardinality(p_values)]);
        END IF;
        RETURN;
    END IF;
    WITH m AS (
        SELECT * FROM unnest(p_values, p_keys, p_headers, p_delays, p_dedup_ids)
                 WITH ORDINALITY AS m(value, key, headers, delay, dedup_id, ord)
    ), seen AS (
        -- Earlier messages with these ids, within the window and still retained: one probe
        -- of the dedup index per distinct id. OFFSET 0 keeps the subquery a probe per id
        -- and keeps the window and floor conditions out of it: pulled up into a join, it
        -- was planned as a merge join over the topic's whole dedup index, and with the
        -- offset condition inside, the planner could take the primary key (topic, offset)
        -- and filter the ids, the same whole-topic scan.
        SELECT d.dedup_id, min(hit.msg_offset) AS msg_offset
        FROM (SELECT DISTINCT m.dedup_id FROM m WHERE m.dedup_id IS NOT NULL) d
        CROSS JOIN unnest(v_dedup_segs) s(seg)
        CROSS JOIN LATERAL (
            SELECT x.msg_offset, x.published_at FROM sluice.messages x
            WHERE x.topic_id = p_topic_id AND x.seg = s.seg AND x.dedup_id = d.dedup_id
            OFFSET 0) hit
        WHERE hit.published_at > p_now - make_interval(secs => v_window)
          AND hit.msg_offset >= v_floor
        GROUP BY d.dedup_id
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
        IF NOT pg_try_advisory_xact_lock(1397511171, (p_topic_id % 256)::int) THEN
            PERFORM pg_notify('sluice', p_topic_id::text || ':' || v_count::text);
        END IF;
    END IF;
END $$;
