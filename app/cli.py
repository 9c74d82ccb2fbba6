"""The `sluice` command: serve, migrate, openapi, keys, sql, and the client commands of
`sluice-client` (topics, publish, tail, subscriptions, dead-letters, stats), which come from
sluice_client's own parser: defined once, there."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from sluice.embedded import command_database
from sluice.logs import READY_PROBE_ID, configure_logging, log_config
from sluice.settings import get_settings

log = logging.getLogger("sluice.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sluice.api.transport import UVICORN_HTTP
    from sluice.startup import ReadyWatcher, check_port

    settings = get_settings()
    fmt = configure_logging(settings.log_level, settings.log_format)
    # Before anything is started: a port in use must not cost a Postgres start-up.
    check_port(args.host, args.port)
    # While starting (Postgres, migrations), a signal ends the process through `finally`.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    metrics_dir = None
    with command_database() as database:
        try:
            banner = asyncio.run(_prepare(database.url, embedded=database.embedded, args=args))
            metrics_dir = _metrics_dir(args.workers)
            # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, restoring the
            # handler it found. Make that a no-op, so we get to stop the embedded Postgres
            # and exit 0.
            for sig in (signal.SIGTERM, signal.SIGINT):
                signal.signal(sig, lambda *_: None)
            watcher = ReadyWatcher(args.host, args.port, banner, READY_PROBE_ID)
            watcher.start()
            uvicorn.run(
                "sluice.main:create_app",
                factory=True,
                host=args.host,
                port=args.port,
                workers=args.workers,
                # Applied in every worker process too (they do not inherit our handlers).
                log_config=log_config(settings.log_level, fmt),
                # sluice.access logs every request; uvicorn's own access line is kept for
                # DEBUG only, and not even formatted otherwise.
                access_log=settings.log_level.upper() == "DEBUG",
                # Slow-loris resistance: idle keep-alive connections are closed quickly.
                timeout_keep_alive=5,
                timeout_graceful_shutdown=25,
                limit_concurrency=args.limit_concurrency,
                proxy_headers=False,
                # uvicorn's httptools protocol, each response sent in one write.
                http=UVICORN_HTTP,
            )
            watcher.stopped.set()
        finally:
            if metrics_dir is not None:
                shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


async def _prepare(url: str, embedded: bool, args: argparse.Namespace) -> Callable[[], None]:
    """Check the database, bring the schema to head; returns what logs the banner."""
    import asyncpg
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from sluice.startup import (
        EXIT_ERROR,
        StartupError,
        describe_database,
        probe_database,
        schema_facts,
    )
    from sluice.storage import migrate

    version = await probe_database(url)
    try:
        await migrate.upgrade(url)
    except (
        OSError,
        asyncpg.PostgresError,
        SQLAlchemyError,
        CommandError,
        migrate.MigrationLockTimeout,
    ) as exc:
        raise StartupError(
            EXIT_ERROR,
            f"The schema could not be brought to head ({type(exc).__name__}: {exc}); "
            "`sluice migrate` shows the same without starting the service.",
        ) from None
    facts = await schema_facts(url)
    head = migrate.head_revision()
    if embedded:
        pgdata = get_settings().data_dir.expanduser().resolve() / "pgdata"
        data = f"embedded PostgreSQL {version} in {pgdata}"
    else:
        data = f"PostgreSQL {version}, {describe_database(url)}"
    schema = f"{facts.revision} (head)" if facts.revision == head else f"{facts.revision}"
    if facts.keys:
        keys = f"enforced: /v1 and /metrics need a key ({facts.active_keys} active)"
    else:
        keys = "none yet: the API is open to anyone (sluice keys create --scope admin)"

    def log_banner() -> None:
        from sluice.startup import base_url, is_wildcard

        base = base_url(args.host, args.port)
        urls = {
            "api": f"{base}/v1/topics",
            "docs": f"{base}/docs",
            "ui": f"{base}/ui",
            "metrics": f"{base}/metrics",
        }
        lines = [
            f"Sluice {_version()} is ready at {base}",
            f"  API         {urls['api']}",
            f"  Swagger UI  {urls['docs']}",
            f"  Live view   {urls['ui']}",
            f"  Metrics     {urls['metrics']}",
            f"  Data        {data}",
            f"  Schema      {schema}",
            f"  API keys    {keys}",
        ]
        if args.workers > 1:
            lines.append(f"  Workers     {args.workers}")
        if is_wildcard(args.host):
            lines.append(f"  Listening   on every interface ({args.host or '*'})")
        lines.append("Stop it with Ctrl+C.")
        log.info(
            "ready",
            extra={
                "version": _version(),
                "url": base,
                **urls,
                "database": data,
                "schema_revision": facts.revision,
                "api_keys": "enforced" if facts.keys else "open",
                "workers": args.workers,
                "_banner": lines,
            },
        )

    return log_banner


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _metrics_dir(workers: int) -> str | None:
    """With several workers, Prometheus metrics are kept in files of a fresh directory that
    every worker shares (prometheus_client multiprocess mode), so any worker's /metrics
    adds up all of them. Set before the workers start; removed when serve ends. A directory
    given in PROMETHEUS_MULTIPROC_DIR is used as is (and left alone)."""
    if workers <= 1 or os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        return None
    path = tempfile.mkdtemp(prefix="sluice-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
    return path


def cmd_migrate(args: argparse.Namespace) -> int:
    import asyncpg
    from alembic.util import CommandError
    from sqlalchemy.exc import SQLAlchemyError

    from sluice.storage import migrate

    configure_logging(get_settings().log_level)
    with command_database() as database:
        try:
            if args.revision.startswith("-") or args.downgrade:
                asyncio.run(migrate.downgrade(database.url, args.revision))
            else:
                asyncio.run(migrate.upgrade(database.url, args.revision))
        except (OSError, asyncpg.PostgresError, SQLAlchemyError, CommandError) as exc:
            # A message, not a traceback: unreachable database, unknown revision, ...
            print(f"sluice migrate: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
    print(f"schema at {args.revision}")
    return 0


def openapi_document() -> dict[str, object]:
    from sluice.main import create_app

    return create_app().openapi()


def cmd_openapi(args: argparse.Namespace) -> int:
    text = json.dumps(openapi_document(), indent=2, sort_keys=True) + "\n"
    if args.output == "-":
        sys.stdout.write(text)
    else:
        Path(args.output).write_text(text)
        print(f"wrote {args.output}")
    return 0


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sluice-mq")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def _port(text: str) -> int:
    value = int(text)
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError("a port is 1..65535")
    return value


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be 1 or more")
    return value


def _serve_epilog() -> str:
    from sluice.startup import EXIT_CODES

    codes = "\n".join(f"  {code:<3} {meaning}" for code, meaning in EXIT_CODES)
    return f"""\
