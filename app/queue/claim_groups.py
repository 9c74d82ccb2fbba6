"""Group claims: the pulls of one subscription that arrive while a claim of it is under way
share the next claim, as publishes share a commit (app.queue.publisher).

Claims of a subscription take turns on its lock in Postgres (and, in one process, on its
claim gate), so with several consumers each waited for the others' claims one at a time: a
single-message pull took 1.9 ms (p50) with 4 consumers against 0.65 ms with one
(bench/RESULTS.md run 25). Here the first pull claims for itself at once; the pulls that
arrive meanwhile queue, and one task claims for all of them together (up to
MAX_GROUP_MESSAGES) and hands each its share in arrival order, until none are waiting. One
claim is one lease in the storage: the shares are parts of it, each acked, nacked or
extended by its receipts as any part of a lease can be.

Only pulls with the same ack deadline share a claim. A share whose pull was cancelled
(the client went away) while the claim ran is given back at once. When the claim fails,
every pull of the group gets the error. An optimisation of one process only: other
processes' claims still meet at the lock in Postgres.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

from sluice.queue.grouping import serve_groups, take_group
from sluice.records import Claim, Delivery

log = logging.getLogger("sluice.claims")

# Upper bound of messages one group claim asks for (a pull asks for at most 1000).
MAX_GROUP_MESSAGES = 1000

ClaimFn = Callable[[int], Awaitable[Claim]]
GiveBackFn = Callable[[list[Delivery]], Awaitable[None]]


@dataclass(slots=True)
class _Waiting:
    count: int
    future: asyncio.Future[Claim] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )


class ClaimGroups:
    def __init__(self) -> None:
        # Per subscription with a claim under way: the pulls waiting for the next one.
        self._busy: dict[tuple[str, str, int | None], deque[_Waiting]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    async def claim(
        self,
        topic: str,
        subscription: str,
        count: int,
        ack_deadline_seconds: int | None,
        claim: ClaimFn,
        give_back: GiveBackFn,
    ) -> Claim:
        """Lease up to `count` messages: by `claim(count)` at once when no claim of the
        subscription is under way, else in the group claim after it."""
        key = (topic, subscription, ack_deadline_seconds)
        busy = self._busy.get(key)
        if busy is not None:
            waiting = _Waiting(count)
            busy.append(waiting)
            try:
                return await waiting.future
            except asyncio.CancelledError:
                # Cancelled once its share was handed out (before this task ran again): no
                # one will see those messages, so they go back.
                future = waiting.future
                handed_out = future.done() and not future.cancelled() and future.exception() is None
                if handed_out and future.result().messages:
                    self._spawn(give_back(future.result().messages))
                raise
        busy = self._busy[key] = deque()
        try:
            return await claim(count)
        finally:
            if busy:
                self._spawn(self._serve(key, busy, claim, give_back))
            else:
                del self._busy[key]

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work, name="sluice-claim-group")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _serve(
        self,
        key: tuple[str, str, int | None],
        busy: deque[_Waiting],
        claim: ClaimFn,
        give_back: GiveBackFn,
    ) -> None:
        """Claim for the waiting pulls, a group at a time, until none are left."""

        async def claim_group(group: list[_Waiting]) -> None:
            orphaned = _hand_out(await claim(sum(w.count for w in group)), group)
            if orphaned:
                try:
                    await give_back(orphaned)
                except Exception:  # they come back at their deadline instead
                    log.warning("giving back %d messages failed", len(orphaned), exc_info=True)

        try:
            await serve_groups(busy, _take_group, claim_group)
        finally:
            del self._busy[key]


def _take_group(waiting: deque[_Waiting]) -> list[_Waiting]:
    return take_group(waiting, lambda pull: pull.count, MAX_GROUP_MESSAGES)


def _hand_out(result: Claim, group: list[_Waiting]) -> list[Delivery]:
    """Each pull its share of the claimed messages, in arrival order; returns the shares of
    pulls cancelled meanwhile, to be given back."""
    orphaned: list[Delivery] = []
    start = 0
    for waiting in group:
        share = result.messages[start : start + waiting.count]
        start += len(share)
        if waiting.future.done():
            orphaned += share
        else:
            waiting.future.set_result(dataclasses.replace(result, messages=share))
    return orphaned
