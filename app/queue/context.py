"""What every queue operation needs: the pool, the clock, the waiters, the publisher."""

from __future__ import annotations

from dataclasses import dataclass

import asyncpg

from app.queue.clock import Clock
from app.queue.publisher import Publisher
from app.queue.rates import RateRecorder
from app.queue.waiters import WaiterHub
from app.settings import Settings


@dataclass
class QueueContext:
    pool: asyncpg.Pool
    # Claims run on their own pool whose commits do not wait for the WAL flush: a claim only
    # hands out leases, and losing one in a Postgres crash just means the messages are
    # delivered again (at-least-once holds; the lost receipts answer `stale`). Claims hold
    # the subscription row lock until commit, so not waiting for the flush there is what
    # lets concurrent consumers of a subscription keep up. Everything that must survive a
    # crash (publish, ack, nack, dead-letter copies) commits durably on `pool`.
    claim_pool: asyncpg.Pool
    settings: Settings
    clock: Clock
    hub: WaiterHub
    publisher: Publisher
    rates: RateRecorder
