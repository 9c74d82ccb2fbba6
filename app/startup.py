"""What `sluice serve` checks before it starts, and what it says once it is ready.

Every check that can fail at start-up fails with a StartupError: one sentence that says
what to do, and an exit code of its own (the table below, also in `sluice serve --help`
and the README). The port is checked first, before any Postgres is started.
"""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, unquote, urlsplit

EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_PORT = 3
EXIT_DB_UNREACHABLE = 4
EXIT_DB_AUTH = 5
EXIT_DB_MISSING = 6
EXIT_DATA_DIR = 7
EXIT_EMBEDDED = 8

EXIT_CODES: tuple[tuple[int, str], ...] = (
    (0, "stopped normally (SIGTERM or Ctrl+C)"),
    (EXIT_ERROR, "any other error (e.g. the schema could not be migrated)"),
    (EXIT_USAGE, "bad command line or setting (e.g. SLUICE_LOG_FORMAT=xml)"),
    (EXIT_PORT, "the port cannot be bound (in use, privileged, no such address)"),
    (EXIT_DB_UNREACHABLE, "DATABASE_URL: no PostgreSQL answers there"),
    (EXIT_DB_AUTH, "DATABASE_URL: PostgreSQL refused the user or password"),
    (EXIT_DB_MISSING, "DATABASE_URL: the database does not exist"),
    (EXIT_DATA_DIR, "SLUICE_DATA_DIR cannot be used (owned by another user, not writable)"),
    (EXIT_EMBEDDED, "the embedded PostgreSQL did not start"),
)


class StartupError(Exception):
    """A start-up failure the user can fix: `sentence` says how; `code` is the exit code."""

    def __init__(self, code: int, sentence: str) -> None:
        super().__init__(sentence)
        self.code = code
        self.sentence = sentence


# ---- the port -------------------------------------------------------------------------------


