"""Subscription endpoints: create/update (merge), validation, get/list/delete, 404s, and
the stats across a message's lifecycle; where a new subscription starts."""

from __future__ import annotations

import asyncio
from datetime import datetime

import asyncpg
import pytest

from sluice.storage.db import plain_url
from tests.conftest import unique
from tests.helpers import (
    JSON,
    ack,
    assert_problem,
    create_subscription,
    create_topic,
    nack,
    publish,
    pull,
    stats,
    sub_path,
    topic_with_subscription,
)

DEFAULTS = {
    "ack_deadline_seconds": 30,
    "max_deliveries": 10,
    "retry_min_seconds": 1.0,
    "retry_max_seconds": 600.0,
    "dead_letter_topic": None,
    "ordered_by_key": False,
    "rate_limit_per_second": None,
    "rate_limit_burst": None,
    "max_in_flight": None,
}
STAT_FIELDS = (
    "backlog",
    "in_flight",
    "delayed",
    "dead_lettered",
    "committed_offset",
    "head_offset",
    "lag",
    "oldest_unacked_age_seconds",
    "rates_per_second",
)


def counts(body: dict) -> dict:
    return {k: body[k] for k in ("backlog", "in_flight", "delayed", "dead_lettered", "lag")}


# ---- create / update ---------------------------------------------------------------------


async def test_create_returns_201_with_defaults_and_stats(client):
    topic = unique()
    await create_topic(client, topic)
    r = await client.put(sub_path(topic, "s"), json={})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["topic"] == topic
    assert body["name"] == "s"
    assert {k: body[k] for k in DEFAULTS} == DEFAULTS
    for field in STAT_FIELDS:
        assert field in body, field
    assert counts(body) == {
        "backlog": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead_lettered": 0,
        "lag": 0,
    }
    assert body["head_offset"] is None
    assert body["committed_offset"] == 0
    assert body["oldest_unacked_age_seconds"] is None
    assert set(body["rates_per_second"]) == {
        "delivered",
        "acked",
        "nacked",
        "expired",
        "dead_lettered",
    }
    assert datetime.fromisoformat(body["created_at"]).tzinfo is not None


async def test_create_with_every_option_then_update_merges(client):
    topic, dlq = unique(), unique("dlq")
    await create_topic(client, topic)
    await create_topic(client, dlq)
    config = {
        "ack_deadline_seconds": 43200,
        "max_deliveries": 0,
        "retry_min_seconds": 2.5,
        "retry_max_seconds": 2.5,
        "dead_letter_topic": dlq,
        "ordered_by_key": True,
        "rate_limit_per_second": 50.5,
        "rate_limit_burst": 7,
        "max_in_flight": 3,
    }
    r = await client.put(sub_path(topic, "s"), json={**config, "start": "earliest"})
    assert r.status_code == 201, r.text
    assert {k: r.json()[k] for k in config} == config
    created_at = r.json()["created_at"]

    # Update: only the fields sent change; the answer is 200, not a second creation.
    r = await client.put(sub_path(topic, "s"), json={"ack_deadline_seconds": 1})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in config} == {**config, "ack_deadline_seconds": 1}
    assert r.json()["created_at"] == created_at

    r = await client.put(sub_path(topic, "s"), json={})
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in config} == {**config, "ack_deadline_seconds": 1}

    # Nullable options can be cleared explicitly.
    r = await client.put(
        sub_path(topic, "s"),
        json={
            "dead_letter_topic": None,
            "rate_limit_per_second": None,
            "rate_limit_burst": None,
            "max_in_flight": None,
        },
    )
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["dead_letter_topic"] is None
    assert body["rate_limit_per_second"] is None
    assert body["max_in_flight"] is None
    assert body["ordered_by_key"] is True

    got = await client.get(sub_path(topic, "s"))
    assert {k: got.json()[k] for k in config} == {k: body[k] for k in config}


async def test_start_applies_only_on_creation(client):
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, "old")
    await create_subscription(client, topic, "s")  # latest
    # Updating with start=earliest does not rewind an existing subscription.
    r = await client.put(sub_path(topic, "s"), json={"start": "earliest"})
    assert r.status_code == 200, r.text
    assert await pull(client, topic, "s") == []


