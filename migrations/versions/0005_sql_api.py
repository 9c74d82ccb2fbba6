"""Publish, ack and nack from SQL inside the application's transaction; read-only views.

The functions, the outbox they write to (insert-only, three partitions emptied in rotation)
and the relay that moves what committed into the log are in the .sql file next to this one;
docs/design.md, "SQL API", tells the design and its proof.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04
"""

from __future__ import annotations

from pathlib import Path

from alembic import op

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None

HERE = Path(__file__).resolve().parent


def upgrade() -> None:
    from sqlalchemy.util import await_only

    # asyncpg's simple-query path runs the whole file (see revision 0004's run_script).
    raw = op.get_bind().connection.driver_connection
    await_only(raw.execute((HERE / "0005_sql_api.sql").read_text()))


def downgrade() -> None:
    # Whatever is still in the outbox (committed but not relayed yet) is lost with it.
    op.execute(
        "DROP VIEW sluice.topic_messages, sluice.topic_stats, sluice.subscription_stats, "
        "sluice.dead_letter_messages"
    )
    for signature in (
        "send_batch(text, jsonb[], text[], jsonb[], text[], integer[])",
        "send(text, jsonb, text, jsonb, text, integer)",
        "ack(text, text, text[])",
        "nack(text, text, text[], double precision)",
        "settle_later(text, text, text, text[], double precision)",
        "receipts_apply(bigint, bigint, bigint[], integer[], bigint[], uuid[], timestamptz)",
        "decode_receipt(text)",
        "relay(integer, double precision)",
        "outbox_parts_to_empty()",
        "empty_outbox_part(smallint)",
        "rotate_outbox(double precision, timestamptz)",
        "sql_now()",
    ):
        op.execute(f"DROP FUNCTION sluice.{signature}")
    op.execute("DROP TABLE sluice.outbox, sluice.outbox_current")
    op.execute("DROP SEQUENCE sluice.outbox_ids")
    op.execute("GRANT EXECUTE ON ALL FUNCTIONS IN SCHEMA sluice TO PUBLIC")
    op.execute("ALTER DEFAULT PRIVILEGES IN SCHEMA sluice GRANT EXECUTE ON FUNCTIONS TO PUBLIC")
