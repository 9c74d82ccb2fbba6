"""An ack's cost follows its receipts, not the size of their lease.

sluice.settle found each receipt's member of its lease, and checked it against the members
already settled, by searching arrays as long as the lease; it now joins the receipts to
them. The .sql file next to this one says why and what was measured.

Revision ID: 0018
Revises: 0017
Create Date: 2026-12-05
"""

from __future__ import annotations

from importlib import import_module

from sluice.migrations.sql_files import run_file

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    run_file("0018_settle_receipts_by_join.sql")


def downgrade() -> None:
    # sluice.settle as revision 0014 left it: 0006's body with 0014's edit.
    import_module("sluice.migrations.versions.0014_settle_notifies_only_waiters").upgrade()
