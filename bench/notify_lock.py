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

Then the SQL API (revision 0011): each client commits `sluice.send` of one message to its
topic, one transaction each, with a Sluice server relaying them into the log, while

- relays declare only when idle: the running server's relay polls while it has work and
  declares that it waits once the outbox stays empty (commits then notify);
- every commit notifies: this bench's session holds the relays' key, as a relay that
  always waits would (what every commit did before 0011).

After each SQL run the bench waits for the relay to have moved every sent message into the
log, and reports how long that took after pgbench ended.

    .venv/bin/python -m bench.notify_lock [--clients 4,16,64] [--seconds 6] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
from pathlib import Path

import asyncpg
import httpx

from bench.infra import Postgres, SluiceServer
from bench.wrk.pgbench import measure
from sluice.storage.db import plain_url
from sluice.storage.listener import INTEREST_BUCKETS, INTEREST_LOCK_CLASS, OUTBOX_LOCK_CLASS

SCRIPT = (
    "SELECT status FROM sluice.publish_batch('notify' || :client_id, ARRAY['{\"n\":1}'],"
    " ARRAY[NULL::text], ARRAY[NULL::text], ARRAY[0], NULL, 16, 0);\n"
)
SEND_SCRIPT = "SELECT sluice.send('notify' || :client_id, '{\"n\":1}'::jsonb);\n"
MODES = ("nobody waits", "every topic waited for")
SQL_MODES = ("relays declare only when idle", "every commit notifies")


def pgbench(url: str, script: str, clients: int, seconds: float) -> tuple[float, int]:
    """(transactions/s, transactions done): one transaction per script run."""
    done = measure(url, None, script, clients, seconds)
    if done["errors"]:
        raise RuntimeError(f"pgbench: {done['errors']} transactions failed")
    return done["rate"], done["messages"]


async def declare_every_bucket(conn: asyncpg.Connection, on: bool) -> None:
    function = "pg_advisory_lock_shared" if on else "pg_advisory_unlock_shared"
    await conn.execute(
        f"SELECT {function}($1, b) FROM generate_series(0, $2 - 1) b",
        INTEREST_LOCK_CLASS,
        INTEREST_BUCKETS,
    )


async def hold_relays_key(conn: asyncpg.Connection, topic: str, within: float = 30.0) -> None:
    """Take the relays' key from a running server: a commit through the SQL API wakes its
    relay, which gives the key back while it has work; take it in that moment."""
    deadline = asyncio.get_running_loop().time() + within
    while not await conn.fetchval("SELECT pg_try_advisory_lock($1, 0)", OUTBOX_LOCK_CLASS):
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"the relays' key was not free within {within} s")
        await conn.fetchval("SELECT sluice.send($1, '{}'::jsonb)", topic)
        await asyncio.sleep(0.005)


async def relayed_count(conn: asyncpg.Connection) -> int:
    """Messages in the log of the topics pgbench sends to."""
    return await conn.fetchval(
        "SELECT count(*) FROM sluice.messages m JOIN sluice.topics t USING (topic_id)"
        " WHERE t.name ~ '^notify[0-9]+$'"
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
            names = [f"notify{n}" for n in range(max(clients))]  # client_id counts from 0
            for name in [*names, "notify-wake"]:
                r = await client.put(f"/v1/topics/{name}", json={})
                assert r.status_code in (200, 201), r.text
    finally:
        await server.stop()
    declarer = await asyncpg.connect(plain_url(url))
    rates: dict[tuple[str, int], list[float]] = {}
    try:
        for round_ in range(args.rounds):
            order = MODES if round_ % 2 == 0 else MODES[::-1]
            for mode in order:
                await declare_every_bucket(declarer, mode != MODES[0])
                for n in clients:
                    await postgres.quiesce()
                    rate, _ = await asyncio.to_thread(pgbench, url, SCRIPT, n, args.seconds)
                    rates.setdefault((mode, n), []).append(rate)
                    print(f"round {round_ + 1}: {mode}, {n} clients: {rate:,.0f} publishes/s")
                await declare_every_bucket(declarer, False)
        # Every client's topic took messages (publish_batch answers 'no_topic' otherwise).
        stored = await declarer.fetchval("SELECT count(DISTINCT topic_id) FROM sluice.messages")
        assert stored == max(clients), f"messages in {stored} topics of {max(clients)}"
        sql_rates, lags = await measure_sql_api(postgres, url, declarer, clients, args)
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
    print()
    print(
        "| clients | SQL sends/s, relays declare when idle | every commit notifies | ratio"
        " | relayed after pgbench ended (s, max) |"
    )
    print("|---|---|---|---|---|")
    for n in clients:
        quiet = statistics.median(sql_rates[(SQL_MODES[0], n)])
        noisy = statistics.median(sql_rates[(SQL_MODES[1], n)])
        lag = max(lags[(SQL_MODES[0], n)] + lags[(SQL_MODES[1], n)])
        print(f"| {n} | {quiet:,.0f} | {noisy:,.0f} | {quiet / noisy:.2f}x | {lag:.2f} |")


async def measure_sql_api(
    postgres: Postgres,
    url: str,
    declarer: asyncpg.Connection,
    clients: list[int],
    args: argparse.Namespace,
) -> tuple[dict[tuple[str, int], list[float]], dict[tuple[str, int], list[float]]]:
    """The SQL rows: sends/s per mode and client count, and how long the relay took after
    each pgbench run to have every sent message in the log."""
    server = SluiceServer(url, 1, Path(tempfile.mkdtemp(prefix="sluice-notify-")), env={})
    await server.start()
    rates: dict[tuple[str, int], list[float]] = {}
    lags: dict[tuple[str, int], list[float]] = {}
    loop = asyncio.get_running_loop()
    try:
        for round_ in range(args.rounds):
            order = SQL_MODES if round_ % 2 == 0 else SQL_MODES[::-1]
            for mode in order:
                if mode == SQL_MODES[1]:
                    await hold_relays_key(declarer, "notify-wake")
                for n in clients:
                    await postgres.quiesce()
                    before = await relayed_count(declarer)
                    rate, sent = await asyncio.to_thread(pgbench, url, SEND_SCRIPT, n, args.seconds)
                    ended = loop.time()
                    while await relayed_count(declarer) < before + sent:
                        if loop.time() - ended > 60:
                            raise RuntimeError("the relay did not catch up within 60 s")
                        await asyncio.sleep(0.01)
                    lags.setdefault((mode, n), []).append(loop.time() - ended)
                    rates.setdefault((mode, n), []).append(rate)
                    print(f"round {round_ + 1}: SQL, {mode}, {n} clients: {rate:,.0f} sends/s")
                if mode == SQL_MODES[1]:
                    await declarer.fetchval("SELECT pg_advisory_unlock($1, 0)", OUTBOX_LOCK_CLASS)
    finally:
        await server.stop()
    return rates, lags


if __name__ == "__main__":
    asyncio.run(main())
