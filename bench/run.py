"""`python -m bench.run`: Sluice over HTTP next to a raw-SQL baseline and pgmq, one run,
one Postgres. Prints one table; --json writes every row with its numbers."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import platform
import shlex
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import held_xmin
from bench import workloads as w
from bench.chart import held_xmin_svg
from bench.infra import ROOT, Postgres, SluiceServer
from bench.peers import Peer, PeerUnavailable
from bench.peers.pgmq import PgmqPeer
from bench.peers.rabbitmq import RabbitPeer
from bench.peers.raw import RawPeer
from bench.peers.sluice import HTTP_CLIENTS, SluicePeer, SluiceSqlPeer
from bench.stats import Result, add_ratios, format_table, keep_medians

ACK_IN_PULL = "ack-in-pull"
SDK_LINGER = 0.005  # seconds: the sdk workload's Publisher linger
SDK_IN_FLIGHT = (1, 4)  # its batches under way at once (4: the default; 1: all in order)
SDK_TRANSPORTS = ("httpx", "aiohttp")  # AsyncClient(transport=...): httpx's own, and over aiohttp
ALL_WORKLOADS = ("publish", "consume", "mixed", "fanout", "idle", "ratelimit", "workers")
# Run only when named in --workloads: held-xmin takes ~5 minutes per system by default;
# sdk measures the Python client library (clients/python) against the bench's own client.
OPTIONAL_WORKLOADS = ("held-xmin", "sdk")
HELD_XMIN_SYSTEMS = ("sluice", "raw", "pgmq")
ALL_SYSTEMS = ("sluice", "sluice-sql", "raw", "pgmq", "rabbitmq")
# Systems measured on the publish and mixed workloads only (they consume like `sluice`).
PUBLISH_ONLY = ("sluice-sql",)
DEFAULT_PGMQ_SQL = ROOT.parent / "shared" / "peers" / "pgmq" / "pgmq.sql"

# Rounds of the SPEC's batched phases. Rounds of one system vary by 20-30% on the shared
# 2-core machine (checkpoints, autovacuum, the other processes); five make the median
# steadier than three did (bench/RESULTS.md).
REPEAT = 5
QUICK_REPEAT = 3

# --quick: a couple of minutes in total instead of ~15 (explicit flags still win).
QUICK = {
    "seconds": 3.0,
    "warmup": 0.5,
    "prefill": 20_000,
    "prefill_single": 3_000,
    "consume_cap": 20.0,
    "mixed_seconds": 5.0,
    "wait_seconds": 2.0,
    "idle_polls": 300,
    "idle_seconds": 6.0,
    "idle_ramp": 2.0,
    "idle_wakeups": 3,
    "held_xmin_block_seconds": 5.0,
    "held_xmin_hold_seconds": 20.0,
    "held_xmin_messages": 20_000,
}


def build_parser() -> argparse.ArgumentParser:
    defaults = w.Config()
    p = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__,
    )
    p.add_argument(
        "--database-url",
        help="an existing Postgres (URL of a database we may CREATE DATABASE from); "
        "default: an embedded Postgres in a temp dir",
    )
    p.add_argument(
        "--pgmq-sql",
        type=Path,
        default=DEFAULT_PGMQ_SQL,
        help="pgmq SQL-only install file, loaded at bench time (pgmq is skipped without it); "
        "default ../shared/peers/pgmq/pgmq.sql from the repository",
    )
    p.add_argument(
        "--systems", default=",".join(ALL_SYSTEMS), help="comma list (default: %(default)s)"
    )
    p.add_argument(
        "--workloads",
        default=",".join(ALL_WORKLOADS),
        help="comma list (default: %(default)s); also "
        + ", ".join(OPTIONAL_WORKLOADS)
        + " (only when named: the long-transaction workload, bench/held_xmin.py)",
    )
    p.add_argument("--quick", action="store_true", help="short phases and small prefills")
    p.add_argument("--json", type=Path, help="also write the results here")
    p.add_argument(
        "--workers", type=int, default=2, help="server workers of the 'workers' phase (default 2)"
    )
    p.add_argument("--sluice-pool-size", type=int, help="SLUICE_DB_POOL_SIZE for the server")
    p.add_argument("--peer-pool-size", type=int, default=10, help="asyncpg pool of raw and pgmq")
    p.add_argument(
        "--repeat",
        type=int,
        help="rounds of the batched publish and consume phases, systems rotated; the median "
        f"is reported (default {REPEAT}, {QUICK_REPEAT} with --quick)",
    )
    p.add_argument(
        "--http-client",
        choices=HTTP_CLIENTS,
        default="aiohttp",
        help="HTTP client of the load generator for Sluice (default %(default)s)",
    )
    p.add_argument("--pgmq-poll-ms", type=int, default=100, help="read_with_poll interval")
    p.add_argument(
        "--profile-server",
        type=Path,
        help="run the (1-worker) Sluice server under cProfile and write the stats here",
    )
    p.add_argument(
        "--held-xmin-chart",
        type=Path,
        help="SVG chart of the held-xmin workload (default: beside --json, else in the temp dir)",
    )
    p.add_argument(
        "--timeout",
        type=float,
        help="give up after this many seconds (default 1800, plus the held-xmin workload's "
        "expected length when it runs)",
    )
    knobs = p.add_argument_group("workload parameters")
    for name in w.Config.__dataclass_fields__:
        value = getattr(defaults, name)
        knobs.add_argument(
            f"--{name.replace('_', '-')}",
            type=type(value),
            default=None,
            choices=held_xmin.MODES if name == "held_xmin_mode" else None,
            help=f"default {value}" + (f" ({QUICK[name]} with --quick)" if name in QUICK else ""),
        )
    return p


def config_from(args: argparse.Namespace) -> w.Config:
    cfg = w.Config()
    for name in w.Config.__dataclass_fields__:
        given = getattr(args, name)
        if given is not None:
            setattr(cfg, name, given)
        elif args.quick and name in QUICK:
            setattr(cfg, name, type(getattr(cfg, name))(QUICK[name]))
    return cfg


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def machine_info(pg_version: str) -> dict[str, str]:
    mem_kb = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    return {
        "cpus": str(os.cpu_count()),
        "memory": f"{mem_kb / 1024 / 1024:.1f} GiB",
        "python": platform.python_version(),
        "postgres": pg_version,
        "kernel": platform.release(),
        "load average at start": " ".join(f"{x:.2f}" for x in os.getloadavg()),
    }


class Run:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.cfg = config_from(args)
        self.systems = [s.strip() for s in args.systems.split(",") if s.strip()]
        self.workloads = [s.strip() for s in args.workloads.split(",") if s.strip()]
        for name in self.workloads:
            if name not in ALL_WORKLOADS + OPTIONAL_WORKLOADS:
                known = ", ".join(ALL_WORKLOADS + OPTIONAL_WORKLOADS)
                raise SystemExit(f"unknown workload {name!r}; known: {known}")
        for name in self.systems:
            if name not in ALL_SYSTEMS:
                raise SystemExit(f"unknown system {name!r}; known: {', '.join(ALL_SYSTEMS)}")
        if all(name in OPTIONAL_WORKLOADS for name in self.workloads):
            # Only held-xmin: the systems it does not run are not started at all.
            self.systems = [name for name in self.systems if name in HELD_XMIN_SYSTEMS]
        self.postgres = Postgres(args.database_url)
        self.ctx = w.Context(self.cfg, self.postgres, log)
        self.tmp = Path(tempfile.mkdtemp(prefix="sluice-bench-logs-"))
        self.server: SluiceServer | None = None
        self.sluice_url = ""
        self.peers: dict[str, Peer] = {}
        self.results: list[Result] = []
        self.skipped: list[str] = []
        self.info: dict[str, str] = {}
        self.held: list[held_xmin.Outcome] = []
        self.held_chart: Path | None = None

    # ---- set-up / tear-down ------------------------------------------------------------------

    async def setup(self) -> None:
        log("starting Postgres" + ("" if self.args.database_url else " (embedded, temp dir)"))
        await asyncio.to_thread(self.postgres.start)
        await self.postgres.locate_postmaster()
        configured = await self.postgres.configure()
        self.info = machine_info(await self.postgres.version())
        if configured:
            self.info["postgres settings"] = ", ".join(f"{k}={v}" for k, v in configured.items())
        self.info["load generator for sluice"] = self.args.http_client
        if {"sluice", "sluice-sql"} & set(self.systems):
            self.sluice_url = await self.postgres.create_database("bench_sluice")
            await self.start_sluice(1, profile=self.args.profile_server)
        if "raw" in self.systems:
            await self.add_peer(
                RawPeer(await self.postgres.create_database("bench_raw"), self.args.peer_pool_size)
            )
        if "pgmq" in self.systems:
            await self.add_peer(
                PgmqPeer(
                    await self.postgres.create_database("bench_pgmq"),
                    self.args.pgmq_sql.resolve(),
                    self.args.peer_pool_size,
                    poll_interval_ms=self.args.pgmq_poll_ms,
                )
            )
        if "rabbitmq" in self.systems:
            log("starting RabbitMQ (a reference point; skipped when not installed)")
            await self.add_peer(RabbitPeer(self.tmp / "rabbitmq"))

    async def add_peer(self, peer: Peer) -> None:
        try:
            await peer.start()
        except PeerUnavailable as exc:
            log(f"skipping {peer.name}: {exc}")
            self.skipped.append(f"{peer.name}: {exc}")
            await peer.close()
            return
        self.peers[peer.name] = peer

    async def start_sluice(self, workers: int, profile: Path | None = None) -> None:
        await self.stop_sluice()
        env = {}
        if self.args.sluice_pool_size:
            env["SLUICE_DB_POOL_SIZE"] = str(self.args.sluice_pool_size)
        log(f"starting sluice serve --workers {workers}")
        server = SluiceServer(self.sluice_url, workers, self.tmp, env, profile_path=profile)
        await server.start()
        self.server = server
        peer = SluicePeer(server.base_url, self.sluice_url, http_client=self.args.http_client)
        peer.server_pid = server.pid
        await peer.start()
        if "sluice-sql" in self.systems:
            old_sql = self.peers.pop("sluice-sql", None)
            if old_sql is not None:
                await old_sql.close()
            sql_peer = SluiceSqlPeer(
                server.base_url,
                self.sluice_url,
                self.args.peer_pool_size,
                http_client=self.args.http_client,
            )
            sql_peer.server_pid = server.pid
            await sql_peer.start()
            self.peers["sluice-sql"] = sql_peer
        # Sluice is always measured first, so keep it first in the dict.
        self.peers = {"sluice": peer, **{k: v for k, v in self.peers.items() if k != "sluice"}}

    async def stop_sluice(self) -> None:
        peer = self.peers.pop("sluice", None)
        if peer is not None:
            await peer.close()
        if self.server is not None:
            await self.server.stop()
            self.server = None

    async def teardown(self) -> None:
        for peer in list(self.peers.values()):
            with contextlib.suppress(Exception):
                await peer.close()
        with contextlib.suppress(Exception):
            await self.stop_sluice()
        with contextlib.suppress(Exception):
            await self.postgres.drop_created()
        await asyncio.to_thread(self.postgres.stop)
        if any(n.startswith("failed") for r in self.results for n in r.notes):
            log(f"server logs kept in {self.tmp}")
        else:
            shutil.rmtree(self.tmp, ignore_errors=True)

    # ---- phases --------------------------------------------------------------------------------

    async def phase(self, label: str, peer: Peer, make: object) -> None:
        """Run one workload on one system; a failure becomes a row, not the end of the run."""
        log(f"{label}: {peer.name}")
        try:
            result = await make  # type: ignore[misc]
        except Exception as exc:
            result = Result(workload=label, system=peer.name, errors=1)
            result.notes.append(f"failed: {type(exc).__name__}: {exc}"[:300])
            if self.server is not None and peer.name == "sluice":
                log(f"server log tail:\n{self.server.log_tail(1500)}")
        log(
            f"  -> {result.rate:,.0f} msgs/s, p50 {result.p50 or 0:.2f} ms, "
            f"p99 {result.p99 or 0:.2f} ms, errors {result.errors}"
        )
        self.results.append(result)

    async def run_workloads(self) -> None:
        cfg, ctx = self.cfg, self.ctx
        # The batched phases are the SPEC's targets: they run --repeat times, each round in
        # a rotated order of systems (whoever runs first meets a colder machine, whoever
        # runs later the previous phases' checkpoints), and the median row is reported.
        if "publish" in self.workloads:
            for batch in (cfg.batch, 1):
                label = f"publish b{batch}"
                for round_, peer in self.rounds(batch == cfg.batch, publish=True):
                    topic = f"pub{batch}r{round_}"
                    await self.phase(label, peer, w.publish(ctx, peer, topic, batch))
        if "consume" in self.workloads:
            for batch, count, drain in (
                (cfg.batch, cfg.prefill, True),
                (1, cfg.prefill_single, False),
            ):
                label = f"consume b{batch}"
                for round_, peer in self.rounds(batch == cfg.batch):
                    topic = f"con{batch}r{round_}"
                    await self.phase(label, peer, w.consume(ctx, peer, topic, batch, count, drain))
                    if peer.name == "sluice":
                        # The same work with Sluice's one-request-per-batch consumer.
                        variant = f"{label} {ACK_IN_PULL}"
                        job = w.consume(
                            ctx, peer, f"{topic}a", batch, count, drain, variant, ack_in_pull=True
                        )
                        await self.phase(variant, peer, job)
        if "mixed" in self.workloads:
            for peer in list(self.peers.values()):
                await self.phase("mixed e2e", peer, w.mixed(ctx, peer, "mixed"))
        if "fanout" in self.workloads:
            label = f"publish b{cfg.batch} x{cfg.fanout} subs"
            for peer in [p for p in self.peers.values() if p.name not in PUBLISH_ONLY]:
                await self.phase(
                    label,
                    peer,
                    w.publish(ctx, peer, "fan", cfg.batch, cfg.fanout, workload=label),
                )
        if "idle" in self.workloads and "sluice" in self.peers:
            peer = self.peers["sluice"]
            assert isinstance(peer, SluicePeer)
            label = f"idle {cfg.idle_polls} long-polls"
            await self.phase(label, peer, w.idle_long_polls(ctx, peer, "idle"))
        if "ratelimit" in self.workloads and "sluice" in self.peers:
            peer = self.peers["sluice"]
            assert isinstance(peer, SluicePeer)
            await self.phase(
                f"rate limit {cfg.rate_limit:g}/s", peer, w.rate_limit_accuracy(ctx, peer, "rl")
            )
        if "workers" in self.workloads and "sluice" in self.peers:
            await self.start_sluice(self.args.workers)
            peer = self.peers["sluice"]
            tag = f"({self.args.workers} workers)"
            label = f"publish b{cfg.batch} {tag}"
            await self.phase(label, peer, w.publish(ctx, peer, "wpub", cfg.batch, workload=label))
            label = f"consume b{cfg.batch} {tag}"
            await self.phase(
                label,
                peer,
                w.consume(ctx, peer, "wcon", cfg.batch, cfg.prefill, True, workload=label),
            )

        if "sdk" in self.workloads and "sluice" in self.peers:
            await self.run_sdk()

        if "held-xmin" in self.workloads:
            await self.run_held_xmin()

    async def run_sdk(self) -> None:
        """The SDK's Worker and Publisher, each round right after the bench's own aiohttp
        client on the same work (unless the consume / publish workloads ran it already)."""
        from bench import sdk

        cfg, ctx = self.cfg, self.ctx
        peer = self.peers["sluice"]
        assert isinstance(peer, SluicePeer)
        label = f"consume b{cfg.batch}"
        for round_ in range(self.args.repeat):
            if "consume" not in self.workloads:
                job = w.consume(
                    ctx,
                    peer,
                    f"sdkref{round_}",
                    cfg.batch,
                    cfg.prefill,
                    True,
                    f"{label} {ACK_IN_PULL}",
                    ack_in_pull=True,
                )
                await self.phase(f"{label} {ACK_IN_PULL}", peer, job)
            for transport in SDK_TRANSPORTS:
                job = sdk.worker_drain(
                    ctx,
                    peer,
                    f"sdkw{transport}{round_}",
                    cfg.prefill,
                    cfg.consumers * cfg.batch,
                    cfg.batch,
                    transport,
                )
                await self.phase(sdk.worker_label(cfg.batch, transport), peer, job)
            if "publish" not in self.workloads:
                job = w.publish(ctx, peer, f"sdkpref{round_}", cfg.batch)
                await self.phase(f"publish b{cfg.batch}", peer, job)
            for in_flight in SDK_IN_FLIGHT:
                for transport in SDK_TRANSPORTS:
                    job = sdk.publisher_linger(
                        ctx,
                        peer,
                        f"sdkp{in_flight}{transport}r{round_}",
                        SDK_LINGER,
                        1000,
                        in_flight,
                        transport,
                    )
                    row = sdk.publisher_label(SDK_LINGER, in_flight, transport)
                    await self.phase(row, peer, job)

    async def run_held_xmin(self) -> None:
        """Each system in turn on a fresh database of its own (Sluice: a fresh server)."""
        settings = held_settings(self.cfg)
        label = f"held-xmin {settings.mode}"
        for name in HELD_XMIN_SYSTEMS:
            if name not in self.peers:
                continue
            log(f"{label}: {name}")
            peer: Peer | None = None
            try:
                url = await self.postgres.create_database(f"bench_held_{name}")
                if name == "sluice":
                    self.sluice_url = url
                    await self.start_sluice(1)
                    peer = self.peers["sluice"]
                elif name == "raw":
                    peer = RawPeer(url, self.args.peer_pool_size)
                    await peer.start()
                else:
                    peer = PgmqPeer(
                        url,
                        self.args.pgmq_sql.resolve(),
                        self.args.peer_pool_size,
                        poll_interval_ms=self.args.pgmq_poll_ms,
                    )
                    await peer.start()
                outcome = await held_xmin.run(
                    peer, url, settings, self.ctx.meter(peer), log, self.postgres.quiesce
                )
            except Exception as exc:
                failed = Result(workload=f"{label} publish", system=name, errors=1)
                failed.notes.append(f"failed: {type(exc).__name__}: {exc}"[:300])
                self.results.append(failed)
                log(f"  failed: {type(exc).__name__}: {exc}")
                if self.server is not None and name == "sluice":
                    log(f"server log tail:\n{self.server.log_tail(1500)}")
                continue
            finally:
                if peer is not None and name != "sluice":
                    await peer.close()
            self.held.append(outcome)
            self.results += held_xmin.results(outcome, label)
            s = outcome.summary()
            log(
                f"  -> publish held median {s['publish']['held_median_ratio'] or 0:.2f}x, "
                f"drain {s['drain']['held_median_ratio'] or 0:.2f}x of before; dead row "
                f"versions +{s['dead_growth'] or 0:,}; lock waits > 1 s: "
                f"{s['lock_waits_over_1s']}"
            )
        if self.held:
            path = self.held_chart_path()
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(held_xmin_svg(self.held))
            except OSError as exc:
                log(f"held-xmin chart not written: {exc}")
            else:
                self.held_chart = path
                log(f"held-xmin chart: {path}")

    def held_chart_path(self) -> Path:
        if self.args.held_xmin_chart is not None:
            return Path(self.args.held_xmin_chart)
        if self.args.json is not None:
            return self.args.json.with_name(self.args.json.stem + "-held-xmin.svg")
        stamp = time.strftime("%Y%m%d-%H%M%S")
        return Path(tempfile.gettempdir()) / f"sluice-bench-held-xmin-{stamp}.svg"

    def rounds(self, repeated: bool, publish: bool = False) -> list[tuple[int, Peer]]:
        """(round, system) in the order to run: `--repeat` rounds, each one rotated."""
        peers = [p for p in self.peers.values() if publish or p.name not in PUBLISH_ONLY]
        count = self.args.repeat if repeated else 1
        return [
            (round_, peers[(round_ + i) % len(peers)])
            for round_ in range(count)
            for i in range(len(peers))
        ]

    def same_work(self) -> dict[str, str]:
        """Sluice-only variants of a workload, compared with the peers' rows of that one."""
        return {
            f"consume b{batch} {ACK_IN_PULL}": f"consume b{batch}" for batch in (self.cfg.batch, 1)
        }

    def references(self) -> dict[str, str]:
        cfg, tag = self.cfg, f"({self.args.workers} workers)"
        sdk_rows = {}
        if "sdk" in self.workloads:
            from bench import sdk

            for transport in SDK_TRANSPORTS:
                consume = f"consume b{cfg.batch} {ACK_IN_PULL}"
                sdk_rows[sdk.worker_label(cfg.batch, transport)] = consume
                for in_flight in SDK_IN_FLIGHT:
                    label = sdk.publisher_label(SDK_LINGER, in_flight, transport)
                    sdk_rows[label] = f"publish b{cfg.batch}"
        return {
            **sdk_rows,
            f"publish b{cfg.batch} x{cfg.fanout} subs": f"publish b{cfg.batch}",
            f"publish b{cfg.batch} {tag}": f"publish b{cfg.batch}",
            f"consume b{cfg.batch} {tag}": f"consume b{cfg.batch}",
        }

    def report(self, command: str) -> str:
        self.results = keep_medians(self.results)
        add_ratios(self.results, self.references(), self.same_work())
        lines = ["", "Sluice benchmark", f"command: {command}"]
        lines += [f"{k}: {v}" for k, v in self.info.items()]
        lines.append("config: " + ", ".join(f"{k}={v}" for k, v in vars_of(self.cfg).items()))
        lines += [f"skipped {s}" for s in self.skipped]
        lines += ["", format_table(self.results), ""]
        lines.append(
            "msgs/s in parentheses: fixed-rate or idle phases (not a throughput score). "
            "latency of: op = request round trip, e2e = publish start -> delivery, "
            "wake = publish start -> a waiting long-poll returns it. "
            "cpu: % of one core (the server's process tree: Sluice or the RabbitMQ broker / "
            "all Postgres processes / this bench)."
        )
        if self.held:
            lines.append(
                "held-xmin rows: msgs/s is the median of the blocks run while the long "
                "transaction was open; latency and cpu are of that window."
            )
            chart = None if self.held_chart is None else str(self.held_chart)
            lines.append(held_xmin.report(self.held, chart))
        return "\n".join(lines)

    def write_json(self, path: Path, command: str) -> None:
        data = {
            "command": command,
            "machine": self.info,
            "config": vars_of(self.cfg),
            "skipped": self.skipped,
            "results": [r.as_dict() for r in self.results],
        }
        if self.held:
            data["held_xmin"] = {
                "chart": None if self.held_chart is None else str(self.held_chart),
                "systems": [o.as_dict() for o in self.held],
            }
        path.write_text(json.dumps(data, indent=2, default=str) + "\n")


