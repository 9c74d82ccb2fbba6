"""SQS-compatible endpoint: queue attributes and tags; SQS access key ids of API keys.

A queue is a topic plus the subscription `sqs` (docs/sqs.md). What SQS keeps about a queue
and Sluice's topic and subscription do not (tags, the raw attributes as the client set
them, their timestamps) is one row per queue, updated only by configuration calls
(CreateQueue, SetQueueAttributes, TagQueue): never per message. It leads with the topic
and goes with it (ON DELETE CASCADE).

An API key may carry an SQS access key id. Its signing secret is never stored: it is
derived from the server's SLUICE_SQS_SECRET and the id (app/access/sigv4.py).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute(
        """
        CREATE TABLE sluice.sqs_queues (
            topic_id    bigint PRIMARY KEY
                        REFERENCES sluice.topics (topic_id) ON DELETE CASCADE,
            -- The SQS name (may end in .fifo, which topic names cannot hold).
            queue_name  text NOT NULL UNIQUE,
            -- The attributes as SQS shows them (strings), e.g. {"VisibilityTimeout": "30"}.
            attributes  jsonb NOT NULL,
            tags        jsonb NOT NULL DEFAULT '{}'::jsonb,
            created_at  timestamptz NOT NULL DEFAULT clock_timestamp(),
            updated_at  timestamptz NOT NULL DEFAULT clock_timestamp()
        )
        """
    )
    op.execute("ALTER TABLE sluice.api_keys ADD COLUMN sqs_access_key_id text UNIQUE")


def downgrade() -> None:
    op.execute("ALTER TABLE sluice.api_keys DROP COLUMN sqs_access_key_id")
    op.execute("DROP TABLE sluice.sqs_queues")
