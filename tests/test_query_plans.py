"""The claim path's look-ups stay index walks for one subscription, whatever the statistics.

The server plans its statements once (plan_cache_mode = force_generic_plan), so a plan
cannot tell subscriptions apart. When one subscription holds many leases, Postgres
estimated that "is anything due for this subscription?" matches most of the table and
planned it as a sequential scan, or an anti join over every subscription's due rows: each
pull of any other subscription then read the whole table (measured 15-33 ms instead of
0.02-0.4 ms). These tests build exactly those statistics and read the plans.
"""

from __future__ import annotations

import asyncpg
import pytest

from sluice.storage import delivery, migrate

BUSY_LEASES = 30_000

# name: (SQL, parameter types, arguments for the idle subscription)
HOT_STATEMENTS = {
    "probe": (delivery._PROBE, "text, text, float8", "'plans', 'idle', 0"),
    "claim_fresh": (
        delivery._CLAIM_FRESH,
        "text, text, int, float8, float8",
        "'plans', 'idle', 100, NULL, 0",
    ),
    "has_due": (delivery._HAS_DUE, "bigint, bigint, timestamptz", "{topic}, {sub}, now()"),
    "next_due": (
        delivery._NEXT_DUE,
        "bigint, bigint, boolean, timestamptz",
        "{topic}, {sub}, true, now()",
    ),
    "in_flight": (delivery._IN_FLIGHT, "bigint, bigint, timestamptz", "{topic}, {sub}, now()"),
}
_RECEIPTS = "ARRAY[1, 2, 3]::bigint[], ARRAY[gen_random_uuid(), gen_random_uuid()]"
SETTLE_STATEMENTS = {
    "ack": (
        delivery._ACK,
        "text, text, bigint[], uuid[], float8",
        f"'plans', 'idle', {_RECEIPTS}, 0",
    ),
    "ack_locked": (
        delivery._ACK_LOCKED,
        "bigint, bigint, bigint[], uuid[], timestamptz",
        f"{{topic}}, {{sub}}, {_RECEIPTS}, now()",
    ),
    "nack_locked": (
        delivery._NACK_LOCKED,
        "bigint, bigint, bigint[], uuid[], timestamptz, int, float8, float8, float8",
        f"{{topic}}, {{sub}}, {_RECEIPTS}, now(), 10, NULL, 1, 600",
    ),
    "extend": (
        delivery._EXTEND,
        "text, text, bigint[], uuid[], float8, float8",
        f"'plans', 'idle', {_RECEIPTS}, 0, 30",
    ),
}


@pytest.fixture
async def skewed_db(fresh_db_url: str) -> str:
    """One topic, a busy subscription with many leases, an idle one; fresh statistics."""
    await migrate.upgrade(fresh_db_url)
    conn = await asyncpg.connect(fresh_db_url)
    try:
        topic_id = await conn.fetchval(
            "INSERT INTO topics (name, retention_seconds, dedup_window_seconds, "
            "max_message_bytes) VALUES ('plans', 3600, 300, 1048576) RETURNING topic_id"
        )
        sub_ids = [
            await conn.fetchval(
                "INSERT INTO subscriptions (topic_id, name, next_offset, ack_deadline_seconds,"
                " max_deliveries, retry_min_seconds, retry_max_seconds, ordered_by_key) "
                "VALUES ($1, $2, 0, 60, 10, 1, 600, false) RETURNING sub_id",
                topic_id,
                name,
            )
            for name in ("busy", "idle")
        ]
        await conn.execute(
            """
            INSERT INTO deliveries
                (topic_id, sub_id, msg_offset, state, due_at, lease_until, lease_token, attempts)
            SELECT $1, $2, g, 'leased', now() + interval '2 minutes', now() + interval '1 minute',
                   gen_random_uuid(), 1
            FROM generate_series(0, $3 - 1) AS g
            """,
            topic_id,
            sub_ids[0],
            BUSY_LEASES,
        )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()
    return fresh_db_url


async def _explain(url: str, name: str, options: str = "") -> str:
    """The plan the server would run: prepared, with plan_cache_mode = force_generic_plan
    as in the server's sessions (app.storage.db)."""
    sql, types, args = {**HOT_STATEMENTS, **SETTLE_STATEMENTS}[name]
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("SET plan_cache_mode = force_generic_plan")
        ids = await conn.fetchrow("SELECT topic_id, sub_id FROM subscriptions WHERE name = 'idle'")
        await conn.execute(f"PREPARE {name}({types}) AS {sql}")
        arguments = args.format(topic=ids["topic_id"], sub=ids["sub_id"])
        # EXPLAIN ANALYZE of a claim would execute it: run it in a transaction and undo it.
        async with conn.transaction():
            rows = await conn.fetch(f"EXPLAIN {options} EXECUTE {name}({arguments})")
            plan = "\n".join(row[0] for row in rows)
            raise _Undo(plan)
    except _Undo as undo:
        return undo.plan
    finally:
        await conn.close()


class _Undo(Exception):
    def __init__(self, plan: str) -> None:
        self.plan = plan


@pytest.mark.parametrize("name", sorted(HOT_STATEMENTS))
async def test_due_lookups_walk_the_due_index(skewed_db: str, name: str) -> None:
    plan = await _explain(skewed_db, name)
    assert "Seq Scan on deliveries" not in plan, plan
    assert "Anti Join" not in plan, plan
    assert "deliveries_due" in plan, plan


@pytest.mark.parametrize("name", sorted(SETTLE_STATEMENTS))
async def test_acks_look_up_receipts_by_primary_key(skewed_db: str, name: str) -> None:
    plan = await _explain(skewed_db, name)
    assert "Seq Scan on deliveries" not in plan, plan
    assert "deliveries_pkey" in plan, plan


@pytest.mark.parametrize("name", ["probe", "claim_fresh"])
async def test_idle_subscription_reads_a_few_pages(skewed_db: str, name: str) -> None:
    """Executed, not only planned: a pull of the idle subscription touches a few pages, not
    the busy subscription's 30,000 leases."""
    plan = await _explain(skewed_db, name, "(ANALYZE, BUFFERS)")
    top = next(line for line in plan.splitlines() if "Buffers:" in line)
    pages = sum(int(part.split("=")[1]) for part in top.split() if "=" in part)
    assert pages < 50, plan
