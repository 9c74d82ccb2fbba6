"""SQL for API keys: creation, listing, revocation and the active set the API checks.

Only SHA-256 digests of secrets are stored or read here; secrets never reach the database.
"""

from __future__ import annotations

import asyncpg

KEY_COLUMNS = "id, name, scopes, created_at, revoked_at"


async def create_key(
    conn: asyncpg.Connection, name: str | None, secret_hash: str, scopes: list[str]
) -> asyncpg.Record:
    row = await conn.fetchrow(
        f"INSERT INTO api_keys (name, secret_hash, scopes) VALUES ($1, $2, $3) "
        f"RETURNING {KEY_COLUMNS}",
        name,
        secret_hash,
        scopes,
    )
    assert row is not None
    return row


async def list_keys(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """Every key, revoked ones included, oldest first (never the hash)."""
    return await conn.fetch(f"SELECT {KEY_COLUMNS} FROM api_keys ORDER BY id")


async def revoke_key(conn: asyncpg.Connection, key_id: int) -> asyncpg.Record | None:
    """Revoke the key; a key revoked before keeps its first revocation time.

    Returns the key's row, or None when no key has this id."""
    return await conn.fetchrow(
        "UPDATE api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp()) "
        f"WHERE id = $1 RETURNING {KEY_COLUMNS}",
        key_id,
    )


async def any_key_exists(conn: asyncpg.Connection) -> bool:
    """Whether a key has ever been created. Revoked keys keep their row, so once the table
    has a row the API stays closed, however many keys are revoked."""
    return bool(await conn.fetchval("SELECT EXISTS (SELECT FROM api_keys)"))


async def delete_all_keys(conn: asyncpg.Connection) -> tuple[int, int]:
    """Delete every key, revoked ones included (`sluice keys open`): the one way to make the
    API open again. Returns (keys deleted, of which active)."""
    row = await conn.fetchrow(
        "WITH deleted AS (DELETE FROM api_keys RETURNING revoked_at) "
        "SELECT count(*) AS keys, count(*) FILTER (WHERE revoked_at IS NULL) AS active "
        "FROM deleted"
    )
    assert row is not None
    return row["keys"], row["active"]


async def active_keys(conn: asyncpg.Connection) -> list[asyncpg.Record]:
    """id, secret_hash and scopes of every unrevoked key: what each API process caches."""
    return await conn.fetch("SELECT id, secret_hash, scopes FROM api_keys WHERE revoked_at IS NULL")
