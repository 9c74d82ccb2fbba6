"""Connection handling: the asyncpg pool and URL normalisation.

Every query of the service runs on connections from this pool; nothing else opens
connections except the LISTEN connection (storage.listener) and Alembic.
"""

from __future__ import annotations

import asyncpg

_DRIVER_PREFIXES = ("postgresql+asyncpg://", "postgresql+psycopg://", "postgres://")


def plain_url(url: str) -> str:
    """Accept postgresql://, postgres:// or a SQLAlchemy-style URL and return postgresql://."""
    for prefix in _DRIVER_PREFIXES:
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


def sqlalchemy_url(url: str) -> str:
    return "postgresql+asyncpg://" + plain_url(url)[len("postgresql://") :]


async def _init_connection(conn: asyncpg.Connection) -> None:
    # Locks are short by design; anything waiting longer is a bug or a stuck peer.
    await conn.execute("SET lock_timeout = '10s'; SET idle_in_transaction_session_timeout = '60s'")


async def create_pool(url: str, size: int) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        plain_url(url),
        min_size=1,
        max_size=size,
        init=_init_connection,
        # Dead connections after a Postgres restart are dropped rather than reused forever.
        max_inactive_connection_lifetime=60.0,
        command_timeout=30.0,
    )
