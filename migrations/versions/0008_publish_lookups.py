"""What a publish looks up costs what the batch needs, not what the topic or the table holds.

sluice.append_messages is replaced (same signature, so its privileges stay) and
sluice.newest_offset_in added; the .sql file next to this one says what changed and why.
Nothing is stored differently.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file, run_sql

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0008_publish_lookups.sql")


def downgrade() -> None:
    restore_function("0004_insert_only_storage.sql", "sluice.append_messages")
    run_sql("DROP FUNCTION sluice.newest_offset_in(bigint, integer)")
