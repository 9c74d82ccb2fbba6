"""Insert-only storage in schema `sluice`: segments, leases by claim, lease events, timers.

A long transaction elsewhere in the database (a report, pg_dump, a replica's feedback) holds
back the xmin horizon: no row version that died after its snapshot can be removed, and a
queue that updates or deletes a row per message walks ever longer chains of them. From this
revision on nothing written per message or per request is ever updated or deleted; state
changes are new rows, and old rows go away with their segment (a DROP of whole partitions).
docs/design.md, "Storage", tells the whole design. The schema and its functions are in the
.sql file next to this one; this file moves the data of revision 0003 over (messages,
subscriptions with their cursors, leases with their receipts, retry times, held-back keys,
dead letters, API keys) and drops the old tables.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-03
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None

HERE = Path(__file__).resolve().parent


def upgrade() -> None:
    run_script(HERE / "0004_insert_only_storage.sql")
    # One open segment per retention lane; existing messages go to their topic's lane.
    op.execute(
        "SELECT sluice.open_segment(lane, clock_timestamp()) FROM generate_series(0, 3) lane"
    )
    _move_data()
    op.execute(
        "DROP TABLE public.subscription_rates, public.deliveries, public.subscriptions, "
        "public.deleted_topics, public.messages, public.topics, public.api_keys"
    )
    op.execute("DROP FUNCTION public.sluice_now(double precision)")


def _move_data() -> None:
    # Topics keep their ids (receipts and rates name them). Their retention floor is where
    # the retained log starts: everything below was removed by the old retention.
    op.execute(
        """
        INSERT INTO sluice.topics (topic_id, name, retention_seconds, dedup_window_seconds,
                                   max_message_bytes, retention_floor, created_at, updated_at)
        OVERRIDING SYSTEM VALUE
        SELECT t.topic_id, t.name, t.retention_seconds, t.dedup_window_seconds,
               t.max_message_bytes,
               coalesce((SELECT min(m.msg_offset) FROM public.messages m
                         WHERE m.topic_id = t.topic_id), t.next_offset),
               t.created_at, t.updated_at
        FROM public.topics t
        """
    )
    op.execute(
        """
        INSERT INTO sluice.topic_segments (topic_id, seg, first_offset)
        SELECT t.topic_id, g.seg, t.retention_floor FROM sluice.topics t
        JOIN sluice.segments g ON g.lane = sluice.lane_of(t.retention_seconds)
                              AND g.closed_at IS NULL
        WHERE EXISTS (SELECT 1 FROM public.messages m WHERE m.topic_id = t.topic_id)
        """
    )
    op.execute(
        """
        INSERT INTO sluice.messages (topic_id, msg_offset, seg, published_at, deliver_at, key,
                                     headers, dedup_id, value)
        SELECT m.topic_id, m.msg_offset, ts.seg, m.published_at, m.deliver_at, m.key,
               m.headers, m.dedup_id, m.value
        FROM public.messages m JOIN sluice.topic_segments ts USING (topic_id)
        """
    )
    op.execute(
        """
        INSERT INTO sluice.subscriptions (topic_id, sub_id, name, ack_deadline_seconds,
            max_deliveries, retry_min_seconds, retry_max_seconds, dead_letter_topic,
            ordered_by_key, rate_limit_per_second, rate_limit_burst, max_in_flight,
            created_at, updated_at)
        OVERRIDING SYSTEM VALUE
        SELECT topic_id, sub_id, name, ack_deadline_seconds, max_deliveries, retry_min_seconds,
               retry_max_seconds, dead_letter_topic, ordered_by_key,
               -- 0003 took any positive rate: below 0.001/s the token maths overflowed.
               CASE WHEN rate_limit_per_second IS NOT NULL
                    THEN greatest(rate_limit_per_second, 0.001) END,
               rate_limit_burst, max_in_flight, created_at, updated_at
        FROM public.subscriptions
        """
    )
    for table, column in (("topics", "topic_id"), ("subscriptions", "sub_id")):
        op.execute(
            f"SELECT setval(pg_get_serial_sequence('sluice.{table}', '{column}'), "
            f"coalesce((SELECT max({column}) FROM sluice.{table}), 0) + 1, false)"
        )
    # Leases out now: one lease per subscription (id -sub_id) with the receipts' own tokens
    # and deadlines, so receipts handed out before the upgrade still ack.
    op.execute(
        """
        INSERT INTO sluice.leases (topic_id, sub_id, lease_id, seg, epoch, offsets, attempts,
                                   secret, tokens, untils, leased_at, lease_until)
        SELECT d.topic_id, d.sub_id, -d.sub_id,
               sluice.write_segment(d.topic_id, sluice.lane_of(t.retention_seconds)), 0,
               array_agg(d.msg_offset ORDER BY d.msg_offset),
               array_agg(d.attempts ORDER BY d.msg_offset), gen_random_uuid(),
               array_agg(d.lease_token ORDER BY d.msg_offset),
               array_agg(d.lease_until ORDER BY d.msg_offset), clock_timestamp(),
               max(d.lease_until)
        FROM public.deliveries d JOIN sluice.topics t USING (topic_id)
        WHERE d.state = 'leased'
          AND EXISTS (SELECT 1 FROM sluice.subscriptions s
                      WHERE s.topic_id = d.topic_id AND s.sub_id = d.sub_id)
        GROUP BY d.topic_id, d.sub_id, t.retention_seconds
        """
    )
    op.execute(
        """
        INSERT INTO sluice.sub_states
        SELECT s.topic_id, s.sub_id, nextval('sluice.state_ids'),
               sluice.write_segment(s.topic_id, sluice.lane_of(t.retention_seconds)),
               0, 0, s.next_offset, '-infinity', 0, 0,
               CASE WHEN l.lease_id IS NULL THEN '{}' ELSE ARRAY[l.lease_id] END,
               CASE WHEN l.lease_id IS NULL THEN '{}' ELSE ARRAY[l.seg] END,
               CASE WHEN l.lease_id IS NULL THEN '{}' ELSE ARRAY[cardinality(l.offsets)] END,
               CASE WHEN l.lease_id IS NULL THEN '{}' ELSE ARRAY[0] END,
               CASE WHEN l.lease_id IS NULL THEN '{}'
                    ELSE ARRAY[(SELECT min(u) FROM unnest(l.untils) u)] END,
               CASE WHEN l.lease_id IS NULL THEN '{}' ELSE ARRAY[l.offsets[1]] END,
               s.tokens, s.tokens_at, s.delivered_total
        FROM public.subscriptions s JOIN sluice.topics t USING (topic_id)
        LEFT JOIN sluice.leases l ON l.topic_id = s.topic_id AND l.sub_id = s.sub_id
                                 AND l.lease_id = -s.sub_id
        """
    )
    # Messages waiting for a time (delay, backoff, redrive): a timer each.
    op.execute(
        """
        INSERT INTO sluice.timers (topic_id, sub_id, due_at, timer_id, seg, epoch, offsets,
                                   attempts)
        SELECT d.topic_id, d.sub_id, d.due_at, nextval('sluice.timer_ids'), ts.seg, 0,
               ARRAY[d.msg_offset], ARRAY[d.attempts]
        FROM public.deliveries d JOIN sluice.topic_segments ts USING (topic_id)
        WHERE d.state = 'ready'
          AND EXISTS (SELECT 1 FROM sluice.subscriptions s
                      WHERE s.topic_id = d.topic_id AND s.sub_id = d.sub_id)
        """
    )
    # Key ordering: every pending keyed message enters its key's FIFO in offset order; the
    # first of each key is the one leased or waiting, the others (blocked) wait behind it.
    op.execute(
        """
        INSERT INTO sluice.key_waits (topic_id, sub_id, key_gen, key, wait_id, seg,
                                      msg_offset, attempts)
        SELECT x.topic_id, x.sub_id, 0, x.key, nextval('sluice.wait_ids'), x.seg,
               x.msg_offset, x.attempts
        FROM (SELECT d.topic_id, d.sub_id, d.key, ts.seg, d.msg_offset, d.attempts
              FROM public.deliveries d JOIN sluice.topic_segments ts USING (topic_id)
              JOIN sluice.subscriptions s ON s.topic_id = d.topic_id AND s.sub_id = d.sub_id
              WHERE s.ordered_by_key AND d.key IS NOT NULL AND d.state <> 'dead'
              ORDER BY d.topic_id, d.sub_id, d.msg_offset) x
        """
    )
    op.execute(
        """
        INSERT INTO sluice.dead_letters (topic_id, sub_id, msg_offset, event_id, seg, kind,
                                         attempts, at)
        SELECT d.topic_id, d.sub_id, d.msg_offset, nextval('sluice.dead_letter_ids'), ts.seg,
               'dead', d.attempts, coalesce(d.dead_at, d.due_at)
        FROM public.deliveries d JOIN sluice.topic_segments ts USING (topic_id)
        WHERE d.state = 'dead'
          AND EXISTS (SELECT 1 FROM sluice.subscriptions s
                      WHERE s.topic_id = d.topic_id AND s.sub_id = d.sub_id)
        """
    )
    op.execute(
        """
        INSERT INTO sluice.subscription_rates
        SELECT r.* FROM public.subscription_rates r
        WHERE EXISTS (SELECT 1 FROM sluice.subscriptions s
                      WHERE s.topic_id = r.topic_id AND s.sub_id = r.sub_id)
        """
    )
    op.execute(
        """
        INSERT INTO sluice.api_keys (id, name, secret_hash, scopes, created_at, revoked_at)
        OVERRIDING SYSTEM VALUE
        SELECT id, name, secret_hash, scopes, created_at, revoked_at FROM public.api_keys
        """
    )
    op.execute(
        "SELECT setval(pg_get_serial_sequence('sluice.api_keys', 'id'), "
        "coalesce((SELECT max(id) FROM sluice.api_keys), 0) + 1, false)"
    )


def run_script(path: Path) -> None:
    """Run a file of SQL statements as it is, on the migration's own connection: asyncpg's
    simple-query path takes many statements (the prepared path takes one), and SQLAlchemy's
    text() would read `:name` inside function bodies as bind parameters."""
    from sqlalchemy.util import await_only

    raw = op.get_bind().connection.driver_connection
    await_only(raw.execute(path.read_text()))


def _legacy(revision_file: str) -> object:
    spec = importlib.util.spec_from_file_location(revision_file, HERE / revision_file)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def downgrade() -> None:
    # The tables of revision 0003, then what maps onto them: topics, messages, API keys,
    # subscriptions with their cursor at the committed offset (what was in flight or waiting
    # is delivered again: at-least-once holds) and their dead letters.
    for name in (
        "0001_topics_and_messages.py",
        "0002_subscriptions_and_deliveries.py",
        "0003_api_keys.py",
    ):
        _legacy(name).upgrade()  # type: ignore[attr-defined]
    op.execute(
        """
        INSERT INTO public.topics (topic_id, name, retention_seconds, dedup_window_seconds,
                                   max_message_bytes, next_offset, created_at, updated_at)
        OVERRIDING SYSTEM VALUE
        SELECT topic_id, name, retention_seconds, dedup_window_seconds, max_message_bytes,
               sluice.next_offset(topic_id), created_at, updated_at
        FROM sluice.topics
        """
    )
    op.execute(
        """
        INSERT INTO public.messages (topic_id, msg_offset, published_at, deliver_at, key,
                                     headers, dedup_id, value)
        SELECT m.topic_id, m.msg_offset, m.published_at, m.deliver_at, m.key, m.headers,
               m.dedup_id, m.value
        FROM sluice.messages m JOIN sluice.topics t USING (topic_id)
        WHERE m.msg_offset >= t.retention_floor
        """
    )
    op.execute(
        """
        INSERT INTO public.subscriptions (topic_id, sub_id, name, ack_deadline_seconds,
            max_deliveries, retry_min_seconds, retry_max_seconds, dead_letter_topic,
            ordered_by_key, rate_limit_per_second, rate_limit_burst, max_in_flight,
            next_offset, tokens, tokens_at, delivered_total, created_at, updated_at)
        OVERRIDING SYSTEM VALUE
        SELECT s.topic_id, s.sub_id, s.name, s.ack_deadline_seconds, s.max_deliveries,
               s.retry_min_seconds, s.retry_max_seconds, s.dead_letter_topic, s.ordered_by_key,
               s.rate_limit_per_second, s.rate_limit_burst, s.max_in_flight,
               coalesce(least(x.lowest_pending, x.cursor), x.cursor), st.tokens, st.tokens_at,
               st.delivered_total, s.created_at, s.updated_at
        FROM sluice.subscriptions s
        CROSS JOIN LATERAL sluice.state_of(s.topic_id, s.sub_id) st
        CROSS JOIN LATERAL sluice.subscription_stats(s.topic_id, s.sub_id, 0) x
        """
    )
    op.execute(
        """
        INSERT INTO public.deliveries (topic_id, sub_id, msg_offset, state, due_at, attempts,
                                       dead_at)
        SELECT d.topic_id, d.sub_id, d.msg_offset, 'dead', d.at, d.attempts, d.at
        FROM (SELECT DISTINCT ON (x.topic_id, x.sub_id, x.msg_offset) x.*
              FROM sluice.dead_letters x
              ORDER BY x.topic_id, x.sub_id, x.msg_offset, x.event_id DESC) d
        JOIN sluice.topics t USING (topic_id)
        WHERE d.kind = 'dead' AND d.msg_offset >= t.retention_floor
          AND EXISTS (SELECT 1 FROM public.subscriptions s
                      WHERE s.topic_id = d.topic_id AND s.sub_id = d.sub_id)
        """
    )
    op.execute(
        """
        INSERT INTO public.api_keys (id, name, secret_hash, scopes, created_at, revoked_at)
        OVERRIDING SYSTEM VALUE
        SELECT id, name, secret_hash, scopes, created_at, revoked_at FROM sluice.api_keys
        """
    )
    for table, column in (("topics", "topic_id"), ("subscriptions", "sub_id"), ("api_keys", "id")):
        op.execute(
            f"SELECT setval(pg_get_serial_sequence('public.{table}', '{column}'), "
            f"coalesce((SELECT max({column}) FROM public.{table}), 0) + 1, false)"
        )
    # Everything of this revision, but not the schema itself: Alembic's version table
    # lives there (migrations/env.py).
    op.execute(
        """
        DO $$
        DECLARE
            r record;
        BEGIN
            FOR r IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'sluice' AND c.relkind IN ('r', 'p')
                       AND c.relname <> 'alembic_version' AND c.relispartition IS FALSE LOOP
                EXECUTE format('DROP TABLE IF EXISTS sluice.%I CASCADE', r.relname);
            END LOOP;
            FOR r IN SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                     WHERE n.nspname = 'sluice' AND c.relkind = 'S' LOOP
                EXECUTE format('DROP SEQUENCE IF EXISTS sluice.%I CASCADE', r.relname);
            END LOOP;
            FOR r IN SELECT p.oid::regprocedure AS sig FROM pg_proc p
                     JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = 'sluice' LOOP
                EXECUTE format('DROP FUNCTION IF EXISTS %s CASCADE', r.sig);
            END LOOP;
        END $$
        """
    )