def check_port(host: str, port: int) -> None:
    """Bind (host, port) the way uvicorn will, and let it go again; StartupError if that
    fails. Done before the embedded Postgres starts and before any migration runs."""
    try:
        addresses = socket.getaddrinfo(
            host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
    except socket.gaierror as exc:
        raise StartupError(
            EXIT_PORT,
            f"Cannot listen on --host {host!r}: this machine cannot resolve it ({exc.strerror}); "
            "use an address it has, such as 127.0.0.1 (this machine only) or 0.0.0.0 (every "
            "interface).",
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(address)
            except PermissionError:
                raise StartupError(
                    EXIT_PORT,
                    f"Port {port} on {host} needs privileges this user does not have: "
                    "choose a port above 1023 with --port.",
                ) from None
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    raise StartupError(
                        EXIT_PORT,
                        f"Port {port} on {host} is already in use (another Sluice?): stop "
                        "what listens there, or choose another port with --port.",
                    ) from None
                if exc.errno == errno.EADDRNOTAVAIL:
                    raise StartupError(
                        EXIT_PORT,
                        f"{host} is not an address of this machine: choose one it has with "
                        "--host (127.0.0.1 for this machine only, 0.0.0.0 for every interface).",
                    ) from None
                raise StartupError(
                    EXIT_PORT, f"Cannot listen on {host} port {port} ({exc.strerror})."
                ) from None


# ---- the database ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """Where DATABASE_URL points, without its password."""

    user: str
    where: str  # host:port, or the socket directory
    database: str

    def __str__(self) -> str:
        return f"database {self.database!r} at {self.where} as user {self.user!r}"


def describe_database(url: str) -> Target:
    from sluice.storage.db import plain_url

    parts = urlsplit(plain_url(url))
    query = parse_qs(parts.query)
    user = unquote(parts.username or "") or (query.get("user") or [""])[0] or "(default user)"
    host = unquote(parts.hostname or "") or (query.get("host") or [""])[0]
    try:
        port = parts.port or int((query.get("port") or ["5432"])[0])
    except ValueError:
        port = 5432
    where = f"the socket in {host}" if host.startswith("/") else f"{host or 'localhost'}:{port}"
    database = unquote(parts.path.lstrip("/")) or (query.get("dbname") or [""])[0] or user
    return Target(user, where, database)


CONNECT_TIMEOUT_SECONDS = 10.0


async def probe_database(url: str) -> str:
    """Connect once; returns the server's version. StartupError, with what to do, when
    nothing answers, the login is refused or the database does not exist."""
    import asyncpg

    from sluice.storage.db import plain_url

    target = describe_database(url)
    try:
        conn = await asyncpg.connect(plain_url(url), timeout=CONNECT_TIMEOUT_SECONDS)
    except (TimeoutError, OSError) as exc:
        if isinstance(exc, TimeoutError):
            reason = f"no answer within {CONNECT_TIMEOUT_SECONDS:g} s"
        elif isinstance(exc, socket.gaierror) or not exc.errno or exc.errno < 0:
            reason = (exc.strerror or str(exc) or type(exc).__name__).lower()
        else:
            reason = os.strerror(exc.errno).lower()
        raise StartupError(
            EXIT_DB_UNREACHABLE,
            f"Cannot reach PostgreSQL at {target.where} ({reason}): start it, or fix the host "
            "and port in DATABASE_URL.",
        ) from None
    except (asyncpg.InvalidPasswordError, asyncpg.InvalidAuthorizationSpecificationError) as exc:
        raise StartupError(
            EXIT_DB_AUTH,
            f"PostgreSQL at {target.where} refused user {target.user!r} ({exc}): fix the user "
            "or password in DATABASE_URL (or let this client in, in pg_hba.conf).",
        ) from None
    except asyncpg.InvalidCatalogNameError:
        raise StartupError(
            EXIT_DB_MISSING,
            f"PostgreSQL at {target.where} has no database {target.database!r}: create it "
            f"(createdb {target.database}) or fix the database name in DATABASE_URL.",
        ) from None
    except (asyncpg.CannotConnectNowError, asyncpg.TooManyConnectionsError) as exc:
        raise StartupError(
            EXIT_DB_UNREACHABLE,
            f"PostgreSQL at {target.where} does not accept connections now ({exc}): "
            "try again when it does.",
        ) from None
    except asyncpg.PostgresError as exc:
        raise StartupError(
            EXIT_ERROR, f"PostgreSQL at {target.where} refused the connection: {exc}."
        ) from None
    except ValueError as exc:  # a URL asyncpg cannot parse
        raise StartupError(
            EXIT_USAGE,
            f"DATABASE_URL is not a postgresql://user@host:port/database URL ({exc}).",
        ) from None
    try:
        return str(await conn.fetchval("SHOW server_version")).split(" ")[0]
    finally:
        await conn.close()


@dataclass(frozen=True)
class SchemaFacts:
    revision: str | None
    keys: int  # keys ever created (revoked ones too): any makes the API need a key
    active_keys: int


async def schema_facts(url: str) -> SchemaFacts:
    import asyncpg

    from sluice.storage.db import plain_url

    conn = await asyncpg.connect(plain_url(url), timeout=CONNECT_TIMEOUT_SECONDS)
    try:
        from sluice.storage.migrate import current_revision

        revision = await current_revision(conn)
        keys, active = 0, 0
        if await conn.fetchval("SELECT to_regclass('sluice.api_keys') IS NOT NULL"):
            row = await conn.fetchrow(
                "SELECT count(*) AS n, count(*) FILTER (WHERE revoked_at IS NULL) AS active "
                "FROM sluice.api_keys"
            )
            keys, active = int(row["n"]), int(row["active"])
        return SchemaFacts(revision, keys, active)
    finally:
        await conn.close()


# ---- ready ----------------------------------------------------------------------------------


def is_wildcard(host: str) -> bool:
    """ "", 0.0.0.0 or :: (every interface)."""
    if not host:
        return True
    try:
        return ipaddress.ip_address(host).is_unspecified
    except ValueError:
        return False


def base_url(host: str, port: int) -> str:
    """The URL a person on this machine opens: a wildcard address becomes localhost."""
    if is_wildcard(host):
        host = "localhost"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port}"


def _probe_host(host: str) -> str:
    if is_wildcard(host):
        return "::1" if ":" in host else "127.0.0.1"
    return host


class ReadyWatcher(threading.Thread):
    """Calls on_ready() once GET /readyz answers 200 (every worker's lifespan has not
    necessarily run by then, but one that serves is up, with the schema at head)."""

    def __init__(
        self,
        host: str,
        port: int,
        on_ready: Callable[[], None],
        request_id: str,
        timeout: float = 600.0,
    ) -> None:
        super().__init__(name="sluice-ready-watcher", daemon=True)
        self.host = _probe_host(host)
        self.port = port
        self.on_ready = on_ready
        self.request_id = request_id
        self.timeout = timeout
        self.stopped = threading.Event()

    def _ready(self) -> bool:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", "/readyz", headers={"X-Request-ID": self.request_id})
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def run(self) -> None:
        deadline = time.monotonic() + self.timeout
        while not self.stopped.is_set() and time.monotonic() < deadline:
            if self._ready():
                with contextlib.suppress(Exception):
                    self.on_ready()
                return
            self.stopped.wait(0.1)
