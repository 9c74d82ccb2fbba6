"""Publish orders with the batching Publisher of the Python SDK.

    pip install ./clients/python            # the SDK (only httpx)
    python examples/sdk/publisher.py --count 1000

Creates the topic and the worker's subscription if they are missing (PUT is idempotent),
then publishes `--count` orders. The Publisher batches them in the background (up to 1000
per request, at most `linger_seconds` after the first of a batch), gives every message a
dedup id so that its retries never store one twice, and resolves one future per message to
its offset. The server is SLUICE_URL (default http://127.0.0.1:8000), the key SLUICE_API_KEY.
"""

from __future__ import annotations

import argparse
import asyncio

from sluice_client import AsyncClient, Publisher


async def main(topic: str, subscription: str, count: int) -> None:
    async with AsyncClient() as client:
        await client.create_topic(topic)
        # Created before publishing, starting at the beginning: the worker sees every order.
        await client.create_subscription(topic, subscription, start="earliest", max_deliveries=5)
        async with Publisher(client, topic, linger_seconds=0.01) as publisher:
            futures = [
                await publisher.publish({"id": i, "amount": 10 + i % 90}, key=f"customer-{i % 7}")
                for i in range(count)
            ]
            offsets = await asyncio.gather(*futures)  # each raises if its batch failed
        # Leaving `async with` flushed and closed the publisher.
        print(f"published {len(offsets)} orders to {topic}, offsets {min(offsets)}..{max(offsets)}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topic", default="orders")
    parser.add_argument("--subscription", default="billing")
    parser.add_argument("--count", type=int, default=100)
    args = parser.parse_args()
    asyncio.run(main(args.topic, args.subscription, args.count))
