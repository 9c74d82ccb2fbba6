"""Alembic environment: runs migrations over the async engine (asyncpg)."""

from __future__ import annotations

import asyncio
import os

import asyncpg
from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config
if config.config_file_name is not None and config.attributes.get("plain_url") is None:
    # Run by the `alembic` command with alembic.ini (not by `sluice migrate`): its logging.
    from logging.config import fileConfig

    fileConfig(config.config_file_name, disable_existing_loggers=False)


def _plain_url() -> str:
    """The URL `sluice migrate` hands over, else DATABASE_URL (the `alembic` command)."""
    given = config.attributes.get("plain_url")
    if given:
        return given
    url = os.environ.get("DATABASE_URL")
    if not url:
        raise SystemExit(
            "DATABASE_URL is not set: point it at the database (postgresql://user@host/db), "
            "or run `sluice migrate`, which starts the embedded Postgres when it is unset"
        )
    from sluice.storage.db import plain_url

    return plain_url(url)


def _lock_timeout() -> str:
    seconds = config.attributes.get("lock_timeout_seconds")
    if seconds is None:  # the `alembic` command
        from sluice.settings import get_settings

        seconds = get_settings().migration_lock_timeout_seconds
    return f"{max(1, round(seconds * 1000))}ms"


# Everything of Sluice lives in this schema, Alembic's version table included: the service
# can share a database with an application (and that application's own Alembic).
SCHEMA = "sluice"
LEGACY_REVISIONS = ("0001", "0002", "0003")


def _prepare(connection: Connection) -> None:
    """The schema, and the version table of installs from before revision 0004 (which kept
    it as public.alembic_version) moved into it."""
    connection.exec_driver_sql(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
    legacy = connection.exec_driver_sql(
        "SELECT to_regclass('public.alembic_version') IS NOT NULL "
        f"AND to_regclass('{SCHEMA}.alembic_version') IS NULL"
    ).scalar()
    if legacy:
        version = connection.exec_driver_sql(
            "SELECT version_num FROM public.alembic_version"
        ).scalar()
        if version in LEGACY_REVISIONS:
            connection.exec_driver_sql(f"ALTER TABLE public.alembic_version SET SCHEMA {SCHEMA}")
    connection.commit()


def _run(connection: Connection) -> None:
    _prepare(connection)
    context.configure(
        connection=connection,
        target_metadata=None,
        transaction_per_migration=True,
        version_table_schema=SCHEMA,
    )
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    # Connect with asyncpg ourselves: it understands every libpq-style URL parameter
    # (host=/socket/dir, sslmode, application_name, ...), which SQLAlchemy would otherwise
    # pass to asyncpg.connect() as keyword arguments it does not accept.
    plain = _plain_url()

    async def connect() -> asyncpg.Connection:
        # A migration's DDL must not wait in line behind a long transaction: every query of
        # its table would queue behind it (`sluice migrate` retries a refused migration).
        return await asyncpg.connect(plain, server_settings={"lock_timeout": _lock_timeout()})

    engine = create_async_engine(
        "postgresql+asyncpg://", async_creator=connect, poolclass=pool.NullPool
    )
    async with engine.connect() as connection:
        await connection.run_sync(_run)
        await connection.commit()
    await engine.dispose()


if context.is_offline_mode():
    raise SystemExit("offline migrations are not supported; run `sluice migrate`")

existing = config.attributes.get("connection")
if existing is not None:
    _run(existing)
else:
    asyncio.run(_run_async())
