"""An ack, nack or give-back notifies only while some process has a long-poll waiting on the
topic's bucket, as publishes do since revision 0010.

sluice.settle sent a NOTIFY whenever what it settled could let a waiting pull go on: an ack
under max_in_flight (room in flight), a key released under key ordering, a nack or a give-back
(deliverable again). A transaction that has notified takes, at its commit, the lock of the
whole server's notification queue and holds it until its commit is flushed, so the commits of
every notifying transaction of the server took turns, though most of those acks have nobody
to wake (consumers busy with a backlog). It now tries the topic's interest key exclusively,
as sluice.append_messages does (revision 0010's .sql file says why that is exact: a listener
declaring the key waits for this transaction to end, and its long-polls claim again once the
key is theirs). The edit below is the whole change (migrations/sql_files.patch_function).

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import patch_function, restore_function

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None

_NOTIFY = """    IF v_wake > 0 THEN
        PERFORM pg_notify('sluice', s.topic_id::text || ':' || v_wake::text);
    END IF;
"""
_NOTIFY_WAITERS = """    -- Only while some process declares waiters on the bucket (revision 0014).
    IF v_wake > 0
       AND NOT pg_try_advisory_xact_lock(1397511171, (s.topic_id % 256)::int) THEN
        PERFORM pg_notify('sluice', s.topic_id::text || ':' || v_wake::text);
    END IF;
"""


def upgrade() -> None:
    patch_function("0006_dead_letter_on_nack.sql", "sluice.settle", [(_NOTIFY, _NOTIFY_WAITERS)])


def downgrade() -> None:
    restore_function("0006_dead_letter_on_nack.sql", "sluice.settle")
