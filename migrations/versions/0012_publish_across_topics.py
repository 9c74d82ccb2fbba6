"""One transaction publishes the grouped requests of several topics (sluice.publish_topics).

A process now has one publish writer instead of one per topic; a group with the requests of
several topics is written by this new function, which appends each topic's messages under
that topic's lock as before, waiting for none while it holds another; sluice.publish_batch
(a group of one topic) now reads the clock once it holds the topic's lock. The .sql file
next to this one says why.

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file, run_sql

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0012_publish_across_topics.sql")


def downgrade() -> None:
    restore_function("0004_insert_only_storage.sql", "sluice.publish_batch")
    run_sql(
        "DROP FUNCTION sluice.publish_topics(text[], integer[], integer[], text[], text[], "
        "text[], integer[], text[], double precision)"
    )
