"""The systems under test, behind one small interface so every workload drives each the same
way: create a queue (with N subscribers), publish a batch, pull a batch, ack it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson


class PeerUnavailable(Exception):
    """The peer cannot run here (e.g. the pgmq install file is missing); it is skipped."""


@dataclass(slots=True)
class Delivery:
    handle: Any  # what ack needs: a receipt, a msg_id
    value: Any  # the value as JSON text, or already parsed

    def sent_at(self) -> float:
        """The send time a workload embedded in the value (`{"t": perf_counter, ...}`)."""
        value = orjson.loads(self.value) if isinstance(self.value, str | bytes) else self.value
        return float(value["t"])


class Peer:
    """One system under test. Values are JSON texts (bytes), built once by the workload."""

    name = "peer"
    server_pid: int | None = None  # the process whose CPU counts as "server" (Sluice only)

    async def start(self) -> None:
        """Connect (and install what is needed); raise PeerUnavailable to be skipped."""

    async def close(self) -> None:
        """Close connections."""

    async def create_queue(self, queue: str, subscribers: int = 1) -> None:
        """A new empty queue; with subscribers > 1 every message goes to each of them."""
        raise NotImplementedError

    async def drop_queue(self, queue: str, subscribers: int = 1) -> None:
        """Free what the queue holds after its workload (no-op where that would cost)."""

    def prepare(self, values: list[bytes]) -> Any:
        """Turn values into what publish sends (throughput phases do this once)."""
        return [v.decode() for v in values]

    async def publish(self, queue: str, prepared: Any) -> None:
        """Publish one batch, atomically, made by prepare()."""
        raise NotImplementedError

    async def ready_to_consume(self, queue: str) -> None:
        """Called once a consume phase's queue is loaded, before its measured window: what a
        consumer sets up before its first message (nothing for the SQL peers)."""

    async def pull(
        self, queue: str, max_messages: int, wait_seconds: float = 0.0, subscriber: int = 0
    ) -> list[Delivery]:
        raise NotImplementedError

    async def ack(self, queue: str, handles: list[Any], subscriber: int = 0) -> int:
        raise NotImplementedError