settings (environment):
  DATABASE_URL         postgresql://user:password@host:port/database of the PostgreSQL to
                       use; unset: start an embedded PostgreSQL under SLUICE_DATA_DIR
  SLUICE_DATA_DIR      where the embedded PostgreSQL keeps its data (default: ./.sluice)
  SLUICE_DB_POOL_SIZE  database connections per process (default: 10)
  SLUICE_LOG_LEVEL     DEBUG, INFO, WARNING, ERROR (default: INFO)
  SLUICE_LOG_FORMAT    json, text or auto: text when stderr is a terminal, JSON lines
                       otherwise (default: auto)

exit codes:
{codes}
  128+N signal N arrived while starting
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice message queue")
    parser.add_argument("--version", action="version", version=f"sluice {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser(
        "serve",
        help="run the HTTP service",
        description=(
            "Run the HTTP service. Checks that the port can be bound, starts the embedded\n"
            "PostgreSQL when DATABASE_URL is unset, brings the schema to head, then serves\n"
            "and says where to go: API, Swagger UI, live view, metrics."
        ),
        epilog=_serve_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    serve.add_argument(
        "--host",
        default="127.0.0.1",
        help="address to listen on; 0.0.0.0 for every interface (default: %(default)s)",
    )
    serve.add_argument(
        "--port", type=_port, default=8000, help="TCP port to listen on (default: %(default)s)"
    )
    serve.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="server processes; add some only for cores Postgres does not need "
        "(default: %(default)s)",
    )
    serve.add_argument(
        "--limit-concurrency",
        type=_positive,
        default=5000,
        help="connections served at once; beyond this they get 503, which protects memory "
        "(default: %(default)s)",
    )
    serve.set_defaults(func=cmd_serve)

    mig = sub.add_parser("migrate", help="bring the schema to head (or to a revision)")
    mig.add_argument("revision", nargs="?", default="head")
    mig.add_argument("--downgrade", action="store_true", help="downgrade to the revision")
    mig.set_defaults(func=cmd_migrate)

    spec = sub.add_parser("openapi", help="write the OpenAPI document")
    spec.add_argument("--output", default="openapi/openapi.json")
    spec.set_defaults(func=cmd_openapi)

    from sluice.access.cli import add_keys_parser

    add_keys_parser(sub)
    from sluice.access.sql_cli import add_sql_parser

    add_sql_parser(sub)
    _add_client_commands(sub)
    return parser


