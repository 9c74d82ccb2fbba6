"""Defects found by review (each reproduced before its fix), and their siblings."""

from __future__ import annotations

import asyncio
import base64
import struct

import asyncpg
import httpx
import pytest

from sluice.queue import receipts
from sluice.storage.db import plain_url
from tests.conftest import unique
from tests.helpers import (
    ack,
    create_subscription,
    create_topic,
    nack,
    publish,
    pull,
    stats,
    sub_path,
    topic_path,
    topic_with_subscription,
)


def swap_tokens(first: str, second: str) -> tuple[str, str]:
    """Two receipts built from two valid ones, each with the other's token."""
    a, b = (base64.urlsafe_b64decode(r) for r in (first, second))
    return (
        base64.urlsafe_b64encode(a[:20] + b[20:]).decode(),
        base64.urlsafe_b64encode(b[:20] + a[20:]).decode(),
    )


async def test_receipts_with_swapped_tokens_are_stale_and_not_applied(client):
    topic = await topic_with_subscription(client, ack_deadline_seconds=600)
    await publish(client, topic, "a", "b")
    got = await pull(client, topic, "s", 2)
    forged = swap_tokens(got[0]["receipt"], got[1]["receipt"])
    assert await ack(client, topic, "s", list(forged)) == {"acked": 0, "stale": list(forged)}
    # Nothing was applied: both are still in flight, and their own receipts ack them.
    assert (await stats(client, topic, "s"))["in_flight"] == 2
    real = [m["receipt"] for m in got]
    assert await ack(client, topic, "s", real) == {"acked": 2, "stale": []}


async def test_a_receipt_of_another_lease_is_stale(client):
    topic = await topic_with_subscription(client, ack_deadline_seconds=600)
    await publish(client, topic, "a", "b")
    [a] = await pull(client, topic, "s", 1)
    [b] = await pull(client, topic, "s", 1)
    offset, _, seg, token = struct.unpack(">qqi16s", base64.urlsafe_b64decode(a["receipt"]))
    _, lease_b, _, _ = struct.unpack(">qqi16s", base64.urlsafe_b64decode(b["receipt"]))
    moved = base64.urlsafe_b64encode(struct.pack(">qqi16s", offset, lease_b, seg, token)).decode()
    assert await ack(client, topic, "s", [moved]) == {"acked": 0, "stale": [moved]}
    assert receipts.decode(moved) is not None


async def test_turning_ordering_on_while_leases_are_out_keeps_key_order(harness):
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(
        client, ack_deadline_seconds=10, retry_min_seconds=1, retry_max_seconds=1
    )
    r = await client.post(
        topic_path(topic) + "/messages",
        json={"messages": [{"value": 0, "key": "K"}, {"value": 1, "key": "K"}]},
    )
    assert r.status_code == 201
    assert len(await pull(client, topic, "s", 10)) == 2  # both out, unordered
    await create_subscription(client, topic, "s", ordered_by_key=True)
    clock.advance(15)  # both leases expire; their backoff (1 s) too
    first = await pull(client, topic, "s", 10)
    assert [m["value"] for m in first] == [0]  # 1 waits for 0
    s = await stats(client, topic, "s")
    assert (s["in_flight"], s["delayed"]) == (1, 1)
    await ack(client, topic, "s", [first[0]["receipt"]])
    [second] = await pull(client, topic, "s", 10)
    assert (second["value"], second["delivery_attempt"]) == (1, 2)


async def test_an_ack_of_a_key_head_racing_ordering_turned_on_releases_the_key(harness):
    """The ack takes the subscription's lock shared, the configuration change exclusively:
    whichever comes first, the next message of the key is not stranded."""
    client = harness.client
    for _ in range(5):
        topic = await topic_with_subscription(client, ack_deadline_seconds=600)
        r = await client.post(
            topic_path(topic) + "/messages",
            json={"messages": [{"value": 0, "key": "K"}, {"value": 1, "key": "K"}]},
        )
        assert r.status_code == 201
        [head] = await pull(client, topic, "s", 1)
        await asyncio.gather(
            ack(client, topic, "s", [head["receipt"]]),
            create_subscription(client, topic, "s", ordered_by_key=True),
        )
        assert [m["value"] for m in await pull(client, topic, "s", 10)] == [1]


async def test_concurrent_creation_of_one_subscription_never_fails(client):
    """Several consumer instances "ensuring" their subscription at start-up."""
    topic = unique()
    await create_topic(client, topic)
    answers = await asyncio.gather(
        *(
            client.put(sub_path(topic, "s"), json={"max_deliveries": 3, "start": "earliest"})
            for _ in range(6)
        )
    )
    assert sorted(a.status_code for a in answers) == [200] * 5 + [201], [a.text for a in answers]
    assert all(a.json()["max_deliveries"] == 3 for a in answers)


async def test_concurrent_creation_of_one_topic_never_fails(client):
    topic = unique()
    answers = await asyncio.gather(*(client.put(topic_path(topic), json={}) for _ in range(6)))
    assert sorted(a.status_code for a in answers) == [200] * 5 + [201], [a.text for a in answers]


