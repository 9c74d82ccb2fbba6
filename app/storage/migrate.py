"""Schema management: Alembic is the only thing that creates or changes tables."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from sluice.settings import get_settings
from sluice.storage.db import plain_url, sqlalchemy_url

log = logging.getLogger("sluice.migrate")

# Serialises concurrent `upgrade` calls (several workers starting at once).
_MIGRATION_LOCK_KEY = 0x51C3_0001
_LOCK_NOT_AVAILABLE = "55P03"


class MigrationLockTimeout(RuntimeError):
    """A migration's lock stayed held by another transaction for longer than allowed."""


def migrations_dir() -> Path:
    """The Alembic scripts: shipped inside the package (`sluice.migrations`, the top-level
    migrations/ folder of the source tree), unless SLUICE_MIGRATIONS_DIR names others."""
    configured = get_settings().migrations_dir
    if configured is not None:
        if not (configured / "env.py").exists():
            raise RuntimeError(f"SLUICE_MIGRATIONS_DIR={configured} holds no Alembic env.py")
        return configured
    import sluice.migrations

    return Path(sluice.migrations.__file__).resolve().parent


def alembic_config(url: str, lock_timeout_seconds: float | None = None) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    config.attributes["plain_url"] = plain_url(url)
    config.attributes["lock_timeout_seconds"] = (
        lock_timeout_seconds or get_settings().migration_lock_timeout_seconds
    )
    return config


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    head = script.get_current_head()
    assert head is not None
    return head


async def upgrade(
    url: str,
    revision: str = "head",
    *,
    lock_timeout_seconds: float | None = None,
    lock_wait_seconds: float | None = None,
) -> None:
    """Upgrade to `revision`. A migration whose lock is not granted within the lock
    timeout rolls back and is tried again (see Settings.migration_lock_timeout_seconds)."""
    # An advisory lock on a separate connection keeps two processes from migrating at once.
    lock_conn = await asyncpg.connect(plain_url(url))
    try:
        await lock_conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        config = alembic_config(url, lock_timeout_seconds)
        await _retrying_locks(
            lambda: command.upgrade(config, revision), lock_wait_seconds, "upgrade"
        )
    finally:
        await lock_conn.close()


async def downgrade(
    url: str,
    revision: str = "base",
    *,
    lock_timeout_seconds: float | None = None,
    lock_wait_seconds: float | None = None,
) -> None:
    config = alembic_config(url, lock_timeout_seconds)
    await _retrying_locks(
        lambda: command.downgrade(config, revision), lock_wait_seconds, "downgrade"
    )


async def _retrying_locks(run: Callable[[], None], wait_seconds: float | None, what: str) -> None:
    """Run an Alembic command (in a thread), again while a lock it needs is held elsewhere.
    Each migration is a transaction of its own: a refused one rolled back, the ones before
    it stay applied, and the next attempt goes on from there."""
    if wait_seconds is None:
        wait_seconds = get_settings().migration_lock_wait_seconds
    deadline = time.monotonic() + wait_seconds
    attempt = 0
    while True:
        try:
            await asyncio.to_thread(run)
            return
        except Exception as exc:
            if not _is_lock_not_available(exc):
                raise
            attempt += 1
            left = deadline - time.monotonic()
            if left <= 0:
                raise MigrationLockTimeout(
                    f"{what} gave up after {wait_seconds:g}s: another transaction kept a lock "
                    "a migration needs (a long transaction or pg_dump? see pg_stat_activity); "
                    "run `sluice migrate` again once it has ended"
                ) from exc
            delay = min(left, 10.0, 0.25 * 2**attempt)
            log.warning(
                "a migration's lock is held by another transaction (a long transaction or "
                "pg_dump? see pg_stat_activity); %s attempt %d again in %.1fs",
                what,
                attempt + 1,
                delay,
            )
            await asyncio.sleep(delay)


def _is_lock_not_available(exc: BaseException) -> bool:
    """Whether the error, or one it was raised from (SQLAlchemy wraps asyncpg's), is
    Postgres's lock_timeout."""
    seen: set[int] = set()
    pending: list[BaseException | None] = [exc]
    while pending:
        error = pending.pop()
        if error is None or id(error) in seen:
            continue
        seen.add(id(error))
        if getattr(error, "sqlstate", None) == _LOCK_NOT_AVAILABLE:
            return True
        pending.extend([error.__cause__, error.__context__, getattr(error, "orig", None)])
    return False


async def current_revision(conn: asyncpg.Connection) -> str | None:
    """The schema revision (version table in schema sluice; public before revision 0004)."""
    for table in ("sluice.alembic_version", "public.alembic_version"):
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            return await conn.fetchval(f"SELECT version_num FROM {table}")
    return None
