"""SQL for API keys: creation, listing, revocation, the active set the API checks, and
deleting every key (the one way to open the API again).

Only SHA-256 digests of secrets are stored or read here; secrets never reach the database.
Revoked keys keep their row: a table with any row means a key has existed, and the API
stays closed.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import asyncpg


@dataclass(frozen=True, slots=True)
class ApiKey:
    """A key as `sluice keys list` shows it (never its hash)."""

    id: int
    name: str | None
    scopes: tuple[str, ...]
    created_at: datetime
    revoked_at: datetime | None


@dataclass(frozen=True, slots=True)
class ActiveKey:
    """An unrevoked key as each API process caches it."""

    id: int
    secret_hash: str
    scopes: tuple[str, ...]
    sqs_access_key_id: str | None = None


def _api_key(row: asyncpg.Record) -> ApiKey:
    return ApiKey(
        row["id"], row["name"], tuple(row["scopes"]), row["created_at"], row["revoked_at"]
    )


# create_key: store a key by the hash of its secret.
CREATE_KEY = """
INSERT INTO sluice.api_keys (name, secret_hash, scopes, sqs_access_key_id) VALUES ($1, $2, $3, $4)
RETURNING id, name, scopes, created_at, revoked_at
"""

# list_keys: every key, revoked ones included, oldest first (never the hash).
LIST_KEYS = "SELECT id, name, scopes, created_at, revoked_at FROM sluice.api_keys ORDER BY id"

# revoke_key: revoke; a key revoked before keeps its first revocation time.
REVOKE_KEY = """
UPDATE sluice.api_keys SET revoked_at = coalesce(revoked_at, clock_timestamp())
WHERE id = $1
RETURNING id, name, scopes, created_at, revoked_at
"""

# active_keys: hash, scopes and SQS access key id of every unrevoked key.
ACTIVE_KEYS = """
SELECT id, secret_hash, scopes, sqs_access_key_id FROM sluice.api_keys WHERE revoked_at IS NULL
"""

# any_key_exists: whether a key was ever created (revoked keys keep their row).
ANY_KEY_EXISTS = "SELECT EXISTS (SELECT FROM sluice.api_keys)"

# delete_all_keys: delete every key, revoked ones included; counts what went.
DELETE_ALL_KEYS = """
WITH deleted AS (DELETE FROM sluice.api_keys RETURNING revoked_at)
SELECT count(*) AS keys, count(*) FILTER (WHERE revoked_at IS NULL) AS active FROM deleted
"""


async def create_key(
    conn: asyncpg.Connection,
    name: str | None,
    secret_hash: str,
    scopes: list[str],
    sqs_access_key_id: str | None = None,
) -> ApiKey:
    """`sqs_access_key_id`: the key also signs SQS requests (its secret is derived, never
    stored: access.sigv4)."""
    row = await conn.fetchrow(CREATE_KEY, name, secret_hash, scopes, sqs_access_key_id)
    assert row is not None
    return _api_key(row)


async def list_keys(conn: asyncpg.Connection) -> list[ApiKey]:
    return [_api_key(row) for row in await conn.fetch(LIST_KEYS)]


async def revoke_key(conn: asyncpg.Connection, key_id: int) -> ApiKey | None:
    """The revoked key, or None when no key has this id."""
    row = await conn.fetchrow(REVOKE_KEY, key_id)
    return None if row is None else _api_key(row)


async def active_keys(conn: asyncpg.Connection) -> list[ActiveKey]:
    return [
        ActiveKey(row["id"], row["secret_hash"], tuple(row["scopes"]), row["sqs_access_key_id"])
        for row in await conn.fetch(ACTIVE_KEYS)
    ]


async def any_key_exists(conn: asyncpg.Connection) -> bool:
    return bool(await conn.fetchval(ANY_KEY_EXISTS))


async def delete_all_keys(conn: asyncpg.Connection) -> tuple[int, int]:
    """Returns (keys deleted, of which active)."""
    row = await conn.fetchrow(DELETE_ALL_KEYS)
    assert row is not None
    return row["keys"], row["active"]
