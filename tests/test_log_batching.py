"""Log lines of one event-loop turn share a write; access lines skip `logging` when it is
configured as `sluice serve` configures it, and read exactly as `logging` would write them."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import random
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime

import pytest

from sluice.api import observability
from sluice.logs import (
    READY_PROBE_ID,
    JSONFormatter,
    LoopBatchedStreamHandler,
    QuietStartup,
    TextFormatter,
    _no_escapes,
    _timestamp,
    access_line_writer,
    configure_logging,
)


class CountingStream(io.StringIO):
    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)


def _handler() -> tuple[LoopBatchedStreamHandler, CountingStream]:
    stream = CountingStream()
    handler = LoopBatchedStreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    return handler, stream


def _record(message: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.makeLogRecord(
        {"name": "t", "levelno": level, "levelname": logging.getLevelName(level), "msg": message}
    )


async def test_the_lines_of_one_loop_turn_are_written_once_at_its_end():
    handler, stream = _handler()
    for i in range(5):
        handler.handle(_record(f"line {i}"))
    assert stream.writes == []  # kept while this turn runs
    await asyncio.sleep(0)  # the next turn
    assert stream.writes == ["".join(f"INFO line {i}\n" for i in range(5))]
    handler.handle(_record("later"))
    await asyncio.sleep(0)
    assert stream.writes[1:] == ["INFO later\n"]  # an idle loop writes each line at once


async def test_a_warning_is_written_at_once_after_the_lines_before_it():
    handler, stream = _handler()
    handler.handle(_record("first"))
    handler.handle(_record("trouble", logging.WARNING))
    assert stream.getvalue() == "INFO first\nWARNING trouble\n"
    await asyncio.sleep(0)
    assert stream.getvalue() == "INFO first\nWARNING trouble\n"  # nothing twice


def test_lines_outside_an_event_loop_are_written_at_once():
    handler, stream = _handler()
    done = threading.Thread(target=handler.handle, args=(_record("from a thread"),))
    done.start()
    done.join()
    handler.handle(_record("no loop here"))
    assert stream.writes == ["INFO from a thread\n", "INFO no loop here\n"]


def test_flush_writes_what_a_loop_kept_even_when_that_loop_never_turns_again():
    handler, stream = _handler()

    async def log_and_leave() -> None:
        handler.handle(_record("kept"))

    loop = asyncio.new_event_loop()
    loop.run_until_complete(log_and_leave())  # the turn that writes it may never come
    handler.flush()  # logging.shutdown() at exit
    assert stream.getvalue() == "INFO kept\n"
    loop.close()

    async def log_again() -> None:
        handler.handle(_record("on another loop"))
        await asyncio.sleep(0)

    asyncio.run(log_again())  # a new loop schedules its own write
    assert stream.getvalue() == "INFO kept\nINFO on another loop\n"


@pytest.fixture
def sluice_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], CountingStream]]:
    """Sets logging up as `sluice serve` does (JSON on stderr, INFO) when called, from the
    test's body: pytest adds its own capture handlers to the root for each phase of a test,
    after the fixtures' set-up. Undone afterwards."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)

    def configure() -> CountingStream:
        stream = CountingStream()
        monkeypatch.setattr("sys.stderr", stream)
        configure_logging("INFO", "json")
        return stream

    yield configure
    root.handlers[:], root.level = saved


def _scope(path: str) -> dict:
    return {"type": "http", "method": "POST", "path": path}


async def test_an_access_line_made_directly_is_the_one_logging_would_write(sluice_logging):
    stream = sluice_logging()
    assert access_line_writer() is not None
    path = "/v1/topics/t\x1b[31m\n/messages"  # escapes and a newline stay escaped
    observability.record(_scope(path), "req-1", "/v1/topics/{topic}/messages", 201, 0.0)
    await asyncio.sleep(0)
    [line] = stream.getvalue().splitlines()
    direct = json.loads(line)

    # The same request through logging and JSONFormatter, as before the direct path.
    record = logging.makeLogRecord(
        {
            "name": "sluice.access",
            "levelno": logging.INFO,
            "levelname": "INFO",
            "msg": "request",
            "request_id": "req-1",
            "method": "POST",
            "route": "/v1/topics/{topic}/messages",
            "path": path,
            "status": 201,
            "duration_ms": direct["duration_ms"],
        }
    )
    through_logging = json.loads(JSONFormatter().format(record))
    assert direct.pop("ts")[:10] == through_logging.pop("ts")[:10]
    assert direct == through_logging
    assert list(direct) == list(through_logging)  # the same order of fields


