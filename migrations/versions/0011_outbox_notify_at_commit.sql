-- Sluice revision 0011: the SQL API wakes the relays at the application's commit only when
-- a relay says it is waiting. sluice.send_batch and sluice.settle_later no longer notify
-- (CREATE OR REPLACE: signatures, owner and privileges stay); a deferred constraint trigger
-- on the outbox does, at commit, once per call (outbox.wakes marks the row it runs for).
--
-- Why. A transaction that has sent a NOTIFY takes, at commit, a lock of the whole Postgres
-- server and holds it until its commit has been flushed (revision 0010 says more): every
-- application transaction that published or acked through SQL took it, so those commits,
-- and every other notifying commit of the server, took turns instead of sharing flushes.
--
-- How. While a relay has found the outbox empty for a while, its process's listener holds
-- the session-level advisory key (1397511172, 0) exclusively (taken without waiting; at most
-- one process holds it). At the application's commit the trigger takes the same key shared
-- without waiting: when it cannot, a relay waits (or is just declaring) and the transaction
-- notifies as before; when it can, no relay waits, and none can declare before this commit
-- is over, and a relay that declares runs one more pass first. A relay that has work polls
-- every few milliseconds until the outbox stays empty, and every relay_interval_seconds in
-- any case: a notification only shortens the wait, it never decides whether a row is
-- relayed. Application transactions take the key shared, so they never wait for each other.

-- The first row of each call that writes to the outbox (a send of 1000 messages writes 1000
-- rows) is marked: the trigger below runs once per call at commit, not once per message,
-- and never for the relay's own 'relayed' rows. NULL on rows written before this revision.
ALTER TABLE sluice.outbox ADD COLUMN wakes boolean;

-- At the commit of a transaction that wrote to the outbox (once per call).
CREATE FUNCTION sluice.outbox_committing() RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog, pg_temp AS $$
BEGIN
    IF NOT pg_try_advisory_xact_lock_shared(1397511172, 0) THEN
        PERFORM pg_notify('sluice', 'outbox');
    END IF;
    RETURN NULL;
END $$;

CREATE CONSTRAINT TRIGGER outbox_wakes_relays AFTER INSERT ON sluice.outbox
    DEFERRABLE INITIALLY DEFERRED
    FOR EACH ROW WHEN (NEW.wakes) EXECUTE FUNCTION sluice.outbox_committing();

-- sluice.send_batch, as in revision 0005 without its NOTIFY, marking its first row.
CREATE OR REPLACE FUNCTION sluice.send_batch(
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
                                   dedup_id, delay, wakes)
        SELECT v_topic.topic_id, nextval('sluice.outbox_ids'), c.part, pg_current_xact_id(),
               'message', v_at, m.v, m.key, m.headers::text, m.dedup_id, nullif(m.delay, 0),
               m.i = 1
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
    RETURN v_ids;
END $$;

-- sluice.settle_later, as in revision 0005 without its NOTIFY, marking its row.
CREATE OR REPLACE FUNCTION sluice.settle_later(p_kind text, p_topic text, p_subscription text,
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
                                   offsets, tokens, seconds, wakes)
        SELECT v_topic_id, nextval('sluice.outbox_ids'), c.part, pg_current_xact_id(), p_kind,
               v_now, v_sub_id, array_agg(d.lease_id ORDER BY r.n),
               array_agg(d.seg ORDER BY r.n), array_agg(d.msg_offset ORDER BY r.n),
               array_agg(d.token ORDER BY r.n), p_seconds, true
        FROM unnest(p_receipts, v_ok) WITH ORDINALITY r(receipt, ok, n)
        CROSS JOIN LATERAL sluice.decode_receipt(r.receipt) d
        CROSS JOIN sluice.outbox_current c
        WHERE r.ok
        GROUP BY c.part;
    END IF;
    RETURN QUERY SELECT r.receipt, r.ok FROM unnest(p_receipts, v_ok) r(receipt, ok);
END $$;
