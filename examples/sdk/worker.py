"""Process orders with the Worker of the Python SDK, until SIGTERM or Ctrl-C.

    pip install ./clients/python
    python examples/sdk/worker.py               # then: python examples/sdk/publisher.py

`subscribe()` long-polls, runs up to `concurrency` handlers at once, extends the leases of
handlers that run long, acks a message only after its handler returned (in the next pull),
nacks with the subscription's backoff when the handler raises, and honours 429 / backs off
on 5xx. On SIGTERM / SIGINT it stops pulling, lets running handlers finish, acks them and
returns its stats. The server is SLUICE_URL (default http://127.0.0.1:8000).
"""

from __future__ import annotations

import argparse
import asyncio
import logging

from sluice_client import DeadLetter, Delivery, Retry, subscribe


async def handle(order: Delivery) -> None:
    value = order.value
    if not isinstance(value, dict) or "id" not in value:
        raise DeadLetter()  # it will never work: parked at once, listed under dead letters
    if value.get("amount", 0) < 0:
        raise Retry(delay_seconds=30)  # e.g. waiting for something else: try again later
    await asyncio.sleep(0.001)  # the real work: write the invoice, call a service, ...
    print(f"processed order {value['id']} (offset {order.offset})", flush=True)


async def main(topic: str, subscription: str, concurrency: int) -> None:
    stats = await subscribe(topic, subscription, handle, concurrency=concurrency)
    print(
        f"stopped: {stats.succeeded} processed, {stats.failed} failed, "
        f"{stats.dead_lettered} dead-lettered, {stats.acked} acked",
        flush=True,
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topic", default="orders")
    parser.add_argument("--subscription", default="billing")
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.topic, args.subscription, args.concurrency))
