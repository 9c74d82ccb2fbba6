"""`sluice-client`: a command-line client over the HTTP API (works against a remote server).

Run as `sluice-client ...` (console script) or `python -m sluice_client ...`; `main(argv)`
returns the exit code instead of exiting, so it can be called in-process. The server's own
command, `sluice`, offers the same commands: it adds them to its parser with
`add_commands()` and runs a parsed command with `run()` (one definition of each).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import stat
import sys
import time
from collections.abc import Iterator, Sequence
from datetime import datetime
from typing import Any, TextIO

from ._client import Client
from ._errors import (
    BadRequest,
    Conflict,
    ConnectionFailed,
    Forbidden,
    NotFound,
    RateLimited,
    SluiceError,
    Unauthorized,
    Unavailable,
)
from ._models import OutgoingMessage

PROG = "sluice-client"

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_REFUSED = 4
EXIT_AUTH = 5
EXIT_UNAVAILABLE = 6
EXIT_RATE_LIMITED = 7
EXIT_INTERRUPTED = 130

# Lines of stdin per publish request: the API takes up to 1000 messages in one; a batch
# also ends at about PUBLISH_BATCH_BYTES of JSON, far below the request size limit.
PUBLISH_BATCH = 1000
PUBLISH_BATCH_BYTES = 1_000_000
PROGRESS_INTERVAL_SECONDS = 0.2
FOLLOW_INTERVAL_SECONDS = 0.5

EPILOG = """\
exit codes:
  0  ok
  1  another error answer of the server
  2  usage error
  3  not found (404)
  4  refused: 400, 409, 413, 415, 422, or invalid JSON input
  5  unauthorized or forbidden (401, 403)
  6  unavailable (503 or another 5xx, or no answer: connection refused, timeout)
  7  rate limited (429)
  130 interrupted (Ctrl-C) outside --follow / --watch
  A reader that goes away (`tail TOPIC | head -n 10`) ends the command quietly with 0,
  not 141 (SIGPIPE) and no traceback: the output it took was complete.

