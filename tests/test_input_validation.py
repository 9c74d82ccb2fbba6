"""Malformed input gets a 4xx application/problem+json answer, never a 500.

One table of cases; every case also checks that a refused publish stored nothing.
"""

from __future__ import annotations

import json
import random
import string
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from tests.conftest import unique
from tests.helpers import JSON, assert_problem, create_topic, topic_path

MiB = 1024 * 1024
INT64_MAX = 2**63 - 1


def nested(depth: int) -> Any:
    value: Any = 0
    for level in range(depth):
        value = [value] if level % 2 else {"k": value}
    return value


def publish_body(*messages: Any) -> bytes:
    return json.dumps({"messages": list(messages)}).encode()


def one(**message: Any) -> bytes:
    return publish_body(message)


@dataclass
class Case:
    method: str
    path: str  # "{t}" is replaced by an existing topic's name
    status: int
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=lambda: dict(JSON))


MSGS = "/v1/topics/{t}/messages"
TOPIC = "/v1/topics/{t}"

CASES: dict[str, Case] = {
    # -- not JSON at all (400) --------------------------------------------------------
    "malformed-json": Case("POST", MSGS, 400, b'{"messages": [{"value": 1}'),
    "trailing-garbage": Case("POST", MSGS, 400, b'{"messages":[{"value":1}]} x'),
    "single-quotes": Case("POST", MSGS, 400, b"{'messages': [{'value': 1}]}"),
    "trailing-comma": Case("POST", MSGS, 400, b'{"messages":[{"value":1},]}'),
    "comment": Case("POST", MSGS, 400, b'{"messages":[{"value":1}]} // hi'),
    "invalid-utf8": Case("POST", MSGS, 400, b'{"messages":[{"value":"\xff\xfe"}]}'),
    "only-whitespace": Case("POST", MSGS, 400, b"   "),
    "NaN": Case("POST", MSGS, 400, b'{"messages":[{"value":NaN}]}'),
    "Infinity": Case("POST", MSGS, 400, b'{"messages":[{"value":Infinity}]}'),
    "-Infinity": Case("POST", MSGS, 400, b'{"messages":[{"value":-Infinity}]}'),
    "float-overflow-1e400": Case("POST", MSGS, 400, b'{"messages":[{"value":1e400}]}'),
    "float-overflow-nested": Case(
        "POST", MSGS, 400, b'{"messages":[{"value":{"a":[-1e999, 18446744073709551616]}}]}'
    ),
    "float-underflow-1e-400": Case("POST", MSGS, 400, b'{"messages":[{"value":1e-400}]}'),
    "float-underflow-negative": Case("POST", MSGS, 400, b'{"messages":[{"value":-1e-400}]}'),
    "float-underflow-nested": Case(
        "POST", MSGS, 400, b'{"messages":[{"value":{"a":[0.0,{"b":0.1e-330}]}}]}'
    ),
    "float-underflow-by-digits": Case(
        "POST", MSGS, 400, b'{"messages":[{"value":0.' + b"0" * 400 + b"1}]}"
    ),
    "integer-with-5000-digits": Case(
        "POST", MSGS, 400, b'{"messages":[{"value":' + b"9" * 5000 + b"}]}"
    ),
    "nested-65-levels": Case("POST", MSGS, 400, one(value=nested(62))),
    "nested-100000-levels": Case(
        "POST", MSGS, 400, b'{"messages":[{"value":' + b"[" * 100_000 + b"]" * 100_000 + b"}]}"
    ),
    "topic-config-malformed": Case("PUT", TOPIC, 400, b'{"retention_seconds": }'),
    "topic-config-nested-too-deep": Case(
        "PUT", TOPIC, 400, json.dumps({"retention_seconds": 60, "x": nested(70)}).encode()
    ),
    # -- not declared as JSON (415) -----------------------------------------------------
    "text/plain": Case("POST", MSGS, 415, one(value=1), {"content-type": "text/plain"}),
    "xml": Case("POST", MSGS, 415, b"<messages/>", {"content-type": "application/xml"}),
    "form": Case(
        "POST", MSGS, 415, b"messages=1", {"content-type": "application/x-www-form-urlencoded"}
    ),
    "multipart": Case(
        "POST", MSGS, 415, b"--x--", {"content-type": "multipart/form-data; boundary=x"}
    ),
    "text/plain+json": Case("POST", MSGS, 415, one(value=1), {"content-type": "text/x+json"}),
    "topic-config-text": Case("PUT", TOPIC, 415, b"{}", {"content-type": "text/plain"}),
    # -- too large (413) ----------------------------------------------------------------
    "body-over-10MiB": Case(
        "POST", MSGS, 413, b'{"messages":[{"value":"' + b"x" * (10 * MiB) + b'"}]}'
    ),
    "message-over-max_message_bytes": Case("POST", MSGS, 413, one(value="x" * 2000)),
    "second-message-over-max": Case(
        "POST", MSGS, 413, publish_body({"value": 1}, {"value": ["y" * 700, "z" * 700]})
    ),
    # -- well-formed JSON that breaks the contract (422) ------------------------------------
    "body-is-array": Case("POST", MSGS, 422, b"[]"),
    "body-is-null": Case("POST", MSGS, 422, b"null"),
    "body-is-string": Case("POST", MSGS, 422, b'"messages"'),
    "empty-body": Case("POST", MSGS, 422, b""),
    "messages-missing": Case("POST", MSGS, 422, b"{}"),
    "messages-null": Case("POST", MSGS, 422, b'{"messages":null}'),
    "messages-not-a-list": Case("POST", MSGS, 422, b'{"messages":{"value":1}}'),
    "message-not-an-object": Case("POST", MSGS, 422, b'{"messages":[1]}'),
    "zero-messages": Case("POST", MSGS, 422, publish_body()),
    "1001-messages": Case("POST", MSGS, 422, publish_body(*({"value": i} for i in range(1001)))),
    "unknown-top-level-field": Case("POST", MSGS, 422, b'{"messages":[{"value":1}],"mesages":[]}'),
    "unknown-message-field": Case("POST", MSGS, 422, one(value=1, delay=5)),
    "missing-value": Case("POST", MSGS, 422, one(key="k")),
    "65-headers": Case("POST", MSGS, 422, one(value=1, headers={f"h{i}": "v" for i in range(65)})),
    "headers-not-object": Case("POST", MSGS, 422, one(value=1, headers=["a", "b"])),
    "header-value-not-string": Case("POST", MSGS, 422, one(value=1, headers={"a": 1})),
    "header-value-null": Case("POST", MSGS, 422, one(value=1, headers={"a": None})),
    "header-name-empty": Case("POST", MSGS, 422, one(value=1, headers={"": "v"})),
    "header-name-257": Case("POST", MSGS, 422, one(value=1, headers={"h" * 257: "v"})),
    "header-value-4097": Case("POST", MSGS, 422, one(value=1, headers={"h": "v" * 4097})),
    "header-with-NUL": Case("POST", MSGS, 422, one(value=1, headers={"h": "a\u0000b"})),
    "header-name-with-NUL": Case("POST", MSGS, 422, one(value=1, headers={"a\u0000": "b"})),
    "key-257-chars": Case("POST", MSGS, 422, one(value=1, key="k" * 257)),
    "key-not-string": Case("POST", MSGS, 422, one(value=1, key=7)),
    "key-with-NUL": Case("POST", MSGS, 422, one(value=1, key="a\u0000b")),
    "key-lone-surrogate": Case("POST", MSGS, 422, one(value=1, key="a\ud800")),
    "dedup_id-129-chars": Case("POST", MSGS, 422, one(value=1, dedup_id="d" * 129)),
    "dedup_id-empty": Case("POST", MSGS, 422, one(value=1, dedup_id="")),
    "dedup_id-with-NUL": Case("POST", MSGS, 422, one(value=1, dedup_id="\u0000")),
    "dedup_id-lone-surrogate": Case("POST", MSGS, 422, one(value=1, dedup_id="\udfff")),
    "delay_seconds-901": Case("POST", MSGS, 422, one(value=1, delay_seconds=901)),
    "delay_seconds--1": Case("POST", MSGS, 422, one(value=1, delay_seconds=-1)),
    "delay_seconds-fraction": Case("POST", MSGS, 422, one(value=1, delay_seconds=1.5)),
    "delay_seconds-huge": Case("POST", MSGS, 422, one(value=1, delay_seconds=2**80)),
    "delay_seconds-null": Case("POST", MSGS, 422, one(value=1, delay_seconds=None)),
    "topic-config-unknown-field": Case("PUT", TOPIC, 422, b'{"retention_secs": 60}'),
    "topic-config-null": Case("PUT", TOPIC, 422, b'{"max_message_bytes": null}'),
    "topic-config-huge-int": Case("PUT", TOPIC, 422, b'{"retention_seconds": 1e30}'),
    "topic-config-array": Case("PUT", TOPIC, 422, b"[]"),
    # -- paths and queries ----------------------------------------------------------------
    "offset-above-int64": Case("GET", MSGS + f"/{INT64_MAX + 1}", 422, None),
    "offset-far-above-int64": Case("GET", MSGS + "/" + "9" * 40, 422, None),
    "offset-negative": Case("GET", MSGS + "/-1", 422, None),
    "offset-not-integer": Case("GET", MSGS + "/1.5", 422, None),
    "offset-text": Case("GET", MSGS + "/latest", 422, None),
    "from_offset-above-int64": Case("GET", MSGS + f"?from_offset={INT64_MAX + 1}", 422, None),
    "from_offset-text": Case("GET", MSGS + "?from_offset=abc", 422, None),
    "from_offset-empty": Case("GET", MSGS + "?from_offset=", 422, None),
    "browse-limit-0": Case("GET", MSGS + "?limit=0", 422, None),
    "browse-limit-1001": Case("GET", MSGS + "?limit=1001", 422, None),
    "browse-limit-huge": Case("GET", MSGS + "?limit=" + "9" * 30, 422, None),
    "list-limit-0": Case("GET", "/v1/topics?limit=0", 422, None),
    "list-limit-huge": Case("GET", f"/v1/topics?limit={2**64}", 422, None),
    "list-after-too-long": Case("GET", "/v1/topics?after=" + "a" * 81, 422, None),
    "topic-name-81": Case("GET", "/v1/topics/" + "a" * 81, 422, None),
    "topic-name-dot": Case("PUT", "/v1/topics/a.b", 422, b"{}"),
    "topic-name-space": Case("POST", "/v1/topics/a%20b/messages", 422, one(value=1)),
    "topic-name-unicode": Case("GET", "/v1/topics/caf%C3%A9/messages", 422, None),
    # -- routing ----------------------------------------------------------------------------
    "unknown-route": Case("GET", "/v1/nope", 404, None),
    "unknown-root-route": Case("GET", "/nope", 404, None),
    "unknown-subresource": Case("GET", TOPIC + "/nope", 404, None),
    "unknown-version": Case("GET", "/v2/topics", 404, None),
    "publish-to-missing-topic": Case(
        "POST", "/v1/topics/no-such-topic-x/messages", 404, one(value=1)
    ),
    "missing-offset": Case("GET", MSGS + f"/{INT64_MAX}", 404, None),
    "wrong-method-patch-topic": Case("PATCH", TOPIC, 405, b"{}"),
    "wrong-method-post-topic": Case("POST", TOPIC, 405, b"{}"),
    "wrong-method-delete-list": Case("DELETE", "/v1/topics", 405, None),
    "wrong-method-put-messages": Case("PUT", MSGS, 405, b"{}"),
    "wrong-method-delete-message": Case("DELETE", MSGS + "/0", 405, None),
    "wrong-method-post-message": Case("POST", MSGS + "/0", 405, one(value=1)),
}


