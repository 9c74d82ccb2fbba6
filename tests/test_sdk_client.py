"""sluice_client.Client and AsyncClient against a real `sluice serve` process (real HTTP):
every operation round-trips, and error answers map to the SDK's exception classes."""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import unique
from tests.sdk_support import sc, server  # noqa: F401 (the fixture)


def test_sync_client_round_trips_every_operation(server):
    with sc.Client(server.base_url) as c:
        assert c.ready()
        prefix = unique("sdk")
        names = [f"{prefix}-{i}" for i in range(3)]
        t = c.create_topic(names[0], retention_seconds=3600)
        assert isinstance(t, sc.Topic) and t.created and t.retention_seconds == 3600
        for name in names[1:]:
            assert c.create_topic(name).created
        again = c.update_topic(names[0], dedup_window_seconds=60)
        assert again.created is False
        assert again.dedup_window_seconds == 60 and again.retention_seconds == 3600
        # list with paging: limit 1 pages through every topic, ours included
        first = c.list_topics(limit=1)
        assert len(first.items) == 1 and first.next_after is not None
        seen = [t.name for t in c.iter_topics(limit=2)]
        assert set(names) <= set(seen)
        assert len(seen) == len(set(seen))

        topic = names[0]
        results = c.publish(
            topic,
            [
                {"value": {"n": 1}, "key": "k1", "headers": {"h": "v"}, "dedup_id": "d-1"},
                sc.OutgoingMessage("two"),
                sc.OutgoingMessage(3, delay_seconds=900),
            ],
        )
        assert [r.duplicate for r in results] == [False, False, False]
        offsets = [r.offset for r in results]
        assert offsets == sorted(offsets)
        dup = c.publish_one(topic, {"n": 1}, dedup_id="d-1")
        assert dup == sc.PublishResult(offsets[0], True)
        assert c.get_topic(topic).message_count == 3

        page = c.browse(topic, limit=10)
        assert [m.value for m in page.messages] == [{"n": 1}, "two", 3]
        assert page.messages[0].key == "k1" and page.messages[0].headers == {"h": "v"}
        assert page.messages[2].deliver_at is not None
        pages = list(c.browse_pages(topic, limit=2))
        assert [len(p.messages) for p in pages] == [2, 1]
        assert c.get_message(topic, offsets[1]).value == "two"

        sub = c.create_subscription(
            topic, "s1", start="earliest", ack_deadline_seconds=5, retry_min_seconds=0
        )
        assert sub.created and sub.ack_deadline_seconds == 5 and sub.backlog == 2
        sub = c.update_subscription(topic, "s1", max_deliveries=3, rate_limit_burst=None)
        assert sub.created is False and sub.max_deliveries == 3 and sub.ack_deadline_seconds == 5
        assert c.get_subscription(topic, "s1").lag == 3
        c.create_subscription(topic, "s2")
        subs = c.list_subscriptions(topic, limit=1)
        assert [s.name for s in subs.items] == ["s1"] and subs.next_after == "s1"
        rest = c.list_subscriptions(topic, after="s1")
        assert [s.name for s in rest.items] == ["s2"]

        pulled = c.pull(topic, "s1", max_messages=10, wait_seconds=1)
        assert [d.offset for d in pulled] == offsets[:2]
        d1, d2 = pulled.messages
        assert isinstance(d1, sc.Delivery) and d1.delivery_attempt == 1 and d1.receipt
        assert d1.ack_deadline is not None and pulled.acked is None
        assert c.extend(topic, "s1", [d1], ack_deadline_seconds=20).extended == 1
        assert c.nack(topic, "s1", [d2.receipt], delay_seconds=0).nacked == 1
        ack = c.ack(topic, "s1", [d1])
        assert ack == sc.AckResult(1, [])
        assert c.ack(topic, "s1", [d1.receipt]).stale == [d1.receipt]
        again = c.pull(topic, "s1", max_messages=10, wait_seconds=1)
        assert [(d.offset, d.delivery_attempt) for d in again] == [(offsets[1], 2)]
        both = c.pull(topic, "s1", max_messages=10, ack=[again.messages[0], "bogus"])
        assert both.acked == 1 and both.stale == ["bogus"] and len(both) == 0

        assert c.seek(topic, "s1", to="earliest").committed_offset == offsets[0]
        assert c.seek(topic, "s1", offset=offsets[1]).committed_offset == offsets[1]
        assert isinstance(c.seek(topic, "s1", time=t.created_at), sc.SeekResult)
        assert c.seek(topic, "s1", to="latest").committed_offset > offsets[1]

        # dead letters: max_deliveries 1, one nack parks the message
        c.create_subscription(topic, "dl", start="earliest", max_deliveries=1)
        d = c.pull(topic, "dl", max_messages=1).messages[0]
        c.nack(topic, "dl", [d], delay_seconds=0)
        parked = c.dead_letters(topic, "dl")
        assert [m.offset for m in parked.messages] == [d.offset]
        assert isinstance(parked.messages[0], sc.DeadLetterMessage)
        assert parked.messages[0].delivery_attempts == 1
        assert c.get_subscription(topic, "dl").dead_lettered == 1
        assert c.redrive(topic, "dl", [d.offset]).redriven == 1
        assert c.dead_letters(topic, "dl").messages == []
        assert c.pull(topic, "dl", max_messages=1, wait_seconds=2).messages[0].offset == d.offset
        assert c.redrive(topic, "dl").redriven == 0
        # a dead letter asked for: parked at once with max_deliveries 0 (unlimited)
        c.create_subscription(topic, "dl0", start="earliest", max_deliveries=0)
        d = c.pull(topic, "dl0", max_messages=1).messages[0]
        with pytest.raises(sc.BadRequest):  # a delay and a dead letter contradict
            c.nack(topic, "dl0", [d], delay_seconds=1, dead_letter=True)
        assert c.nack(topic, "dl0", [d], dead_letter=True).nacked == 1
        assert [m.offset for m in c.dead_letters(topic, "dl0").messages] == [d.offset]

        c.delete_subscription(topic, "s2")
        with pytest.raises(sc.NotFound):
            c.get_subscription(topic, "s2")
        for name in names:
            c.delete_topic(name)
        with pytest.raises(sc.NotFound):
            c.get_topic(topic)


