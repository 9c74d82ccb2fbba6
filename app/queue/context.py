"""What every queue operation needs: the pool, the clock, the waiters, the publisher."""

from __future__ import annotations

import asyncio
import weakref
from dataclasses import dataclass, field

import asyncpg

from sluice.queue.claim_groups import ClaimGroups
from sluice.queue.clock import Clock
from sluice.queue.publisher import Publisher
from sluice.queue.rates import RateRecorder
from sluice.queue.settle_groups import SettleGroups
from sluice.queue.waiters import WaiterHub
from sluice.settings import Settings


@dataclass
class QueueContext:
    pool: asyncpg.Pool
    # Claims run on their own pool whose commits do not wait for the WAL flush: a claim only
    # hands out leases, and losing one in a Postgres crash just means the messages are
    # delivered again (at-least-once holds; the lost receipts answer `stale`). Claims hold
    # the subscription's lock until commit, so not waiting for the flush there is what lets
    # concurrent consumers of a subscription keep up. A claim that parks dead letters turns
    # durable commits back on for itself (storage sluice.park). Everything else that must
    # survive a crash (publish, ack, nack) commits durably on `pool`.
    claim_pool: asyncpg.Pool
    settings: Settings
    clock: Clock
    hub: WaiterHub
    publisher: Publisher
    rates: RateRecorder
    # One claim per subscription at a time from this process. Claims of a subscription
    # serialise on its lock anyway; queueing them here instead of in Postgres keeps several
    # backends from waiting on that lock, where a preempted holder (2 cores shared with the
    # API and the clients) stalls them all. An optimisation only: other processes' claims
    # still meet at the lock in Postgres.
    claim_gates: weakref.WeakValueDictionary[tuple[str, str], asyncio.Lock] = field(
        default_factory=weakref.WeakValueDictionary
    )

    # Pulls of a subscription that arrive while a claim of it runs share the next claim.
    claim_groups: ClaimGroups = field(default_factory=ClaimGroups)
    # Acks of a subscription that arrive while an ack of it is written share the next write.
    settle_groups: SettleGroups = field(default_factory=SettleGroups)

    # The SQS endpoint's queues, name -> (loaded at, queue): queue.sqs_queues.get_queue
    # reads a queue's row at most once a second per process, not on every message call.
    sqs_queues: dict[str, tuple[float, object]] = field(default_factory=dict)

    def claim_gate(self, topic: str, subscription: str) -> asyncio.Lock:
        gate = self.claim_gates.get((topic, subscription))
        if gate is None:
            gate = self.claim_gates[(topic, subscription)] = asyncio.Lock()
        return gate
