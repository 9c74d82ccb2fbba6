"""Alembic migrations: upgrade to head, downgrade to base, step by step, and the CLI."""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import subprocess
import sys
from pathlib import Path

import asyncpg
import pytest
from alembic.script import ScriptDirectory

from sluice.storage import migrate
from sluice.storage.db import plain_url
from tests.conftest import ROOT, database_url, run_app, unique
from tests.helpers import create_topic, publish

# Tables of the storage (schema sluice since revision 0004).
CORE_TABLES = {
    "sluice.topics",
    "sluice.messages",
    "sluice.subscriptions",
    "sluice.sub_states",
    "sluice.leases",
    "sluice.lease_events",
    "sluice.timers",
}
SCHEMAS = ("public", "sluice")


async def schema(url: str) -> dict[str, set[str]]:
    """Everything of Sluice in the database (schemas public and sluice), qualified names.
    Partitions of a segment are named by the segment: the same after a re-creation."""
    conn = await asyncpg.connect(plain_url(url))
    try:
        tables = await conn.fetch(
            "SELECT schemaname || '.' || tablename FROM pg_tables "
            "WHERE schemaname = ANY($1::text[]) "
            "UNION SELECT n.nspname || '.' || c.relname FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = ANY($1::text[]) AND c.relkind = 'p'",
            SCHEMAS,
        )
        functions = await conn.fetch(
            "SELECT n.nspname || '.' || p.proname FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = ANY($1::text[])",
            SCHEMAS,
        )
        # A revision may change a function's body only (0006): compared by a digest.
        bodies = await conn.fetch(
            "SELECT n.nspname || '.' || p.proname || '(' || "
            "pg_get_function_identity_arguments(p.oid) || ') ' || md5(p.prosrc) FROM pg_proc p "
            "JOIN pg_namespace n ON n.oid = p.pronamespace WHERE n.nspname = ANY($1::text[])",
            SCHEMAS,
        )
        indexes = await conn.fetch(
            "SELECT schemaname || '.' || indexname FROM pg_indexes "
            "WHERE schemaname = ANY($1::text[]) AND tablename <> 'alembic_version'",
            SCHEMAS,
        )
        types = await conn.fetch(
            "SELECT n.nspname || '.' || t.typname FROM pg_type t "
            "JOIN pg_namespace n ON n.oid = t.typnamespace "
            "WHERE n.nspname = ANY($1::text[]) AND t.typtype IN ('e', 'd', 'c') "
            "AND NOT EXISTS (SELECT 1 FROM pg_class c WHERE c.reltype = t.oid)",
            SCHEMAS,
        )
        sequences = await conn.fetch(
            "SELECT schemaname || '.' || sequencename FROM pg_sequences "
            "WHERE schemaname = ANY($1::text[])",
            SCHEMAS,
        )
        version = await migrate.current_revision(conn)
    finally:
        await conn.close()
    return {
        "tables": {r[0] for r in tables},
        "functions": {r[0] for r in functions},
        "bodies": {r[0] for r in bodies},
        "indexes": {r[0] for r in indexes},
        "types": {r[0] for r in types},
        "sequences": {r[0] for r in sequences},
        "version": {version} if version else set(),
    }


def revisions_base_to_head() -> list[str]:
    script = ScriptDirectory.from_config(migrate.alembic_config("postgresql://unused"))
    revisions = [r.revision for r in script.walk_revisions("base", "heads")]
    return list(reversed(revisions))


def assert_empty(state: dict[str, set[str]]) -> None:
    assert state["tables"] <= {"sluice.alembic_version"}, state["tables"]
    assert not state["functions"], state["functions"]
    assert not state["bodies"], state["bodies"]
    assert not state["indexes"], state["indexes"]
    assert not state["types"], state["types"]
    assert not state["sequences"], state["sequences"]
    assert not state["version"]


async def test_upgrade_downgrade_upgrade(fresh_db_url):
    head = migrate.head_revision()
    assert_empty(await schema(fresh_db_url))

    await migrate.upgrade(fresh_db_url)
    state = await schema(fresh_db_url)
    assert state["version"] == {head}
    assert state["tables"] >= CORE_TABLES | {"sluice.alembic_version"}
    assert not {t for t in state["tables"] if t.startswith("public.")}, state["tables"]
    assert {"sluice.now", "sluice.claim", "sluice.settle"} <= state["functions"]
    first_upgrade = state

    # Upgrading again is a no-op.
    await migrate.upgrade(fresh_db_url)
    assert await schema(fresh_db_url) == first_upgrade

    await migrate.downgrade(fresh_db_url, "base")
    assert_empty(await schema(fresh_db_url))

    await migrate.upgrade(fresh_db_url)
    assert await schema(fresh_db_url) == first_upgrade

    # And the re-created schema works.
    async with run_app(fresh_db_url) as h:
        topic = unique()
        await create_topic(h.client, topic)
        assert await publish(h.client, topic, {"ok": True}) == [0]
        r = await h.client.get(f"/v1/topics/{topic}/messages/0")
        assert r.json()["value"] == {"ok": True}


