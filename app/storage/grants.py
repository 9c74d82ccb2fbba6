"""Privileges on the SQL API (revision 0005) for application roles.

A role gets USAGE on schema sluice plus EXECUTE on the functions of what it may do, or
SELECT on the views; never a privilege on a table. The functions run as their owner
(SECURITY DEFINER, fixed search_path) and check their input, like the HTTP API does.
"""

from __future__ import annotations

import asyncpg

PUBLISH_FUNCTIONS = (
    "sluice.send(text, jsonb, text, jsonb, text, integer)",
    "sluice.send_batch(text, jsonb[], text[], jsonb[], text[], integer[])",
)
CONSUME_FUNCTIONS = (
    "sluice.ack(text, text, text[])",
    "sluice.nack(text, text, text[], double precision)",
)
READ_VIEWS = (
    "sluice.topic_messages",
    "sluice.topic_stats",
    "sluice.subscription_stats",
    "sluice.dead_letter_messages",
)


def grant_statements(role: str, publish: bool, consume: bool, read: bool) -> list[str]:
    """The GRANTs, role quoted as an identifier (also what `sluice sql grant --print` shows)."""
    quoted = _quote(role)
    statements = [f"GRANT USAGE ON SCHEMA sluice TO {quoted}"]
    functions = (PUBLISH_FUNCTIONS if publish else ()) + (CONSUME_FUNCTIONS if consume else ())
    statements += [f"GRANT EXECUTE ON FUNCTION {f} TO {quoted}" for f in functions]
    if read:
        statements.append(f"GRANT SELECT ON {', '.join(READ_VIEWS)} TO {quoted}")
    return statements


def revoke_statements(role: str) -> list[str]:
    quoted = _quote(role)
    functions = ", ".join(PUBLISH_FUNCTIONS + CONSUME_FUNCTIONS)
    return [
        f"REVOKE EXECUTE ON FUNCTION {functions} FROM {quoted}",
        f"REVOKE SELECT ON {', '.join(READ_VIEWS)} FROM {quoted}",
        f"REVOKE USAGE ON SCHEMA sluice FROM {quoted}",
    ]


async def role_exists(conn: asyncpg.Connection, role: str) -> bool:
    return bool(await conn.fetchval("SELECT true FROM pg_roles WHERE rolname = $1", role))


async def grant(
    conn: asyncpg.Connection, role: str, *, publish: bool, consume: bool, read: bool
) -> None:
    async with conn.transaction():
        for statement in grant_statements(role, publish, consume, read):
            await conn.execute(statement)


async def revoke(conn: asyncpg.Connection, role: str) -> None:
    async with conn.transaction():
        for statement in revoke_statements(role):
            await conn.execute(statement)


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'