@pytest.mark.parametrize(
    "body",
    [
        {"ack_deadline_seconds": 0},
        {"ack_deadline_seconds": 43201},
        {"ack_deadline_seconds": -5},
        {"ack_deadline_seconds": "soon"},
        {"ack_deadline_seconds": 1.5},
        {"max_deliveries": -1},
        {"max_deliveries": "x"},
        {"retry_min_seconds": -1},
        {"retry_max_seconds": -1},
        {"retry_min_seconds": 10, "retry_max_seconds": 5},
        {"retry_min_seconds": 700},  # above the default retry_max of 600
        {"ordered_by_key": "maybe"},
        {"rate_limit_per_second": 0},
        {"rate_limit_per_second": -3},
        # The token bucket's arithmetic must stay finite: 1/rate for the next token.
        {"rate_limit_per_second": 1e-320},  # subnormal
        {"rate_limit_per_second": 5e-324},
        {"rate_limit_per_second": 0.0009},  # below one message every 1000 s
        {"rate_limit_per_second": 1_000_001},
        {"rate_limit_per_second": 1e300},
        {"rate_limit_burst": 0},
        {"rate_limit_per_second": 1, "rate_limit_burst": 1_000_001},
        {"retry_min_seconds": 1e300},
        {"retry_max_seconds": 1e300},
        {"ack_deadline_seconds": 1e300},
        {"rate_limit_burst": 5},  # a burst without a rate
        {"max_in_flight": 0},
        {"max_in_flight": -1},
        {"start": "middle"},
        {"start": None},
        {"dead_letter_topic": "bad name!"},
        {"ack_deadline": 30},  # typo: unknown fields are refused
        {"ack_deadline_seconds": None},
        {"max_deliveries": None},
        {"ordered_by_key": None},
    ],
)
async def test_invalid_options_are_422_and_nothing_is_created(client, body):
    topic = unique()
    await create_topic(client, topic)
    r = await client.put(sub_path(topic, "s"), json=body)
    assert_problem(r, 422)
    assert_problem(await client.get(sub_path(topic, "s")), 404)


async def test_rate_limit_bounds_are_inclusive(client):
    topic = unique()
    await create_topic(client, topic)
    for sub, config in (
        ("slowest", {"rate_limit_per_second": 0.001}),
        ("fastest", {"rate_limit_per_second": 1_000_000, "rate_limit_burst": 1_000_000}),
    ):
        body = await create_subscription(client, topic, sub, **config)
        assert {k: body[k] for k in config} == config


@pytest.mark.parametrize(
    "body",
    [
        b'{"retry_min_seconds": Infinity}',
        b'{"retry_max_seconds": NaN}',
        b'{"rate_limit_per_second": -Infinity}',
        b'{"rate_limit_per_second": 1e999}',
        b'{"rate_limit_per_second": 1e-999}',
        b'{"retry_min_seconds": 1e-400}',
    ],
)
async def test_non_finite_and_out_of_range_numbers_are_not_json(client, body):
    """Infinity, NaN and numbers a double cannot hold never reach the settings (400)."""
    topic = unique()
    await create_topic(client, topic)
    r = await client.put(sub_path(topic, "s"), content=body, headers=JSON)
    assert_problem(r, 400)
    assert_problem(await client.get(sub_path(topic, "s")), 404)


