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

from bench.floors import floor_sluice_pgmq, median
from bench.infra import CpuMeter
from bench.peers import Peer
from bench.workloads import make_value, run_loop


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seconds", type=float, default=8.0)
    p.add_argument("--producers", type=int, default=4)
    p.add_argument("--size", type=int, default=1024, help="bytes of each value")
    args = p.parse_args()
    rates: dict[str, list[float]] = {}
    floor = "bench.wrk.floor_pg_app:grouped_app"
    async with floor_sluice_pgmq(floor, "grouped commit floor") as (postgres, peers):
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
    print(
        f"\ncommand: python -m bench.publish_floor --rounds {args.rounds} --seconds "
        f"{args.seconds:g} --producers {args.producers} --size {args.size}"
    )
    print("| server | publish b1 msgs/s (median) | every round | vs pgmq |")
    print("|---|---|---|---|")
    pgmq = median(rates["pgmq"]) if "pgmq" in rates else None
    for name, found in rates.items():
        ratio = f"{median(found) / pgmq:.2f}x" if pgmq else "-"
        rounds = " / ".join(f"{r:,.0f}" for r in found)
        print(f"| {name} | {median(found):,.0f} | {rounds} | {ratio} |")


if __name__ == "__main__":
    asyncio.run(main())
