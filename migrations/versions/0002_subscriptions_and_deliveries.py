"""Subscriptions (consumer groups) and their delivery state.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30
"""

from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # next_offset is the subscription's cursor over the topic log: every message below it
    # has been taken into `deliveries` (or acknowledged). Messages at or above it are
    # pending without any per-subscription row, so publishing costs the same for 1 or 100
    # subscriptions. The token bucket lives here so every API process shares it.
    op.execute(
        """
        CREATE TABLE subscriptions (
            topic_id              bigint NOT NULL REFERENCES topics ON DELETE CASCADE,
            sub_id                bigint GENERATED ALWAYS AS IDENTITY,
            name                  text NOT NULL,
            ack_deadline_seconds  integer NOT NULL,
            max_deliveries        integer NOT NULL,
            retry_min_seconds     double precision NOT NULL,
            retry_max_seconds     double precision NOT NULL,
            dead_letter_topic     text,
            ordered_by_key        boolean NOT NULL,
            rate_limit_per_second double precision,
            rate_limit_burst      integer,
            max_in_flight         integer,
            next_offset           bigint NOT NULL,
            tokens                double precision NOT NULL DEFAULT 0,
            tokens_at             timestamptz NOT NULL DEFAULT clock_timestamp(),
            delivered_total       bigint NOT NULL DEFAULT 0,
            created_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
            updated_at            timestamptz NOT NULL DEFAULT clock_timestamp(),
            PRIMARY KEY (topic_id, sub_id),
            UNIQUE (topic_id, name)
        ) WITH (fillfactor = 50)
        """
    )
    # One row per message a subscription has taken from the log and not yet acknowledged:
    #   ready   deliverable at due_at (a delay, a retry backoff, a redrive or a seek)
    #   leased  delivered; lease ends at lease_until, and if not acked it becomes
    #           deliverable again at due_at (= lease_until + backoff)
    #   blocked ordered_by_key: waits behind an earlier message of the same key
    #   dead    parked after max_deliveries
    # Acknowledging deletes the row. lease_token is the fencing token inside the receipt.
    # No foreign key to subscriptions: its check would cost every claimed row a look-up;
    # deleting a subscription or topic deletes its rows explicitly (storage layer).
    op.execute(
        """
        CREATE TABLE deliveries (
            topic_id    bigint NOT NULL,
            sub_id      bigint NOT NULL,
            msg_offset  bigint NOT NULL,
            state       text NOT NULL CHECK (state IN ('ready', 'leased', 'blocked', 'dead')),
            due_at      timestamptz NOT NULL,
            lease_until timestamptz,
            lease_token uuid,
            attempts    integer NOT NULL DEFAULT 0,
            key         text,
            dead_at     timestamptz,
            PRIMARY KEY (topic_id, sub_id, msg_offset)
        ) WITH (
            fillfactor = 70,
            autovacuum_vacuum_scale_factor = 0.0,
            autovacuum_vacuum_threshold = 2000,
            autovacuum_vacuum_cost_delay = 0
        )
        """
    )
    # The claim index: only rows that can become deliverable by time, ordered by that time.
    # Blocked and dead rows are not in it, so thousands of messages stuck behind one key
    # never make a claim scan them.
    op.execute(
        "CREATE INDEX deliveries_due ON deliveries (topic_id, sub_id, due_at) "
        "WHERE state IN ('ready', 'leased')"
    )
    # Key ordering: "is an earlier message of this key still pending?" and "which message
    # of this key is next?". key is only stored for ordered_by_key subscriptions.
    op.execute(
        "CREATE INDEX deliveries_by_key ON deliveries (topic_id, sub_id, key, msg_offset) "
        "WHERE key IS NOT NULL AND state <> 'dead'"
    )
    op.execute(
        "CREATE INDEX deliveries_dead ON deliveries (topic_id, sub_id, msg_offset) "
        "WHERE state = 'dead'"
    )
    # Per-subscription event counts in 10-second buckets, for delivered/acked/... rates that
    # hold across every API process. Each process adds its counts about once a second.
    op.execute(
        """
        CREATE TABLE subscription_rates (
            topic_id      bigint NOT NULL,
            sub_id        bigint NOT NULL,
            bucket        timestamptz NOT NULL,
            delivered     bigint NOT NULL DEFAULT 0,
            acked         bigint NOT NULL DEFAULT 0,
            nacked        bigint NOT NULL DEFAULT 0,
            expired       bigint NOT NULL DEFAULT 0,
            dead_lettered bigint NOT NULL DEFAULT 0,
            PRIMARY KEY (topic_id, sub_id, bucket),
            FOREIGN KEY (topic_id, sub_id) REFERENCES subscriptions ON DELETE CASCADE
        )
        """
    )


def downgrade() -> None:
    op.execute("DROP TABLE subscription_rates")
    op.execute("DROP TABLE deliveries")
    op.execute("DROP TABLE subscriptions")
