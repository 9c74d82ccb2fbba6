"""A publish notifies only when some process has a long-poll waiting for its topic.

sluice.append_messages is replaced (same signature, so its privileges stay); the .sql file
next to this one says what changed and why. Nothing is stored differently.

Revision ID: 0010
Revises: 0009
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0010_notify_only_waiters.sql")


def downgrade() -> None:
    restore_function("0008_publish_lookups.sql", "sluice.append_messages")
