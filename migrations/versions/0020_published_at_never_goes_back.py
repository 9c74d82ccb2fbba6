"""A message's published_at is not earlier than the one of the message before it, unless the
clock was stepped back by more than 5 minutes.

sluice.append_messages stamped a batch with the time its caller read from the clock once the
topic's lock was held (revisions 0012, 0013, 0016), so published_at grew with the offset as
long as the wall clock did. A clock stepped backwards (not slewed: an NTP step after the
clock ran fast, a manual `date`, a VM restored from a snapshot) stamped the next messages
earlier than the ones before them, under later offsets, and a seek by time into that
stretch landed up to the step late, skipping messages published after the time sought
(docs/design.md, "Commit-ordered offsets, without a counter row"). A batch's published_at
is now the later of the clock's time and the topic's newest message's, read in the same
statement that finds the newest offset: during a step back the messages carry the time of
the last one before it until the clock catches up.

Only when that message is at most 5 minutes ahead of the clock (the slack the dedup look-up
already allows for, 0008). A step back tells a clock that was wrong before from one that is
wrong now no better than its size does; holding every later stamp at a time far ahead
would hold the topic's retention (its floor is the first message stamped within retention)
and its dedup window there too, for as long as the clock took to catch up, where without
the bound only the messages stamped while the clock ran fast are off. Delays and the dedup
window count from the clock (a delay counted from the newest message's time would hold a
message back for the step too). Backend CPU of a `publish_batch` of one 1 KiB message, one
session, 4 x 600 calls alternated with revision 0010's function: 136 us median before, 135
after (bench/RESULTS.md run 35).

sluice.newest_offset_in becomes sluice.newest_message_in, which returns that message's
time with its offset (a PL/pgSQL function, as 0008 says why: its segment is a parameter,
planned for one partition). The edits below are the whole change to append_messages
(migrations/sql_files.patch_function).

Revision ID: 0020
Revises: 0019
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import patch_function, restore_function, run_sql

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None

_NEWEST_MESSAGE_IN = """
CREATE FUNCTION sluice.newest_message_in(
    p_topic_id bigint, p_seg integer, OUT msg_offset bigint, OUT published_at timestamptz)
LANGUAGE plpgsql STABLE AS $$
BEGIN
    SELECT m.msg_offset, m.published_at INTO msg_offset, published_at
    FROM sluice.messages m
    WHERE m.topic_id = p_topic_id AND m.seg = p_seg
    ORDER BY m.msg_offset DESC LIMIT 1;
END $$;
COMMENT ON FUNCTION sluice.newest_message_in(bigint, integer) IS
    'The offset and time of the newest message of a topic in one segment (NULLs when none)';
"""

_DECLARE = """\
    v_dedup_segs integer[];
BEGIN
"""
_DECLARE_HEAD_AT = """\
    v_dedup_segs integer[];
    v_head_at timestamptz;
    v_published_at timestamptz;
BEGIN
"""
_HEAD = """\
           sluice.newest_offset_in(p_topic_id, ts.seg),
"""
_HEAD_AND_ITS_TIME = """\
           hd.msg_offset, hd.published_at,
"""
_INTO = """\
    INTO v_floor, v_window, v_last_seg, v_last_first, v_head, v_seg
"""
_INTO_HEAD_AT = """\
    INTO v_floor, v_window, v_last_seg, v_last_first, v_head, v_head_at, v_seg
"""
_NEWEST_SEGMENT = """\
                       WHERE x.topic_id = p_topic_id ORDER BY x.seg DESC LIMIT 1) ts ON true
"""
_NEWEST_SEGMENT_AND_MESSAGE = """\
                       WHERE x.topic_id = p_topic_id ORDER BY x.seg DESC LIMIT 1) ts ON true
    LEFT JOIN LATERAL sluice.newest_message_in(p_topic_id, ts.seg) hd ON true
"""
_NEXT = """\
    v_next := greatest(v_floor, coalesce(v_head + 1, v_last_first, 0));
"""
_NEXT_AND_STAMP = """\
    v_next := greatest(v_floor, coalesce(v_head + 1, v_last_first, 0));
    -- Never earlier than the newest message: published_at grows with the offset even when
    -- the wall clock is stepped back, by up to 5 minutes (revision 0020). A newest message
    -- further ahead was stamped by a clock that ran fast: stamps follow the clock again
    -- rather than stay in its future. Delays and the dedup window count from the clock.
    v_published_at := CASE WHEN v_head_at > p_now + interval '5 minutes' THEN p_now
                           ELSE greatest(p_now, v_head_at) END;
"""
_INSERT = """\
        SELECT p_topic_id, v_next + m.ord - 1, v_seg, p_now,
"""
_INSERT_STAMPED = """\
        SELECT p_topic_id, v_next + m.ord - 1, v_seg, v_published_at,
"""
_INSERT_FRESH = """\
        SELECT p_topic_id, f.new_offset, v_seg, p_now,
"""
_INSERT_FRESH_STAMPED = """\
        SELECT p_topic_id, f.new_offset, v_seg, v_published_at,
"""


def upgrade() -> None:
    run_sql(_NEWEST_MESSAGE_IN)
    patch_function(
        "0010_notify_only_waiters.sql",
        "sluice.append_messages",
        [
            (_DECLARE, _DECLARE_HEAD_AT),
            (_HEAD, _HEAD_AND_ITS_TIME),
            (_INTO, _INTO_HEAD_AT),
            (_NEWEST_SEGMENT, _NEWEST_SEGMENT_AND_MESSAGE),
            (_NEXT, _NEXT_AND_STAMP),
            (_INSERT, _INSERT_STAMPED),
            (_INSERT_FRESH, _INSERT_FRESH_STAMPED),
        ],
    )
    run_sql("DROP FUNCTION sluice.newest_offset_in(bigint, integer)")


def downgrade() -> None:
    restore_function("0008_publish_lookups.sql", "sluice.newest_offset_in")
    restore_function("0010_notify_only_waiters.sql", "sluice.append_messages")
    run_sql("DROP FUNCTION sluice.newest_message_in(bigint, integer)")
