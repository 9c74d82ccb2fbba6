"""Invoice every order: pull `orders` events over HTTP, and in ONE database transaction
write the invoice and ack the message through SQL (sluice.ack). Either both happen or
neither: a consumer killed between the two leaves nothing behind, the message comes back
after its ack deadline, and the order is invoiced exactly once.

    SLUICE_URL=http://127.0.0.1:8000 DATABASE_URL=postgresql://... python consumer.py

Runs until the topic has been empty for IDLE_EXIT_SECONDS (default: forever). For the crash
demonstration, PAUSE_BEFORE_COMMIT=N makes it stop before committing the N-th message
(printing PAUSED) so that it can be killed there.
"""

from __future__ import annotations

import asyncio
import os
import time

import asyncpg
import httpx

TOPIC = "orders"
SUBSCRIPTION = os.environ.get("SUBSCRIPTION", "invoicing")


async def invoice(conn: asyncpg.Connection, message: dict, pause: bool) -> bool:
    """Apply the effect and ack, atomically. False when the receipt had gone stale (the
    lease expired and the message went to someone else): nothing is written then."""
    order = message["value"]
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO invoices (order_id, amount) VALUES ($1, $2)",
            order["order_id"],
            order["total"],
        )
        [row] = await conn.fetch(
            "SELECT applies FROM sluice.ack($1, $2, $3)",
            TOPIC,
            SUBSCRIPTION,
            [message["receipt"]],
        )
        if not row["applies"]:
            raise StaleReceipt  # rolls the invoice back with the transaction
        if pause:
            print("PAUSED", order["order_id"], flush=True)
            await asyncio.sleep(3600)
    return True


class StaleReceipt(Exception):
    pass


async def main() -> None:
    pause_at = int(os.environ.get("PAUSE_BEFORE_COMMIT", "0"))
    idle_exit = float(os.environ.get("IDLE_EXIT_SECONDS", "inf"))
    headers = {}
    if key := os.environ.get("SLUICE_API_KEY"):
        headers["Authorization"] = f"Bearer {key}"
    conn = await asyncpg.connect(os.environ["DATABASE_URL"])
    handled = 0
    idle_since = time.monotonic()
    base_url = os.environ["SLUICE_URL"]
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=30) as http:
        while time.monotonic() - idle_since < idle_exit:
            r = await http.post(
                f"/v1/topics/{TOPIC}/subscriptions/{SUBSCRIPTION}/pull",
                json={"max_messages": 10, "wait_seconds": 1},
            )
            r.raise_for_status()
            messages = r.json()["messages"]
            if messages:
                idle_since = time.monotonic()
            for message in messages:
                handled += 1
                try:
                    await invoice(conn, message, pause=handled == pause_at)
                except StaleReceipt:
                    print("stale", message["offset"], flush=True)
    await conn.close()
    print("done", handled, flush=True)


if __name__ == "__main__":
    asyncio.run(main())
