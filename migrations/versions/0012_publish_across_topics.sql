-- Sluice revision 0012: one transaction publishes the requests of several topics.
--
-- Each process funnelled the publishes of a topic through a writer of its own (one group
-- commit per topic), so a process publishing to many topics at once wrote one transaction,
-- one round trip and one WAL flush per topic: 16 topics at 16 connections (wrk) were
-- answered at 2,700-3,000 publishes/s with 240-270 us of server CPU each, one topic at
-- 8,400-9,800/s and 86-101 us. Now a process has one writer, and a group holding the
-- requests of several topics goes to Postgres as one call of this function: 16 topics
-- 6,500-7,100/s at 98-106 us (bench/RESULTS.md run 31).
--
-- Commit order is kept as before: every topic's messages are appended by
-- sluice.append_messages, which takes the topic's advisory lock until commit. What is new
-- is holding several of those locks at once, so the call must never wait for one while it
-- holds another (another process's group, the relay and the dead-letter copies take topic
-- locks too, in other orders): each topic's lock is only tried, and a topic whose lock is
-- taken is left out ('busy'). The caller writes that topic's requests in a transaction of
-- their own, which waits for the lock and holds no other (app/queue/publisher.py).
--
-- Arguments: the topics in the order to write them, how many of the flat message arrays'
-- entries each one takes, and the largest message of each (checked against the topic's
-- max_message_bytes). Answers, per topic: its status ('ok', 'no_topic', 'too_large' or
-- 'busy': nothing of a topic that is not 'ok' is stored), its first offset, and whether its
-- offsets and duplicate flags are listed in `offsets`/`duplicates` (topics with dedup ids:
-- their lists, one after another; the others took consecutive offsets).
CREATE FUNCTION sluice.publish_topics(
    p_topics text[], p_counts integer[], p_largest integer[], p_values text[],
    p_keys text[], p_headers text[], p_delays integer[], p_dedup_ids text[],
    p_skew double precision,
    OUT statuses text[], OUT first_offsets bigint[], OUT listed boolean[],
    OUT offsets bigint[], OUT duplicates boolean[])
LANGUAGE plpgsql AS $$
DECLARE
    v_from integer := 1;
    v_to integer;
    v_topic_id bigint;
    v_max integer;
    v_dedup text[];
    r record;
BEGIN
    statuses := '{}';
    first_offsets := '{}';
    listed := '{}';
    offsets := '{}';
    duplicates := '{}';
    FOR i IN 1 .. cardinality(p_topics) LOOP
        v_to := v_from + p_counts[i] - 1;
        SELECT t.topic_id, t.max_message_bytes INTO v_topic_id, v_max
        FROM sluice.topics t WHERE t.name = p_topics[i];
        IF v_topic_id IS NULL THEN
            statuses := statuses || 'no_topic'::text;
        ELSIF p_largest[i] > v_max THEN
            statuses := statuses || 'too_large'::text;
        ELSIF NOT pg_try_advisory_xact_lock(1397511169, (v_topic_id % 2147483647)::int) THEN
            statuses := statuses || 'busy'::text;
        ELSE
            v_dedup := p_dedup_ids[v_from:v_to];
            IF v_dedup IS NOT NULL
               AND NOT EXISTS (SELECT 1 FROM unnest(v_dedup) d WHERE d IS NOT NULL) THEN
                v_dedup := NULL;  -- ids only in other topics' messages
            END IF;
            -- The time once the topic's lock is ours: published_at grows with the offset.
            SELECT a.first_offset, a.offsets, a.duplicates INTO r
            FROM sluice.append_messages(v_topic_id, p_values[v_from:v_to], p_keys[v_from:v_to],
                                        p_headers[v_from:v_to], p_delays[v_from:v_to], v_dedup,
                                        sluice.now(p_skew)) a;
            statuses := statuses || 'ok'::text;
            first_offsets := first_offsets || r.first_offset;
            IF v_dedup IS NOT NULL THEN
                listed := listed || true;
                offsets := offsets || r.offsets;
                duplicates := duplicates || r.duplicates;
            ELSE
                listed := listed || false;
            END IF;
            v_from := v_to + 1;
            CONTINUE;
        END IF;
        first_offsets := first_offsets || NULL::bigint;
        listed := listed || false;
        v_from := v_to + 1;
    END LOOP;
END $$;

-- A single topic's publish (the writer's groups of one topic) takes the topic's lock before
-- it reads the clock. It read the clock first, as an argument of append_messages (which
-- takes the lock), so a publish that waited for the lock behind another process's could
-- store an earlier published_at than that one under a later offset, and a seek by time could
-- then land past a message published after the time sought. Same signature, so its
-- privileges stay; append_messages takes the lock again, which its holder gets at once.
CREATE OR REPLACE FUNCTION sluice.publish_batch(
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
        PERFORM pg_advisory_xact_lock(1397511169, (v_topic_id % 2147483647)::int);
        SELECT a.first_offset, a.offsets, a.duplicates INTO first_offset, offsets, duplicates
        FROM sluice.append_messages(v_topic_id, p_values, p_keys, p_headers, p_delays,
                                    p_dedup_ids, sluice.now(p_skew)) a;
    END IF;
END $$;