async def test_the_tiniest_floats_work_where_zero_is_allowed(harness):
    """Retry backoff, nack delay and wait accept 0, so any positive double too, down to the
    smallest subnormal: the answers are deliveries, never a 500."""
    client, clock = harness.client, harness.clock
    tiny = 5e-324
    topic = await topic_with_subscription(
        client,
        retry_min_seconds=tiny,
        retry_max_seconds=tiny,
        ack_deadline_seconds=1,
        max_deliveries=0,
    )
    await publish(client, topic, "m")
    [m] = await pull(client, topic, "s", 1, wait_seconds=tiny)
    assert await nack(client, topic, "s", [m["receipt"]], delay_seconds=tiny) == {
        "nacked": 1,
        "stale": [],
    }
    [m] = await pull(client, topic, "s", 1, wait_seconds=tiny)
    assert m["delivery_attempt"] == 2
    assert (await nack(client, topic, "s", [m["receipt"]]))["nacked"] == 1  # tiny backoff
    [m] = await pull(client, topic, "s", 1)
    assert m["delivery_attempt"] == 3
    clock.advance(4)  # the lease (1 s) and its tiny backoff are over
    [m] = await pull(client, topic, "s", 1)
    assert m["delivery_attempt"] == 4
    assert (await ack(client, topic, "s", [m["receipt"]]))["acked"] == 1
    base = sub_path(topic, "s")
    for path, body in (
        ("/nack", {"receipts": [m["receipt"]], "delay_seconds": 1e300}),
        ("/pull", {"wait_seconds": 1e300}),
        ("/pull", {"wait_seconds": 5e-324, "ack_deadline_seconds": 1e300}),
    ):
        assert_problem(await client.post(base + path, json=body), 422)


async def test_update_is_validated_against_the_merged_config(client):
    topic = await topic_with_subscription(client, retry_min_seconds=1, retry_max_seconds=5)
    assert_problem(await client.put(sub_path(topic, "s"), json={"retry_min_seconds": 6}), 422)
    await create_subscription(client, topic, "s", rate_limit_per_second=10, rate_limit_burst=3)
    # Removing the rate while its burst stays is refused too.
    assert_problem(
        await client.put(sub_path(topic, "s"), json={"rate_limit_per_second": None}), 422
    )
    body = await stats(client, topic, "s")
    assert body["retry_min_seconds"] == 1
    assert body["rate_limit_per_second"] == 10


async def test_dead_letter_topic_must_exist_and_not_be_the_topic(client):
    topic = unique()
    await create_topic(client, topic)
    body = assert_problem(
        await client.put(sub_path(topic, "s"), json={"dead_letter_topic": unique("nope")}), 422
    )
    assert "dead_letter_topic" in body["detail"]
    assert_problem(await client.put(sub_path(topic, "s"), json={"dead_letter_topic": topic}), 422)
    assert_problem(await client.get(sub_path(topic, "s")), 404)
    # Also on update.
    await create_subscription(client, topic, "s")
    assert_problem(await client.put(sub_path(topic, "s"), json={"dead_letter_topic": topic}), 422)
    assert (await stats(client, topic, "s"))["dead_letter_topic"] is None


async def test_invalid_subscription_names_are_rejected(client):
    topic = unique()
    await create_topic(client, topic)
    for name in ("a.b", "x" * 81, "sp ace"):
        r = await client.put(f"/v1/topics/{topic}/subscriptions/{name}", json={})
        assert r.status_code in (404, 422), (name, r.status_code)
        assert r.status_code != 201
    r = await client.put(f"/v1/topics/{topic}/subscriptions/{'x' * 80}", json={})
    assert r.status_code == 201, r.text


# ---- topic must exist; get / list / delete ------------------------------------------------


async def test_everything_on_a_missing_topic_is_404(client):
    topic = unique("missing")
    base = sub_path(topic, "s")
    assert_problem(await client.put(base, json={}), 404)
    assert_problem(await client.get(base), 404)
    assert_problem(await client.get(f"/v1/topics/{topic}/subscriptions"), 404)
    assert_problem(await client.delete(base), 404)
    assert_problem(await client.post(base + "/pull", json={}), 404)
    receipts = {"receipts": ["x"]}
    assert_problem(await client.post(base + "/ack", json=receipts), 404)
    assert_problem(await client.post(base + "/nack", json=receipts), 404)
    assert_problem(
        await client.post(base + "/extend", json={**receipts, "ack_deadline_seconds": 5}), 404
    )
    assert_problem(await client.post(base + "/seek", json={"to": "latest"}), 404)
    assert_problem(await client.get(base + "/dead-letters"), 404)
    assert_problem(await client.post(base + "/dead-letters/redrive", json={}), 404)
    # ...and the topic was not created implicitly.
    assert_problem(await client.get(f"/v1/topics/{topic}"), 404)