async def test_async_client_round_trips_every_operation(server):
    async with sc.AsyncClient(server.base_url) as c:
        topic = unique("sdka")
        assert (await c.create_topic(topic)).created
        assert (await c.update_topic(topic, max_message_bytes=2048)).max_message_bytes == 2048
        assert (await c.get_topic(topic)).head_offset is None
        assert topic in [t.name async for t in c.iter_topics(limit=500)]
        page = await c.list_topics(limit=1)
        assert len(page.items) == 1
        results = await c.publish(topic, [{"value": i, "key": f"k{i}"} for i in range(5)])
        offsets = [r.offset for r in results]
        assert (await c.publish_one(topic, "x", headers={"a": "b"})).offset > offsets[-1]
        assert (await c.get_message(topic, offsets[2])).value == 2
        browsed = [m.value async for p in c.browse_pages(topic, limit=2) for m in p.messages]
        assert browsed == [0, 1, 2, 3, 4, "x"]
        assert len((await c.browse(topic, from_offset=offsets[4])).messages) == 2

        sub = await c.create_subscription(topic, "s", start="earliest", max_deliveries=1)
        assert sub.created and sub.backlog == 6
        assert (await c.update_subscription(topic, "s", ordered_by_key=True)).ordered_by_key
        assert [s.name for s in (await c.list_subscriptions(topic)).items] == ["s"]
        pulled = await c.pull(topic, "s", max_messages=3, wait_seconds=1)
        assert [d.value for d in pulled] == [0, 1, 2]
        ext = await c.extend(topic, "s", pulled.messages, ack_deadline_seconds=60)
        assert ext.extended == 3
        assert (await c.ack(topic, "s", pulled.messages[:1])).acked == 1
        assert (await c.nack(topic, "s", [pulled.messages[1]], delay_seconds=0)).nacked == 1
        nxt = await c.pull(topic, "s", max_messages=10, ack=[pulled.messages[2]])
        assert nxt.acked == 1 and [d.value for d in nxt] == [3, 4, "x"]
        stats = await c.get_subscription(topic, "s")
        assert stats.dead_lettered == 1 and stats.in_flight == 3
        dls = await c.dead_letters(topic, "s")
        assert [m.value for m in dls.messages] == [1]
        assert (await c.redrive(topic, "s")).redriven == 1
        seek = await c.seek(topic, "s", to="earliest")
        assert seek.committed_offset == offsets[0]
        await c.delete_subscription(topic, "s")
        await c.delete_topic(topic)
        with pytest.raises(sc.NotFound):
            await c.get_topic(topic)


