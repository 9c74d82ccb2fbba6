"""What the request groups of one process share (app.queue.claim_groups, app.queue.ack_groups):
the requests that arrive while one of their kind runs wait in a queue, each with a future,
and one task serves them a group at a time."""

from __future__ import annotations

import asyncio
import copy
from collections import deque
from collections.abc import Callable, Iterable
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


def fail_group(group: Iterable[Waiting], exc: Exception) -> None:
    """Every request of the group gets the error, a copy each (a pull adds its own acks to
    the error it answers)."""
    for request in group:
        if not request.future.done():
            request.future.set_exception(copy.copy(exc))


def cancel_unserved(*requests: Iterable[Waiting]) -> None:
    """The requests a serving task leaves when it is cancelled: cancelled too."""
    for waiting in requests:
        for request in waiting:
            if not request.future.done():
                request.future.cancel()
