"""The in-memory waiting room of long-polls: who gets woken, and how often idle waiters
re-check the database."""

from __future__ import annotations

import asyncio
from contextlib import AsyncExitStack

from sluice.queue.waiters import WaiterHub


async def _park(hub: WaiterHub, stack: AsyncExitStack, capacities: list[int]) -> list:
    return [await stack.enter_async_context(hub.waiting(1, "s", c)) for c in capacities]


async def test_a_notification_wakes_only_as_many_waiters_as_its_messages_need():
    hub = WaiterHub()
    async with AsyncExitStack() as stack:
        waiters = await _park(hub, stack, [100, 100, 100, 100])
        hub.notify(1, 150)  # two batches of 100 can take 150 messages
        assert [w.event.is_set() for w in waiters] == [True, True, False, False]


async def test_single_message_waiters_are_woken_one_per_message_oldest_first():
    hub = WaiterHub()
    async with AsyncExitStack() as stack:
        waiters = await _park(hub, stack, [1, 1, 1])
        hub.notify(1, 2)
        assert [w.event.is_set() for w in waiters] == [True, True, False]
        hub.notify(2, 5)  # another topic: nobody here
        assert not waiters[2].event.is_set()


async def test_close_wakes_everybody():
    hub = WaiterHub()
    async with AsyncExitStack() as stack:
        waiters = await _park(hub, stack, [10, 10])
        hub.close()
        assert all(w.event.is_set() for w in waiters)


async def test_only_one_waiter_per_subscription_runs_the_safety_recheck():
    hub = WaiterHub()
    async with AsyncExitStack() as stack:
        await _park(hub, stack, [1, 1, 1])
        assert hub.take_recheck(1, "s", 0.2) is True
        assert hub.take_recheck(1, "s", 0.2) is False
        assert hub.take_recheck(1, "other", 0.2) is True
        await asyncio.sleep(0.25)
        assert hub.take_recheck(1, "s", 0.2) is True
