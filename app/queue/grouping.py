"""What the request groups of one process share (app.queue.claim_groups, app.queue.settle_groups):
the requests that arrive while one of their kind runs wait in a queue, each with a future,
and one task serves them a group at a time."""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar


class Waiting(Protocol):
    @property
    def future(self) -> asyncio.Future[Any]: ...


W = TypeVar("W", bound=Waiting)


def take_group(waiting: deque[W], size: Callable[[W], int], cap: int) -> list[W]:
    """The next group: requests in arrival order while their sizes add up to at most `cap`
    (the first one whatever its size); those cancelled while they waited are dropped."""
    group: list[W] = []
    total = 0
    while waiting and (not group or total + size(waiting[0]) <= cap):
        request = waiting.popleft()
        if request.future.done():  # cancelled while it waited (its client went away)
            continue
        group.append(request)
        total += size(request)
    return group


async def serve_groups(
    waiting: deque[W],
    take: Callable[[deque[W]], list[W]],
    serve: Callable[[list[W]], Awaitable[None]],
) -> None:
    """Serve the waiting requests a group at a time (`take`, then `serve`, which answers
    them) until none are left. When `serve` raises, every request of its group not answered
    yet gets the error, a copy each (a pull adds its own acks to the error it answers). When
    this task is cancelled, the requests it leaves are cancelled too."""
    group: list[W] = []
    try:
        while waiting:
            group = take(waiting)
            if not group:  # all of them were cancelled while they waited
                continue
            try:
                await serve(group)
            except Exception as exc:
                for request in group:
                    if not request.future.done():
                        request.future.set_exception(copy.copy(exc))
    finally:
        for request in [*group, *waiting]:
            if not request.future.done():
                request.future.cancel()
