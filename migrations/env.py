"""Alembic environment: runs migrations over the async engine (asyncpg)."""

from __future__ import annotations

import asyncio

import asyncpg
from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import create_async_engine

config = context.config


def _run(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=None, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()


async def _run_async() -> None:
    # Connect with asyncpg ourselves: it understands every libpq-style URL parameter
    # (host=/socket/dir, sslmode, application_name, ...), which SQLAlchemy would otherwise
    # pass to asyncpg.connect() as keyword arguments it does not accept.
    plain = config.attributes.get("plain_url") or config.get_main_option("plain_url")

    async def connect() -> asyncpg.Connection:
        return await asyncpg.connect(plain)

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