async def test_raising_max_in_flight_wakes_a_waiting_pull(client):
    topic = await topic_with_subscription(client, max_in_flight=1, ack_deadline_seconds=600)
    await publish(client, topic, "a", "b")
    assert len(await pull(client, topic, "s", 10)) == 1
    waiting = asyncio.create_task(pull(client, topic, "s", 10, wait_seconds=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    started = asyncio.get_running_loop().time()
    await create_subscription(client, topic, "s", max_in_flight=5)
    got = await asyncio.wait_for(waiting, 5)
    assert [m["value"] for m in got] == ["b"]
    assert asyncio.get_running_loop().time() - started < 3


async def test_turning_ordering_off_wakes_a_waiting_pull(client):
    topic = await topic_with_subscription(client, ordered_by_key=True, ack_deadline_seconds=600)
    r = await client.post(
        topic_path(topic) + "/messages",
        json={"messages": [{"value": 0, "key": "K"}, {"value": 1, "key": "K"}]},
    )
    assert r.status_code == 201
    assert len(await pull(client, topic, "s", 10)) == 1
    waiting = asyncio.create_task(pull(client, topic, "s", 10, wait_seconds=10))
    await asyncio.sleep(0.3)
    assert not waiting.done()
    await create_subscription(client, topic, "s", ordered_by_key=False)
    got = await asyncio.wait_for(waiting, 5)
    assert [m["value"] for m in got] == [1]


async def test_dead_letter_copies_respect_the_dead_letter_topics_limits(client):
    """A copy that does not fit the dead-letter topic (size, 64 headers with the
    sluice-origin-* ones) is not published there; the message stays parked."""
    dlq = unique("dlq")
    await create_topic(client, dlq, max_message_bytes=300)
    topic = unique()
    await create_topic(client, topic)
    await create_subscription(
        client, topic, "s", max_deliveries=1, dead_letter_topic=dlq, start="earliest"
    )
    many = {f"h{i}": "v" for i in range(62)}
    r = await client.post(
        topic_path(topic) + "/messages",
        json={
            "messages": [
                {"value": "small"},
                {"value": "x" * 400},
                {"value": "many headers", "headers": many},
            ]
        },
    )
    assert r.status_code == 201
    got = await pull(client, topic, "s", 10)
    assert (await nack(client, topic, "s", [m["receipt"] for m in got]))["nacked"] == 3
    parked = (await client.get(sub_path(topic, "s") + "/dead-letters")).json()["messages"]
    assert [m["value"] for m in parked] == ["small", "x" * 400, "many headers"]
    copies = (await client.get(topic_path(dlq) + "/messages")).json()["messages"]
    assert [m["value"] for m in copies] == ["small"]
    assert copies[0]["headers"]["sluice-origin-topic"] == topic
    for copy in copies:
        assert len(copy["headers"]) <= 64


async def test_a_long_poll_whose_client_went_away_leases_nothing(server_factory, db_url):
    """A pull with wait_seconds 20 from a client that disconnects after 1 s: a message
    published afterwards is not leased to the dead connection (with max_deliveries 1 it
    would be dead-lettered unseen), and the next pull gets it at its first attempt."""
    server = server_factory()
    topic = unique()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as client:
        await create_topic(client, topic)
        await create_subscription(client, topic, "s", max_deliveries=1, ack_deadline_seconds=2)
        with pytest.raises(httpx.ReadTimeout):
            async with httpx.AsyncClient(base_url=server.base_url, timeout=1) as gone:
                await gone.post(
                    sub_path(topic, "s") + "/pull", json={"max_messages": 10, "wait_seconds": 20}
                )
        await asyncio.sleep(1)
        await publish(client, topic, "for a live consumer")
        await asyncio.sleep(3)  # past the ack deadline a dead connection's lease would have
        s = (await client.get(sub_path(topic, "s"))).json()
        assert (s["in_flight"], s["dead_lettered"], s["backlog"]) == (0, 0, 1), s
        [m] = await pull(client, topic, "s", 10)
        assert (m["value"], m["delivery_attempt"]) == ("for a live consumer", 1)


class FakeWatch:
    """A long-poll's client as consuming.pull sees it; `gone` is set to say it left."""

    def __init__(self) -> None:
        self.event = asyncio.Event()
        self.started = asyncio.Event()

    def start(self) -> asyncio.Event:
        self.started.set()
        return self.event

    async def gone(self) -> bool:
        return self.event.is_set()


@pytest.mark.parametrize("at_once", [False, True])
async def test_leases_claimed_for_a_client_that_went_away_are_given_back(
    harness, db_url, monkeypatch, at_once
):
    """When the client of a long-poll is gone by the time its claim returns (the pull had
    to wait, or messages were there at once: a stopping worker cancels its pulls), the
    leases go back at once and the attempt is not counted."""
    client = harness.client
    topic = await topic_with_subscription(client, max_deliveries=1, ack_deadline_seconds=600)
    from sluice.queue import consuming

    watch = FakeWatch()
    real_claim = consuming.claim

    async def claim_then_client_leaves(ctx, params):
        result = await real_claim(ctx, params)
        if result.messages:
            watch.event.set()  # the client disconnected while this claim ran
        return result

    monkeypatch.setattr(consuming, "claim", claim_then_client_leaves)
    params = consuming.PullParams(topic, "s", max_messages=10, wait_seconds=10)
    if at_once:
        await publish(client, topic, "m")
    waiting = asyncio.create_task(consuming.pull(harness.ctx, params, client_gone=watch))
    if not at_once:
        await asyncio.wait_for(watch.started.wait(), 10)  # nothing there yet: it waits
        await publish(client, topic, "m")
    outcome = await asyncio.wait_for(waiting, 10)
    assert outcome.messages == []
    assert watch.started.is_set() is not at_once  # answered at once: no listener started
    monkeypatch.setattr(consuming, "claim", real_claim)
    s = await stats(client, topic, "s")
    assert (s["in_flight"], s["dead_lettered"], s["backlog"]) == (0, 0, 1), s
    [m] = await pull(client, topic, "s", 10)
    assert m["delivery_attempt"] == 1
    conn = await asyncpg.connect(plain_url(db_url))
    try:
        kinds = await conn.fetch(
            "SELECT e.kind FROM sluice.lease_events e JOIN sluice.topics t USING (topic_id) "
            "WHERE t.name = $1",
            topic,
        )
    finally:
        await conn.close()
    assert [k["kind"] for k in kinds] == ["released"]


async def test_a_group_commit_whose_outcome_is_unknown_is_not_retried(harness, monkeypatch):
    """The combined publish of a group committed, then the connection broke before the
    answer: retrying each request alone would store every message twice. Every request of
    the group is answered 503 (clients retry with dedup ids) and nothing is stored twice."""
    from sluice.storage import log as log_sql

    client = harness.client
    topic = unique()
    await create_topic(client, topic)
    real = log_sql.publish_topics
    calls: list[int] = []
    gate = asyncio.Event()

    async def committed_then_lost(conn, topics, skew):
        calls.append(sum(len(messages) for _, messages, _ in topics))
        call = len(calls)
        if call == 1:  # the writer holds a request until the others queue up
            await gate.wait()
        result = await real(conn, topics, skew)
        if call == 2:  # the group of the five queued requests
            raise ConnectionResetError("connection lost after COMMIT was sent")
        return result

    monkeypatch.setattr(log_sql, "publish_topics", committed_then_lost)

    def send(value: int) -> asyncio.Task:
        body = {"messages": [{"value": value}]}
        return asyncio.create_task(client.post(topic_path(topic) + "/messages", json=body))

    async def calls_reach(count: int) -> None:
        async with asyncio.timeout(10):
            while len(calls) < count:
                await asyncio.sleep(0.01)

    requests = [send(0)]
    await calls_reach(1)  # the writer holds request 0
    requests += [send(i) for i in range(1, 6)]
    await asyncio.sleep(0.2)  # the other five queue up behind it
    gate.set()
    answers = await asyncio.gather(*requests)
    assert calls == [1, 5], calls
    assert sorted(a.status_code for a in answers) == [201, 503, 503, 503, 503, 503]
    for answer in answers:
        if answer.status_code == 503:
            assert answer.headers["retry-after"] == "1"
            assert "dedup_id" in answer.json()["detail"]
    stored = (await client.get(topic_path(topic) + "/messages")).json()["messages"]
    assert sorted(m["value"] for m in stored) == list(range(6))  # each once


async def test_the_disconnect_watch_looks_without_waiting_and_then_listens():
    """`gone()` answers at once whether the next ASGI message is the disconnect (as a
    server's receive() gives it when the connection is closed) or nothing yet (receive()
    would wait); the receive stays usable, and `start()` then sets its event on the
    disconnect."""
    from starlette.requests import Request

    from sluice.api.disconnect import DisconnectWatch

    scope = {"type": "http", "method": "POST", "path": "/", "headers": []}

    async def closed() -> dict:
        return {"type": "http.disconnect"}

    assert await DisconnectWatch(Request(scope, closed)).gone()

    arrived = asyncio.Event()

    async def connected() -> dict:
        await arrived.wait()  # as a server's receive() waits for the next message
        return {"type": "http.disconnect"}

    watch = DisconnectWatch(Request(scope, connected))
    assert not await watch.gone()
    # The look never suspends (no turn of the event loop: on a busy server a turn is all
    # the other requests' work): the coroutine finishes on its first step.
    look = watch.gone()
    with pytest.raises(StopIteration) as finished:
        look.send(None)
    assert finished.value.value is False
    assert not arrived._waiters  # the peeked receive() left no waiter behind
    event = watch.start()
    await asyncio.sleep(0.01)
    assert not event.is_set()
    arrived.set()
    await asyncio.wait_for(event.wait(), 5)
    assert await watch.gone()
    await watch.close()
