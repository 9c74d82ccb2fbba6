"""Topic endpoints: create/update (merge), details and stats, listing with paging, delete."""

from __future__ import annotations

import asyncio
from datetime import datetime

import pytest

from tests.conftest import unique
from tests.helpers import assert_problem, create_topic, publish, topic_path

DEFAULTS = {"retention_seconds": 604800, "dedup_window_seconds": 300, "max_message_bytes": 1048576}


async def test_create_returns_201_with_defaults_and_empty_stats(client):
    topic = unique()
    r = await client.put(topic_path(topic), json={})
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["name"] == topic
    for field, value in DEFAULTS.items():
        assert body[field] == value
    assert body["head_offset"] is None
    assert body["oldest_offset"] is None
    assert body["message_count"] == 0
    assert body["publish_rate_per_second"] == 0
    created = datetime.fromisoformat(body["created_at"])
    assert created.tzinfo is not None
    assert datetime.fromisoformat(body["updated_at"]) >= created


async def test_create_with_explicit_config(client):
    topic = unique()
    config = {"retention_seconds": 3600, "dedup_window_seconds": 10, "max_message_bytes": 2048}
    r = await client.put(topic_path(topic), json=config)
    assert r.status_code == 201, r.text
    assert {k: r.json()[k] for k in config} == config
    r = await client.get(topic_path(topic))
    assert r.status_code == 200
    assert {k: r.json()[k] for k in config} == config


async def test_update_returns_200_and_merges_omitted_fields(client):
    topic = unique()
    await create_topic(client, topic, retention_seconds=3600, dedup_window_seconds=10)
    before = (await client.get(topic_path(topic))).json()

    r = await client.put(topic_path(topic), json={"max_message_bytes": 4096})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["max_message_bytes"] == 4096
    assert body["retention_seconds"] == 3600  # kept, not reset to the default
    assert body["dedup_window_seconds"] == 10
    assert body["created_at"] == before["created_at"]
    assert datetime.fromisoformat(body["updated_at"]) >= datetime.fromisoformat(
        before["updated_at"]
    )

    # An empty update changes nothing and is still 200 (not a second creation).
    r = await client.put(topic_path(topic), json={})
    assert r.status_code == 200
    assert {k: r.json()[k] for k in DEFAULTS} == {
        "retention_seconds": 3600,
        "dedup_window_seconds": 10,
        "max_message_bytes": 4096,
    }


async def test_update_keeps_messages_and_offsets(client):
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, 1, 2, 3)
    await create_topic(client, topic, retention_seconds=7200)
    assert await publish(client, topic, 4) == [3]
    body = (await client.get(topic_path(topic))).json()
    assert (body["oldest_offset"], body["head_offset"], body["message_count"]) == (0, 3, 4)


@pytest.mark.parametrize(
    "config",
    [
        {"retention_seconds": 59},
        {"retention_seconds": 0},
        {"retention_seconds": 90 * 24 * 3600 + 1},
        {"dedup_window_seconds": -1},
        {"dedup_window_seconds": 7 * 24 * 3600 + 1},
        {"max_message_bytes": 0},
        {"max_message_bytes": 10 * 1024 * 1024 + 1},
        {"retention_seconds": "a week"},
        {"retention_seconds": 3600.5},
        {"retention_seconds": None},
        {"dedup_window_seconds": None},
        {"max_message_bytes": None},
        {"retention": 3600},
        {"name": "other"},
    ],
)
async def test_invalid_config_is_422_and_changes_nothing(client, config):
    topic = unique()
    r = await client.put(topic_path(topic), json=config)
    assert_problem(r, 422)
    assert_problem(await client.get(topic_path(topic)), 404)  # not created

    await create_topic(client, topic, retention_seconds=3600)
    r = await client.put(topic_path(topic), json=config)
    assert_problem(r, 422)
    body = (await client.get(topic_path(topic))).json()
    assert body["retention_seconds"] == 3600
    assert body["dedup_window_seconds"] == 300
    assert body["max_message_bytes"] == 1048576


async def test_config_bounds_are_inclusive(client):
    topic = unique()
    config = {"retention_seconds": 60, "dedup_window_seconds": 0, "max_message_bytes": 1}
    r = await client.put(topic_path(topic), json=config)
    assert r.status_code == 201, r.text
    config = {
        "retention_seconds": 90 * 24 * 3600,
        "dedup_window_seconds": 7 * 24 * 3600,
        "max_message_bytes": 10 * 1024 * 1024,
    }
    r = await client.put(topic_path(topic), json=config)
    assert r.status_code == 200, r.text
    assert {k: r.json()[k] for k in config} == config


