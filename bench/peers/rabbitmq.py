"""RabbitMQ: an optional reference point, not a target (the SPEC's figures compare with raw
SQL and pgmq).

The bench starts the broker itself from Debian's rabbitmq-server package, on 127.0.0.1 and
free ports, with its data in a temp dir, and stops it (and the epmd it started) by PID at
the end. Queues are durable and messages persistent; publishes wait for publisher confirms
(a confirm means the broker has the message on disk); consumers ack each message manually.
A subscriber is a queue bound to the queue's fanout exchange (fan-out copies the message
into each queue, like pgmq and raw). Pulling a batch means taking up to N deliveries the
broker pushed to this process (prefetch window), the natural way to consume RabbitMQ:
basic.get would cost a round trip per message. A batch publish is not atomic in RabbitMQ
(transactions exist but are not the way it is used); each message is confirmed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

from bench.infra import free_port
from bench.peers import Delivery, Peer, PeerUnavailable

try:
    import aio_pika
except ImportError:  # pragma: no cover - aio-pika comes with the test extra
    aio_pika = None  # type: ignore[assignment]

_SERVER_GLOB = "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin/rabbitmq-server"
# After the first message of a pull, how long to wait for more to fill the batch.
_FILL_SECONDS = 0.002
# Longest wait for the broker's first push to a newly registered consumer (ready_to_consume).
_FIRST_PUSH_SECONDS = 10.0


def rabbitmq_server() -> Path | None:
    """The broker's start script (run directly: the packaged wrapper switches users)."""
    found = sorted(Path("/").glob(_SERVER_GLOB.lstrip("/")))
    return found[-1] if found else None


class RabbitBroker:
    """A private broker: its own epmd, node name, ports and data dir, all on 127.0.0.1."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self._epmd: subprocess.Popen[bytes] | None = None
        self._server: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int | None:
        return None if self._server is None else self._server.pid

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}/"

    async def start(self, script: Path, ready_within: float = 90.0) -> None:
        epmd = shutil.which("epmd")
        if epmd is None:
            raise PeerUnavailable("epmd (Erlang) not found")
        self.directory.mkdir(parents=True, exist_ok=True)
        epmd_port = free_port()
        (self.directory / "rabbitmq.conf").write_text(
            f"listeners.tcp.default = 127.0.0.1:{self.port}\nloopback_users = none\n"
        )
        (self.directory / "enabled_plugins").write_text("[].\n")
        env = {
            **os.environ,
            "HOME": str(self.directory),
            "RABBITMQ_NODENAME": f"sluicebench{self.port}@localhost",
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(free_port()),
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
            "RABBITMQ_MNESIA_BASE": str(self.directory / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.directory / "log"),
            "RABBITMQ_CONFIG_FILE": str(self.directory / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.directory / "enabled_plugins"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "ERL_EPMD_PORT": str(epmd_port),
        }
        with (self.directory / "broker.log").open("wb") as log:
            # Our own epmd in the foreground, so that it is our child and stops with us.
            self._epmd = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [epmd, "-address", "127.0.0.1", "-port", str(epmd_port)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
            self._server = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                [str(script)],
                env=env,
                cwd=self.directory,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its process group is ours to stop
            )
        deadline = time.monotonic() + ready_within
        while time.monotonic() < deadline:
            if self._server.poll() is not None:
                raise PeerUnavailable(f"rabbitmq-server exited; see {self.directory}/broker.log")
            with contextlib.suppress(OSError):
                _, writer = await asyncio.open_connection("127.0.0.1", self.port)
                writer.close()
                return
            await asyncio.sleep(0.25)
        raise PeerUnavailable(f"rabbitmq-server not ready after {ready_within:.0f}s")

    def stop(self) -> None:
        if self._server is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._server.pid, signal.SIGTERM)
            try:
                self._server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self._server.pid, signal.SIGKILL)
                self._server.wait(timeout=10)
            self._server = None
        if self._epmd is not None:
            self._epmd.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._epmd.wait(timeout=10)
            self._epmd = None


class _Subscriber:
    """One consumer on one queue: deliveries pushed by the broker wait here to be pulled."""

    def __init__(self) -> None:
        self.buffer: asyncio.Queue[Any] = asyncio.Queue()
        self.pushed = asyncio.Event()  # the broker has pushed at least one delivery
        # The consumer's channel, held for as long as the peer lives: its consumer feeds
        # `buffer`, and the acks of the deliveries go back on it.
        self.channel: Any = None

    async def receive(self, message: Any) -> None:
        """The consumer's callback: one delivery pushed by the broker."""
        await self.buffer.put(message)
        self.pushed.set()


