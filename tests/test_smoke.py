from tests.conftest import unique
from tests.helpers import ack, publish, pull, topic_with_subscription


async def test_publish_pull_ack_roundtrip(client):
    topic = await topic_with_subscription(client, start="earliest")
    offsets = await publish(client, topic, {"n": 1}, {"n": 2})
    got = await pull(client, topic, "s", 10)
    assert [m["offset"] for m in got] == offsets
    assert (await ack(client, topic, "s", [m["receipt"] for m in got]))["acked"] == 2


async def test_put_without_body_creates_with_defaults(client):
    topic = unique()
    r = await client.put(f"/v1/topics/{topic}")
    assert r.status_code == 201, r.text
    assert r.json()["retention_seconds"] == 7 * 24 * 3600
    r = await client.put(f"/v1/topics/{topic}/subscriptions/s")
    assert r.status_code == 201, r.text
    assert r.json()["ack_deadline_seconds"] == 30
