"""Subscription numbers (backlog, lag, ...) from the raw delivery state storage reports.

Shared by the GET answers and /metrics, so the two always agree.
"""

from __future__ import annotations

from datetime import timedelta

from sluice.records import DeliveryCounts, DeliveryState


def delivery_counts(state: DeliveryState) -> DeliveryCounts:
    """backlog: deliverable now (due redeliveries, and the log past the cursor that is not
    delayed); delayed: waiting for a delay, a backoff or an earlier message of the key;
    lag: all unacknowledged; committed offset: the lowest not yet acked or dead-lettered."""
    cursor = state.cursor
    head = state.head_offset
    log_end = head + 1 if head is not None else cursor
    in_log = max(0, log_end - cursor)
    backlog = state.due + in_log - state.delayed_in_log
    delayed = state.waiting + state.delayed_in_log
    lowest = state.lowest_pending
    committed = cursor if lowest is None else min(lowest, cursor)
    age = None
    if committed < log_end and state.committed_published_at is not None:
        age = round(max(0.0, (state.now - state.committed_published_at) / timedelta(seconds=1)), 3)
    return DeliveryCounts(
        backlog=backlog,
        in_flight=state.in_flight,
        delayed=delayed,
        dead_lettered=state.dead_lettered,
        committed_offset=committed,
        head_offset=head,
        lag=backlog + state.in_flight + delayed,
        oldest_unacked_age_seconds=age,
    )
