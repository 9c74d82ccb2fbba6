"""`python -m bench.wrk.run`: the server's own cost per request, measured with wrk (a load
generator in C that costs almost nothing), next to the floor of the HTTP path: a bare ASGI
app on the same uvicorn, and the same answer through a Starlette and a FastAPI route
(bench/wrk/floor_app.py). Single-message publishes, one message per request, at several
connection counts. Reports requests/s and each server's CPU time per request (its process
tree, from /proc), and their ratio to the floor.

    .venv/bin/python -m bench.wrk.run [--seconds 10] [--connections 4,16,64] [--profile DIR]

With --profile, after the measured rows Sluice is run once more per connection count under
py-spy (not measured: the sampler costs the server CPU), and the summary of each profile
(bench/wrk/profile.py) is printed after the table.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from bench.infra import Postgres, SluiceServer, free_port, tree_cpu_seconds
from bench.wrk.profile import summarise

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "publish.lua"


def wrk(url: str, connections: int, seconds: float, topic: str) -> tuple[float, int, str]:
    """(requests/s, non-2xx or socket errors, raw output)."""
    out = subprocess.run(
        [
            "wrk",
            "-t",
            "1",
            "-c",
            str(connections),
            "-d",
            f"{seconds:g}s",
            "-s",
            str(SCRIPT),
            url,
            "--",
            topic,
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


def measure(url: str, pid: int, connections: int, seconds: float, topic: str) -> dict:
    before = tree_cpu_seconds(pid) or 0.0
    started = time.monotonic()
    rate, bad, _ = wrk(url, connections, seconds, topic)
    elapsed = time.monotonic() - started
    cpu = (tree_cpu_seconds(pid) or 0.0) - before
    requests = rate * seconds
    return {
        "rate": rate,
        "errors": bad,
        "cpu_pct": 100 * cpu / elapsed,
        "us_per_request": 1e6 * cpu / requests if requests else float("nan"),
    }


# What else answers the same request, cheapest first: the floor, then the frameworks.
FLOORS = {
    "bare ASGI (floor)": "bench.wrk.floor_app:app",
    "Starlette route + orjson": "bench.wrk.floor_app:starlette_app",
    "FastAPI route + pydantic": "bench.wrk.floor_app:fastapi_app",
}


def start_floor(target: str, port: int) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "uvicorn",
            target,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        cwd=HERE.parents[1],
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
    p.add_argument("--profile", type=Path, help="write py-spy profiles of Sluice here")
    p.add_argument("--only-sluice", action="store_true", help="skip the floors")
    p.add_argument("--log-level", default="WARNING", help="Sluice's SLUICE_LOG_LEVEL")
    p.add_argument("--workers", type=int, default=1, help="sluice serve --workers (default 1)")
    args = p.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("wrk is not installed (Debian: apt-get install wrk)")
    connections = [int(c) for c in args.connections.split(",")]
    postgres = Postgres(None)
    await asyncio.to_thread(postgres.start)
    tmp = Path(tempfile.mkdtemp(prefix="sluice-wrk-"))
    # WARNING by default like bench/run.py; INFO adds an access log line per request.
    env = {"SLUICE_LOG_LEVEL": args.log_level}
    server = SluiceServer(await postgres.create_database("bench_wrk"), args.workers, tmp, env=env)
    started: dict[str, tuple[str, subprocess.Popen[bytes]]] = {}
    rows: list[tuple[int, str, dict]] = []
    profiles: list[Path] = []
    try:
        # Sluice first: its port is chosen when it is created, and only bound once it runs,
        # so a floor started before could be given the same free port.
        await server.start()
        for name, target in ({} if args.only_sluice else FLOORS).items():
            port = free_port()
            started[name] = (f"http://127.0.0.1:{port}", start_floor(target, port))
        async with httpx.AsyncClient(base_url=server.base_url) as client:
            assert (await client.put("/v1/topics/wrk", json={})).status_code == 201
        for url, _ in started.values():
            await wait_answering(url)
        assert server.pid is not None
        targets = [(name, url, proc.pid) for name, (url, proc) in started.items()]
        label = "sluice publish b1" + (f" ({args.workers} workers)" if args.workers > 1 else "")
        targets.append((label, server.base_url, server.pid))
        for c in connections:
            for name, url, pid in targets:
                wrk(url, c, 2, "wrk")  # warm-up
                rows.append((c, name, measure(url, pid, c, args.seconds, "wrk")))
        if args.profile:
            args.profile.mkdir(parents=True, exist_ok=True)
            for c in connections:
                profiles.append(profile(server.base_url, server.pid, c, args.seconds, args.profile))
    finally:
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
    )
    print("| connections | server | req/s | server us/req | server cpu % | vs floor | errors |")
    print("|---|---|---|---|---|---|---|")
    floor = {c: r for c, name, r in rows if name == "bare ASGI (floor)"}
    for c, name, r in rows:
        ratio = r["us_per_request"] / floor[c]["us_per_request"] if c in floor else float("nan")
        print(
            f"| {c} | {name} | {r['rate']:,.0f} | {r['us_per_request']:.0f} | "
            f"{r['cpu_pct']:.0f} | {ratio:.1f}x | {r['errors']} |"
        )
    for path in profiles:
        print()
        print(summarise(path, top=40))


def profile(url: str, pid: int, connections: int, seconds: float, into: Path) -> Path:
    """py-spy on the server (and its children) while wrk runs; raw (collapsed) stacks."""
    path = into / f"sluice-c{connections}.txt"
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
            "--nonblocking",
            "--duration",
            f"{int(seconds)}",
            "-o",
            str(path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    time.sleep(0.5)
    wrk(url, connections, seconds, "wrk")
    spy.wait(seconds + 30)
    return path


if __name__ == "__main__":
    asyncio.run(main())
