"""An ack (nack, extend) reads only the events of its lease that name one of its receipts.

sluice.settle looped over every event of each lease it touched, newest first, gathering the
offsets they settled and the deadlines they extended into arrays that it then matched the
receipts against; sluice.receipts_apply (the SQL API's check at the call) unnested every
event of the lease the same way. A lease's events are its settles, one per request (or per
group of requests sharing a write), so acking the members of a lease one by one, as a
consumer that acks each message when it is done does (SQS clients delete each message), read
one more event with every ack, and settle appended each to arrays copied on every append:
one lease of 1,000 messages acked one receipt at a time cost 510-750 us of backend CPU per
ack for the first hundred and 1,110-1,450 for the last hundred (bench/RESULTS.md run 35).
Claims that arrive together share one lease (app/queue/claim_groups.py), so leases of
hundreds are what many consumers pulling a few messages each make.

An event that names none of the request's receipts decides nothing about them: the checks
only ask whether a receipt's offset was settled, and what its newest extension is. Both
functions now leave out the events of the lease whose offsets do not overlap the request's
(`&&`, on the lease's primary-key range, newest first as before). The overlap check costs
the event's offsets times the request's in comparisons, so it is made only where that
product is at most 4,096: the single-receipt acks whose events pile up; a request of 100
receipts against events of 100 (a consumer acking its share of a group claim) reads them as
before (checked: 450 us per ack either way, where the check on every event added 10-37 us).
The lease of 1,000 acked one receipt at a time: 480-660 us for the first hundred acks and
490-525 for the last, 458-473 ms in all against 732-986. Over HTTP, 16 consumers each
pulling 10 messages and acking each in a request of its own: 2,983-3,018 messages/s against
2,535-2,605, Postgres 166-169 us per message against 198-199. What applies is unchanged.

Revision ID: 0021
Revises: 0020
Create Date: 2026-12-05
"""

from __future__ import annotations

from sluice.migrations.sql_files import patch_function, restore_function

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None

_SETTLE_EVENTS = """\
                         AND e.lease_id = l.lease_id AND e.seg = l.seg
                       ORDER BY e.event_id DESC LOOP
"""
_SETTLE_EVENTS_OF_RECEIPTS = """\
                         AND e.lease_id = l.lease_id AND e.seg = l.seg
                         -- Those naming a receipt, where that check is cheap (0021).
                         AND (cardinality(e.offsets) * cardinality(p_offsets) > 4096
                              OR e.offsets && p_offsets)
                       ORDER BY e.event_id DESC LOOP
"""
_CHECK_EVENTS = """\
              AND e.seg = l.seg
        CROSS JOIN LATERAL unnest(e.offsets) y(o)
"""
_CHECK_EVENTS_OF_RECEIPTS = """\
              AND e.seg = l.seg
              -- Those naming a receipt, where that check is cheap (0021).
              AND (cardinality(e.offsets) * cardinality(p_offsets) > 4096
                   OR e.offsets && p_offsets)
        CROSS JOIN LATERAL unnest(e.offsets) y(o)
"""


def upgrade() -> None:
    patch_function(
        "0018_settle_receipts_by_join.sql",
        "sluice.settle",
        [(_SETTLE_EVENTS, _SETTLE_EVENTS_OF_RECEIPTS)],
    )
    patch_function(
        "0019_sql_receipts_in_one_pass.sql",
        "sluice.receipts_apply",
        [(_CHECK_EVENTS, _CHECK_EVENTS_OF_RECEIPTS)],
    )


def downgrade() -> None:
    restore_function("0019_sql_receipts_in_one_pass.sql", "sluice.receipts_apply")
    restore_function("0018_settle_receipts_by_join.sql", "sluice.settle")
