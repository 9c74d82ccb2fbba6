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
    settings: Settings
    clock: Clock
    hub: WaiterHub
    publisher: Publisher
    rates: RateRecorder
