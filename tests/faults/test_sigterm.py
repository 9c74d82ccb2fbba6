"""SIGTERM drains (SPEC 4.1, 5): waiting long-polls are answered at once with what they
have, in-flight acks complete, the process exits promptly, and nothing acked comes back."""

from __future__ import annotations

import asyncio
import time

import asyncpg
import httpx
import pytest

from sluice.storage.db import plain_url
from tests.conftest import unique

LONG_POLLS = 20
MESSAGES = 200
ACK_REQUESTS = 3
ACKED_PER_REQUEST = 50


async def _blocked_acks(db_url: str) -> int:
    """Sessions of this database waiting for a lock. (Asked on a connection of its own:
    inside a transaction, pg_stat_activity would show the same snapshot every time.)"""
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND datname = current_database()"
        )
    finally:
        await conn.close()


async def _in_progress(client: httpx.AsyncClient, base: str) -> float:
    metrics = (await client.get(f"{base}/metrics")).text
    for line in metrics.splitlines():
        if line.startswith("sluice_http_requests_in_progress "):
            return float(line.split()[1])
    raise AssertionError("no sluice_http_requests_in_progress in /metrics")


@pytest.mark.timeout(180)
async def test_sigterm_answers_long_polls_and_finishes_in_flight_acks(db_url, sluice_servers):
    server = sluice_servers(db_url)
    base = server.base_url
    topic, idle_topic = unique("term"), unique("term-idle")
    work = f"{base}/v1/topics/{topic}/subscriptions/work"
    idle = f"{base}/v1/topics/{idle_topic}/subscriptions/idle"
    async with httpx.AsyncClient(timeout=60) as client:
        for t in (topic, idle_topic):
            assert (await client.put(f"{base}/v1/topics/{t}", json={})).status_code == 201
        backoff = {"retry_min_seconds": 0.2, "retry_max_seconds": 0.2}
        r = await client.put(work, json={"start": "earliest", **backoff})
        assert r.status_code == 201, r.text
        assert (await client.put(idle, json={})).status_code == 201
        batch = [{"value": i} for i in range(MESSAGES)]
        r = await client.post(f"{base}/v1/topics/{topic}/messages", json={"messages": batch})
        assert r.status_code == 201, r.text
        r = await client.post(
            work + "/pull", json={"max_messages": 1000, "ack_deadline_seconds": 10}
        )
        leased = r.json()["messages"]
        assert len(leased) == MESSAGES
        to_ack = leased[: ACK_REQUESTS * ACKED_PER_REQUEST]
        acked_offsets = {m["offset"] for m in to_ack}
        unacked_offsets = {m["offset"] for m in leased} - acked_offsets

        # Long-polls that would wait 20 s.
        polls = [
            asyncio.create_task(
                client.post(idle + "/pull", json={"max_messages": 10, "wait_seconds": 20})
            )
            for _ in range(LONG_POLLS)
        ]
        answered_at: list[float] = []
        for poll in polls:
            poll.add_done_callback(lambda _task: answered_at.append(time.monotonic()))
        # Acks held in flight inside the server: another session holds the subscription's
        # lock exclusively (as a claim does), so the first waits for it in Postgres and the
        # others, queued behind that write, for the next one (app.queue.settle_groups).
        db = await asyncpg.connect(plain_url(db_url))
        try:
            lock = db.transaction()
            await lock.start()
            await db.execute(
                "SELECT sluice.lock_subscription(s.sub_id, true) FROM sluice.subscriptions s "
                "JOIN sluice.topics t USING (topic_id) WHERE t.name = $1 AND s.name = 'work'",
                topic,
            )
            acks = [
                asyncio.create_task(
                    client.post(
                        work + "/ack",
                        json={"receipts": [m["receipt"] for m in to_ack[i::ACK_REQUESTS]]},
                    )
                )
                for i in range(ACK_REQUESTS)
            ]
            deadline = time.monotonic() + 8  # the server's lock_timeout is 10 s
            while await _blocked_acks(db_url) < 1:
                assert time.monotonic() < deadline, "the acks never reached the database"
                await asyncio.sleep(0.05)
            # Every ack is in the server: the long-polls, the acks and this scrape in progress.
            while await _in_progress(client, base) < LONG_POLLS + ACK_REQUESTS + 1:
                assert time.monotonic() < deadline, "the acks never reached the server"
                await asyncio.sleep(0.05)
            assert not any(p.done() for p in polls), "long-polls should still be waiting"

            signalled = time.monotonic()
            server.sigterm()
            await asyncio.sleep(0.5)
            assert not any(a.done() for a in acks)
            await lock.rollback()  # the in-flight acks may proceed now
        finally:
            await db.close()

        poll_answers = await asyncio.gather(*polls)
        polls_done = max(answered_at) - signalled
        ack_answers = await asyncio.gather(*acks)
        exit_code = await asyncio.to_thread(server.proc.wait, 30)
        exited = time.monotonic() - signalled
        print(
            f"\nSIGTERM: {LONG_POLLS} long-polls answered within {polls_done:.2f}s, "
            f"process exited ({exit_code}) after {exited:.2f}s"
        )
        for answer in poll_answers:
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"messages": []}
        assert polls_done < 5.0, "waiting long-polls were not ended early"
        for answer in ack_answers:
            assert answer.status_code == 200, answer.text
            assert answer.json() == {"acked": ACKED_PER_REQUEST, "stale": []}
        assert exited < 10.0, server.log_tail()
        assert exit_code == 0, server.log_tail()

        # A new server: the unacked leases come back after their deadline, the acked never.
        server2 = await asyncio.to_thread(sluice_servers, db_url)
        work2 = work.replace(base, server2.base_url)
        seen: dict[int, int] = {}
        deadline = time.monotonic() + 40
        quiet_until: float | None = None  # once all expected came back, watch 1.5 s more
        while quiet_until is None or time.monotonic() < quiet_until:
            assert time.monotonic() < deadline, (sorted(seen), sorted(unacked_offsets))
            r = await client.post(work2 + "/pull", json={"max_messages": 1000, "wait_seconds": 1})
            assert r.status_code == 200, r.text
            got = r.json()["messages"]
            for m in got:
                seen[m["offset"]] = seen.get(m["offset"], 0) + 1
            if got:
                receipts = [m["receipt"] for m in got]
                r = await client.post(work2 + "/ack", json={"receipts": receipts})
                assert r.json()["acked"] == len(got), r.text
            if quiet_until is None and unacked_offsets <= set(seen):
                quiet_until = time.monotonic() + 1.5
        redelivered_acked = acked_offsets & set(seen)
        assert not redelivered_acked, f"acked before SIGTERM, delivered again: {redelivered_acked}"
        assert all(n == 1 for n in seen.values()), seen
        r = await client.get(work2)
        assert r.json()["lag"] == 0, r.text
