"""`python -m bench.publish_floor`: single-message publishes from the bench's Python load
generator (its closed loop and aiohttp client, as `bench.run`'s `publish b1` row) against
three servers in turn: the commit floor that shares commits (bench/wrk/floor_pg_app.py
`grouped_app`: bare ASGI, one writer task, one INSERT per group, nothing else), Sluice, and
pgmq's `send` over asyncpg. Rounds rotate the order. It answers one question: how close
can any Python HTTP server that commits each publish come to pgmq here, with this client?

    .venv/bin/python -m bench.publish_floor [--rounds 3] [--seconds 8] [--producers 4]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import tempfile
from pathlib import Path

from bench.infra import CpuMeter, Postgres, SluiceServer, free_port
from bench.peers import Peer
from bench.peers.pgmq import PgmqPeer
from bench.peers.sluice import SluicePeer
from bench.run import DEFAULT_PGMQ_SQL
from bench.workloads import make_value, run_loop
from bench.wrk.run import start_floor, wait_answering


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--producers", type=int, default=4)
    p.add_argument("--size", type=int, default=1024, help="bytes of each value")
    args = p.parse_args()
    postgres = Postgres(None)
    await asyncio.to_thread(postgres.start)
    await postgres.configure()
    tmp = Path(tempfile.mkdtemp(prefix="sluice-floor-"))
    floor_url = await postgres.create_database("bench_floor")
    port = free_port()
    floor = start_floor(
        "bench.wrk.floor_pg_app:grouped_app", port, {"FLOOR_DATABASE_URL": floor_url}
    )
    server = SluiceServer(
        await postgres.create_database("bench_sluice"), 1, tmp, env={"SLUICE_LOG_LEVEL": "WARNING"}
    )
    peers: dict[str, Peer] = {}
    rates: dict[str, list[float]] = {}
    try:
        await wait_answering(f"http://127.0.0.1:{port}")
        await server.start()
        peers["grouped commit floor"] = SluicePeer(f"http://127.0.0.1:{port}", floor_url)
        peers["grouped commit floor"].server_pid = floor.pid
        peers["sluice"] = SluicePeer(server.base_url, server.database_url)
        peers["sluice"].server_pid = server.pid
        if DEFAULT_PGMQ_SQL.is_file():
            pgmq_url = await postgres.create_database("bench_pgmq")
            peers["pgmq"] = PgmqPeer(pgmq_url, DEFAULT_PGMQ_SQL)
        for peer in peers.values():
            await peer.start()
        names = list(peers)
        for round_ in range(args.rounds):
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                peer = peers[name]
                queue = f"floor{round_}"
                await peer.create_queue(queue)
                prepared = peer.prepare([make_value(args.size)])

                async def op(
                    _: int, peer: Peer = peer, queue: str = queue, prepared: object = prepared
                ) -> int:
                    await peer.publish(queue, prepared)
                    return 1

                await postgres.quiesce()
                out = await run_loop(
                    args.producers,
                    op,
                    seconds=args.seconds,
                    warmup=1.0,
                    meter=CpuMeter(peer.server_pid, postgres.postmaster_pid),
                )
                rate = out.messages / out.seconds
                rates.setdefault(name, []).append(rate)
                cpu = ", ".join(f"{k} {v:.0f}%" for k, v in out.cpu.items() if v is not None)
                print(f"round {round_ + 1} {name}: {rate:,.0f} msgs/s, {out.errors} errors ({cpu})")
    finally:
        for peer in peers.values():
            await peer.close()
        await server.stop()
        floor.terminate()
        floor.wait(10)
        postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"\ncommand: python -m bench.publish_floor --rounds {args.rounds} --seconds "
        f"{args.seconds:g} --producers {args.producers} --size {args.size}"
    )
    print("| server | publish b1 msgs/s (median) | every round | vs pgmq |")
    print("|---|---|---|---|")
    pgmq = sorted(rates["pgmq"])[len(rates["pgmq"]) // 2] if "pgmq" in rates else None
    for name, found in rates.items():
        median = sorted(found)[len(found) // 2]
        ratio = f"{median / pgmq:.2f}x" if pgmq else "-"
        rounds = " / ".join(f"{r:,.0f}" for r in found)
        print(f"| {name} | {median:,.0f} | {rounds} | {ratio} |")


if __name__ == "__main__":
    asyncio.run(main())