class RabbitPeer(Peer):
    name = "rabbitmq"

    def __init__(self, directory: Path, prefetch: int = 400) -> None:
        self._broker = RabbitBroker(directory)
        self._prefetch = prefetch
        self._connection: Any = None
        self._publish_channel: Any = None
        self._exchanges: dict[str, Any] = {}
        self._subscribers: dict[tuple[str, int], _Subscriber] = {}
        self._subscriber_lock = asyncio.Lock()

    async def start(self) -> None:
        if aio_pika is None:
            raise PeerUnavailable("aio-pika is not installed (pip install aio-pika)")
        script = rabbitmq_server()
        if script is None:
            raise PeerUnavailable("rabbitmq-server is not installed (apt install rabbitmq-server)")
        await self._broker.start(script)
        self.server_pid = self._broker.pid
        self._connection = await aio_pika.connect(self._broker.url)
        self._publish_channel = await self._connection.channel(publisher_confirms=True)

    async def close(self) -> None:
        if self._connection is not None:
            with contextlib.suppress(Exception):
                await self._connection.close()
            self._connection = None
        await asyncio.to_thread(self._broker.stop)

    async def create_queue(self, queue: str, subscribers: int = 1) -> None:
        exchange = await self._publish_channel.declare_exchange(
            queue, aio_pika.ExchangeType.FANOUT, durable=True
        )
        for i in range(subscribers):
            declared = await self._publish_channel.declare_queue(f"{queue}.{i}", durable=True)
            await declared.bind(exchange)
        self._exchanges[queue] = exchange

    def prepare(self, values: list[bytes]) -> Any:
        return values

    async def publish(self, queue: str, prepared: Any) -> None:
        exchange = self._exchanges[queue]
        persistent = aio_pika.DeliveryMode.PERSISTENT
        # Each publish waits for its confirm; gathered, they are in flight together and the
        # broker confirms them in groups.
        await asyncio.gather(
            *(
                exchange.publish(aio_pika.Message(value, delivery_mode=persistent), "")
                for value in prepared
            )
        )

    async def _subscriber(self, queue: str, index: int) -> _Subscriber:
        key = (queue, index)
        async with self._subscriber_lock:
            found = self._subscribers.get(key)
            if found is not None:
                return found
            subscriber = _Subscriber()
            channel = await self._connection.channel()
            await channel.set_qos(prefetch_count=self._prefetch)
            declared = await channel.declare_queue(f"{queue}.{index}", durable=True)
            await declared.consume(subscriber.receive, no_ack=False)
            subscriber.channel = channel
            self._subscribers[key] = subscriber
            return subscriber

    async def ready_to_consume(self, queue: str) -> None:
        """Register the consumer and let the broker start pushing before the window: its
        first push to a new consumer can take longer than a pull's half-second look for
        "nothing there" on a busy machine (the pulls then found nothing and a phase drained
        0 messages)."""
        source = await self._subscriber(queue, 0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(source.pushed.wait(), _FIRST_PUSH_SECONDS)

    async def pull(
        self, queue: str, max_messages: int, wait_seconds: float = 0.0, subscriber: int = 0
    ) -> list[Delivery]:
        source = await self._subscriber(queue, subscriber)
        buffer = source.buffer
        # Deliveries arrive pushed; "nothing there" is only known after a moment, so even a
        # pull without wait gives the broker half a second to push the first one.
        try:
            first = await asyncio.wait_for(buffer.get(), max(wait_seconds, 0.5))
        except TimeoutError:
            return []
        taken = [first]
        while len(taken) < max_messages:
            if buffer.empty():
                try:
                    taken.append(await asyncio.wait_for(buffer.get(), _FILL_SECONDS))
                except TimeoutError:
                    break
            else:
                taken.append(buffer.get_nowait())
        return [Delivery(message, message.body) for message in taken]

    async def ack(self, queue: str, handles: list[Any], subscriber: int = 0) -> int:
        # One basic.ack per message: several workers share the channel, so an ack with
        # multiple=True could acknowledge another worker's deliveries.
        for message in handles:
            await message.ack()
        return len(handles)