async def test_details_track_head_oldest_count_and_rate(client):
    topic = unique()
    await create_topic(client, topic)
    assert await publish(client, topic, *range(5)) == [0, 1, 2, 3, 4]
    body = (await client.get(topic_path(topic))).json()
    assert body["head_offset"] == 4
    assert body["oldest_offset"] == 0
    assert body["message_count"] == 5
    # 5 messages within the last minute: the average rate over 60 s.
    assert body["publish_rate_per_second"] == pytest.approx(5 / 60, abs=0.001)


async def test_details_of_missing_topic_is_404(client):
    body = assert_problem(await client.get(topic_path(unique())), 404)
    assert "does not exist" in body["detail"]


async def test_list_contains_created_topics_with_config(client):
    prefix = unique("L")
    names = [f"{prefix}-{i}" for i in range(3)]
    for name in names:
        await create_topic(client, name, retention_seconds=600)
    r = await client.get("/v1/topics", params={"after": prefix, "limit": 3})
    assert r.status_code == 200, r.text
    topics = r.json()["topics"]
    assert [t["name"] for t in topics] == names
    for t in topics:
        assert t["retention_seconds"] == 600
        assert t["dedup_window_seconds"] == 300
        assert t["max_message_bytes"] == 1048576
        assert "created_at" in t and "updated_at" in t


async def test_list_paging_with_after_and_next_after(client):
    prefix = unique("P")
    names = [f"{prefix}-{i}" for i in range(5)]
    for name in reversed(names):  # creation order must not matter: sorted by name
        await create_topic(client, name)

    seen: list[str] = []
    after = prefix
    pages = 0
    while True:
        r = await client.get("/v1/topics", params={"after": after, "limit": 2})
        assert r.status_code == 200, r.text
        page = r.json()
        ours = [t["name"] for t in page["topics"] if t["name"].startswith(prefix)]
        seen.extend(ours)
        pages += 1
        if len(ours) < len(page["topics"]) or page["next_after"] is None:
            break
        assert page["next_after"] == page["topics"][-1]["name"]
        after = page["next_after"]
        assert pages < 10
    assert seen == names
    assert pages == 3


async def test_list_default_page_and_next_after_null_at_end(client):
    topic = "zzzz" + unique("zzzz")  # sorts after (nearly) every other test's topic
    await create_topic(client, topic)
    r = await client.get("/v1/topics", params={"after": topic})
    assert r.status_code == 200
    names = [t["name"] for t in r.json()["topics"]]
    assert all(name > topic for name in names)
    assert len(names) < 100 and r.json()["next_after"] is None
    # Without parameters: the first (up to) 100 names.
    r = await client.get("/v1/topics")
    assert r.status_code == 200
    names = [t["name"] for t in r.json()["topics"]]
    assert 1 <= len(names) <= 100
    assert (r.json()["next_after"] is None) == (len(names) < 100)


async def test_list_next_after_is_set_when_page_is_full(client):
    prefix = unique("F")
    for i in range(2):
        await create_topic(client, f"{prefix}-{i}")
    r = await client.get("/v1/topics", params={"after": prefix, "limit": 1})
    assert r.json()["next_after"] == f"{prefix}-0"
    assert [t["name"] for t in r.json()["topics"]] == [f"{prefix}-0"]


@pytest.mark.parametrize(
    "params",
    [
        {"limit": 0},
        {"limit": 1001},
        {"limit": -1},
        {"limit": "ten"},
        {"limit": 2**70},
        {"after": "a" * 81},
    ],
)
async def test_list_with_invalid_paging_is_422(client, params):
    assert_problem(await client.get("/v1/topics", params=params), 422)


async def test_delete_is_204_then_404(client):
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, "x")
    r = await client.delete(topic_path(topic))
    assert r.status_code == 204
    assert r.content == b""
    assert_problem(await client.get(topic_path(topic)), 404)
    assert_problem(await client.delete(topic_path(topic)), 404)
    assert_problem(await client.get(topic_path(topic) + "/messages"), 404)
    assert_problem(await client.get(topic_path(topic) + "/messages/0"), 404)
    r = await client.post(topic_path(topic) + "/messages", json={"messages": [{"value": 1}]})
    assert_problem(r, 404)
    names = [
        t["name"] for t in (await client.get("/v1/topics", params={"limit": 1000})).json()["topics"]
    ]
    assert topic not in names


