"""A publish's dedup probes look in the topic's recent segments, not every partition.

sluice.append_messages is replaced (same signature, so its privileges stay); the .sql file
next to this one has the new body and says what changed and why. Nothing is stored
differently.

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-04
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0009_dedup_recent_segments.sql")


def downgrade() -> None:
    restore_function("0008_dedup_probe.sql", "sluice.append_messages")
