"""A claim reads the subscription's timers only once one may be due.

The state row gains `timer_wake`, never later than the due time of any timer after the
frontier; sluice.claim reads the timers (a scan of every partition) only once that time has
come. The .sql file next to this one says who keeps the bound and how; the two edits below
make the writers of timers that wrote no state row (redrive, and retention releasing a
key's head) write one, whose `timer_wake` is the column's default: read the timers.

Revision ID: 0017
Revises: 0016
Create Date: 2026-12-05
"""

from __future__ import annotations

from importlib import import_module

from sluice.migrations.sql_files import patch_function, restore_function, run_file, run_sql

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None

_REDRIVEN = """\
    IF v_count > 0 THEN
        PERFORM pg_notify('sluice', s.topic_id::text || ':' || v_count::text);
    END IF;
"""
_REDRIVEN_SAVED = """\
    IF v_count > 0 THEN
        -- Its timer_wake at the default: the next claim reads the timers (0017).
        PERFORM sluice.save_state(st);
        PERFORM pg_notify('sluice', s.topic_id::text || ':' || v_count::text);
    END IF;
"""

_RETENTION_DECLARE = """\
    k record;
BEGIN
"""
_RETENTION_DECLARE_FLAG = """\
    k record;
    v_activated boolean;
BEGIN
"""
_KEYS_RELEASED = """\
            st := sluice.state_of(sb.topic_id, sb.sub_id);
            FOR k IN SELECT DISTINCT w.key FROM sluice.key_waits w
"""
_KEYS_RELEASED_FLAG = """\
            st := sluice.state_of(sb.topic_id, sb.sub_id);
            v_activated := false;
            FOR k IN SELECT DISTINCT w.key FROM sluice.key_waits w
"""
_ACTIVATED = """\
                    PERFORM sluice.key_activate(sb.topic_id, sb.sub_id, st.key_gen, st.epoch,
                                                k.key, v_floor, v_now);
                END IF;
            END LOOP;
"""
_ACTIVATED_SAVED = """\
                    PERFORM sluice.key_activate(sb.topic_id, sb.sub_id, st.key_gen, st.epoch,
                                                k.key, v_floor, v_now);
                    v_activated := true;
                END IF;
            END LOOP;
            IF v_activated THEN
                -- Its timer_wake at the default: the next claim reads the timers (0017).
                PERFORM sluice.save_state(st);
            END IF;
"""


def upgrade() -> None:
    run_file("0017_timers_read_when_due.sql")
    patch_function("0004_insert_only_storage.sql", "sluice.redrive", [(_REDRIVEN, _REDRIVEN_SAVED)])
    patch_function(
        "0004_insert_only_storage.sql",
        "sluice.advance_retention",
        [
            (_RETENTION_DECLARE, _RETENTION_DECLARE_FLAG),
            (_KEYS_RELEASED, _KEYS_RELEASED_FLAG),
            (_ACTIVATED, _ACTIVATED_SAVED),
        ],
    )


def downgrade() -> None:
    # The claim as revision 0015 left it: 0004's body with 0015's edits.
    import_module("sluice.migrations.versions.0015_claim_events_per_segment").upgrade()
    restore_function("0004_insert_only_storage.sql", "sluice.redrive")
    restore_function("0004_insert_only_storage.sql", "sluice.advance_retention")
    run_sql("ALTER TABLE sluice.sub_states DROP COLUMN timer_wake")
