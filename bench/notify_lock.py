"""`python -m bench.notify_lock`: what a publish's NOTIFY costs the commits of everybody else.

A transaction that has sent a NOTIFY takes a lock of the whole Postgres server at commit and
holds it until its commit is flushed, so notifying commits take turns. Since revision 0010
a publish notifies only when some process declares a long-poll waiting for its topic
(storage/listener.py). This bench drives `sluice.publish_batch` with pgbench (Postgres' own
load generator in C, so the client costs next to nothing): each client publishes single
messages to a topic of its own, one transaction each, while

- nobody waits: no process declares waiters, the publishes do not notify;
- every topic is waited for: this bench's session declares every bucket, as listeners do
  for their long-polls, and every publish notifies (what every publish did before 0010).

    .venv/bin/python -m bench.notify_lock [--clients 4,16,64] [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import subprocess
import tempfile
from pathlib import Path

import asyncpg
import httpx

from bench.infra import Postgres, SluiceServer
from bench.wrk.pgbench import pgbench_binary
from sluice.storage.db import plain_url
from sluice.storage.listener import INTEREST_BUCKETS, INTEREST_LOCK_CLASS

SCRIPT = (
    "SELECT status FROM sluice.publish_batch('notify' || :client_id, ARRAY['{\"n\":1}'],"
    " ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[0], NULL, 16, 0);\n"
)
MODES = ("nobody waits", "every topic waited for")


def pgbench(url: str, script: Path, clients: int, seconds: float) -> tuple[float, str]:
    """(transactions/s, pgbench's output)."""
    out = subprocess.run(
        [
            str(pgbench_binary()),
            *("-n", "-c", str(clients), "-j", "1", "-T", f"{seconds:g}"),
            *("-f", str(script), plain_url(url)),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    found = re.search(r"tps = ([\d.]+)", out.stdout)
    failed = re.search(r"number of failed transactions: (\d+)", out.stdout)
    if out.returncode != 0 or found is None or (failed and int(failed.group(1))):
        text = (out.stdout + out.stderr)[-2000:]
        raise RuntimeError(f"pgbench failed ({out.returncode}): {text}")
    return float(found.group(1)), out.stdout


async def declare_every_bucket(conn: asyncpg.Connection, on: bool) -> None:
    function = "pg_advisory_lock_shared" if on else "pg_advisory_unlock_shared"
    await conn.execute(
        f"SELECT {function}($1, b) FROM generate_series(0, $2 - 1) b",
        INTEREST_LOCK_CLASS,
        INTEREST_BUCKETS,
    )


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clients", default="4,16,64")
    p.add_argument("--seconds", type=float, default=6.0)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--database-url", default=None, help="an existing server (default: embedded)")
    args = p.parse_args()
    clients = [int(n) for n in args.clients.split(",")]
    postgres = Postgres(args.database_url)
    await asyncio.to_thread(postgres.start)
    url = await postgres.create_database("bench_notify")
    # The schema and topics come from a Sluice server, stopped before the load starts.
    server = SluiceServer(url, 1, Path(tempfile.mkdtemp(prefix="sluice-notify-")), env={})
    await server.start()
    try:
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            for n in range(max(clients)):  # pgbench's client_id counts from 0
                r = await client.put(f"/v1/topics/notify{n}", json={})
                assert r.status_code in (200, 201), r.text
    finally:
        await server.stop()
    script = Path(tempfile.mkdtemp(prefix="sluice-notify-")) / "publish.sql"
    script.write_text(SCRIPT)
    declarer = await asyncpg.connect(plain_url(url))
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            for mode in order:
                await declare_every_bucket(declarer, mode != MODES[0])
                for n in clients:
                    await postgres.quiesce()
                    rate, _ = await asyncio.to_thread(pgbench, url, script, n, args.seconds)
                    rates.setdefault((mode, n), []).append(rate)
                    print(f"round {round_ + 1}: {mode}, {n} clients: {rate:,.0f} publishes/s")
                await declare_every_bucket(declarer, False)
        # Every client's topic took messages (publish_batch answers 'no_topic' otherwise).
        stored = await declarer.fetchval("SELECT count(DISTINCT topic_id) FROM sluice.messages")
        assert stored == max(clients), f"messages in {stored} topics of {max(clients)}"
    finally:
        await declarer.close()
        postgres.stop()
    print()
    print("| clients | nobody waits (publishes/s) | every topic waited for | ratio |")
    print("|---|---|---|---|")
    for n in clients:
        quiet = statistics.median(rates[(MODES[0], n)])
        noisy = statistics.median(rates[(MODES[1], n)])
        print(f"| {n} | {quiet:,.0f} | {noisy:,.0f} | {quiet / noisy:.2f}x |")


if __name__ == "__main__":
    asyncio.run(main())
