-- Sluice revision 0009: a subscription's newest state row is looked up in one partition.
--
-- sluice.state_of (every claim, ack, nack, extend, stats) found the newest state row with
-- `ORDER BY state_id DESC LIMIT 1` over every partition of sub_states: one index probe per
-- segment partition, and a live installation has tens of them (a claim of 100: 48 buffers
-- with 4 partitions, 277 with 44; an ack: 22 and 102; bench/RESULTS.md run 24). A
-- subscription's state rows all live in one segment: the first is written in its topic's
-- write segment, every later one copies the segment of the one before, and dropping that
-- segment carries the newest row to the newest open segment in the same transaction. So the
-- subscription row now names that segment (`state_seg`, written when the subscription is
-- created and when its rows are carried: not per message nor per request), and state_of
-- probes only it. A NULL or outdated `state_seg` (a row written some other way) falls back
-- to every partition: the answer never depends on it.

ALTER TABLE sluice.subscriptions ADD COLUMN state_seg integer;
UPDATE sluice.subscriptions s
SET state_seg = (SELECT z.seg FROM sluice.sub_states z
                 WHERE z.topic_id = s.topic_id AND z.sub_id = s.sub_id
                 ORDER BY z.state_id DESC LIMIT 1);

-- The newest state row of a subscription.
CREATE OR REPLACE FUNCTION sluice.state_of(p_topic_id bigint, p_sub_id bigint)
RETURNS sluice.sub_states LANGUAGE plpgsql STABLE AS $$
DECLARE
    v_seg integer;
    st sluice.sub_states;
BEGIN
    SELECT s.state_seg INTO v_seg FROM sluice.subscriptions s
    WHERE s.topic_id = p_topic_id AND s.sub_id = p_sub_id;
    SELECT * INTO st FROM sluice.sub_states z
    WHERE z.topic_id = p_topic_id AND z.sub_id = p_sub_id AND z.seg = v_seg
    ORDER BY z.state_id DESC LIMIT 1;
    IF NOT FOUND THEN
        SELECT * INTO st FROM sluice.sub_states z
        WHERE z.topic_id = p_topic_id AND z.sub_id = p_sub_id
        ORDER BY z.state_id DESC LIMIT 1;
    END IF;
    RETURN st;
END $$;

-- The first state of a new subscription: its cursor at `p_start`, a full token bucket; the
-- subscription row names the segment its state rows live in.
CREATE OR REPLACE FUNCTION sluice.init_state(p_topic_id bigint, p_sub_id bigint, p_start bigint,
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
    UPDATE sluice.subscriptions s
    SET state_seg = (SELECT z.seg FROM sluice.sub_states z
                     WHERE z.topic_id = p_topic_id AND z.sub_id = p_sub_id
                     ORDER BY z.state_id DESC LIMIT 1)
    WHERE s.topic_id = p_topic_id AND s.sub_id = p_sub_id;
END $$;

-- Drop a segment: every parent locked (fixed order, under the caller's lock_timeout), the
-- newest state of each subscription that lives there carried to a live segment (and the
-- subscription row told), then the partitions dropped.
CREATE OR REPLACE FUNCTION sluice.drop_segment(p_seg integer) RETURNS boolean
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
    WITH carried AS (
        INSERT INTO sluice.sub_states
        SELECT x.topic_id, x.sub_id, nextval('sluice.state_ids'), v_target, x.epoch, x.key_gen,
               x.cursor, x.timer_due, x.timer_id, x.event_id, x.win_lease, x.win_seg,
               x.win_size, x.win_done, x.win_check, x.win_low, x.tokens, x.tokens_at,
               x.delivered_total
        FROM sluice.subscriptions s
        CROSS JOIN LATERAL (SELECT * FROM sluice.sub_states z
                            WHERE z.topic_id = s.topic_id AND z.sub_id = s.sub_id
                            ORDER BY z.state_id DESC LIMIT 1) x
        WHERE x.seg = p_seg
        RETURNING topic_id, sub_id)
    UPDATE sluice.subscriptions s SET state_seg = v_target
    FROM carried c WHERE s.topic_id = c.topic_id AND s.sub_id = c.sub_id;
    FOREACH v_table IN ARRAY sluice.segmented_tables() LOOP
        EXECUTE format('DROP TABLE sluice.%I', format('%s_%s', v_table, lpad(p_seg::text, 6, '0')));
    END LOOP;
    DELETE FROM sluice.topic_segments WHERE seg = p_seg;
    DELETE FROM sluice.segments WHERE seg = p_seg;
    RETURN true;
END $$;