async def test_missing_subscription_on_existing_topic_is_404(client):
    topic = unique()
    await create_topic(client, topic)
    base = sub_path(topic, "nope")
    for r in (
        await client.get(base),
        await client.delete(base),
        await client.post(base + "/pull", json={}),
        await client.post(base + "/ack", json={"receipts": ["x"]}),
        await client.post(base + "/nack", json={"receipts": ["x"]}),
        await client.post(base + "/extend", json={"receipts": ["x"], "ack_deadline_seconds": 5}),
        await client.post(base + "/seek", json={"to": "earliest"}),
        await client.get(base + "/dead-letters"),
        await client.post(base + "/dead-letters/redrive", json={}),
    ):
        body = assert_problem(r, 404)
        assert "nope" in body["detail"]


async def test_list_is_paged_in_name_order_with_stats(client):
    topic = unique()
    await create_topic(client, topic)
    names = ["c", "a", "e", "b", "d"]
    for name in names:
        await create_subscription(client, topic, name)
    r = await client.get(f"/v1/topics/{topic}/subscriptions", params={"limit": 2})
    assert r.status_code == 200, r.text
    page = r.json()
    assert [s["name"] for s in page["subscriptions"]] == ["a", "b"]
    seen = [s["name"] for s in page["subscriptions"]]
    while page["next_after"] is not None:
        r = await client.get(
            f"/v1/topics/{topic}/subscriptions",
            params={"limit": 2, "after": page["next_after"]},
        )
        assert r.status_code == 200, r.text
        page = r.json()
        seen += [s["name"] for s in page["subscriptions"]]
    assert seen == sorted(names)
    full = (await client.get(f"/v1/topics/{topic}/subscriptions")).json()
    assert [s["name"] for s in full["subscriptions"]] == sorted(names)
    assert full["next_after"] is None
    for s in full["subscriptions"]:
        assert s["topic"] == topic
        for field in STAT_FIELDS:
            assert field in s
    for bad in ({"limit": 0}, {"limit": 1001}, {"limit": "x"}):
        assert_problem(await client.get(f"/v1/topics/{topic}/subscriptions", params=bad), 422)
    # Subscriptions of another topic never show up.
    other = unique()
    await create_topic(client, other)
    r = await client.get(f"/v1/topics/{other}/subscriptions")
    assert r.json()["subscriptions"] == []


async def test_delete_is_204_then_404_and_recreate_starts_fresh(client):
    topic = await topic_with_subscription(client, start="earliest")
    await publish(client, topic, 1, 2)
    assert len(await pull(client, topic, "s", 1)) == 1
    r = await client.delete(sub_path(topic, "s"))
    assert r.status_code == 204
    assert r.content == b""
    assert_problem(await client.delete(sub_path(topic, "s")), 404)
    assert_problem(await client.get(sub_path(topic, "s")), 404)
    assert_problem(await client.post(sub_path(topic, "s") + "/pull", json={}), 404)
    # Recreated under the same name: a new subscription (latest), no leftover state.
    r = await client.put(sub_path(topic, "s"), json={})
    assert r.status_code == 201
    assert counts(r.json()) == {
        "backlog": 0,
        "in_flight": 0,
        "delayed": 0,
        "dead_lettered": 0,
        "lag": 0,
    }
    assert await pull(client, topic, "s") == []


async def test_deleting_the_topic_deletes_its_subscriptions(client):
    topic = await topic_with_subscription(client)
    assert (await client.delete(f"/v1/topics/{topic}")).status_code == 204
    await create_topic(client, topic)
    assert_problem(await client.get(sub_path(topic, "s")), 404)


# ---- where subscriptions start; fan-out -----------------------------------------------------


async def test_latest_skips_older_messages_and_earliest_sees_them(client):
    topic = unique()
    await create_topic(client, topic)
    old = await publish(client, topic, "a", "b", "c")
    await create_subscription(client, topic, "late")
    await create_subscription(client, topic, "early", start="earliest")
    assert await pull(client, topic, "late") == []
    assert (await stats(client, topic, "late"))["lag"] == 0
    assert (await stats(client, topic, "late"))["committed_offset"] == old[-1] + 1
    new = await publish(client, topic, "d")
    assert [m["offset"] for m in await pull(client, topic, "late", 10)] == new
    assert [m["offset"] for m in await pull(client, topic, "early", 10)] == old + new