@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
async def test_bad_input_gets_a_problem(client, case: Case):
    topic = unique()
    await create_topic(client, topic, max_message_bytes=1024)
    await client.post(topic_path(topic) + "/messages", json={"messages": [{"value": "seed"}]})
    r = await client.request(
        case.method, case.path.format(t=topic), content=case.body, headers=case.headers
    )
    body = assert_problem(r, case.status)
    assert "Traceback" not in r.text
    if case.status == 405:
        assert r.headers.get("allow")
    # Nothing was stored and nothing changed by the refused request.
    details = (await client.get(topic_path(topic))).json()
    assert (details["head_offset"], details["message_count"]) == (0, 1)
    assert details["max_message_bytes"] == 1024
    assert body["status"] == case.status


async def test_body_over_limit_streamed_without_content_length(client):
    topic = unique()
    await create_topic(client, topic)

    async def chunks():
        yield b'{"messages":[{"value":"'
        for _ in range(11):
            yield b"x" * MiB
        yield b'"}]}'

    r = await client.post(topic_path(topic) + "/messages", content=chunks(), headers=JSON)
    assert_problem(r, 413)
    assert (await client.get(topic_path(topic))).json()["head_offset"] is None


async def test_limits_are_inclusive(client):
    """The largest accepted values of every limit in one valid batch."""
    topic = unique()
    await create_topic(client, topic)
    message = {
        "value": nested(61),  # 64 levels with the envelope
        "key": "k" * 256,
        "headers": {f"h{i}": "v" * 10 for i in range(64)},
        "dedup_id": "d" * 128,
        "delay_seconds": 900,
    }
    r = await client.post(
        topic_path(topic) + "/messages", content=publish_body(message), headers=JSON
    )
    assert r.status_code == 201, r.text
    r = await client.post(
        topic_path(topic) + "/messages",
        content=publish_body(*({"value": i} for i in range(1000))),
        headers=JSON,
    )
    assert r.status_code == 201, r.text


