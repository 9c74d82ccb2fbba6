"""`python -m bench.wrk.statements`: where Postgres spends a request's time, per statement.

Starts the bench's own Postgres with pg_stat_statements loaded (`track = all`, so the
statements inside Sluice's PL/pgSQL functions are counted on their own, and
`track_planning = on`), runs `sluice serve` on it, drives it with wrk (single-message
publishes, or pulls of one each acked in a request of its own, as `bench.wrk.run`), and
prints the statements by total time: calls, time per request and per call (wall time inside
Postgres: a statement's callers include it, and waits on locks count), and plans made.

    .venv/bin/python -m bench.wrk.statements [--workload consume] [--connections 4]
                                             [--seconds 6] [--top 25]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import sys
import tempfile
from pathlib import Path

import asyncpg
import httpx

from bench.infra import Postgres, SluiceServer
from bench.wrk.run import WORKLOADS, prefill_sluice, wrk

SETTINGS = {
    "shared_preload_libraries": "pg_stat_statements",
    "pg_stat_statements.track": "all",
    "pg_stat_statements.track_planning": "on",
}
TOP = """
SELECT calls, total_exec_time, total_plan_time, plans, toplevel,
       left(regexp_replace(query, '\\s+', ' ', 'g'), 120) AS query
FROM pg_stat_statements ORDER BY total_exec_time + total_plan_time DESC LIMIT $1
"""


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workload", choices=WORKLOADS, default="publish")
    p.add_argument("--connections", type=int, default=4)
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--top", type=int, default=25)
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    postgres = Postgres(None)
    await asyncio.to_thread(postgres.start)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-statements-"))
    server: SluiceServer | None = None
    try:
        admin = await asyncpg.connect(postgres.url)
        try:
            for name, value in {**Postgres.EMBEDDED_SETTINGS, **SETTINGS}.items():
                await admin.execute(f"ALTER SYSTEM SET {name} = '{value}'")
        finally:
            await admin.close()
        await asyncio.to_thread(postgres.restart)
        url = await postgres.create_database("bench_statements")
        stats = await asyncpg.connect(url)
        await stats.execute("CREATE EXTENSION pg_stat_statements")
        server = SluiceServer(url, 1, tmp)
        await server.start()
        async with httpx.AsyncClient(base_url=server.base_url, timeout=60) as client:
            assert (await client.put("/v1/topics/wrk", json={})).status_code == 201
            subscription = await client.put("/v1/topics/wrk/subscriptions/s", json={})
            assert subscription.status_code == 201
            if args.workload == "consume":
                await prefill_sluice(client, int(8_000 * (args.seconds + 2)))
        wrk_args = ["wrk", "s"] if args.workload == "consume" else ["wrk"]
        wrk(server.base_url, args.connections, 2, wrk_args, args.workload)  # warm-up
        await stats.execute("SELECT pg_stat_statements_reset()")
        rate, errors, text = wrk(
            server.base_url, args.connections, args.seconds, wrk_args, args.workload
        )
        ran = re.search(r"(\d+) requests in", text)
        requests = int(ran.group(1)) if ran else 0
        rows = await stats.fetch(TOP, args.top)
        await stats.close()
    finally:
        if server is not None:
            await server.stop()
        postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"command: python -m bench.wrk.statements --workload {args.workload} --connections "
        f"{args.connections} --seconds {args.seconds:g} --top {args.top}"
    )
    print(f"{requests:,} requests, {rate:,.0f}/s, {errors} errors")
    print("| calls | us/request | us/call | plans | top level | statement |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        total = 1000 * (row["total_exec_time"] + row["total_plan_time"])
        query = row["query"].replace("|", "\\|")
        print(
            f"| {row['calls']:,} | {total / max(requests, 1):.1f} | "
            f"{total / max(row['calls'], 1):.1f} | {row['plans']} | "
            f"{'yes' if row['toplevel'] else 'no'} | `{query}` |"
        )


if __name__ == "__main__":
    asyncio.run(main())
