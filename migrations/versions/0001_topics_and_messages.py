"""Topics and their append-only message log.

Revision ID: 0001
Revises:
Create Date: 2026-11-30
"""

from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    # sluice_now(skew): the database clock, shifted by `skew` seconds. Every time-dependent
    # query uses it so that tests can move time forward instead of sleeping; in production
    # skew is always 0. Times come from Postgres, never from API hosts, so hosts with
    # different clocks agree on deadlines.
    op.execute(
        """
        CREATE FUNCTION sluice_now(skew double precision) RETURNS timestamptz
        LANGUAGE sql VOLATILE PARALLEL SAFE
        AS $$ SELECT clock_timestamp() + make_interval(secs => skew) $$
        """
    )
    # next_offset is the per-topic counter. Publishing increments it with an UPDATE, so the
    # row lock is held until commit: offsets of a topic are handed out in commit order and
    # a rolled-back publish also rolls the counter back (no gaps from aborts).
    op.execute(
        """
        CREATE TABLE topics (
            topic_id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name                 text NOT NULL UNIQUE,
            retention_seconds    integer NOT NULL,
            dedup_window_seconds integer NOT NULL,
            max_message_bytes    integer NOT NULL,
            next_offset          bigint NOT NULL DEFAULT 0,
            created_at           timestamptz NOT NULL DEFAULT clock_timestamp(),
            updated_at           timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    # value and headers are stored as JSON text exactly as serialised once at publish, and
    # written back into responses without being parsed again.
    op.execute(
        """
        CREATE TABLE messages (
            topic_id     bigint NOT NULL,
            msg_offset   bigint NOT NULL,
            published_at timestamptz NOT NULL,
            deliver_at   timestamptz,
            key          text,
            headers      text,
            dedup_id     text,
            value        text NOT NULL,
            PRIMARY KEY (topic_id, msg_offset)
        ) WITH (
            autovacuum_vacuum_scale_factor = 0.0,
            autovacuum_vacuum_threshold = 10000,
            autovacuum_vacuum_insert_scale_factor = 0.0,
            autovacuum_vacuum_insert_threshold = 100000
        )
        """
    )
    # Deleting a topic only records it here; its messages are removed in small batches by
    # the maintenance task, so dropping a big topic is never one long DELETE.
    op.execute(
        """
        CREATE TABLE deleted_topics (
            topic_id   bigint PRIMARY KEY,
            deleted_at timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    # Seek-by-time, retention cut-offs and publish rates look messages up by time.
    op.execute("CREATE INDEX messages_by_time ON messages (topic_id, published_at)")
    op.execute(
        "CREATE INDEX messages_by_dedup ON messages (topic_id, dedup_id) WHERE dedup_id IS NOT NULL"
    )
    # Only delayed messages are in this index: stats count the delayed ones cheaply.
    op.execute(
        "CREATE INDEX messages_delayed ON messages (topic_id, msg_offset) "
        "INCLUDE (deliver_at) WHERE deliver_at IS NOT NULL"
    )


def downgrade() -> None:
    op.execute("DROP TABLE deleted_topics")
    op.execute("DROP TABLE messages")
    op.execute("DROP TABLE topics")
    op.execute("DROP FUNCTION sluice_now(double precision)")
