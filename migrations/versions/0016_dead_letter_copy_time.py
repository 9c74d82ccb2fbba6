"""A dead-letter copy's time is no earlier than its dead-letter topic's newest message.

sluice.park stamped the copies it appends to the dead-letter topic with the time its claim or
settle started (or, through the relay, the time the application's nack was made): the
dead-letter topic's lock is taken later, in sluice.append_messages, so a copy could get an
earlier published_at than a message published to that topic just before, under a later
offset, and a seek by time on the dead-letter topic could skip that message. park now takes
the topic's lock first and stamps the copies with the later of that time and the topic's
newest published_at (one look-up per parked batch, a rare path). The edits below are the
whole change (migrations/sql_files.patch_function).

Revision ID: 0016
Revises: 0015
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import patch_function, restore_function

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None

_DECLARE = """\
    v_skipped integer := 0;
BEGIN
"""
_DECLARE_TIME = """\
    v_skipped integer := 0;
    v_at timestamptz;
BEGIN
"""
_APPEND = """\
    IF cardinality(v_values) > 0 THEN
        PERFORM sluice.append_messages(v_target.topic_id, v_values, v_keys, v_headers,
                                       NULL, NULL, p_now);
    END IF;
"""
_LOCK_THEN_APPEND = """\
    IF cardinality(v_values) > 0 THEN
        -- The topic's lock, then its newest time: the copies never go back in time (0016).
        PERFORM pg_advisory_xact_lock(1397511169, (v_target.topic_id % 2147483647)::int);
        SELECT greatest(p_now, max(m.published_at)) INTO v_at
        FROM sluice.messages m WHERE m.topic_id = v_target.topic_id;
        PERFORM sluice.append_messages(v_target.topic_id, v_values, v_keys, v_headers,
                                       NULL, NULL, v_at);
    END IF;
"""


def upgrade() -> None:
    patch_function(
        "0004_insert_only_storage.sql",
        "sluice.park",
        [(_DECLARE, _DECLARE_TIME), (_APPEND, _LOCK_THEN_APPEND)],
    )


def downgrade() -> None:
    restore_function("0004_insert_only_storage.sql", "sluice.park")