def test_errors_map_to_exception_classes(server):
    with sc.Client(server.base_url) as c:
        missing = unique("nope")
        with pytest.raises(sc.NotFound) as nf:
            c.get_topic(missing)
        assert nf.value.status == 404 and nf.value.title and nf.value.detail
        assert nf.value.type.startswith("https://")
        with pytest.raises(sc.NotFound):
            c.publish(missing, [{"value": 1}])
        topic = unique("sdke")
        c.create_topic(topic, max_message_bytes=16)
        with pytest.raises(sc.BadRequest) as bad:
            c.create_subscription(topic, "s", ack_deadline_seconds=0)
        assert bad.value.status == 422 and bad.value.errors
        with pytest.raises(sc.BadRequest) as too_big:
            c.publish(topic, [{"value": "x" * 100}])
        assert too_big.value.status == 413
        with pytest.raises(sc.NotFound):
            c.seek(topic, "missing-sub", to="earliest")
        deep: object = 1
        for _ in range(80):  # deeper than the API's JSON nesting limit: 400
            deep = [deep]
        with pytest.raises(sc.BadRequest) as malformed:
            c.publish(topic, [{"value": deep}])
        assert malformed.value.status == 400
        with pytest.raises(TypeError):
            c.create_subscription(topic, "s", ack_deadlin_seconds=3)

        # 429: a subscription limited to one message per 10 s, burst 1
        c.create_subscription(
            topic, "slow", start="earliest", rate_limit_per_second=0.1, rate_limit_burst=1
        )
        c.publish(topic, [{"value": i} for i in range(3)])
        first = c.pull(topic, "slow", max_messages=1)
        assert len(first) == 1
        with pytest.raises(sc.RateLimited) as limited:
            c.pull(topic, "slow", max_messages=1, ack=[first.messages[0]])
        err = limited.value
        assert err.status == 429 and err.retry_after is not None and 1 <= err.retry_after <= 11
        assert err.acked == 1  # the acks of a refused pull stay applied
        assert isinstance(err, sc.SluiceError)
        c.delete_topic(topic)


@pytest.mark.parametrize(
    ("status", "cls"),
    [
        (400, sc.BadRequest),
        (401, sc.Unauthorized),
        (403, sc.Forbidden),
        (404, sc.NotFound),
        (409, sc.Conflict),
        (413, sc.BadRequest),
        (422, sc.BadRequest),
        (429, sc.RateLimited),
        (500, sc.Unavailable),
        (503, sc.Unavailable),
    ],
)
def test_every_problem_status_maps_to_its_class(status, cls):
    # Statuses the shared test server cannot be made to answer without side effects
    # (401/403 need API keys, which would close the API for every test) are served here.
    def answer(request: httpx.Request) -> httpx.Response:
        assert request.headers["authorization"] == "Bearer secret"
        body = {"type": "https://sluice.dev/problems/x", "title": "T", "status": status}
        body["detail"] = "why"
        return httpx.Response(
            status,
            json=body,
            headers={"content-type": "application/problem+json", "retry-after": "7"},
        )

    with (
        sc.Client(
            "http://sluice.test", api_key="secret", transport=httpx.MockTransport(answer)
        ) as c,
        pytest.raises(cls) as info,
    ):
        c.get_topic("t")
    err = info.value
    assert (err.status, err.title, err.detail, err.type) == (
        status,
        "T",
        "why",
        "https://sluice.dev/problems/x",
    )
    if cls in (sc.RateLimited, sc.Unavailable):
        assert err.retry_after == 7


def test_configuration_from_environment_and_connection_errors(monkeypatch):
    monkeypatch.setenv("SLUICE_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("SLUICE_API_KEY", "k-env")
    seen = {}

    def answer(request: httpx.Request) -> httpx.Response:
        seen["auth"] = request.headers.get("authorization")
        seen["url"] = str(request.url)
        raise httpx.ConnectError("refused", request=request)

    with sc.Client(transport=httpx.MockTransport(answer)) as c:
        assert c.base_url == "http://127.0.0.1:9"
        with pytest.raises(sc.ConnectionFailed) as info:
            c.get_topic("t")
    assert info.value.status is None and isinstance(info.value, sc.SluiceError)
    assert seen == {"auth": "Bearer k-env", "url": "http://127.0.0.1:9/v1/topics/t"}

    async def go():
        async with sc.AsyncClient() as ac:
            with pytest.raises(sc.ConnectionFailed):
                await ac.get_topic("t")  # nothing listens on port 9

    asyncio.run(go())