async def test_body_just_under_10MiB_is_not_refused_for_its_size(client):
    topic = unique()
    await create_topic(client, topic, max_message_bytes=10 * MiB)
    envelope = b'{"messages":[{"value":""}]}'
    body = b'{"messages":[{"value":"' + b"x" * (10 * MiB - len(envelope)) + b'"}]}'
    assert len(body) == 10 * MiB
    r = await client.post(topic_path(topic) + "/messages", content=body, headers=JSON)
    assert r.status_code == 201, r.text


async def test_malformed_json_detail_says_what_is_wrong(client):
    topic = unique()
    await create_topic(client, topic)
    r = await client.post(topic_path(topic) + "/messages", content=b'{"messages": [}', headers=JSON)
    body = assert_problem(r, 400)
    assert body["detail"] != "request body is not valid JSON: JSON decode error"
    r = await client.post(
        topic_path(topic) + "/messages", content=one(value=nested(70)), headers=JSON
    )
    assert "64" in assert_problem(r, 400)["detail"]


async def test_validation_problem_lists_the_errors(client):
    topic = unique()
    await create_topic(client, topic)
    r = await client.post(
        topic_path(topic) + "/messages",
        content=publish_body({"value": 1, "key": "k" * 300}, {"value": 2, "delay_seconds": -1}),
        headers=JSON,
    )
    body = assert_problem(r, 422)
    locations = [e["location"] for e in body["errors"]]
    assert ["body", "messages", "0", "key"] in locations
    assert ["body", "messages", "1", "delay_seconds"] in locations


