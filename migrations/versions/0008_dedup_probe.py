"""A publish's dedup lookup probes the dedup index per id (it scanned the whole topic).

sluice.append_messages is replaced (same signature, so its privileges stay); the .sql file
next to this one has the new body and says what changed and why. Nothing is stored
differently.

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-04
"""

from __future__ import annotations

import re
from pathlib import Path

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

HERE = Path(__file__).resolve().parent


def _run(sql: str) -> None:
    # asyncpg's simple-query path, as revisions 0004-0006 (text() would read `:name`
    # inside the function body as a bind parameter).
    from sqlalchemy.util import await_only

    raw = op.get_bind().connection.driver_connection
    await_only(raw.execute(sql))


def upgrade() -> None:
    _run((HERE / "0008_dedup_probe.sql").read_text())


def downgrade() -> None:
    # The body of revision 0004, taken from its file (one definition of it, not a copy).
    text = (HERE / "0004_insert_only_storage.sql").read_text()
    found = re.search(r"^CREATE FUNCTION sluice\.append_messages\(.*?^END \$\$;", text, re.S | re.M)
    assert found is not None, "sluice.append_messages not found in revision 0004"
    _run("CREATE OR REPLACE" + found.group(0)[len("CREATE") :])
