"""A subscription's newest state row is looked up in one partition, not in all of them.

Adds subscriptions.state_seg (the segment that holds the subscription's state rows) and
replaces sluice.state_of, sluice.init_state and sluice.drop_segment (same signatures: their
privileges stay); the .sql file next to this one says why.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file, run_sql

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0009_state_in_one_partition.sql")


def downgrade() -> None:
    for function in ("sluice.state_of", "sluice.init_state", "sluice.drop_segment"):
        restore_function("0004_insert_only_storage.sql", function)
    run_sql("ALTER TABLE sluice.subscriptions DROP COLUMN state_seg")
