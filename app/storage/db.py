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


# Locks are short by design; anything waiting longer is a bug or a stuck peer. Set at
# connect time (server_settings), so no query is needed to restore them on each checkout.
_SESSION_SETTINGS = {
    "lock_timeout": "10s",
    "idle_in_transaction_session_timeout": "60s",
    # Every query is prepared once and driven by indexes whatever the parameters, so plan
    # once (at the 1st execution) instead of re-planning the big claim statements on every
    # call; the planner's custom plans cost more than they could save here.
    "plan_cache_mode": "force_generic_plan",
    # Every Sluice statement is meant to walk an index (a claim reads the log from the
    # cursor, a publish finds the newest offset, ...). Plans are made once per connection,
    # and a new segment's partitions are empty when they are: with sequential scans allowed,
    # a plan made then (or after an ANALYZE that found them empty) scans and sorts the whole
    # partition on every call once it has grown (measured: 7k instead of 95k messages/s).
    "enable_seqscan": "off",
    # Sluice's tables and functions live in a schema of their own (the application's
    # database may hold tables of the same names).
    "search_path": "sluice",
}


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset on release: nothing to do.

    asyncpg's default reset sends `RESET ALL; UNLISTEN *; ...` on every release: one more
    round trip per operation, and it would undo the session settings. We keep no session
    state (pool connections never LISTEN; the maintenance advisory lock is released
    explicitly), and asyncpg still ends any open transaction itself before this runs.
    """


async def create_pool(url: str, size: int, *, durable_commits: bool = True) -> asyncpg.Pool:
    """A pool of `size` connections.

    durable_commits=False sets synchronous_commit=off for the pool's sessions: a commit
    returns without waiting for its WAL flush (a crash may lose the last ~0.6 s of its
    transactions, never corrupt anything). Only for work whose loss is harmless; see
    app.queue.context for which.
    """
    settings = dict(_SESSION_SETTINGS)
    if not durable_commits:
        settings["synchronous_commit"] = "off"
    return await asyncpg.create_pool(
        plain_url(url),
        min_size=1,
        max_size=size,
        reset=_keep_session,
        server_settings=settings,
        # Dead connections after a Postgres restart are dropped rather than reused forever.
        max_inactive_connection_lifetime=60.0,
        command_timeout=30.0,
    )


def split_pool_size(total: int) -> tuple[int, int]:
    """SLUICE_DB_POOL_SIZE split into (main pool, claim pool); together they use `total`."""
    claims = max(1, total // 2)
    return max(1, total - claims), claims
