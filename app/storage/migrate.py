"""Schema management: Alembic is the only thing that creates or changes tables."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
from alembic import command
from alembic.config import Config
from alembic.script import ScriptDirectory

from sluice.settings import get_settings
from sluice.storage.db import plain_url, sqlalchemy_url

# Serialises concurrent `upgrade` calls (several workers starting at once).
_MIGRATION_LOCK_KEY = 0x51C3_0001


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


def alembic_config(url: str) -> Config:
    config = Config()
    config.set_main_option("script_location", str(migrations_dir()))
    config.set_main_option("sqlalchemy.url", sqlalchemy_url(url).replace("%", "%%"))
    config.attributes["plain_url"] = plain_url(url)
    return config


def head_revision() -> str:
    script = ScriptDirectory.from_config(alembic_config("postgresql://unused"))
    head = script.get_current_head()
    assert head is not None
    return head


def _upgrade_sync(url: str, revision: str) -> None:
    command.upgrade(alembic_config(url), revision)


def _downgrade_sync(url: str, revision: str) -> None:
    command.downgrade(alembic_config(url), revision)


async def upgrade(url: str, revision: str = "head") -> None:
    # An advisory lock on a separate connection keeps two processes from migrating at once.
    lock_conn = await asyncpg.connect(plain_url(url))
    try:
        await lock_conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK_KEY)
        await asyncio.to_thread(_upgrade_sync, url, revision)
    finally:
        await lock_conn.close()


async def downgrade(url: str, revision: str = "base") -> None:
    await asyncio.to_thread(_downgrade_sync, url, revision)


async def current_revision(conn: asyncpg.Connection) -> str | None:
    """The schema revision (version table in schema sluice; public before revision 0004)."""
    for table in ("sluice.alembic_version", "public.alembic_version"):
        if await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
            return await conn.fetchval(f"SELECT version_num FROM {table}")
    return None