async def test_earliest_on_an_empty_topic_sees_the_first_message(client):
    topic = unique()
    await create_topic(client, topic)
    await create_subscription(client, topic, "e", start="earliest")
    await create_subscription(client, topic, "l", start="latest")
    offsets = await publish(client, topic, "first")
    assert [m["offset"] for m in await pull(client, topic, "e")] == offsets
    assert [m["offset"] for m in await pull(client, topic, "l")] == offsets


async def test_every_subscription_gets_every_message(client):
    topic = unique()
    await create_topic(client, topic)
    subs = [f"s{i}" for i in range(4)]
    for s in subs:
        await create_subscription(client, topic, s)
    offsets = await publish(client, topic, *range(25))
    for s in subs:
        got = []
        while batch := await pull(client, topic, s, 7):
            got += batch
            assert (await ack(client, topic, s, [m["receipt"] for m in batch]))["acked"] == len(
                batch
            )
        assert [m["offset"] for m in got] == offsets
        assert [m["value"] for m in got] == list(range(25))
    # Acking on one subscription never affected the others (checked above: each got all).
    for s in subs:
        assert (await stats(client, topic, s))["lag"] == 0


# ---- stats across a lifecycle ---------------------------------------------------------------


async def test_stats_across_a_lifecycle(harness):
    client, clock = harness.client, harness.clock
    topic, dlq = unique(), unique("dlq")
    await create_topic(client, topic)
    await create_topic(client, dlq)
    await create_subscription(
        client,
        topic,
        "s",
        ack_deadline_seconds=30,
        max_deliveries=2,
        retry_min_seconds=10,
        retry_max_seconds=10,
        dead_letter_topic=dlq,
    )
    offsets = await publish(client, topic, *range(6))
    delayed = await publish(client, topic, "later", delay_seconds=60)
    s = await stats(client, topic, "s")
    assert s["head_offset"] == delayed[0]
    assert s["committed_offset"] == offsets[0]
    assert counts(s) == {"backlog": 6, "in_flight": 0, "delayed": 1, "dead_lettered": 0, "lag": 7}
    assert s["oldest_unacked_age_seconds"] is not None
    assert 0 <= s["oldest_unacked_age_seconds"] < 5

    clock.advance(5)
    s = await stats(client, topic, "s")
    assert 5 <= s["oldest_unacked_age_seconds"] < 10

    got = await pull(client, topic, "s", 4)
    assert [m["offset"] for m in got] == offsets[:4]
    s = await stats(client, topic, "s")
    assert counts(s) == {"backlog": 2, "in_flight": 4, "delayed": 1, "dead_lettered": 0, "lag": 7}
    assert s["committed_offset"] == offsets[0]

    # ack the first two: committed offset moves up to the lowest unacked.
    await ack(client, topic, "s", [m["receipt"] for m in got[:2]])
    s = await stats(client, topic, "s")
    assert counts(s) == {"backlog": 2, "in_flight": 2, "delayed": 1, "dead_lettered": 0, "lag": 5}
    assert s["committed_offset"] == offsets[2]

    # nack one: it waits for its backoff (10 s) -> delayed.
    await nack(client, topic, "s", [got[2]["receipt"]])
    s = await stats(client, topic, "s")
    assert counts(s) == {"backlog": 2, "in_flight": 1, "delayed": 2, "dead_lettered": 0, "lag": 5}
    assert s["committed_offset"] == offsets[2]

    clock.advance(11)
    s = await stats(client, topic, "s")
    assert counts(s) == {"backlog": 3, "in_flight": 1, "delayed": 1, "dead_lettered": 0, "lag": 5}

    # The nacked message comes back (attempt 2, its last); nack it again -> dead letter.
    again = await pull(client, topic, "s", 1)
    assert [(m["offset"], m["delivery_attempt"]) for m in again] == [(offsets[2], 2)]
    await nack(client, topic, "s", [again[0]["receipt"]])
    s = await stats(client, topic, "s")
    assert counts(s) == {"backlog": 2, "in_flight": 1, "delayed": 1, "dead_lettered": 1, "lag": 4}
    assert s["committed_offset"] == offsets[3]  # dead-lettered counts as done

    # Ack the last lease, then drain the rest, the delayed one included.
    assert (await ack(client, topic, "s", [got[3]["receipt"]]))["acked"] == 1
    clock.advance(60)
    rest = []
    while batch := await pull(client, topic, "s", 10):
        rest += batch
    assert sorted(m["offset"] for m in rest) == offsets[4:] + delayed
    assert (await ack(client, topic, "s", [m["receipt"] for m in rest]))["acked"] == 3
    s = await stats(client, topic, "s")
    assert counts(s) == {"backlog": 0, "in_flight": 0, "delayed": 0, "dead_lettered": 1, "lag": 0}
    assert s["committed_offset"] == delayed[0] + 1
    assert s["head_offset"] == delayed[0]
    assert s["oldest_unacked_age_seconds"] is None
    assert s["delivered_total"] == 8  # 4 + 1 redelivery + 3

    # Rates: events are counted (flushed to the database about once a second).
    await harness.ctx.rates.flush(harness.ctx.pool, clock.skew)
    rates = (await stats(client, topic, "s"))["rates_per_second"]
    assert rates["delivered"] == pytest.approx(8 / 60, abs=0.002)
    assert rates["acked"] == pytest.approx(6 / 60, abs=0.002)
    assert rates["nacked"] == pytest.approx(1 / 60, abs=0.002)
    assert rates["dead_lettered"] == pytest.approx(1 / 60, abs=0.002)


