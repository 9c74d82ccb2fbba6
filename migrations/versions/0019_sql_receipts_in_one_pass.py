"""The SQL API's ack and nack check their receipts in one pass.

sluice.receipts_apply is restated as one set of joins (the .sql file next to this one says
why and what was measured); the edits below make sluice.settle_later decode each receipt
once, for the check and for the outbox row.

Revision ID: 0019
Revises: 0018
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import patch_function, restore_function, run_file

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None

_DECLARE = """\
    v_ok boolean[];
BEGIN
"""
_DECLARE_DECODED = """\
    v_ok boolean[];
    d_lease bigint[];
    d_seg integer[];
    d_off bigint[];
    d_tok uuid[];
BEGIN
"""
# (The first line is 0011's own, longer than this file's lines may be.)
_CHECK = (
    "    v_ok := (SELECT sluice.receipts_apply(v_topic_id, v_sub_id, "
    "array_agg(coalesce(d.lease_id, -1) ORDER BY r.n),\n"
    """\
                                          array_agg(d.seg ORDER BY r.n),
                                          array_agg(d.msg_offset ORDER BY r.n),
                                          array_agg(d.token ORDER BY r.n), v_now)
             FROM unnest(p_receipts) WITH ORDINALITY r(receipt, n)
             LEFT JOIN LATERAL sluice.decode_receipt(r.receipt) d ON true);
"""
)
_CHECK_DECODED_ONCE = """\
    -- Each receipt decoded once, for the check and the outbox row (0019).
    SELECT array_agg(coalesce(d.lease_id, -1) ORDER BY r.n), array_agg(d.seg ORDER BY r.n),
           array_agg(d.msg_offset ORDER BY r.n), array_agg(d.token ORDER BY r.n)
    INTO d_lease, d_seg, d_off, d_tok
    FROM unnest(p_receipts) WITH ORDINALITY r(receipt, n)
    LEFT JOIN LATERAL sluice.decode_receipt(r.receipt) d ON true;
    v_ok := sluice.receipts_apply(v_topic_id, v_sub_id, d_lease, d_seg, d_off, d_tok, v_now);
"""
_OUTBOX = """\
               v_now, v_sub_id, array_agg(d.lease_id ORDER BY r.n),
               array_agg(d.seg ORDER BY r.n), array_agg(d.msg_offset ORDER BY r.n),
               array_agg(d.token ORDER BY r.n), p_seconds, true
        FROM unnest(p_receipts, v_ok) WITH ORDINALITY r(receipt, ok, n)
        CROSS JOIN LATERAL sluice.decode_receipt(r.receipt) d
        CROSS JOIN sluice.outbox_current c
"""
_OUTBOX_DECODED = """\
               v_now, v_sub_id, array_agg(r.lease_id ORDER BY r.n),
               array_agg(r.seg ORDER BY r.n), array_agg(r.msg_offset ORDER BY r.n),
               array_agg(r.token ORDER BY r.n), p_seconds, true
        FROM unnest(v_ok, d_lease, d_seg, d_off, d_tok) WITH ORDINALITY
             r(ok, lease_id, seg, msg_offset, token, n)
        CROSS JOIN sluice.outbox_current c
"""


def upgrade() -> None:
    run_file("0019_sql_receipts_in_one_pass.sql")
    patch_function(
        "0011_outbox_notify_at_commit.sql",
        "sluice.settle_later",
        [(_DECLARE, _DECLARE_DECODED), (_CHECK, _CHECK_DECODED_ONCE), (_OUTBOX, _OUTBOX_DECODED)],
    )


def downgrade() -> None:
    restore_function("0005_sql_api.sql", "sluice.receipts_apply")
    restore_function("0011_outbox_notify_at_commit.sql", "sluice.settle_later")