def random_json(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 4 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**31, 2**63, -(2**64), 10**25, rng.randrange(-1000, 1000)])
    if kind == 3:
        return rng.choice([0.5, -1e-300, 1e300, rng.random()])
    if kind in (4, 5):
        alphabet = string.printable + "\u00e9\u4e2d\U0001f600\u0000\ud800"
        return "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 20)))
    if kind in (6, 7):
        return [random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    fields = ["value", "key", "headers", "delay_seconds", "dedup_id", "messages", "x"]
    return {rng.choice(fields): random_json(rng, depth + 1) for _ in range(rng.randrange(0, 4))}


async def test_random_bodies_never_cause_a_server_error(client):
    """A deterministic fuzz of publish bodies: 201 or a 4xx problem, nothing else."""
    rng = random.Random(20261130)
    topic = unique()
    await create_topic(client, topic, max_message_bytes=4096)
    statuses: set[int] = set()
    for _ in range(300):
        messages = [
            random_json(rng, 1)
            if rng.random() < 0.3
            else {
                "value": random_json(rng),
                **({"key": random_json(rng, 3)} if rng.random() < 0.3 else {}),
                **({"headers": random_json(rng, 3)} if rng.random() < 0.3 else {}),
                **({"delay_seconds": random_json(rng, 3)} if rng.random() < 0.2 else {}),
                **({"dedup_id": random_json(rng, 3)} if rng.random() < 0.3 else {}),
            }
            for _ in range(rng.randrange(0, 4))
        ]
        body = json.dumps({"messages": messages}).encode()
        if rng.random() < 0.1:  # sometimes cut it short
            body = body[: rng.randrange(len(body))]
        r = await client.post(topic_path(topic) + "/messages", content=body, headers=JSON)
        statuses.add(r.status_code)
        if r.status_code != 201:
            assert_problem(r, r.status_code)
            assert 400 <= r.status_code < 500, r.text
    assert 201 in statuses and 422 in statuses


# ---- against a real server process (uvicorn in front of the app) ---------------------------


async def test_real_server_refuses_oversized_and_malformed_bodies(server_factory):
    server = server_factory()
    topic = unique()
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        await create_topic(client, topic)
        path = topic_path(topic) + "/messages"
        big = b'{"messages":[{"value":"' + b"x" * (10 * MiB + 1) + b'"}]}'
        assert_problem(await client.post(path, content=big, headers=JSON), 413)

        async def chunks():
            for _ in range(12):
                yield b"x" * MiB

    # A fresh connection: the server may close the one it refused a body on.
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        assert_problem(await client.post(path, content=chunks(), headers=JSON), 413)
    async with httpx.AsyncClient(base_url=server.base_url, timeout=30) as client:
        assert_problem(await client.post(path, content=b"{", headers=JSON), 400)
        assert_problem(await client.get(path + f"/{INT64_MAX + 1}"), 422)
        assert_problem(await client.get("/v1/nope"), 404)
        # The server is still healthy and nothing was stored.
        r = await client.get(topic_path(topic))
        assert r.status_code == 200 and r.json()["head_offset"] is None