async def test_stats_count_expired_leases_as_backlog(harness):
    client, clock = harness.client, harness.clock
    topic = await topic_with_subscription(
        client, ack_deadline_seconds=10, retry_min_seconds=5, retry_max_seconds=5
    )
    await publish(client, topic, 1, 2)
    await pull(client, topic, "s", 2)
    assert counts(await stats(client, topic, "s"))["in_flight"] == 2
    clock.advance(11)  # lease over, backoff (5 s) still running
    s = await stats(client, topic, "s")
    assert counts(s) == {"backlog": 0, "in_flight": 0, "delayed": 2, "dead_lettered": 0, "lag": 2}
    clock.advance(5)
    s = await stats(client, topic, "s")
    assert counts(s) == {"backlog": 2, "in_flight": 0, "delayed": 0, "dead_lettered": 0, "lag": 2}


async def test_a_pull_waiting_for_its_subscriptions_lock_while_it_is_deleted_answers_404(
    harness, db_url
):
    """The claim finds the subscription, waits for its lock, then reads it again: deleted
    meanwhile, the pull is answered 404 (not a claim on a subscription that is gone)."""
    client = harness.client
    topic = await topic_with_subscription(client)
    await publish(client, topic, "a")
    holder = await asyncpg.connect(plain_url(db_url))
    try:
        async with holder.transaction():
            sub_id = await holder.fetchval(
                "SELECT sb.sub_id FROM sluice.subscriptions sb JOIN sluice.topics t "
                "USING (topic_id) WHERE t.name = $1 AND sb.name = 's'",
                topic,
            )
            await holder.execute(
                "SELECT pg_advisory_xact_lock(1397510914, ($1 % 2147483647)::int)", sub_id
            )
            pulling = asyncio.create_task(client.post(sub_path(topic, "s") + "/pull", json={}))
            for _ in range(500):
                waiting = await holder.fetchval(
                    "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND NOT granted AND objid = $1",
                    sub_id % 2147483647,
                )
                if waiting or pulling.done():
                    break
                await asyncio.sleep(0.01)
            assert waiting == 1, "the pull never waited for the lock"
            await holder.execute("DELETE FROM sluice.subscriptions WHERE sub_id = $1", sub_id)
        assert_problem(await pulling, 404)
    finally:
        await holder.close()
