"""`python -m bench.consume_floor`: the consume rows of `bench.run` (the bench's 4 consumers
in closed loops, aiohttp, pull then ack in a request of its own; b100 drains a prefill, b1
runs a timed window) against three servers in turn: the consume floor
(bench/wrk/floor_consume_app.py: bare ASGI in front of the raw baseline's SQL, nothing
else), Sluice, and pgmq's read + delete over asyncpg. Rounds rotate the order. It answers
one question: how close can any Python HTTP server in front of the cheapest SQL come to
pgmq here, with this client?

    .venv/bin/python -m bench.consume_floor [--rounds 3] [--batches 100,1] [--seconds 10]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

from bench.infra import Postgres, SluiceServer, free_port
from bench.peers import Peer
from bench.peers.pgmq import PgmqPeer
from bench.peers.sluice import SluicePeer
from bench.run import DEFAULT_PGMQ_SQL
from bench.workloads import Config, Context, consume
from bench.wrk.run import start_floor, wait_answering

FLOOR = "consume floor"


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batches", default="100,1", help="comma list of pull sizes")
    defaults = Config()
    p.add_argument("--seconds", type=float, default=defaults.seconds, help="b1's window")
    p.add_argument("--prefill", type=int, default=defaults.prefill, help="drained by b100")
    p.add_argument("--prefill-single", type=int, default=defaults.prefill_single)
    args = p.parse_args()
    cfg = Config(seconds=args.seconds, prefill=args.prefill, prefill_single=args.prefill_single)
    postgres = Postgres(None)
    await asyncio.to_thread(postgres.start)
    await postgres.configure()
    ctx = Context(cfg, postgres, print)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-floor-"))
    floor_url = await postgres.create_database("bench_floor")
    port = free_port()
    floor = start_floor("bench.wrk.floor_consume_app:app", port, {"FLOOR_DATABASE_URL": floor_url})
    server = SluiceServer(
        await postgres.create_database("bench_sluice"), 1, tmp, env={"SLUICE_LOG_LEVEL": "WARNING"}
    )
    peers: dict[str, Peer] = {}
    rates: dict[tuple[int, str], list[float]] = {}
    batches = [int(b) for b in args.batches.split(",")]
    try:
        await wait_answering(f"http://127.0.0.1:{port}")
        await server.start()
        peers[FLOOR] = SluicePeer(f"http://127.0.0.1:{port}", floor_url)
        peers[FLOOR].server_pid = floor.pid
        peers["sluice"] = SluicePeer(server.base_url, server.database_url)
        peers["sluice"].server_pid = server.pid
        if DEFAULT_PGMQ_SQL.is_file():
            peers["pgmq"] = PgmqPeer(await postgres.create_database("bench_pgmq"), DEFAULT_PGMQ_SQL)
        for peer in peers.values():
            await peer.start()
        names = list(peers)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for batch in batches:
                for name in names[shift:] + names[:shift]:
                    drain = batch > 1
                    count = cfg.prefill if drain else cfg.prefill_single
                    queue = f"floor{batch}r{round_}"
                    result = await consume(ctx, peers[name], queue, batch, count, drain)
                    rates.setdefault((batch, name), []).append(result.rate)
                    cpu = ", ".join(f"{k} {v:.0f}%" for k, v in result.cpu.items() if v is not None)
                    print(
                        f"round {round_ + 1} consume b{batch} {name}: "
                        f"{result.rate:,.0f} msgs/s, {result.errors} errors ({cpu})"
                    )
    finally:
        for peer in peers.values():
            await peer.close()
        await server.stop()
        floor.terminate()
        floor.wait(10)
        postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    command = (
        f"python -m bench.consume_floor --rounds {args.rounds} --batches {args.batches} "
        f"--seconds {args.seconds:g} --prefill {args.prefill} "
        f"--prefill-single {args.prefill_single}"
    )
    print(f"\ncommand: {command}")
    print("| row | server | msgs/s (median) | every round | vs pgmq |")
    print("|---|---|---|---|---|")
    for batch in batches:
        found_pgmq = rates.get((batch, "pgmq"))
        pgmq = sorted(found_pgmq)[len(found_pgmq) // 2] if found_pgmq else None
        for name in peers:
            found = rates.get((batch, name), [])
            if not found:
                continue
            median = sorted(found)[len(found) // 2]
            ratio = f"{median / pgmq:.2f}x" if pgmq else "-"
            rounds = " / ".join(f"{r:,.0f}" for r in found)
            print(f"| consume b{batch} | {name} | {median:,.0f} | {rounds} | {ratio} |")


if __name__ == "__main__":
    asyncio.run(main())