Messages (tail, dead-letters list) are printed as JSON lines in both output modes.
publish from stdin prints one offset a line; on a terminal a progress bar (rate, and with
`< file` the share done and an ETA) on stderr instead. No colours, never a prompt.
`sluice` (the server's command) offers the same commands, options after the command name.
Errors: one line `sluice-client: <detail>` on stderr; with --output json also a JSON
object {"error": {...}} on stdout.
"""


class InputError(Exception):
    """Invalid input given to the CLI (not an answer of the server): exit code 4."""


def _exit_code(exc: SluiceError) -> int:
    if isinstance(exc, NotFound):
        return EXIT_NOT_FOUND
    if isinstance(exc, Unauthorized | Forbidden):
        return EXIT_AUTH
    if isinstance(exc, RateLimited):
        return EXIT_RATE_LIMITED
    if isinstance(exc, Unavailable | ConnectionFailed):
        return EXIT_UNAVAILABLE
    if isinstance(exc, BadRequest | Conflict):
        return EXIT_REFUSED
    return 1


def _jsonable(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _jsonable(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, datetime):
        return obj.isoformat()
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def _dumps(obj: Any) -> str:
    return json.dumps(_jsonable(obj), ensure_ascii=False)


class _Out:
    def __init__(self, mode: str, stdout: TextIO, stderr: TextIO, prog: str = PROG) -> None:
        self.json = mode == "json"
        self.stdout = stdout
        self.stderr = stderr
        self.prog = prog  # what error lines start with: sluice-client or sluice

    def line(self, text: str = "") -> None:
        print(text, file=self.stdout, flush=True)

    def doc(self, obj: Any) -> None:
        self.line(_dumps(obj))

    def note(self, text: str) -> None:
        print(text, file=self.stderr, flush=True)

    def table(self, rows: Sequence[tuple[str, Any]]) -> None:
        width = max((len(k) for k, _ in rows), default=0)
        for key, value in rows:
            shown = "-" if value is None else value
            if isinstance(shown, datetime):
                shown = shown.isoformat()
            self.line(f"{key.ljust(width)}  {shown}")


# ---- commands ---------------------------------------------------------------------------


def _topic_rows(t: Any) -> list[tuple[str, Any]]:
    return [
        ("name", t.name),
        ("retention_seconds", t.retention_seconds),
        ("dedup_window_seconds", t.dedup_window_seconds),
        ("max_message_bytes", t.max_message_bytes),
        ("head_offset", t.head_offset),
        ("oldest_offset", t.oldest_offset),
        ("message_count", t.message_count),
        ("publish_rate_per_second", t.publish_rate_per_second),
        ("created_at", t.created_at),
        ("updated_at", t.updated_at),
    ]


def cmd_topics(c: Client, a: argparse.Namespace, out: _Out) -> int:
    if a.topics_cmd == "list":
        topics = list(c.iter_topics())
        if out.json:
            out.doc({"topics": topics})
        else:
            for t in topics:
                out.line(t.name)
    elif a.topics_cmd == "show":
        t = c.get_topic(a.name)
        out.doc(t) if out.json else out.table(_topic_rows(t))
    elif a.topics_cmd == "create":
        t = c.create_topic(
            a.name,
            retention_seconds=a.retention_seconds,
            dedup_window_seconds=a.dedup_window_seconds,
            max_message_bytes=a.max_message_bytes,
        )
        if out.json:
            out.doc(t)
        else:
            out.line(f"{'created' if t.created else 'updated'} topic {t.name}")
    elif a.topics_cmd == "delete":
        c.delete_topic(a.name)
        out.doc({"deleted": True, "topic": a.name}) if out.json else out.line(
            f"deleted topic {a.name}"
        )
    return EXIT_OK


def _parse_value(text: str, as_string: bool, where: str) -> Any:
    if as_string:
        return text
    try:
        return json.loads(text)
    except ValueError as exc:
        raise InputError(f"{where} is not valid JSON ({exc}); use --string to send text") from exc


def _parse_headers(pairs: list[str] | None) -> dict[str, str] | None:
    if not pairs:
        return None
    headers: dict[str, str] = {}
    for pair in pairs:
        name, sep, value = pair.partition("=")
        if not sep or not name:
            raise InputError(f"--header {pair!r}: expected NAME=VALUE")
        headers[name] = value
    return headers


def _stdin_values(
    stream: TextIO, as_string: bool, progress: _Progress | None = None
) -> Iterator[tuple[Any, int]]:
    """(value, size of its line) per non-blank line."""
    for number, raw in enumerate(stream, start=1):
        if progress is not None:
            progress.read += len(raw)
        line = raw.rstrip("\r\n")
        if not line.strip():
            continue
        yield _parse_value(line, as_string, f"stdin line {number}"), len(raw)


def _input_size(stream: TextIO) -> int | None:
    """The size of stdin when it is a regular file (`< file`): what an ETA needs."""
    try:
        info = os.fstat(stream.fileno())
    except (OSError, ValueError, AttributeError):
        return None
    return info.st_size if stat.S_ISREG(info.st_mode) and info.st_size > 0 else None


class _Progress:
    """One line on stderr, rewritten in place: messages published, rate, and with a known
    input size the share done and an ETA. Only on a terminal (never in a pipe)."""

    def __init__(self, stderr: TextIO, total_bytes: int | None) -> None:
        self.stderr = stderr
        self.total = total_bytes
        self.read = 0  # characters of input read (bytes for ASCII input)
        self.started = time.monotonic()
        self.shown_at = 0.0

    def update(self, published: int, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.shown_at < PROGRESS_INTERVAL_SECONDS:
            return
        self.shown_at = now
        elapsed = max(now - self.started, 1e-6)
        rate = published / elapsed
        text = f"published {published} ({rate:,.0f}/s)"
        if self.total:
            share = min(1.0, self.read / self.total)
            eta = elapsed * (1 - share) / share if share > 0 else 0.0
            filled = int(share * 20)
            text = f"[{'#' * filled}{'.' * (20 - filled)}] {share:4.0%} {text} ETA {eta:.0f}s"
        self.stderr.write("\r" + text + "\033[K" + ("\n" if final else ""))
        self.stderr.flush()


def cmd_publish(c: Client, a: argparse.Namespace, out: _Out, stdin: TextIO) -> int:
    headers = _parse_headers(a.header)

    def message(value: Any) -> OutgoingMessage:
        return OutgoingMessage(value, key=a.key, headers=headers, delay_seconds=a.delay)

    if a.value is not None:
        r = c.publish_one(
            a.topic,
            _parse_value(a.value, a.string, "VALUE"),
            key=a.key,
            headers=headers,
            delay_seconds=a.delay,
        )
        if out.json:
            out.doc({"messages": [r]})
        else:
            out.line(f"{r.offset}{' (duplicate)' if r.duplicate else ''}")
        return EXIT_OK

    results: list[Any] = []
    batch: list[OutgoingMessage] = []
    batch_bytes = 0
    # On a terminal a progress bar replaces the offsets (100k lines of numbers help nobody
    # there); in a pipe the offsets are printed, one a line, and no bar.
    interactive = out.stdout.isatty() and out.stderr.isatty()
    progress = _Progress(out.stderr, _input_size(stdin)) if interactive else None

    def send() -> None:
        nonlocal batch_bytes
        rs = c.publish(a.topic, batch)
        results.extend(rs)
        if progress is not None:
            progress.update(len(results))
        elif not out.json:
            out.stdout.write(
                "".join(f"{r.offset}{' (duplicate)' if r.duplicate else ''}\n" for r in rs)
            )
            out.stdout.flush()
        batch.clear()
        batch_bytes = 0

    try:
        for value, size in _stdin_values(stdin, a.string, progress):
            batch.append(message(value))
            batch_bytes += size
            if len(batch) >= PUBLISH_BATCH or batch_bytes >= PUBLISH_BATCH_BYTES:
                send()
        if batch:
            send()
    except (SluiceError, InputError):
        if results:
            out.note(f"{out.prog}: {len(results)} messages were published before the error")
        raise
    finally:
        if progress is not None and results:
            progress.update(len(results), final=True)
    if out.json:
        out.doc({"messages": results})
    else:
        dups = sum(1 for r in results if r.duplicate)
        out.note(f"published {len(results)} messages to {a.topic} ({dups} duplicates)")
    return EXIT_OK


def _message_doc(m: Any) -> dict[str, Any]:
    return {
        "offset": m.offset,
        "key": m.key,
        "headers": m.headers,
        "value": m.value,
        "published_at": m.published_at,
    }


def cmd_tail(c: Client, a: argparse.Namespace, out: _Out) -> int:
    if a.subscription is not None:
        return _tail_subscription(c, a, out)
    if a.ack:
        raise InputError("--ack needs a SUBSCRIPTION")
    offset = a.from_offset
    printed = 0
    try:
        while True:
            page = c.browse(a.topic, from_offset=offset, limit=a.batch)
            for m in page.messages:
                doc = _message_doc(m)
                doc["deliver_at"] = m.deliver_at
                out.doc(doc)
                printed += 1
                if a.max is not None and printed >= a.max:
                    return EXIT_OK
            offset = page.next_offset
            if not page.messages:
                if not a.follow:
                    return EXIT_OK
                time.sleep(FOLLOW_INTERVAL_SECONDS)
    except KeyboardInterrupt:
        if a.follow:
            return EXIT_OK
        raise


def _tail_subscription(c: Client, a: argparse.Namespace, out: _Out) -> int:
    if not a.ack:
        raise InputError(
            "tail TOPIC SUBSCRIPTION needs --ack (what is pulled is acked once printed)"
        )
    wait = a.wait if a.wait is not None else (20.0 if a.follow else 1.0)
    printed = 0
    try:
        while True:
            want = a.batch if a.max is None else min(a.batch, a.max - printed)
            result = c.pull(a.topic, a.subscription, max_messages=want, wait_seconds=wait)
            if not result.messages:
                if a.follow:
                    continue
                return EXIT_OK
            for d in result.messages:
                doc = _message_doc(d)
                doc["delivery_attempt"] = d.delivery_attempt
                out.doc(doc)
            c.ack(a.topic, a.subscription, result.messages)
            printed += len(result.messages)
            if a.max is not None and printed >= a.max:
                return EXIT_OK
    except KeyboardInterrupt:
        # a batch printed but not acked yet is delivered again after its ack deadline
        if a.follow:
            return EXIT_OK
        raise


_SUB_OPTIONS = (
    ("ack_deadline_seconds", int),
    ("max_deliveries", int),
    ("retry_min_seconds", float),
    ("retry_max_seconds", float),
    ("dead_letter_topic", str),
    ("rate_limit_per_second", float),
    ("rate_limit_burst", int),
    ("max_in_flight", int),
)


def _sub_rows(s: Any) -> list[tuple[str, Any]]:
    return [
        ("topic", s.topic),
        ("name", s.name),
        ("ack_deadline_seconds", s.ack_deadline_seconds),
        ("max_deliveries", s.max_deliveries),
        ("retry_min_seconds", s.retry_min_seconds),
        ("retry_max_seconds", s.retry_max_seconds),
        ("dead_letter_topic", s.dead_letter_topic),
        ("ordered_by_key", s.ordered_by_key),
        ("rate_limit_per_second", s.rate_limit_per_second),
        ("rate_limit_burst", s.rate_limit_burst),
        ("max_in_flight", s.max_in_flight),
        ("created_at", s.created_at),
        ("updated_at", s.updated_at),
    ]


def _stats_rows(s: Any) -> list[tuple[str, Any]]:
    r = s.rates_per_second
    return [
        ("backlog", s.backlog),
        ("in_flight", s.in_flight),
        ("delayed", s.delayed),
        ("dead_lettered", s.dead_lettered),
        ("committed_offset", s.committed_offset),
        ("head_offset", s.head_offset),
        ("lag", s.lag),
        ("oldest_unacked_age_seconds", s.oldest_unacked_age_seconds),
        ("delivered_total", s.delivered_total),
        ("delivered/s", r.delivered),
        ("acked/s", r.acked),
        ("nacked/s", r.nacked),
        ("expired/s", r.expired),
        ("dead_lettered/s", r.dead_lettered),
    ]


def cmd_subscriptions(c: Client, a: argparse.Namespace, out: _Out) -> int:
    cmd = a.subs_cmd
    if cmd == "list":
        subs: list[Any] = []
        after = None
        while True:
            page = c.list_subscriptions(a.topic, after=after)
            subs.extend(page.items)
            after = page.next_after
            if after is None or not page.items:
                break
        if out.json:
            out.doc({"subscriptions": subs})
        else:
            for s in subs:
                out.line(f"{s.name}\tbacklog={s.backlog}\tin_flight={s.in_flight}\tlag={s.lag}")
    elif cmd == "show":
        s = c.get_subscription(a.topic, a.name)
        out.doc(s) if out.json else out.table(_sub_rows(s) + _stats_rows(s))
    elif cmd == "create":
        settings = {
            name: getattr(a, name) for name, _ in _SUB_OPTIONS if getattr(a, name) is not None
        }
        if a.ordered_by_key is not None:
            settings["ordered_by_key"] = a.ordered_by_key
        s = c.create_subscription(a.topic, a.name, start=a.start, **settings)
        if out.json:
            out.doc(s)
        else:
            out.line(f"{'created' if s.created else 'updated'} subscription {a.topic}/{s.name}")
    elif cmd == "delete":
        c.delete_subscription(a.topic, a.name)
        if out.json:
            out.doc({"deleted": True, "topic": a.topic, "subscription": a.name})
        else:
            out.line(f"deleted subscription {a.topic}/{a.name}")
    elif cmd == "seek":
        r = c.seek(a.topic, a.name, offset=a.offset, to=a.to, time=a.time)
        if out.json:
            out.doc(r)
        else:
            out.line(f"committed_offset {r.committed_offset}")
    return EXIT_OK


def cmd_dead_letters(c: Client, a: argparse.Namespace, out: _Out) -> int:
    if a.dl_cmd == "list":
        offset = a.from_offset
        while True:
            page = c.dead_letters(a.topic, a.subscription, from_offset=offset)
            for m in page.messages:
                out.doc(m)
            if not page.messages or page.next_offset <= offset:
                break
            offset = page.next_offset
    else:
        r = c.redrive(a.topic, a.subscription, a.offset or None)
        out.doc(r) if out.json else out.line(f"redriven {r.redriven}")
    return EXIT_OK


def cmd_stats(c: Client, a: argparse.Namespace, out: _Out) -> int:
    try:
        while True:
            s = c.get_subscription(a.topic, a.subscription)
            if out.json:
                out.doc(s)  # with --watch: one JSON line per reading
            else:
                if a.watch is not None:
                    out.line(f"# {datetime.now().astimezone().isoformat(timespec='seconds')}")
                out.table(_stats_rows(s))
            if a.watch is None:
                return EXIT_OK
            time.sleep(a.watch)
            if not out.json:
                out.line()
    except KeyboardInterrupt:
        if a.watch is not None:
            return EXIT_OK
        raise


# ---- parser -----------------------------------------------------------------------------


def _nonneg_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text} is negative")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


#: the commands this module defines (the server's `sluice` command offers them too)
COMMANDS = ("topics", "publish", "tail", "subscriptions", "dead-letters", "stats")

_OPTION_DEFAULTS: dict[str, Any] = {"url": None, "api_key": None, "output": "text", "timeout": 30.0}


def _add_connection_options(p: argparse.ArgumentParser, *, suppress: bool) -> None:
    """--url, --api-key, --output, --timeout. `suppress`: no default of their own (the
    options of a command: given after it, they override those given before it)."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if suppress else value

    p.add_argument(
        "--url",
        default=default(os.environ.get("SLUICE_URL")),
        help="server base URL (default: $SLUICE_URL, else http://127.0.0.1:8000)",
    )
    p.add_argument(
        "--api-key",
        default=default(os.environ.get("SLUICE_API_KEY")),
        help="API key, sent as a Bearer token (default: $SLUICE_API_KEY)",
    )
    p.add_argument(
        "--output",
        choices=("text", "json"),
        default=default("text"),
        help="text (default) or json: one JSON document, or JSON lines for streams",
    )
    p.add_argument(
        "--timeout",
        type=float,
        default=default(30.0),
        help="HTTP timeout in seconds (default 30)",
    )


def _leaf_parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    """The parsers that end a command line (`topics list`, `publish`, ...). argparse has no
    public way to walk its sub-parsers; `_actions` has been stable since Python 3.2."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield parser
    for action in subs:
        for child in dict.fromkeys(action.choices.values()):  # aliases map to one parser
            yield from _leaf_parsers(child)


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Command-line client for the Sluice HTTP message queue.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_connection_options(p, suppress=False)
    add_commands(p.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return p


def add_commands(cmds: Any) -> dict[str, argparse.ArgumentParser]:
    """Add the client commands to `cmds` (what `add_subparsers()` returned, with
    dest="command"); each command also takes the connection options after its name.
    Returns the commands' parsers by name."""
    # topics
    tp = cmds.add_parser("topics", help="list, show, create, delete topics")
    tcmds = tp.add_subparsers(dest="topics_cmd", required=True, metavar="ACTION")
    tcmds.add_parser("list", help="list topic names")
    for action in ("show", "delete"):
        tcmds.add_parser(action, help=f"{action} a topic").add_argument("name")
    tc = tcmds.add_parser("create", help="create a topic, or change the settings given")
    tc.add_argument("name")
    tc.add_argument("--retention-seconds", type=int)
    tc.add_argument("--dedup-window-seconds", type=int)
    tc.add_argument("--max-message-bytes", type=int)

    # publish
    pp = cmds.add_parser(
        "publish",
        help="publish a message, or one message per stdin line",
        description=(
            "Publish VALUE (JSON text), or without VALUE one message per line of stdin "
            f"(each line JSON; blank lines skipped; sent {PUBLISH_BATCH} per request). "
            "Text that is not valid JSON is refused (exit 4) unless --string is given, "
            "which sends VALUE / each line as a JSON string as it is."
        ),
    )
    pp.add_argument("topic")
    pp.add_argument("value", nargs="?", help="the message value as JSON (default: stdin lines)")
    pp.add_argument("--key", help="message key")
    pp.add_argument(
        "--header", action="append", metavar="NAME=VALUE", help="message header (repeatable)"
    )
    pp.add_argument("--delay", type=_nonneg_int, default=0, metavar="SECONDS")
    pp.add_argument("--string", action="store_true", help="send the text as a JSON string")

    # tail
    tl = cmds.add_parser(
        "tail",
        help="print messages as JSON lines",
        description=(
            "tail TOPIC: browse stored messages from --from-offset (nothing is consumed); "
            "--follow keeps polling every 0.5 s until interrupted. "
            "tail TOPIC SUBSCRIPTION --ack: pull (long-poll, --wait seconds, default 1, "
            "20 with --follow) and ack each batch once printed; without --follow it stops "
            "at the first empty pull."
        ),
    )
    tl.add_argument("topic")
    tl.add_argument("subscription", nargs="?")
    tl.add_argument("--from-offset", type=_nonneg_int, default=0)
    tl.add_argument("--follow", "-f", action="store_true")
    tl.add_argument("--ack", action="store_true", help="pull from SUBSCRIPTION and ack")
    tl.add_argument("--max", "-n", type=_positive_int, help="stop after N messages")
    tl.add_argument("--wait", type=float, help="pull long-poll seconds (0..20)")
    tl.add_argument("--batch", type=_positive_int, default=100, help="page / pull size")

    # subscriptions
    sp = cmds.add_parser("subscriptions", help="list, show, create, delete, seek subscriptions")
    scmds = sp.add_subparsers(dest="subs_cmd", required=True, metavar="ACTION")
    scmds.add_parser("list", help="list a topic's subscriptions").add_argument("topic")
    for action in ("show", "delete"):
        sa = scmds.add_parser(action, help=f"{action} a subscription")
        sa.add_argument("topic")
        sa.add_argument("name")
    sc_ = scmds.add_parser("create", help="create a subscription, or change the settings given")
    sc_.add_argument("topic")
    sc_.add_argument("name")
    sc_.add_argument(
        "--start", choices=("earliest", "latest"), help="where a new one starts (default latest)"
    )
    for name, typ in _SUB_OPTIONS:
        sc_.add_argument("--" + name.replace("_", "-"), dest=name, type=typ)
    sc_.add_argument("--ordered-by-key", action=argparse.BooleanOptionalAction, default=None)
    sk = scmds.add_parser("seek", help="move the committed offset")
    sk.add_argument("topic")
    sk.add_argument("name")
    where = sk.add_mutually_exclusive_group(required=True)
    where.add_argument("--offset", type=_nonneg_int)
    where.add_argument("--to", choices=("earliest", "latest"))
    where.add_argument("--time", help="ISO 8601 time with a timezone")

    # dead letters
    dp = cmds.add_parser("dead-letters", help="list or redrive parked messages")
    dcmds = dp.add_subparsers(dest="dl_cmd", required=True, metavar="ACTION")
    dl = dcmds.add_parser("list", help="print parked messages as JSON lines")
    dl.add_argument("topic")
    dl.add_argument("subscription")
    dl.add_argument("--from-offset", type=_nonneg_int, default=0)
    dr = dcmds.add_parser("redrive", help="deliver parked messages again")
    dr.add_argument("topic")
    dr.add_argument("subscription")
    dr.add_argument(
        "--offset", type=_nonneg_int, action="append", help="only this one (repeatable)"
    )

    # stats
    st = cmds.add_parser("stats", help="a subscription's stats")
    st.add_argument("topic")
    st.add_argument("subscription")
    st.add_argument(
        "--watch",
        type=float,
        metavar="SECONDS",
        help="read again every SECONDS until interrupted (json: one line per reading)",
    )
    parsers = {name: cmds.choices[name] for name in COMMANDS}
    for parser in parsers.values():
        for leaf in _leaf_parsers(parser):
            _add_connection_options(leaf, suppress=True)
    return parsers


def _run(c: Client, a: argparse.Namespace, out: _Out, stdin: TextIO) -> int:
    if a.command == "topics":
        return cmd_topics(c, a, out)
    if a.command == "publish":
        return cmd_publish(c, a, out, stdin)
    if a.command == "tail":
        return cmd_tail(c, a, out)
    if a.command == "subscriptions":
        return cmd_subscriptions(c, a, out)
    if a.command == "dead-letters":
        return cmd_dead_letters(c, a, out)
    return cmd_stats(c, a, out)


def _fail(out: _Out, code: int, detail: str, exc: SluiceError | None = None) -> int:
    out.note(f"{out.prog}: {detail}")
    if out.json:
        error: dict[str, Any] = {"exit_code": code, "detail": detail}
        if exc is not None:
            error.update(status=exc.status, title=exc.title, type=exc.type)
            if exc.errors:
                error["errors"] = exc.errors
        out.doc({"error": error})
    return code


def main(argv: Sequence[str] | None = None, prog: str = PROG) -> int:
    try:
        a = build_parser(prog).parse_args(argv)
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    return run(a, prog)


def run(a: argparse.Namespace, prog: str = PROG) -> int:
    """Run a command parsed by a parser that `add_commands()` built; the exit code."""
    stdout, stderr, stdin = sys.stdout, sys.stderr, sys.stdin
    for name, value in _OPTION_DEFAULTS.items():
        if not hasattr(a, name):  # a parser without the options before the command
            env = {"url": "SLUICE_URL", "api_key": "SLUICE_API_KEY"}.get(name)
            setattr(a, name, os.environ.get(env) if env else value)
    out = _Out(a.output, stdout, stderr, prog)
    try:
        with Client(a.url, api_key=a.api_key, timeout=a.timeout) as c:
            return _run(c, a, out, stdin)
    except SluiceError as exc:
        detail = exc.detail if exc.status is None else f"{exc.status} {exc.title}: {exc.detail}"
        if isinstance(exc, ConnectionFailed):
            detail = f"cannot reach {a.url or 'the server'}: {exc.detail}"
        return _fail(out, _exit_code(exc), detail, exc)
    except InputError as exc:
        return _fail(out, EXIT_REFUSED, str(exc))
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # the reader went away (e.g. `| head`): stop quietly
        if stdout is sys.__stdout__:
            try:  # so that the interpreter's final flush does not fail again
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, stdout.fileno())
            except (OSError, ValueError):
                pass
        return EXIT_OK


def console_main() -> None:
    sys.exit(main())
