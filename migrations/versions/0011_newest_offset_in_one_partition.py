"""A publish finds its topic's newest offset in one partition, not after setting up all.

Adds sluice.newest_offset_in and replaces sluice.append_messages (same signature, so its
privileges stay); the .sql file next to this one says why. Nothing is stored differently.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-04
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file, run_sql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0011_newest_offset_in_one_partition.sql")


def downgrade() -> None:
    restore_function("0009_dedup_recent_segments.sql", "sluice.append_messages")
    run_sql("DROP FUNCTION sluice.newest_offset_in(bigint, integer)")
