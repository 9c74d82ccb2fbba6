"""Subscription numbers (backlog, lag, ...) from a row of storage `delivery_states`.

Shared by the GET answers and /metrics, so the two always agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sluice.storage.delivery import seconds_between


@dataclass(slots=True)
class DeliveryCounts:
    backlog: int
    in_flight: int
    delayed: int
    dead_lettered: int
    committed_offset: int
    head_offset: int | None
    lag: int
    oldest_unacked_age_seconds: float | None


def delivery_counts(state: Any) -> DeliveryCounts:
    """The stats of a subscription from its row of storage `delivery_states` (also used
    by /metrics, so both always agree)."""
    cursor = state["cursor"]
    head = state["head_offset"]
    oldest = state["oldest_offset"]
    log_end = head + 1 if head is not None else cursor
    in_log = max(0, log_end - max(cursor, oldest if oldest is not None else cursor))
    backlog = state["due"] + in_log - state["delayed_in_log"]
    delayed = state["waiting"] + state["delayed_in_log"]
    lowest = state["lowest_pending"]
    committed = cursor if lowest is None else min(lowest, cursor)
    age = None
    published = state["committed_published_at"]
    if committed < log_end and published is not None:
        age = round(max(0.0, seconds_between(state["now"], published)), 3)
    return DeliveryCounts(
        backlog=backlog,
        in_flight=state["in_flight"],
        delayed=delayed,
        dead_lettered=state["dead_lettered"],
        committed_offset=committed,
        head_offset=head,
        lag=backlog + state["in_flight"] + delayed,
        oldest_unacked_age_seconds=age,
    )