def _add_client_commands(sub: argparse._SubParsersAction) -> None:
    """The client's commands, over HTTP (--url / $SLUICE_URL, default this host's :8000).

    sluice-client is a dependency of this distribution; an environment set up before it
    was (an older virtualenv) still serves, migrates and manages keys without them."""
    try:
        from sluice_client import cli as client_cli
    except ImportError:
        # Named, so that using one says what to install instead of "invalid choice".
        for name in ("topics", "publish", "tail", "subscriptions", "dead-letters", "stats"):
            missing = sub.add_parser(name, help="(needs sluice-client)", add_help=False)
            missing.add_argument("rest", nargs=argparse.REMAINDER)
            missing.set_defaults(func=_client_missing)
        return
    for parser in client_cli.add_commands(sub).values():
        parser.set_defaults(func=_run_client_command)


def _client_missing(args: argparse.Namespace) -> int:
    from sluice.startup import EXIT_USAGE

    _report(
        args.command,
        "The client commands come with sluice-client: pip install ./clients/python "
        "(from a checkout of this repository).",
        EXIT_USAGE,
    )
    return EXIT_USAGE


def _run_client_command(args: argparse.Namespace) -> int:
    from sluice_client import cli as client_cli

    return client_cli.run(args, prog="sluice")


def _report(command: str, sentence: str, code: int) -> None:
    """One sentence, no traceback: a plain line on a terminal, a JSON line otherwise."""
    from sluice.logs import resolve_format

    try:
        fmt = resolve_format(None)
    except Exception:  # the settings themselves are what is wrong
        fmt = resolve_format("auto")
    if fmt == "json":
        from sluice.logs import JSONFormatter

        record = logging.makeLogRecord(
            {"name": "sluice.cli", "levelno": logging.ERROR, "levelname": "ERROR"}
        )
        record.msg = sentence
        record.command = command
        record.exit_code = code
        print(JSONFormatter().format(record), file=sys.stderr)
    else:
        print(f"sluice {command}: {sentence}", file=sys.stderr)


def _setting_sentence(exc: Exception) -> str:
    from pydantic import ValidationError

    if not isinstance(exc, ValidationError):
        return str(exc)
    parts = []
    for error in exc.errors():
        name = str(error["loc"][0]) if error["loc"] else "?"
        env = name if name.isupper() else "SLUICE_" + name.upper()
        parts.append(f"{env}={error.get('input')!s}: {error['msg']}")
    return "Invalid setting " + "; ".join(parts) + "."


def main(argv: list[str] | None = None) -> int:
    from pydantic import ValidationError

    from sluice.startup import EXIT_USAGE, StartupError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except StartupError as exc:
        _report(args.command, exc.sentence, exc.code)
        return exc.code
    except ValidationError as exc:
        _report(args.command, _setting_sentence(exc), EXIT_USAGE)
        return EXIT_USAGE


if __name__ == "__main__":
    raise SystemExit(main())
