"""The relay reads the clock once it holds the topic's lock.

A relay pass appended each topic's outbox messages with the time read as an argument of
sluice.append_messages, which takes the topic's lock: a pass that waited for the lock behind
an HTTP publish stored an earlier published_at under a later offset than that publish's
messages, so a seek by time to just before the pass's time landed past the publish's
messages (published after the time sought, never delivered). The pass now takes the lock
first, as sluice.publish_batch does since revision 0012; the clock is read after it, in the
same statement as before. Nothing else of the function changes: the edit below is the whole
change (migrations/sql_files.patch_function).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import patch_function, restore_function

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None

_APPEND = """        v_dedup := CASE WHEN v_row.any_dedup THEN v_row.dedups END;
        SELECT a.offsets, a.duplicates, a.first_offset INTO v_done
"""
_LOCK_THEN_APPEND = """        v_dedup := CASE WHEN v_row.any_dedup THEN v_row.dedups END;
        -- The topic's lock before the clock (revision 0013): published_at grows with the
        -- offset. append_messages takes it again, which its holder gets at once.
        PERFORM pg_advisory_xact_lock(1397511169, (v_row.topic_id % 2147483647)::int);
        SELECT a.offsets, a.duplicates, a.first_offset INTO v_done
"""


def upgrade() -> None:
    patch_function("0005_sql_api.sql", "sluice.relay", [(_APPEND, _LOCK_THEN_APPEND)])


def downgrade() -> None:
    restore_function("0005_sql_api.sql", "sluice.relay")
