"""The SQL API wakes the relays at the application's commit only when a relay waits.

sluice.send_batch and sluice.settle_later are replaced without their NOTIFY (same
signatures, so their privileges stay); a deferred constraint trigger on the outbox notifies
at commit when a relay has declared that it waits (outbox.wakes, new, marks the one row per
call it runs for). The .sql file next to this one says why.

Revision ID: 0011
Revises: 0010
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import restore_function, run_file, run_sql

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0011_outbox_notify_at_commit.sql")


def downgrade() -> None:
    run_sql("DROP TRIGGER outbox_wakes_relays ON sluice.outbox")
    run_sql("DROP FUNCTION sluice.outbox_committing()")
    for function in ("sluice.send_batch", "sluice.settle_later"):
        restore_function("0005_sql_api.sql", function)
    run_sql("ALTER TABLE sluice.outbox DROP COLUMN wakes")