async def test_each_revision_upgrades_and_downgrades(fresh_db_url):
    revisions = revisions_base_to_head()
    assert revisions[-1] == migrate.head_revision()
    assert len(revisions) >= 2
    states = []
    for revision in revisions:
        await migrate.upgrade(fresh_db_url, revision)
        state = await schema(fresh_db_url)
        assert state["version"] == {revision}
        states.append(state)
    # Each step changes something: a table, an index, a function or a function's body.
    for before, after in itertools.pairwise(states):
        assert after["tables"] | after["indexes"] | after["bodies"] != (
            before["tables"] | before["indexes"] | before["bodies"]
        )
    # Step down one revision at a time: each downgrade restores the previous schema.
    for index in range(len(revisions) - 1, 0, -1):
        await migrate.downgrade(fresh_db_url, revisions[index - 1])
        assert await schema(fresh_db_url) == states[index - 1]
    await migrate.downgrade(fresh_db_url, "base")
    assert_empty(await schema(fresh_db_url))


async def test_concurrent_upgrades_are_serialised(fresh_db_url):
    # Several workers starting at once all run `upgrade`; none may fail.
    await asyncio.gather(*(migrate.upgrade(fresh_db_url) for _ in range(3)))
    state = await schema(fresh_db_url)
    assert state["version"] == {migrate.head_revision()}
    assert state["tables"] >= CORE_TABLES


async def test_a_migration_never_waits_in_line_behind_a_long_transaction(fresh_db_url):
    """Revision 0007 alters sluice.api_keys, which every authenticated request reads. While
    another transaction holds a lock on it (pg_dump holds ACCESS SHARE on every table), the
    ALTER must not wait in the lock queue, where every later read of the table would queue
    behind it: it gives up within its lock timeout, rolls back and is tried again, and
    readers go on meanwhile. Once the long transaction ends, the upgrade completes."""
    await migrate.upgrade(fresh_db_url, "0006")
    url = plain_url(fresh_db_url)
    holder, reader = await asyncpg.connect(url), await asyncpg.connect(url)
    try:
        long_transaction = holder.transaction()
        await long_transaction.start()
        await holder.fetchval("SELECT count(*) FROM sluice.api_keys")
        upgrading = asyncio.create_task(migrate.upgrade(fresh_db_url, lock_timeout_seconds=0.2))
        await asyncio.sleep(1.0)
        assert not upgrading.done()
        await reader.execute("SET lock_timeout = '1s'")
        for _ in range(10):  # a read waits at most for one attempt's lock timeout
            await reader.fetchval("SELECT count(*) FROM sluice.api_keys")
            await asyncio.sleep(0.1)
        assert await current_version(reader) == "0006"
        await long_transaction.commit()
        await asyncio.wait_for(upgrading, 30)
        assert await current_version(reader) == migrate.head_revision()
    finally:
        await holder.close()
        await reader.close()


async def test_a_migration_gives_up_after_its_lock_wait(fresh_db_url):
    await migrate.upgrade(fresh_db_url, "0006")
    holder = await asyncpg.connect(plain_url(fresh_db_url))
    try:
        async with holder.transaction():
            await holder.fetchval("SELECT count(*) FROM sluice.api_keys")
            with pytest.raises(migrate.MigrationLockTimeout, match="pg_stat_activity"):
                await migrate.upgrade(fresh_db_url, lock_timeout_seconds=0.1, lock_wait_seconds=0.5)
        assert await current_version(holder) == "0006"  # 0007 rolled back
    finally:
        await holder.close()


async def current_version(conn: asyncpg.Connection) -> str:
    return await conn.fetchval("SELECT version_num FROM sluice.alembic_version")


def sluice_command() -> list[str]:
    script = Path(sys.executable).with_name("sluice")
    return [str(script)] if script.exists() else [sys.executable, "-m", "sluice.cli"]