async def test_access_lines_go_through_logging_when_it_is_configured_otherwise(
    sluice_logging, caplog
):
    sluice_logging()
    logging.getLogger().addHandler(caplog.handler)
    # pytest's caplog is a second handler on the root: the general path, so it sees them.
    with caplog.at_level(logging.INFO):
        assert access_line_writer() is None
        observability.record(_scope("/v1/topics"), "req-2", "/v1/topics", 200, 0.0)
    assert [r.request_id for r in caplog.records if r.name == "sluice.access"] == ["req-2"]  # type: ignore[attr-defined]


def test_only_sluices_own_json_handler_at_info_takes_the_direct_path(sluice_logging):
    sluice_logging()
    root = logging.getLogger()
    assert access_line_writer() is root.handlers[0]
    [handler] = root.handlers
    handler.setFormatter(TextFormatter())  # text for a terminal: the general path
    assert access_line_writer() is None
    handler.setFormatter(JSONFormatter())
    root.setLevel(logging.WARNING)
    assert access_line_writer() is None
    root.setLevel(logging.INFO)
    handler.addFilter(lambda record: True)  # someone's own filter
    assert access_line_writer() is None
    handler.filters = [QuietStartup("INFO")]
    access = logging.getLogger("sluice.access")
    access.addHandler(logging.NullHandler())
    try:
        assert access_line_writer() is None
    finally:
        access.handlers.clear()
    assert access_line_writer() is handler


async def test_the_ready_probe_line_stays_debug(sluice_logging):
    stream = sluice_logging()
    observability.record(_scope("/readyz"), READY_PROBE_ID, "/readyz", 200, 0.0)
    observability.record(_scope("/readyz"), "not-the-probe", "/readyz", 200, 0.0)
    await asyncio.sleep(0)
    [line] = stream.getvalue().splitlines()
    # The probe's line is DEBUG (QuietStartup), shown only at DEBUG.
    assert json.loads(line)["request_id"] == "not-the-probe"


class BrokenStream(io.StringIO):
    def write(self, text: str) -> int:
        raise OSError("stderr is gone")


async def test_a_broken_stream_never_fails_the_request_that_logs():
    handler = LoopBatchedStreamHandler(BrokenStream())
    fields = {"request_id": "req-3"}
    handler.write_info("sluice.access", "request", fields)  # kept for the end of the turn
    await asyncio.sleep(0)  # the write fails there: the lines are dropped, nothing raised
    assert handler._pending == []
    raised: list[BaseException] = []

    def from_a_thread() -> None:  # no loop there: written at once, and failing quietly too
        try:
            handler.write_info("sluice.access", "request", fields)
        except BaseException as exc:
            raised.append(exc)

    done = threading.Thread(target=from_a_thread)
    done.start()
    done.join()
    assert raised == [] and handler._pending == []


def test_time_stamps_are_datetimes_own_formatting():
    """The line's time stamp, formatted once per second, is what datetime writes, for any
    time: rounding of the microseconds (half to even) and carries into the next second
    included."""
    rng = random.Random(2026)
    times = [rng.uniform(0, 4e9) for _ in range(20_000)]
    # Whole microseconds, and times halfway between two microseconds (the rounding's ties).
    times += [rng.randrange(4 * 10**9) + rng.randrange(10**6) / 1e6 for _ in range(20_000)]
    times += [rng.randrange(4 * 10**9) + (rng.randrange(10**7) + 0.5) / 1e7 for _ in range(20_000)]
    times += [0.0, 1.9999995, 1.9999994999, 1e9 + 0.9999996, 1733356800.9995, 1733356800.999999]
    for created in times:
        expected = datetime.fromtimestamp(created, UTC).isoformat(timespec="milliseconds")
        assert _timestamp(created) == expected, created


@pytest.mark.parametrize(
    "text", ["request", "plain ascii", "a\x1bb", "tab\tand\nnewline", "é\x07", "\u00a0x", "\x7f"]
)
def test_control_characters_are_written_out_whatever_else_the_text_holds(text):
    expected = "".join(
        f"\\x{ord(c):02x}" if (ord(c) < 32 and c not in "\t\n") or c == "\x7f" else c for c in text
    )
    assert _no_escapes(text) == expected