async def test_delete_removes_subscriptions(client):
    topic = unique()
    await create_topic(client, topic)
    r = await client.put(topic_path(topic) + "/subscriptions/s", json={})
    assert r.status_code == 201, r.text
    assert (await client.delete(topic_path(topic))).status_code == 204
    await create_topic(client, topic)
    assert_problem(await client.get(topic_path(topic) + "/subscriptions/s"), 404)


async def test_recreated_topic_starts_empty(client):
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, "old-1", "old-2")
    assert (await client.delete(topic_path(topic))).status_code == 204
    r = await client.put(topic_path(topic), json={})
    assert r.status_code == 201
    body = r.json()
    assert body["head_offset"] is None and body["message_count"] == 0
    r = await client.get(topic_path(topic) + "/messages")
    assert r.json()["messages"] == []
    assert await publish(client, topic, "new") == [0]
    r = await client.get(topic_path(topic) + "/messages")
    assert [m["value"] for m in r.json()["messages"]] == ["new"]


async def test_delete_missing_topic_is_404(client):
    assert_problem(await client.delete(topic_path(unique())), 404)


VALID_NAMES = ["a", "A-Z_0-9", "x" * 80, "-", "_", "0"]
INVALID_NAMES = [
    "x" * 81,
    "has space",
    "dot.name",
    "umlaut-\u00e4",
    "emoji-\U0001f600",
    "star*",
    "colon:x",
    "tab%09x",
    "nul%00x",
    "trailing-newline%0A",
    "%0Aleading-newline",
    "plus+x",
    "percent%25",
]


@pytest.mark.parametrize("name", VALID_NAMES)
async def test_valid_names_are_accepted(client, name):
    r = await client.put(topic_path(name), json={})
    assert r.status_code in (200, 201), r.text
    assert r.json()["name"] == name
    assert (await client.get(topic_path(name))).json()["name"] == name
    assert (await client.delete(topic_path(name))).status_code == 204


@pytest.mark.parametrize("name", INVALID_NAMES)
@pytest.mark.parametrize(
    ("method", "suffix", "body"),
    [
        ("PUT", "", {}),
        ("GET", "", None),
        ("DELETE", "", None),
        ("POST", "/messages", {"messages": [{"value": 1}]}),
        ("GET", "/messages", None),
        ("GET", "/messages/0", None),
    ],
)
async def test_invalid_names_are_422(client, name, method, suffix, body):
    r = await client.request(method, f"/v1/topics/{name}{suffix}", json=body)
    assert_problem(r, 422)


async def test_encoded_slash_in_name_is_never_a_topic(client):
    # %2F decodes to "/": the path no longer names one topic, so no route matches it.
    r = await client.put("/v1/topics/a%2Fb", json={})
    assert r.status_code in (404, 422)
    assert r.headers["content-type"].startswith("application/problem+json")
    assert_problem(await client.get(topic_path("a")), 404)


async def test_empty_name_is_not_a_topic(client):
    # /v1/topics/ has no name: it is not the list and not a topic.
    r = await client.put("/v1/topics/", json={}, follow_redirects=True)
    assert r.status_code in (404, 405, 422)
    assert r.headers["content-type"].startswith("application/problem+json")


async def test_names_are_case_sensitive(client):
    lower = unique("case").lower()
    upper = lower.upper()
    await create_topic(client, lower)
    assert_problem(await client.get(topic_path(upper)), 404)
    r = await client.put(topic_path(upper), json={})
    assert r.status_code == 201


async def test_concurrent_creates_make_one_topic(client):
    topic = unique()
    results = await asyncio.gather(*(client.put(topic_path(topic), json={}) for _ in range(8)))
    assert sorted(r.status_code for r in results) == [200] * 7 + [201]
    assert len({r.json()["created_at"] for r in results}) == 1


async def test_publish_rate_is_the_last_minute_only(harness):
    client = harness.client
    topic = unique()
    await create_topic(client, topic)
    await publish(client, topic, *range(12))
    assert (await client.get(topic_path(topic))).json()["publish_rate_per_second"] == 0.2
    harness.clock.advance(61)
    await publish(client, topic, "one more")
    body = (await client.get(topic_path(topic))).json()
    assert body["publish_rate_per_second"] == pytest.approx(1 / 60, abs=0.001)
    assert body["message_count"] == 13
