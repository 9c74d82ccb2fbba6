"""A lease that expires while its consumer still works (PITFALLS: leasing): the late ack
is stale, it does not steal the new lease, and the redelivered copy is acked normally."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

import pytest

from tests.conftest import unique
from tests.helpers import ack, create_subscription, create_topic, publish, pull, stats, sub_path


async def _sleep_until(moment: datetime, extra: float) -> None:
    await asyncio.sleep(max(0.0, (moment - datetime.now(UTC)).total_seconds()) + extra)


@pytest.mark.timeout(60)
async def test_late_ack_after_lease_expiry_is_stale_and_redelivery_is_acked(client):
    topic = unique("lease")
    await create_topic(client, topic)
    # Deadline 1 s; after expiry the message is deliverable again exactly 2 s later
    # (min = max backoff: no jitter), which leaves a window where the lease has expired
    # but the message has not been redelivered yet.
    await create_subscription(
        client,
        topic,
        "s",
        start="earliest",
        ack_deadline_seconds=1,
        retry_min_seconds=2,
        retry_max_seconds=2,
        max_deliveries=0,
    )
    offsets = await publish(client, topic, "slow-a", "slow-b", "quick")
    first = await pull(client, topic, "s", 10)
    assert [m["offset"] for m in first] == offsets
    assert all(m["delivery_attempt"] == 1 for m in first)
    old = {m["value"]: m["receipt"] for m in first}
    deadline = max(datetime.fromisoformat(m["ack_deadline"]) for m in first)

    # Control: an ack within the deadline works (so "stale" below is not a blanket answer).
    assert await ack(client, topic, "s", [old["quick"]]) == {"acked": 1, "stale": []}

    # The consumer of slow-a and slow-b works past the deadline.
    await _sleep_until(deadline, 0.3)
    late = await ack(client, topic, "s", [old["slow-a"]])
    assert late == {"acked": 0, "stale": [old["slow-a"]]}, "expired lease, not yet redelivered"
    r = await client.post(
        sub_path(topic, "s") + "/extend",
        json={"receipts": [old["slow-b"]], "ack_deadline_seconds": 60},
    )
    assert r.status_code == 200, r.text
    assert r.json() == {"extended": 0, "stale": [old["slow-b"]]}, "an expired lease is not revived"

    # The messages come back as attempt 2 with new receipts; the acked one does not.
    second = await pull(client, topic, "s", 10, wait_seconds=10)
    assert sorted(m["value"] for m in second) == ["slow-a", "slow-b"], second
    assert all(m["delivery_attempt"] == 2 for m in second)
    new = {m["value"]: m["receipt"] for m in second}
    assert not set(new.values()) & set(old.values())

    # The first consumer finally finishes: its acks are stale and leave the new leases alone.
    late = await ack(client, topic, "s", [old["slow-a"], old["slow-b"], old["quick"]])
    assert late["acked"] == 0
    assert sorted(late["stale"]) == sorted([old["slow-a"], old["slow-b"], old["quick"]])
    current = await stats(client, topic, "s")
    assert current["in_flight"] == 2, current

    # The redelivered copies are acked normally, once.
    done = await ack(client, topic, "s", [new["slow-a"], new["slow-b"]])
    assert done == {"acked": 2, "stale": []}
    again = await ack(client, topic, "s", [new["slow-a"]])
    assert again == {"acked": 0, "stale": [new["slow-a"]]}

    # Nothing comes back after deadline + backoff.
    assert await pull(client, topic, "s", 10, wait_seconds=3.5) == []
    final = await stats(client, topic, "s")
    assert final["lag"] == 0 and final["in_flight"] == 0, final
