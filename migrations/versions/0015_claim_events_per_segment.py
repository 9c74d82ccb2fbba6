"""A claim reads its window's lease events one segment at a time.

sluice.claim counted the lease events written since the last claim with one statement whose
segment condition was `ev.seg = ANY(st.win_seg)`: an array parameter, which partition
pruning cannot use, so every claim started and ran an index scan on every partition of
lease_events, one per segment of every lane (44 partitions: the claim of one message took
about twice the CPU it takes with 4; bench/RESULTS.md run 32). Now the statement runs once
per distinct segment of the window with `ev.seg` equal to a scalar, which the generic plan
prunes before it starts any scan: a window in one segment reads one partition. The rows read
are the same (and the loop's sums, minimum and maximum do not depend on their order); the
frontier's step past the claim's own expiry events reads per segment too. Every
event below the frontier is committed, as before, since settles hold the subscription's lock
until their commit and the claim holds it exclusively. The edits below are the whole change
(migrations/sql_files.patch_function).

Revision ID: 0015
Revises: 0014
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import patch_function, restore_function

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None

_DECLARE = """\
    v_sorted boolean := true;
    i integer;
BEGIN
"""
_DECLARE_SEGMENT = """\
    v_sorted boolean := true;
    i integer;
    v_event_seg integer;
    v_event_segs integer[] := '{}';
BEGIN
"""
_EVENTS = """\
        FOR r IN SELECT ev.lease_id, ev.kind, cardinality(ev.offsets) AS n, ev.lease_until,
                        ev.event_id
                 FROM sluice.lease_events ev
                 WHERE ev.topic_id = s.topic_id AND ev.sub_id = s.sub_id
                   AND ev.lease_id = ANY(st.win_lease) AND ev.seg = ANY(st.win_seg)
                   AND ev.event_id > st.event_id LOOP
"""
_EVENTS_PER_SEGMENT = """\
        -- One segment at a time: a scalar segment prunes to its partition (0015). Each
        -- segment once, told apart by array assignments (no statement of their own).
        FOREACH v_event_seg IN ARRAY st.win_seg LOOP
        CONTINUE WHEN v_event_seg = ANY(v_event_segs);
        v_event_segs := v_event_segs || v_event_seg;
        FOR r IN SELECT ev.lease_id, ev.kind, cardinality(ev.offsets) AS n, ev.lease_until,
                        ev.event_id
                 FROM sluice.lease_events ev
                 WHERE ev.topic_id = s.topic_id AND ev.sub_id = s.sub_id
                   AND ev.lease_id = ANY(st.win_lease) AND ev.seg = v_event_seg
                   AND ev.event_id > st.event_id LOOP
"""
_LOOP_END = """\
            nx.event_id := greatest(nx.event_id, r.event_id);
        END LOOP;
    END IF;
"""
_LOOPS_END = """\
            nx.event_id := greatest(nx.event_id, r.event_id);
        END LOOP;
        END LOOP;
    END IF;
"""

_EXPIRED = """\
    IF v_expiry THEN
        nx.event_id := greatest(nx.event_id, (SELECT max(ev.event_id) FROM sluice.lease_events ev
            WHERE ev.topic_id = s.topic_id AND ev.sub_id = s.sub_id AND ev.event_id > nx.event_id
              AND ev.lease_id = ANY(st.win_lease) AND ev.seg = ANY(st.win_seg)));
    END IF;
"""
_EXPIRED_PER_SEGMENT = """\
    IF v_expiry THEN
        -- The window's segments, as step 1 found them (0015).
        FOREACH v_event_seg IN ARRAY v_event_segs LOOP
            nx.event_id := greatest(nx.event_id, (
                SELECT max(ev.event_id) FROM sluice.lease_events ev
                WHERE ev.topic_id = s.topic_id AND ev.sub_id = s.sub_id
                  AND ev.event_id > nx.event_id AND ev.lease_id = ANY(st.win_lease)
                  AND ev.seg = v_event_seg));
        END LOOP;
    END IF;
"""


def upgrade() -> None:
    patch_function(
        "0004_insert_only_storage.sql",
        "sluice.claim",
        [
            (_DECLARE, _DECLARE_SEGMENT),
            (_EVENTS, _EVENTS_PER_SEGMENT),
            (_LOOP_END, _LOOPS_END),
            (_EXPIRED, _EXPIRED_PER_SEGMENT),
        ],
    )


def downgrade() -> None:
    restore_function("0004_insert_only_storage.sql", "sluice.claim")
