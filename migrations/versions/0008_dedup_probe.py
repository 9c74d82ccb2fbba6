"""A publish's dedup lookup probes the dedup index per id (it scanned the whole topic).

sluice.append_messages is replaced (same signature, so its privileges stay); the .sql file
next to this one has the new body and says what changed and why. Nothing is stored
differently.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0008_dedup_probe.sql")


def downgrade() -> None:
    restore_function("0004_insert_only_storage.sql", "sluice.append_messages")
