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

from bench.floors import floor_sluice_pgmq, median
from bench.workloads import Config, Context, consume

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
    rates: dict[tuple[int, str], list[float]] = {}
    batches = [int(b) for b in args.batches.split(",")]
    floor = "bench.wrk.floor_consume_app:app"
    async with floor_sluice_pgmq(floor, FLOOR) as (postgres, peers):
        ctx = Context(cfg, postgres, print)
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
    command = (
        f"python -m bench.consume_floor --rounds {args.rounds} --batches {args.batches} "
        f"--seconds {args.seconds:g} --prefill {args.prefill} "
        f"--prefill-single {args.prefill_single}"
    )
    print(f"\ncommand: {command}")
    print("| row | server | msgs/s (median) | every round | vs pgmq |")
    print("|---|---|---|---|---|")
    for batch in batches:
        pgmq = median(rates[batch, "pgmq"]) if (batch, "pgmq") in rates else None
        for name in names:
            found = rates.get((batch, name), [])
            if not found:
                continue
            ratio = f"{median(found) / pgmq:.2f}x" if pgmq else "-"
            rounds = " / ".join(f"{r:,.0f}" for r in found)
            print(f"| consume b{batch} | {name} | {median(found):,.0f} | {rounds} | {ratio} |")


if __name__ == "__main__":
    asyncio.run(main())
