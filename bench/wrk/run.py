"""`python -m bench.wrk.run`: the server's own cost per request, measured with wrk (a load
generator in C that costs almost nothing), next to the floor of the HTTP path: a bare ASGI
app on the same uvicorn, and the same answer through a Starlette and a FastAPI route
(bench/wrk/floor_app.py), and the floors of a publish that commits: that app plus one
INSERT per request, or per group of requests (bench/wrk/floor_pg_app.py). Single-message
publishes, one message per request, and single-message consumes (a pull of one, then its
ack in a request of its own), at several connection counts. Reports requests/s,
messages/s, each server's CPU time per request (its process tree, from /proc) and their
ratio to the floor, and Postgres' CPU per message. pgmq gets the same workloads from
pgbench, Postgres' load generator in C (bench/wrk/pgbench.py), when its install file is
there (--pgmq-sql): each system with a client that costs ~nothing.

    .venv/bin/python -m bench.wrk.run [--seconds 10] [--connections 4,16,64] [--profile DIR]
                                      [--workloads publish,consume]

With --profile, after the measured rows Sluice is run once more per connection count under
py-spy (not measured: the sampler costs the server CPU), and the summary of each profile
(bench/wrk/profile.py) is printed after the table.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.infra import Postgres, SluiceServer, free_port, tree_cpu_seconds
from bench.run import DEFAULT_PGMQ_SQL
from bench.wrk import pgbench
from bench.wrk.profile import summarise
from sluice.api.transport import UVICORN_HTTP

HERE = Path(__file__).resolve().parent
SCRIPTS = {
    "publish": HERE / "publish.lua",
    "publish-topics": HERE / "publish_topics.lua",
    "consume": HERE / "consume.lua",
}
# The message of every row: the value publish.lua sends, which pgmq gets as its payload.
VALUE = '{"order_id":42,"total":19.9,"customer":"c-7"}'
WORKLOADS = ("publish", "consume")
# Messages waiting before each consume row: more than the fastest system takes in the
# warm-up and the measured seconds, so no row runs dry.
CONSUME_RATE_CEILING = 8_000


def wrk(
    url: str, connections: int, seconds: float, args: list[str], workload: str = "publish"
) -> tuple[float, int, str]:
    """(requests/s, non-2xx or socket errors, raw output)."""
    out = subprocess.run(
        [
            *("wrk", "-t", "1", "-c", str(connections), "-d", f"{seconds:g}s"),
            *("-s", str(SCRIPTS[workload]), url, "--", *args),
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
    )
    text = out.stdout + out.stderr
    rate = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    bad = sum(int(n) for n in re.findall(r"Non-2xx or 3xx responses: (\d+)", text))
    errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    if errors:
        bad += sum(int(n) for n in errors.groups())
    return rate, bad, text


def measure(
    url: str,
    pid: int,
    postmaster: int | None,
    connections: int,
    seconds: float,
    args: list[str],
    workload: str = "publish",
) -> dict:
    before = tree_cpu_seconds(pid) or 0.0
    pg_before = tree_cpu_seconds(postmaster) or 0.0
    started = time.monotonic()
    rate, bad, text = wrk(url, connections, seconds, args, workload)
    elapsed = time.monotonic() - started
    cpu = (tree_cpu_seconds(pid) or 0.0) - before
    pg_cpu = (tree_cpu_seconds(postmaster) or 0.0) - pg_before
    # wrk's own duration, the one its Requests/sec is over: its request count over that rate
    # ("N requests in 8.00s" prints the duration rounded, 0.5% off in a 1-s run).
    ran = re.search(r"(\d+) requests in", text)
    requests = float(ran.group(1)) if ran else rate * seconds
    duration = requests / rate if rate else seconds
    if workload == "consume":
        acked = re.search(r"^acked (\d+)$", text, re.MULTILINE)
        messages = int(acked.group(1)) if acked else 0
    else:
        messages = round(requests)
    return {
        "rate": rate,
        "messages": messages,
        "msg_rate": messages / duration,
        "errors": bad,
        "cpu_pct": 100 * cpu / elapsed,
        "us_per_request": 1e6 * cpu / requests if requests else float("nan"),
        "postgres_us_per_msg": 1e6 * pg_cpu / messages if messages else float("nan"),
    }


async def prefill_sluice(client: httpx.AsyncClient, count: int) -> None:
    body = '{"messages":[' + ",".join([f'{{"value":{VALUE}}}'] * 1000) + "]}"
    for _ in range(-(-count // 1000)):
        r = await client.post(
            "/v1/topics/wrk/messages", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 201, r.text


# What else answers the same request, cheapest first: the floor, then the frameworks; each
# row's app and the uvicorn protocol it runs on.
FLOORS = {
    "bare ASGI (floor)": ("bench.wrk.floor_app:app", "httptools"),
    # The same app on the protocol `sluice serve` runs (app/api/transport.py): what sending
    # each response in one write takes off the floor itself. "vs floor" stays the row above.
    "bare ASGI, one write per response": ("bench.wrk.floor_app:app", UVICORN_HTTP),
    "Starlette route + orjson": ("bench.wrk.floor_app:starlette_app", "httptools"),
    "FastAPI route + pydantic": ("bench.wrk.floor_app:fastapi_app", "httptools"),
}
# The floor of a publish that commits: the bare ASGI app plus one INSERT per request, its
# own transaction, through asyncpg's pool or a list of connections; and with the requests
# that arrive during a write sharing the next one (bench/wrk/floor_pg_app.py). What Sluice
# adds on top of the last one is the cost of its own work (auth, validation, limits, offsets
# in commit order, the log line, metrics).
COMMIT_FLOORS = {
    "ASGI + INSERT per request (asyncpg pool)": "bench.wrk.floor_pg_app:pool_app",
    "ASGI + INSERT per request (connection list)": "bench.wrk.floor_pg_app:free_list_app",
    "ASGI + INSERT per group (one writer)": "bench.wrk.floor_pg_app:grouped_app",
}


def start_floor(
    target: str, port: int, env: dict[str, str] | None = None, http: str = "httptools"
) -> subprocess.Popen[bytes]:
    """uvicorn serving `target` (its command line's `--http` names no protocol class, so it is
    started from Python)."""
    launch = (
        "import sys, uvicorn; uvicorn.run(sys.argv[1], host='127.0.0.1', port=int(sys.argv[2]), "
        "http=sys.argv[3], log_level='warning', access_log=False)"
    )
    return subprocess.Popen(
        [sys.executable, "-c", launch, target, str(port), http],
        cwd=HERE.parents[1],
        env={**os.environ, **(env or {})},
    )


async def wait_answering(url: str) -> None:
    async with httpx.AsyncClient() as probe:
        for _ in range(100):
            try:
                await probe.get(url)
                return
            except httpx.HTTPError:
                await asyncio.sleep(0.1)


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--connections", default="4,16,64")
    p.add_argument(
        "--profile", type=Path, help="write py-spy profiles of Sluice here, one per workload"
    )
    p.add_argument(
        "--native", action="store_true", help="with --profile: C frames too (py-spy --native)"
    )
    p.add_argument("--only-sluice", action="store_true", help="skip the floors")
    p.add_argument(
        "--log-level",
        default="INFO",
        help="Sluice's SLUICE_LOG_LEVEL (default %(default)s, the service's default: an "
        "access line per request, as SPEC 6 measures; WARNING leaves it out)",
    )
    p.add_argument("--workers", type=int, default=1, help="sluice serve --workers (default 1)")
    p.add_argument("--workloads", default=",".join(WORKLOADS), help="default: %(default)s")
    p.add_argument(
        "--topics",
        type=int,
        default=1,
        help="Sluice's publish rows spread the requests over this many topics, in turn "
        "(default 1; the floors and pgmq are unchanged)",
    )
    p.add_argument(
        "--pgmq-sql",
        type=Path,
        default=DEFAULT_PGMQ_SQL,
        help="pgmq SQL-only install file (pgmq rows are skipped without it)",
    )
    args = p.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    if not workloads or set(workloads) - set(WORKLOADS):
        p.error(f"--workloads: a comma list of {', '.join(WORKLOADS)}")
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    connections = [int(c) for c in args.connections.split(",")]
    if args.topics < 1:
        p.error("--topics: at least 1")
    postgres = Postgres(None)
    await asyncio.to_thread(postgres.start)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-wrk-"))
    # INFO by default (unlike bench/run.py): the SPEC's HTTP-cost figure counts the access log.
    env = {"SLUICE_LOG_LEVEL": args.log_level}
    server = SluiceServer(await postgres.create_database("bench_wrk"), args.workers, tmp, env=env)
    started: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    rows: list[tuple[int, str, dict]] = []
    profiles: list[Path] = []
    notes: list[str] = []
    pgmq_url = None
    postmaster = postgres.postmaster_pid
    workers = f" ({args.workers} workers)" if args.workers > 1 else ""
    client: httpx.AsyncClient | None = None
    try:
        if not args.only_sluice and args.pgmq_sql.is_file():
            pgmq_url = await postgres.create_database("bench_wrk_pgmq")
            await pgbench.install(pgmq_url, args.pgmq_sql)
        elif not args.only_sluice:
            notes.append(f"pgmq rows skipped: no {args.pgmq_sql}")
        # Sluice first: its port is chosen when it is created, and only bound once it runs,
        # so a floor started before could be given the same free port.
        await server.start()
        if "publish" in workloads:
            for name, (target, http) in ({} if args.only_sluice else FLOORS).items():
                port = free_port()
                started[name] = (f"http://127.0.0.1:{port}", start_floor(target, port, http=http))
            if not args.only_sluice:
                floor_url = await postgres.create_database("bench_wrk_floor")
                floor_env = {"FLOOR_DATABASE_URL": floor_url}
                for name, target in COMMIT_FLOORS.items():
                    port = free_port()
                    started[name] = (
                        f"http://127.0.0.1:{port}",
                        start_floor(target, port, floor_env),
                    )
        client = httpx.AsyncClient(base_url=server.base_url, timeout=60)
        assert (await client.put("/v1/topics/wrk", json={})).status_code == 201
        assert (await client.put("/v1/topics/wrk/subscriptions/s", json={})).status_code == 201
        for i in range(args.topics if args.topics > 1 else 0):
            assert (await client.put(f"/v1/topics/wrk{i}", json={})).status_code == 201
        for url, _ in started.values():
            await wait_answering(url)
        assert server.pid is not None
        targets = [(name, url, proc.pid) for name, (url, proc) in started.items()]
        spread = f", {args.topics} topics" if args.topics > 1 else ""
        targets.append((f"sluice publish b1{spread}{workers}", server.base_url, server.pid))
        # (workload, wrk script arguments) of each target's publish rows
        publish_load = (
            ("publish-topics", ["wrk", str(args.topics)])
            if args.topics > 1
            else ("publish", ["wrk"])
        )
        scripts = pgbench.scripts(VALUE)
        backlog = int(CONSUME_RATE_CEILING * (args.seconds + 2))
        for c in connections:
            if "publish" in workloads:
                for name, url, pid in targets:
                    workload, wrk_args = publish_load if pid == server.pid else ("publish", ["wrk"])
                    wrk(url, c, 2, wrk_args, workload)  # warm-up
                    found = measure(url, pid, postmaster, c, args.seconds, wrk_args, workload)
                    rows.append((c, name, found))
                if pgmq_url is not None:
                    found = pgbench.measure(
                        pgmq_url, postmaster, scripts["publish"], c, args.seconds
                    )
                    rows.append((c, "pgmq send b1 (pgbench)", found))
            if "consume" in workloads:
                await prefill_sluice(client, backlog)
                wrk(server.base_url, c, 2, ["wrk", "s"], "consume")  # warm-up
                found = measure(
                    server.base_url, server.pid, postmaster, c, args.seconds, ["wrk", "s"],
                    "consume",
                )  # fmt: skip
                rows.append((c, f"sluice pull + ack b1{workers}", found))
                if pgmq_url is not None:
                    await pgbench.prefill(pgmq_url, VALUE, backlog)
                    found = pgbench.measure(
                        pgmq_url, postmaster, scripts["consume"], c, args.seconds
                    )
                    rows.append((c, "pgmq read + delete b1 (pgbench)", found))
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for c in connections:
                for workload in workloads:
                    if workload == "consume":
                        await prefill_sluice(client, backlog)
                    wrk_args = ["wrk", "s"] if workload == "consume" else publish_load[1]
                    load = workload if workload == "consume" else publish_load[0]
                    found = profile(
                        server.base_url, server.pid, c, args.seconds, args.profile,
                        (load, wrk_args), args.native,
                    )  # fmt: skip
                    profiles.append(found)
    finally:
        if client is not None:
            await client.aclose()
        await server.stop()
        for _, proc in started.values():
            proc.terminate()
            proc.wait(10)
        postgres.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    print(
        f"command: python -m bench.wrk.run --seconds {args.seconds:g} "
        f"--connections {args.connections} --log-level {args.log_level}"
        + (f" --workers {args.workers}" if args.workers > 1 else "")
        + (f" --topics {args.topics}" if args.topics > 1 else "")
        + (" --only-sluice" if args.only_sluice else "")
        + (f" --workloads {args.workloads}" if workloads != list(WORKLOADS) else "")
    )
    print(
        "| connections | server | req/s | msgs/s | server us/req | server cpu % | vs floor "
        "| postgres us/msg | errors |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    floor = {c: r for c, name, r in rows if name == "bare ASGI (floor)"}
    for c, name, r in rows:
        if "us_per_request" not in r:  # pgbench: Postgres is the server
            print(
                f"| {c} | {name} | {r['rate']:,.0f} | {r['rate']:,.0f} | - | - | - | "
                f"{r['postgres_us_per_msg']:.0f} | {r['errors']} |"
            )
            continue
        # --only-sluice measures no floor: the column says so rather than "nanx".
        ratio = f"{r['us_per_request'] / floor[c]['us_per_request']:.1f}x" if c in floor else "-"
        is_floor = name in FLOORS
        messages = "-" if is_floor else f"{r['msg_rate']:,.0f}"
        postgres_cost = "-" if is_floor else f"{r['postgres_us_per_msg']:.0f}"
        print(
            f"| {c} | {name} | {r['rate']:,.0f} | {messages} | {r['us_per_request']:.0f} | "
            f"{r['cpu_pct']:.0f} | {ratio} | {postgres_cost} | {r['errors']} |"
        )
    for note in notes:
        print(f"\n{note}")
    for path in profiles:
        print()
        print(summarise(path, top=40))


def profile(
    url: str,
    pid: int,
    connections: int,
    seconds: float,
    into: Path,
    load: tuple[str, list[str]],
    native: bool = False,
) -> Path:
    """py-spy on the server (and its children) while wrk runs `load` (its workload script
    and arguments); raw (collapsed) stacks."""
    workload, wrk_args = load
    path = into / f"sluice-{workload}-c{connections}.txt"
    spy = subprocess.Popen(
        [
            shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy"),
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--rate",
            "250",
            "--format",
            "raw",
            *(["--native"] if native else ["--nonblocking"]),
            "--duration",
            f"{int(seconds)}",
            "-o",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    wrk(url, connections, seconds, wrk_args, workload)
    spy.wait(seconds + 30)
    return path


if __name__ == "__main__":
    asyncio.run(main())