def run_cli(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.update({"DATABASE_URL": url, "SLUICE_LOG_LEVEL": "WARNING"})
    return subprocess.run(
        [*sluice_command(), "migrate", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


async def test_sluice_migrate_cli(fresh_db_url):
    result = run_cli(fresh_db_url)
    assert result.returncode == 0, result.stderr
    assert "head" in result.stdout
    state = await schema(fresh_db_url)
    assert state["version"] == {migrate.head_revision()}
    assert state["tables"] >= CORE_TABLES

    # Idempotent.
    result = run_cli(fresh_db_url)
    assert result.returncode == 0, result.stderr
    assert (await schema(fresh_db_url))["version"] == {migrate.head_revision()}

    result = run_cli(fresh_db_url, "base", "--downgrade")
    assert result.returncode == 0, result.stderr
    assert_empty(await schema(fresh_db_url))

    result = run_cli(fresh_db_url, "head")
    assert result.returncode == 0, result.stderr
    assert (await schema(fresh_db_url))["version"] == {migrate.head_revision()}


async def test_sluice_migrate_cli_with_sqlalchemy_style_url(fresh_db_url):
    # DATABASE_URL is documented as plain postgresql://, but a driver-qualified URL works too.
    url = "postgresql+asyncpg://" + plain_url(fresh_db_url).removeprefix("postgresql://")
    result = run_cli(url)
    assert result.returncode == 0, result.stderr
    assert (await schema(fresh_db_url))["version"] == {migrate.head_revision()}


async def test_sluice_migrate_cli_fails_cleanly_without_a_database(pg_server):
    missing = database_url(pg_server, "no_such_database_" + unique("x")[2:])
    result = run_cli(missing)
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "no_such_database" in result.stderr


async def test_sluice_migrate_cli_unknown_revision_fails_cleanly(fresh_db_url):
    result = run_cli(fresh_db_url, "not-a-revision")
    assert result.returncode != 0
    assert "Traceback" not in result.stdout + result.stderr
    assert "not-a-revision" in result.stderr


async def test_database_url_with_libpq_parameters_migrates(fresh_db_url):
    from sluice.storage import migrate

    separator = "&" if "?" in fresh_db_url else "?"
    url = fresh_db_url + separator + "application_name=sluice-migrate-test"
    await migrate.upgrade(url)
    conn = await asyncpg.connect(fresh_db_url)
    try:
        assert await conn.fetchval("SELECT version_num FROM sluice.alembic_version") == (
            migrate.head_revision()
        )
    finally:
        await conn.close()


def run_alembic(url: str | None, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    if url is not None:
        env["DATABASE_URL"] = url
    alembic = Path(sys.executable).with_name("alembic")
    return subprocess.run(
        [str(alembic), *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120
    )


async def test_alembic_command_works_from_the_checkout(fresh_db_url):
    # People who know Alembic run it as they always do: alembic.ini, URL from DATABASE_URL.
    result = run_alembic(fresh_db_url, "upgrade", "head")
    assert result.returncode == 0, result.stderr
    assert (await schema(fresh_db_url))["version"] == {migrate.head_revision()}
    current = run_alembic(fresh_db_url, "current")
    assert current.returncode == 0, current.stderr
    assert migrate.head_revision() in current.stdout
    history = run_alembic(None, "history")
    assert history.returncode == 0, history.stderr
    assert "0001" in history.stdout
    missing = run_alembic(None, "upgrade", "head")
    assert missing.returncode != 0
    assert "DATABASE_URL" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_each_patched_function_starts_from_its_newest_definition():
    """migrations/sql_files.patch_function edits the body a revision's .sql file defines: the
    file named must be the newest to define the function before the patching revision (an
    older body would undo what came between), and a function is patched at most once since
    that definition (a second patch would start again from the file and undo the first)."""
    versions = ROOT / "migrations" / "versions"
    defined: dict[str, list[str]] = {}
    for sql in sorted(versions.glob("*.sql")):
        pattern = r"^CREATE (?:OR REPLACE )?FUNCTION (sluice\.\w+)\("
        for found in re.finditer(pattern, sql.read_text(), re.M):
            defined.setdefault(found.group(1), []).append(sql.name)
    patched: dict[tuple[str, str], list[str]] = {}
    call = re.compile(r'patch_function\(\s*"([^"]+)",\s*"([^"]+)"')
    for revision in sorted(versions.glob("0*.py")):
        for found in call.finditer(revision.read_text()):
            file, function = found.group(1), found.group(2)
            before = [name for name in defined[function] if name[:4] < revision.name[:4]]
            assert before and before[-1] == file, (revision.name, function, before)
            patched.setdefault((function, file), []).append(revision.name)
    assert patched, "no revision patches a function: the check reads nothing"
    for (function, file), revisions in patched.items():
        assert len(revisions) == 1, (function, file, revisions)
