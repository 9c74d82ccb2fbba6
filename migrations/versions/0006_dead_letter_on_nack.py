"""A nack can ask for a dead letter: sluice.settle takes the kind 'dead_letter'.

The function is replaced (same signature, so its privileges stay); the .sql file next to
this one has the new body and says what changed. Nothing is stored differently: a dead
letter asked for is recorded exactly as the parking nack of a last attempt.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0006_dead_letter_on_nack.sql")


def downgrade() -> None:
    restore_function("0004_insert_only_storage.sql", "sluice.settle")