def vars_of(cfg: w.Config) -> dict[str, object]:
    return {name: getattr(cfg, name) for name in w.Config.__dataclass_fields__}


def held_settings(cfg: w.Config) -> held_xmin.Settings:
    return held_xmin.Settings(
        block_seconds=cfg.held_xmin_block_seconds,
        blocks_before=cfg.held_xmin_blocks_before,
        hold_seconds=cfg.held_xmin_hold_seconds,
        blocks_after=cfg.held_xmin_blocks_after,
        messages=cfg.held_xmin_messages,
        mode=cfg.held_xmin_mode,
        producers=cfg.held_xmin_producers,
        consumers=cfg.held_xmin_consumers,
        batch=cfg.batch,
        size=cfg.held_xmin_size,
    )


def held_xmin_estimate(cfg: w.Config, systems: int) -> float:
    """Expected seconds of the held-xmin workload (blocks, hold, settling, server start)."""
    blocks = cfg.held_xmin_blocks_before + cfg.held_xmin_blocks_after + 1
    held = math.ceil(cfg.held_xmin_hold_seconds / cfg.held_xmin_block_seconds)
    return systems * ((blocks + held) * cfg.held_xmin_block_seconds + 120)


async def main_async(args: argparse.Namespace, command: str) -> int:
    run = Run(args)
    # SIGTERM (or Ctrl-C) stops the run the same way as the timeout: the server and the
    # embedded Postgres this run started are stopped, and what was measured is reported.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(signum, task.cancel)
    try:
        async with asyncio.timeout(args.timeout):
            await run.setup()
            await run.run_workloads()
    except TimeoutError:
        log(f"timed out after {args.timeout:.0f}s; reporting what was measured")
    except asyncio.CancelledError:
        task.uncancel()
        log("stopped by a signal; reporting what was measured")
    finally:
        await run.teardown()
    print(run.report(command), flush=True)
    if args.json:
        run.write_json(args.json, command)
    return 0 if run.results else 1


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.repeat is None:
        args.repeat = QUICK_REPEAT if args.quick else REPEAT
    elif args.repeat < 1:
        parser.error("--repeat must be at least 1")
    cfg = config_from(args)
    if cfg.held_xmin_blocks_before < 1 or cfg.held_xmin_blocks_after < 1:
        parser.error("held-xmin needs at least one block before and one after the hold")
    if cfg.held_xmin_block_seconds <= 0 or cfg.held_xmin_hold_seconds <= 0:
        parser.error("held-xmin block and hold seconds must be positive")
    if cfg.held_xmin_messages < 1 or cfg.held_xmin_producers < 1 or cfg.held_xmin_consumers < 1:
        parser.error("held-xmin needs messages, producers and consumers")
    if args.timeout is None:
        args.timeout = 1800.0
        if "held-xmin" in args.workloads.split(","):
            args.timeout += held_xmin_estimate(cfg, len(HELD_XMIN_SYSTEMS))
    return args


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    command = shlex.join(["python", "-m", "bench.run", *argv])
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return asyncio.run(main_async(args, command))


if __name__ == "__main__":
    raise SystemExit(main())
