"""Group acks: the acks of one subscription that arrive while an ack of it is being written
share the next write, as publishes share a commit (app.queue.publisher) and pulls a claim
(app.queue.claim_groups).

An ack is a durable transaction of its own: the subscription's lock, the checks of its
receipts, an insert, a commit that waits for the WAL flush. Consumers that take one message
at a time ack one receipt per request, so with several of them each ack paid all of that
for one message, and the round trip to Postgres besides (bench/RESULTS.md run 28). Here the
first ack of a subscription is written at once; the acks that arrive meanwhile queue, and
one task writes them together (up to MAX_GROUP_RECEIPTS receipts) until none are waiting.
Each request is answered only once the write holding its receipts has committed.

Each request of a group gets the receipts it gave that the write applied, in arrival
order: a receipt given by two requests of one group counts for the first, and is stale for
the second, as if they had been written one after the other. When the write fails, every
request of the group gets the error (acks can be retried: an applied receipt then answers
stale). An optimisation of one process only: other processes' acks still meet at the lock
in Postgres.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sluice.queue.grouping import serve_groups, take_group
from sluice.records import Receipt, Settled

# Upper bound of receipts in one write (an ack request carries at most 1000).
MAX_GROUP_RECEIPTS = 1000

WriteFn = Callable[[list[Receipt]], Awaitable[Settled]]


@dataclass(slots=True)
class _Waiting:
    receipts: list[Receipt]
    future: asyncio.Future[Settled] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class AckGroups:
    def __init__(self) -> None:
        # Per subscription with a write under way: the acks waiting for the next one.
        self._busy: dict[tuple[str, str], deque[_Waiting]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def ack(
        self, topic: str, subscription: str, receipts: list[Receipt], write: WriteFn
    ) -> Settled:
        """Apply the receipts: by `write(receipts)` at once when no ack of the subscription
        is being written, else in the group write after it."""
        key = (topic, subscription)
        busy = self._busy.get(key)
        if busy is not None:
            waiting = _Waiting(receipts)
            busy.append(waiting)
            return await waiting.future
        busy = self._busy[key] = deque()
        try:
            return await write(receipts)
        finally:
            if busy:
                task = asyncio.create_task(self._serve(key, busy, write), name="sluice-ack-group")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                del self._busy[key]

    async def _serve(self, key: tuple[str, str], busy: deque[_Waiting], write: WriteFn) -> None:
        """Write the waiting acks, a group at a time, until none are left."""

        async def write_group(group: list[_Waiting]) -> None:
            _hand_out(await write([r for waiting in group for r in waiting.receipts]), group)

        try:
            await serve_groups(busy, _take_group, write_group)
        finally:
            del self._busy[key]


def _take_group(waiting: deque[_Waiting]) -> list[_Waiting]:
    return take_group(waiting, lambda ack: len(ack.receipts), MAX_GROUP_RECEIPTS)


def _hand_out(settled: Settled, group: list[_Waiting]) -> None:
    """Each request the applied receipts it gave, the first to give one getting it."""
    left = set(settled.applied)
    parked = settled.dead_lettered
    for waiting in group:
        mine = {r.key for r in waiting.receipts if r.key in left}
        left -= mine
        if not waiting.future.done():
            waiting.future.set_result(
                dataclasses.replace(settled, applied=mine, dead_lettered=parked)
            )
        parked = 0  # acks park nothing; were it otherwise, the count is told once
