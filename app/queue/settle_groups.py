"""Group settles: the acks of one subscription that arrive while an ack of it is being
written share the next write, as publishes share a commit (app.queue.publisher) and pulls a
claim (app.queue.claim_groups); the same for nacks, extends and give-backs, each kind (and
delay or deadline) in groups of its own, since one write applies one kind.

A settle is a durable transaction of its own: the subscription's lock, the checks of its
receipts, an insert, a commit that waits for the WAL flush. Consumers that take one message
at a time ack one receipt per request, so with several of them each ack paid all of that
for one message, and the round trip to Postgres besides (bench/RESULTS.md run 28); a
handler failing on every message nacks the same way, and a worker extending the leases of
its long handlers extends each one. Here the first settle of a subscription and kind is
written at once; those that arrive meanwhile queue, and one task writes them together (up
to MAX_GROUP_RECEIPTS receipts) until none are waiting. Each request is answered only once
the write holding its receipts has committed.

Each request of a group gets the receipts it gave that the write applied, in arrival
order: a receipt given by two requests of one group counts for the first, and is stale for
the second, as if they had been written one after the other. When the write fails, every
request of the group gets the error (settles can be retried: an applied receipt then
answers stale). An optimisation of one process only: other processes' settles still meet
at the lock in Postgres.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from sluice.queue.grouping import serve_groups, take_group
from sluice.records import Receipt, Settled, Settlement

# Upper bound of receipts in one write (an ack request carries at most 1000).
MAX_GROUP_RECEIPTS = 1000

WriteFn = Callable[[list[Receipt]], Awaitable[Settled]]


@dataclass(slots=True)
class _Waiting:
    receipts: list[Receipt]
    future: asyncio.Future[Settled] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


# A group's subscription, what it does and its seconds (a nack's delay, an extend's deadline).
_Key = tuple[str, str, Settlement, float | None]


class SettleGroups:
    def __init__(self) -> None:
        # Per subscription and kind with a write under way: the requests waiting for the next.
        self._busy: dict[_Key, deque[_Waiting]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def settle(
        self,
        topic: str,
        subscription: str,
        receipts: list[Receipt],
        write: WriteFn,
        kind: Settlement = Settlement.ACK,
        seconds: float | None = None,
    ) -> Settled:
        """Apply the receipts: by `write(receipts)` at once when no settle of the same
        subscription, kind and seconds is being written, else in the group write after it."""
        key = (topic, subscription, kind, seconds)
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
                task = asyncio.create_task(
                    self._serve(key, busy, write), name="sluice-settle-group"
                )
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            else:
                del self._busy[key]

    async def _serve(self, key: _Key, busy: deque[_Waiting], write: WriteFn) -> None:
        """Write the waiting requests, a group at a time, until none are left."""

        async def write_group(group: list[_Waiting]) -> None:
            _hand_out(await write([r for waiting in group for r in waiting.receipts]), group)

        try:
            await serve_groups(busy, _take_group, write_group)
        finally:
            del self._busy[key]


def _take_group(waiting: deque[_Waiting]) -> list[_Waiting]:
    return take_group(waiting, lambda request: len(request.receipts), MAX_GROUP_RECEIPTS)


def _hand_out(settled: Settled, group: list[_Waiting]) -> None:
    """Each request the applied receipts it gave, the first to give one getting it. The
    group's dead letters (nacks at their last attempt) are among the applied receipts but not
    told apart: each request is told at most as many as it had applied, in order, so that
    the counts (the process's rates, which add them up) stay right and none goes negative."""
    left = set(settled.applied)
    parked = settled.dead_lettered
    for waiting in group:
        mine = {r.key for r in waiting.receipts if r.key in left}
        left -= mine
        told = min(parked, len(mine))
        parked -= told
        if not waiting.future.done():
            outcome = dataclasses.replace(settled, applied=mine, dead_lettered=told)
            waiting.future.set_result(outcome)
