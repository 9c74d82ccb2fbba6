"""The `sluice` command: serve, migrate, openapi, keys."""

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
from pathlib import Path

from sluice.embedded import resolve_database_url
from sluice.logs import configure_logging
from sluice.settings import get_settings

log = logging.getLogger("sluice.cli")


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from sluice.storage import migrate

    settings = get_settings()
    configure_logging(settings.log_level)
    url, server = resolve_database_url()
    metrics_dir = _metrics_dir(args.workers)
    # While starting (migrations), a signal ends the process through `finally` below.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _exit_on_signal)
    try:
        asyncio.run(migrate.upgrade(url))
        # uvicorn re-raises SIGTERM/SIGINT after its graceful shutdown, restoring the handler
        # it found. Make that a no-op, so we get to stop the embedded Postgres and exit 0.
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: None)
        log.info("starting", extra={"host": args.host, "port": args.port, "workers": args.workers})
        uvicorn.run(
            "sluice.main:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            # Applied in every worker process too (they do not inherit our handlers).
            log_config=_log_config(settings.log_level),
            # Slow-loris resistance: idle keep-alive connections are closed quickly.
            timeout_keep_alive=5,
            timeout_graceful_shutdown=25,
            limit_concurrency=args.limit_concurrency,
            proxy_headers=False,
        )
    finally:
        if server is not None:
            from sluice.embedded import stop_embedded

            stop_embedded(server)
        if metrics_dir is not None:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return 0


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


def _log_config(level: str) -> dict[str, object]:
    """configure_logging() as a dictConfig: JSON lines on stderr at SLUICE_LOG_LEVEL."""
    level = level.upper()
    propagate = {"handlers": [], "propagate": True}
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "sluice.logs.JSONFormatter"}},
        "handlers": {
            "stderr": {
                "class": "logging.StreamHandler",
                "formatter": "json",
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
    url, server = resolve_database_url()
    try:
        if args.revision.startswith("-") or args.downgrade:
            asyncio.run(migrate.downgrade(url, args.revision))
        else:
            asyncio.run(migrate.upgrade(url, args.revision))
    except (OSError, asyncpg.PostgresError, SQLAlchemyError, CommandError) as exc:
        # A message, not a traceback: unreachable database, unknown revision, ...
        print(f"sluice migrate: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if server is not None:
            from sluice.embedded import stop_embedded

            stop_embedded(server)
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sluice", description="Sluice message queue")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--workers", type=int, default=1)
    serve.add_argument(
        "--limit-concurrency",
        type=int,
        default=5000,
        help="connections beyond this get 503 (protects memory)",
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
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
