"""The held-xmin workload (issue "Steady under a held xmin horizon", SPEC section 6).

One queue per system (Sluice: one topic and one subscription), continuous traffic in
blocks of `block_seconds`: at the start of every block the producers get a quota of
`messages` (batches of `batch`, ~`size`-byte values) and publish it as fast as they can,
while the consumers drain the queue (pull a batch, ack it in a separate request) until it
is empty; then both wait for the next block. After `blocks_before` blocks a second
connection opens a long transaction in the system's database and holds it for
`hold_seconds`; then `blocks_after` more blocks run.

The long transaction (`mode`):
- snapshot: `BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1 FROM bench_held.unrelated`,
  a snapshot that touches no table of the system (a report on another table): it holds
  back the xmin horizon, so no dead row version made after it began can be removed.
- pgdump: the same, and then what pg_dump does: `LOCK TABLE ... IN ACCESS SHARE MODE` on
  every table of the database outside `bench_held` (partitions included, looked up in
  pg_catalog when the transaction starts) and a read of each one, held to the end.

The dead row versions the hold left behind: the count just before its commit minus the
count when it opened, per 100k messages acked and per request (publish, pull or ack)
completed while it was open. The bench does not VACUUM before the hold (a VACUUM of a
drained table leaves statistics that say "empty", and raw's claim then got a nested-loop
plan that re-ran its SKIP LOCKED subquery for every row and never finished), so dead
versions left from before the hold may be vacuumed meanwhile: the growth can undercount by
up to the count at the start, which is reported beside it.

It connects to the system's own database: Postgres computes the removal horizon of a
database's tables from the backends connected to that database (a transaction in another
database holds back only the shared catalogs).

Per block (see `Block`):
- publish msgs/s: messages of the block's quota stored / the time from the block's start
  until the last of them was stored; when the quota was stored within the block this is
  `messages / time taken`, the producers' throughput. A quota not stored by the end of the
  block is cut there (the rest is not offered) and the time is at least the whole block.
- drain msgs/s: messages acked during the block / the time from the block's start until the
  queue was drained (every stored message acked, the last ack's time), or the whole block
  when it was not drained within it. Publishing and draining overlap, so the drain time is
  never shorter than the publish time.
- dead row versions of the system's tables (every table of its database outside
  `bench_held`; Sluice: all of the service's tables, raw: its table, pgmq: its meta, queue
  and archive tables), taken when the block's traffic has drained (or at its end):
  `n_dead_tup` from pg_stat_user_tables (backends report it up to ~10 s late, and vacuum
  replaces it with its own count) and, where the pgstattuple extension can be created,
  its exact `dead_tuple_count` (a full scan of each table).

Lock waits: every 0.25 s, pg_locks of the system's database are sampled for backends
waiting on a lock (`waitstart` says since when); a wait seen lasting over 1 s is counted,
with whether the long transaction blocked it (pg_blocking_pids), directly or through a
waiter queued ahead of it (a query behind a TRUNCATE that waits for the dump). A wait of
1-1.25 s can be missed between two samples.
"""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import asyncpg

from bench.infra import CpuMeter
from bench.peers import Peer
from bench.stats import Result

clock = time.perf_counter

MODES = ("snapshot", "pgdump")
SCHEMA = "bench_held"  # the bench's own objects in the system's database
LOCK_SAMPLE_SECONDS = 0.25
LONG_LOCK_WAIT = 1.0
IDLE_PULL_SLEEP = 0.01  # an empty pull while messages are still in flight elsewhere


@dataclass(slots=True)
class Settings:
    """The workload's knobs (defaults and flags: `--held-xmin-*` of bench.workloads.Config)."""

    block_seconds: float
    blocks_before: int
    hold_seconds: float
    blocks_after: int
    messages: int  # per block, all producers together
    mode: str
    producers: int
    consumers: int
    batch: int
    size: int


# ---- the system's tables -------------------------------------------------------------------

TABLES_SQL = """
SELECT c.oid::regclass::text AS name, c.relkind = 'p' AS partitioned
FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
WHERE c.relkind IN ('r', 'p')
  AND n.nspname NOT IN ('pg_catalog', 'information_schema', $1)
  AND n.nspname NOT LIKE 'pg\\_toast%' AND n.nspname NOT LIKE 'pg\\_temp%'
ORDER BY 1
"""

N_DEAD_SQL = """
SELECT relid::regclass::text AS name, n_dead_tup, n_live_tup
FROM pg_stat_user_tables WHERE schemaname <> $1
"""

SIZE_SQL = "SELECT coalesce(sum(pg_total_relation_size(t::regclass)), 0) FROM unnest($1::text[]) t"

LOCK_WAITS_SQL = """
SELECT l.pid, l.waitstart, extract(epoch FROM now() - l.waitstart)::float8 AS waited,
       l.locktype, l.mode, l.relation::regclass::text AS relation,
       left(a.query, 120) AS query, pg_blocking_pids(l.pid) AS blockers
FROM pg_locks l JOIN pg_stat_activity a ON a.pid = l.pid
WHERE NOT l.granted AND l.waitstart IS NOT NULL AND a.datname = current_database()
"""


async def prepare_database(url: str) -> bool:
    """The bench's schema in the system's database: the unrelated table the long transaction
    reads, and pgstattuple where it can be created. Returns whether pgstattuple is there."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(
            f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}; "
            f"CREATE TABLE IF NOT EXISTS {SCHEMA}.unrelated (id int PRIMARY KEY); "
            f"INSERT INTO {SCHEMA}.unrelated VALUES (1) ON CONFLICT DO NOTHING"
        )
        try:
            await conn.execute(f"CREATE EXTENSION IF NOT EXISTS pgstattuple SCHEMA {SCHEMA}")
        except asyncpg.PostgresError:
            return False
        return bool(
            await conn.fetchval(
                "SELECT extnamespace::regnamespace::text = $1 FROM pg_extension "
                "WHERE extname = 'pgstattuple'",
                SCHEMA,
            )
        )
    finally:
        await conn.close()


@dataclass(slots=True)
class DeadSample:
    at: float  # seconds since the workload started
    n_dead_tup: dict[str, int]
    exact: dict[str, int] | None  # pgstattuple's dead_tuple_count, None without it
    total_bytes: int
    seconds: float  # what taking the sample took

    @property
    def total(self) -> int:
        """The exact count where there is one, else n_dead_tup."""
        return sum((self.exact if self.exact is not None else self.n_dead_tup).values())

    @property
    def total_n_dead_tup(self) -> int:
        return sum(self.n_dead_tup.values())


async def sample_dead(conn: asyncpg.Connection, exact: bool, at: float) -> DeadSample:
    t0 = clock()
    tables = await conn.fetch(TABLES_SQL, SCHEMA)
    leaves = [r["name"] for r in tables if not r["partitioned"]]
    n_dead = {r["name"]: int(r["n_dead_tup"]) for r in await conn.fetch(N_DEAD_SQL, SCHEMA)}
    counted: dict[str, int] | None = None
    if exact:
        counted = {}
        for name in leaves:
            with contextlib.suppress(asyncpg.UndefinedTableError):  # dropped since the lookup
                counted[name] = int(
                    await conn.fetchval(
                        f"SELECT dead_tuple_count FROM {SCHEMA}.pgstattuple($1::regclass)", name
                    )
                )
    size = int(await conn.fetchval(SIZE_SQL, leaves))
    return DeadSample(
        at=at,
        n_dead_tup={name: n_dead.get(name, 0) for name in leaves},
        exact=counted,
        total_bytes=size,
        seconds=clock() - t0,
    )


# ---- the long transaction ------------------------------------------------------------------


class Hold:
    """The long transaction on a connection of its own."""

    def __init__(self, url: str, mode: str) -> None:
        self._url = url
        self._mode = mode
        self.conn: asyncpg.Connection | None = None
        self.pid: int | None = None
        self.tables: list[str] = []  # pgdump: what it locked and read
        self.open_seconds = 0.0  # the time BEGIN ... (and the reads) took

    async def open(self) -> None:
        t0 = clock()
        self.conn = await asyncpg.connect(self._url)
        self.pid = int(await self.conn.fetchval("SELECT pg_backend_pid()"))
        await self.conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await self.conn.execute(f"SELECT 1 FROM {SCHEMA}.unrelated")
        if self._mode == "pgdump":
            # pg_dump: ACCESS SHARE on every table it dumps, taken up front and held to the
            # end, then a read of each table's data.
            rows = await self.conn.fetch(TABLES_SQL, SCHEMA)
            self.tables = [r["name"] for r in rows]
            for name in self.tables:
                await self.conn.execute(f"LOCK TABLE {name} IN ACCESS SHARE MODE")
            for row in rows:
                if not row["partitioned"]:
                    await self.conn.fetchval(f"SELECT count(*) FROM ONLY {row['name']}")
        self.open_seconds = clock() - t0

    async def close(self) -> None:
        if self.conn is None:
            return
        with contextlib.suppress(Exception):
            await self.conn.execute("COMMIT")
        with contextlib.suppress(Exception):
            await self.conn.close()
        self.conn = None


# ---- lock waits ------------------------------------------------------------------------------


@dataclass(slots=True)
class LockWait:
    pid: int
    started: float  # seconds since the workload started
    waited: float  # the longest wait seen, seconds
    locktype: str
    mode: str
    relation: str | None
    query: str
    by_held: bool  # the long transaction among its blockers, directly or down a queue


def _behind(held: int, blockers: dict[int, list[int]]) -> set[int]:
    """The waiting pids that `held` blocks, directly or through other waiters (a query
    queued behind an ACCESS EXCLUSIVE request that waits for the long transaction)."""
    found: set[int] = set()
    changed = True
    while changed:
        changed = False
        for pid, by in blockers.items():
            if pid not in found and any(b == held or b in found for b in by):
                found.add(pid)
                changed = True
    return found


class LockWatch:
    """Samples waiting locks of one database (see the module's docstring)."""

    def __init__(self, url: str, t0: float, wall0: float) -> None:
        self._url = url
        self._t0 = t0  # clock() at the workload's start
        self._wall0 = wall0  # time.time() at the same moment (waitstart is wall time)
        self.held_pid = 0
        self.waits: dict[tuple[int, float], LockWait] = {}
        self.samples = 0

    async def run(self) -> None:
        conn = await asyncpg.connect(self._url)
        try:
            while True:
                rows = await conn.fetch(LOCK_WAITS_SQL)
                behind = _behind(self.held_pid, {r["pid"]: r["blockers"] for r in rows})
                for r in rows:
                    key = (int(r["pid"]), r["waitstart"].timestamp())
                    wait = self.waits.get(key)
                    if wait is None:
                        wait = self.waits[key] = LockWait(
                            pid=key[0],
                            started=key[1] - self._wall0,
                            waited=0.0,
                            locktype=r["locktype"],
                            mode=r["mode"],
                            relation=r["relation"],
                            query=r["query"] or "",
                            by_held=False,
                        )
                    wait.waited = max(wait.waited, float(r["waited"]))
                    wait.by_held = wait.by_held or key[0] in behind
                self.samples += 1
                await asyncio.sleep(LOCK_SAMPLE_SECONDS)
        finally:
            await conn.close()

    def long_waits(self) -> list[LockWait]:
        return sorted(
            (w for w in self.waits.values() if w.waited > LONG_LOCK_WAIT), key=lambda w: w.started
        )


# ---- the traffic ----------------------------------------------------------------------------


@dataclass(slots=True)
class Traffic:
    """Producers and consumers that run for the whole workload, fed a quota per block."""

    peer: Peer
    queue: str
    s: Settings
    block: int = -1
    block_start: float = 0.0
    quota_left: int = 0
    in_flight: int = 0  # publish requests under way
    stored_total: int = 0
    acked_total: int = 0
    last_ack: float = 0.0
    stopping: bool = False
    # per block of the quota: messages stored, when the last of them was stored
    stored: dict[int, int] = field(default_factory=dict)
    last_store: dict[int, float] = field(default_factory=dict)
    cut: dict[int, int] = field(default_factory=dict)  # quota not offered (block ended)
    drained_at: dict[int, float] = field(default_factory=dict)
    # events, times are clock() values
    stores: list[tuple[float, int]] = field(default_factory=list)
    acks: list[tuple[float, int]] = field(default_factory=list)
    requests: list[float] = field(default_factory=list)  # completion of every request
    publish_ms: list[tuple[float, float]] = field(default_factory=list)
    cycle_ms: list[tuple[float, float]] = field(default_factory=list)  # pull + ack
    errors: list[tuple[float, str]] = field(default_factory=list)
    next_block: asyncio.Event = field(default_factory=asyncio.Event)
    drained: asyncio.Event = field(default_factory=asyncio.Event)

    def start_block(self, index: int) -> None:
        self.block = index
        self.block_start = clock()
        self.quota_left = self.s.messages
        self.stored.setdefault(index, 0)
        self.drained = asyncio.Event()
        event, self.next_block = self.next_block, asyncio.Event()
        event.set()

    def end_quota(self) -> None:
        """The block is over: whatever of its quota was not taken is not offered."""
        if self.quota_left > 0:
            self.cut[self.block] = self.quota_left
            self.quota_left = 0

    def stop(self) -> None:
        self.stopping = True
        self.quota_left = 0
        self.next_block.set()

    def _failed(self, exc: BaseException) -> None:
        self.errors.append((clock(), f"{type(exc).__name__}: {exc}"[:300]))

    def _check_drained(self) -> None:
        if self.quota_left == 0 and self.in_flight == 0 and self.acked_total >= self.stored_total:
            if self.block not in self.drained_at:
                self.drained_at[self.block] = max(self.last_ack, self.block_start)
            self.drained.set()

    async def producer(self, values: list[bytes]) -> None:
        full = self.peer.prepare(values)
        while not self.stopping:
            if self.quota_left <= 0:
                await self.next_block.wait()
                continue
            n = min(self.s.batch, self.quota_left)
            self.quota_left -= n
            block = self.block
            self.in_flight += 1
            body = full if n == len(values) else self.peer.prepare(values[:n])
            t0 = clock()
            try:
                await self.peer.publish(self.queue, body)
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(0.05)
            else:
                now = clock()
                self.stored[block] = self.stored.get(block, 0) + n
                self.stored_total += n
                self.last_store[block] = now
                self.stores.append((now, n))
                self.publish_ms.append((now, (now - t0) * 1000))
            finally:
                self.in_flight -= 1
                self.requests.append(clock())

    async def consumer(self) -> None:
        while not self.stopping:
            t0 = clock()
            try:
                deliveries = await self.peer.pull(self.queue, self.s.batch)
            except Exception as exc:
                self._failed(exc)
                await asyncio.sleep(0.05)
                continue
            finally:
                self.requests.append(clock())
            if not deliveries:
                waiting_for = self.next_block  # before the check: no await in between
                self._check_drained()
                if self.drained.is_set() and not self.stopping:
                    await waiting_for.wait()
                else:
                    await asyncio.sleep(IDLE_PULL_SLEEP)
                continue
            try:
                acked = await self.peer.ack(self.queue, [d.handle for d in deliveries])
            except Exception as exc:
                self._failed(exc)
                continue
            finally:
                self.requests.append(clock())
            now = clock()
            self.acked_total += acked
            self.last_ack = now
            self.acks.append((now, acked))
            self.cycle_ms.append((now, (now - t0) * 1000))


# ---- one block -------------------------------------------------------------------------------


@dataclass(slots=True)
class Block:
    index: int  # 1-based
    phase: str  # before / held / after
    start: float  # seconds since the workload started
    seconds: float  # the block's length (start of the next one - start)
    held_seconds: float  # of the block, under the long transaction
    offered: int  # the quota minus what was cut at the block's end
    published: int
    publish_seconds: float
    acked: int
    drain_seconds: float
    drained: bool
    requests: int
    errors: int
    dead: DeadSample | None = None

    @property
    def publish_rate(self) -> float:
        return self.published / self.publish_seconds if self.publish_seconds > 0 else 0.0

    @property
    def drain_rate(self) -> float:
        return self.acked / self.drain_seconds if self.drain_seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(publish_rate=self.publish_rate, drain_rate=self.drain_rate)
        if self.dead is not None:
            data["dead"]["total"] = self.dead.total
            data["dead"]["total_n_dead_tup"] = self.dead.total_n_dead_tup
        return data


def _count(events: list[tuple[float, int]], start: float, end: float) -> int:
    return sum(n for t, n in events if start <= t < end)


# ---- the workload ------------------------------------------------------------------------------


@dataclass(slots=True)
class Outcome:
    """Everything measured of one system."""

    system: str
    mode: str
    settings: Settings
    blocks: list[Block]
    hold_open: float  # seconds since the start
    hold_close: float
    hold_open_seconds: float  # what opening the transaction (and pgdump's reads) took
    locked_tables: list[str]
    dead_at_open: DeadSample | None
    dead_at_close: DeadSample | None
    pgstattuple: bool
    held_messages: int  # acked while the transaction was open
    held_requests: int
    lock_waits: list[LockWait]
    lock_samples: int
    per_second: dict[str, list[int]]
    cpu: dict[str, float | None]
    held_publish_ms: list[float]
    held_cycle_ms: list[float]
    errors: int
    first_error: str | None

    # -- ratios against the median of the blocks before ---------------------------------------

    def _phase(self, phase: str) -> list[Block]:
        return [b for b in self.blocks if b.phase == phase]

    def ratios(self, rate: Callable[[Block], float]) -> dict[str, float | None]:
        before = [rate(b) for b in self._phase("before")]
        held = [rate(b) for b in self._phase("held")]
        after = [rate(b) for b in self._phase("after")]
        base = statistics.median(before) if before else 0.0

        def of(value: float | None) -> float | None:
            return None if value is None or base <= 0 else value / base

        return {
            "before_median": base,
            "held_min": min(held) if held else None,
            "held_median": statistics.median(held) if held else None,
            "first_after": after[0] if after else None,
            "held_min_ratio": of(min(held) if held else None),
            "held_median_ratio": of(statistics.median(held) if held else None),
            "first_after_ratio": of(after[0] if after else None),
        }

    @property
    def dead_growth(self) -> int | None:
        if self.dead_at_open is None or self.dead_at_close is None:
            return None
        return self.dead_at_close.total - self.dead_at_open.total

    def summary(self) -> dict[str, Any]:
        growth = self.dead_growth
        waits = self.lock_waits
        return {
            "publish": self.ratios(lambda b: b.publish_rate),
            "drain": self.ratios(lambda b: b.drain_rate),
            "hold_seconds": self.hold_close - self.hold_open,
            "held_messages": self.held_messages,
            "held_requests": self.held_requests,
            "dead_growth": growth,
            "dead_counted_by": "pgstattuple" if self.pgstattuple else "n_dead_tup",
            "dead_per_100k_messages": (
                None
                if growth is None or not self.held_messages
                else growth * 100_000 / self.held_messages
            ),
            "dead_per_request": (
                None if growth is None or not self.held_requests else growth / self.held_requests
            ),
            "lock_waits_over_1s": len(waits),
            "lock_waits_over_1s_by_held": sum(w.by_held for w in waits),
            "longest_lock_wait_s": max((w.waited for w in waits), default=0.0),
        }

    def as_dict(self) -> dict[str, Any]:
        return {
            "system": self.system,
            "mode": self.mode,
            "settings": asdict(self.settings),
            "summary": self.summary(),
            "hold": {
                "open_at": self.hold_open,
                "close_at": self.hold_close,
                "open_took_seconds": self.hold_open_seconds,
                "locked_tables": self.locked_tables,
                "dead_at_open": None if self.dead_at_open is None else asdict(self.dead_at_open),
                "dead_at_close": (
                    None if self.dead_at_close is None else asdict(self.dead_at_close)
                ),
            },
            "blocks": [b.as_dict() for b in self.blocks],
            "lock_waits_over_1s": [asdict(w) for w in self.lock_waits],
            "lock_samples": self.lock_samples,
            "per_second": self.per_second,
            "cpu_held": self.cpu,
            "errors": self.errors,
            "first_error": self.first_error,
        }


def make_value(size: int) -> bytes:
    head = b'{"pad":"'
    return head + b"x" * max(0, size - len(head) - 2) + b'"}'


async def run(
    peer: Peer,
    database_url: str,
    s: Settings,
    meter: CpuMeter,
    log: Callable[[str], None],
    settle: Callable[[], Awaitable[None]],
    queue: str = "held",
) -> Outcome:
    """Run the workload against one system whose database is `database_url` (fresh);
    `settle` (VACUUM, CHECKPOINT) runs once the queue exists, before the first block."""
    exact = await prepare_database(database_url)
    await peer.create_queue(queue)
    await settle()
    stats = await asyncpg.connect(database_url)
    t0, wall0 = clock(), time.time()
    traffic = Traffic(peer, queue, s)
    watch = LockWatch(database_url, t0, wall0)
    hold = Hold(database_url, s.mode)
    values = [make_value(s.size)] * s.batch
    workers = [asyncio.create_task(traffic.producer(values)) for _ in range(s.producers)]
    workers += [asyncio.create_task(traffic.consumer()) for _ in range(s.consumers)]
    watching = asyncio.create_task(watch.run())
    background: list[asyncio.Task[None]] = []
    blocks: list[Block] = []
    hold_open = hold_close = 0.0
    dead_open: DeadSample | None = None
    dead_close: DeadSample | None = None
    closed = asyncio.Event()
    cpu: dict[str, float | None] = {}

    async def sample_into(block: Block) -> None:
        block.dead = await sample_dead(stats_for_blocks, exact, clock() - t0)

    async def close_hold_later() -> None:
        nonlocal hold_close, dead_close
        await asyncio.sleep(max(0.0, s.hold_seconds - (clock() - t0 - hold_open)))
        dead_close = await sample_dead(closing_stats, exact, clock() - t0)
        await hold.close()
        hold_close = clock() - t0
        cpu.update(meter.stop())
        log(f"  hold committed after {hold_close - hold_open:.1f}s")
        closed.set()

    async def one_block(index: int, phase: str) -> None:
        start = clock()
        traffic.start_block(index)
        deadline = start + s.block_seconds
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(traffic.drained.wait(), deadline - clock())
        block = Block(
            index=index + 1,
            phase=phase,
            start=start - t0,
            seconds=0.0,
            held_seconds=0.0,
            offered=0,
            published=0,
            publish_seconds=0.0,
            acked=0,
            drain_seconds=0.0,
            drained=traffic.drained.is_set(),
            requests=0,
            errors=0,
        )
        blocks.append(block)
        if block.drained:
            await sample_into(block)  # the queue is idle: the sample disturbs nothing
            await asyncio.sleep(max(0.0, deadline - clock()))
            traffic.end_quota()
        else:
            traffic.end_quota()  # before the next block starts: its quota is its own
            background.append(asyncio.create_task(sample_into(block)))
        log(
            f"  block {block.index} ({phase}): stored {traffic.stored.get(index, 0):,}, "
            f"acked {traffic.acked_total:,} in all"
            + ("" if block.drained else ", not drained within the block")
        )

    # Separate connections: a block's sample may run while the hold's closing one does.
    stats_for_blocks = stats
    closing_stats = await asyncpg.connect(database_url)
    closer: asyncio.Task[None] | None = None
    try:
        index = 0
        for _ in range(s.blocks_before):
            await one_block(index, "before")
            index += 1
        dead_open = await sample_dead(closing_stats, exact, clock() - t0)
        await hold.open()
        watch.held_pid = hold.pid or 0
        hold_open = clock() - t0 - hold.open_seconds
        meter.start()
        log(
            f"  {s.mode} transaction open (pid {hold.pid}"
            + (f", {len(hold.tables)} tables locked and read" if hold.tables else "")
            + f", {hold.open_seconds:.2f}s to open)"
        )
        closer = asyncio.create_task(close_hold_later())
        # Held: every block that starts while the transaction is open (not within its last
        # half second: with a hold that is a multiple of the block, the commit lands on the
        # boundary). The blocks after start once it has committed.
        planned_close = t0 + hold_open + s.hold_seconds
        while clock() < planned_close - 0.5 and not closed.is_set():
            await one_block(index, "held")
            index += 1
        await closed.wait()
        for _ in range(s.blocks_after):
            await one_block(index, "after")
            index += 1
        end = clock()
    finally:
        traffic.stop()
        for task in [*workers, watching]:
            task.cancel()
        if closer is not None and not closer.done():
            closer.cancel()
        await asyncio.gather(*workers, watching, return_exceptions=True)
        if closer is not None:
            await asyncio.gather(closer, return_exceptions=True)
        await asyncio.gather(*background, return_exceptions=True)
        await hold.close()
        for conn in (stats, closing_stats):
            with contextlib.suppress(Exception):
                await conn.close()
        with contextlib.suppress(Exception):
            await peer.drop_queue(queue)

    # Block numbers from the events (times relative to t0).
    starts = [b.start for b in blocks] + [end - t0]
    for i, b in enumerate(blocks):
        b.seconds = starts[i + 1] - b.start
        lo, hi = b.start + t0, starts[i + 1] + t0
        b.held_seconds = max(0.0, min(hi - t0, hold_close) - max(b.start, hold_open))
        q = i  # the quota's index
        b.offered = s.messages - traffic.cut.get(q, 0)
        b.published = traffic.stored.get(q, 0)
        last = traffic.last_store.get(q)
        finished = b.published >= b.offered
        took = (last - lo) if last is not None else 0.0
        b.publish_seconds = took if finished else max(took, s.block_seconds)
        b.acked = _count(traffic.acks, lo, hi)
        drained = traffic.drained_at.get(q)
        b.drained = drained is not None and drained < lo + s.block_seconds
        b.drain_seconds = (drained - lo) if b.drained and drained is not None else hi - lo
        b.requests = sum(1 for t in traffic.requests if lo <= t < hi)
        b.errors = sum(1 for t, _ in traffic.errors if lo <= t < hi)

    t_open, t_close = t0 + hold_open, t0 + hold_close
    seconds = int(end - t0) + 1
    per_second: dict[str, list[int]] = {k: [0] * seconds for k in ("published", "acked")}
    for key, events in (("published", traffic.stores), ("acked", traffic.acks)):
        for t, n in events:
            per_second[key][min(seconds - 1, int(t - t0))] += n
    return Outcome(
        system=peer.name,
        mode=s.mode,
        settings=s,
        blocks=blocks,
        hold_open=hold_open,
        hold_close=hold_close,
        hold_open_seconds=hold.open_seconds,
        locked_tables=hold.tables,
        dead_at_open=dead_open,
        dead_at_close=dead_close,
        pgstattuple=exact,
        held_messages=_count(traffic.acks, t_open, t_close),
        held_requests=sum(1 for t in traffic.requests if t_open <= t < t_close),
        lock_waits=watch.long_waits(),
        lock_samples=watch.samples,
        per_second=per_second,
        cpu=cpu,
        held_publish_ms=[ms for t, ms in traffic.publish_ms if t_open <= t < t_close],
        held_cycle_ms=[ms for t, ms in traffic.cycle_ms if t_open <= t < t_close],
        errors=len(traffic.errors),
        first_error=traffic.errors[0][1] if traffic.errors else None,
    )


# ---- rows of the main table -----------------------------------------------------------------


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def results(outcome: Outcome, label: str) -> list[Result]:
    """Two rows of the main table (publish, drain): msgs/s is the median of the held blocks;
    notes carry the ratios to the blocks before, dead row versions and lock waits."""
    summary = outcome.summary()
    rows = []
    for what, latencies in (
        ("publish", outcome.held_publish_ms),
        ("drain", outcome.held_cycle_ms),
    ):
        r = summary[what]
        held = outcome._phase("held")
        rate = r["held_median"] or 0.0
        row = Result(
            workload=f"{label} {what}",
            system=outcome.system,
            messages=sum(b.published if what == "publish" else b.acked for b in held),
            seconds=sum(b.publish_seconds if what == "publish" else b.drain_seconds for b in held),
            fixed_rate=rate,
            latencies_ms=latencies,
            errors=sum(b.errors for b in outcome.blocks),
            cpu=outcome.cpu,
        )
        row.ratios.update(
            {
                k: v
                for k, v in (
                    ("held_min", r["held_min_ratio"]),
                    ("held_median", r["held_median_ratio"]),
                    ("first_after", r["first_after_ratio"]),
                )
                if v is not None
            }
        )
        row.notes.append(
            f"median of {len(held)} held blocks; before {r['before_median']:,.0f}/s; "
            f"held min {_x(r['held_min_ratio'])}, median {_x(r['held_median_ratio'])} of "
            f"before; first after {_x(r['first_after_ratio'])}"
        )
        if what == "drain":
            row.notes.append("latency: pull + ack of a batch")
            growth = summary["dead_growth"]
            if growth is not None:
                per_100k = summary["dead_per_100k_messages"]
                per_req = summary["dead_per_request"]
                row.notes.append(
                    f"dead row versions +{growth:,} over the hold ({summary['dead_counted_by']}"
                    f"; {per_100k or 0:,.0f} per 100k msgs, {per_req or 0:.2f} per request)"
                )
            row.notes.append(
                f"lock waits > 1 s: {summary['lock_waits_over_1s']} "
                f"({summary['lock_waits_over_1s_by_held']} behind the long transaction)"
            )
        if outcome.first_error and what == "publish":
            row.notes.append(f"first error: {outcome.first_error}")
        rows.append(row)
    return rows


# ---- the report ---------------------------------------------------------------------------------


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max([len(h), *(len(row[i]) for row in rows)]) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)) + " |"

    return "\n".join(
        [line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
        + [line(r) for r in rows]
    )


def _short(table: str) -> str:
    return table.removeprefix("public.")


def block_table(outcome: Outcome) -> str:
    """Block, phase, rates, requests and dead row versions per table (the tables that had
    any at some point), their total, n_dead_tup's total and the tables' size."""
    samples = [b.dead for b in outcome.blocks if b.dead is not None]
    exact = outcome.pgstattuple
    tables = sorted(
        {
            name
            for d in samples
            for name, n in (d.exact if exact and d.exact is not None else d.n_dead_tup).items()
            if n
        }
    )
    headers = ["block", "phase", "publish msgs/s", "drain msgs/s", "requests", "errors"]
    headers += [_short(t) for t in tables]
    headers += ["dead total", "n_dead_tup total", "size MB"]
    rows = []
    for b in outcome.blocks:
        phase = b.phase
        if b.phase == "held" and b.held_seconds < b.seconds - 0.5:
            phase += f" ({b.held_seconds:.0f} of {b.seconds:.0f}s)"
        if not b.drained:
            phase += ", not drained"
        row = [
            str(b.index),
            phase,
            f"{b.publish_rate:,.0f}" + ("" if b.published >= b.offered else " (cut)"),
            f"{b.drain_rate:,.0f}",
            f"{b.requests:,}",
            str(b.errors),
        ]
        d = b.dead
        counts = (d.exact if exact and d.exact is not None else d.n_dead_tup) if d else {}
        row += [f"{counts.get(t, 0):,}" if d else "-" for t in tables]
        row += (
            [f"{d.total:,}", f"{d.total_n_dead_tup:,}", f"{d.total_bytes / 2**20:,.1f}"]
            if d
            else ["-", "-", "-"]
        )
        rows.append(row)
    return markdown(headers, rows)


def summary_table(outcomes: list[Outcome]) -> str:
    headers = [
        "system",
        "mode",
        "what",
        "before (median)",
        "held min",
        "held median",
        "first after",
        "held min / before",
        "held median / before",
        "first after / before",
    ]
    rows = []
    for o in outcomes:
        s = o.summary()
        for what in ("publish", "drain"):
            r = s[what]
            rows.append(
                [
                    o.system,
                    o.mode,
                    what,
                    f"{r['before_median']:,.0f}",
                    "-" if r["held_min"] is None else f"{r['held_min']:,.0f}",
                    "-" if r["held_median"] is None else f"{r['held_median']:,.0f}",
                    "-" if r["first_after"] is None else f"{r['first_after']:,.0f}",
                    _x(r["held_min_ratio"]),
                    _x(r["held_median_ratio"]),
                    _x(r["first_after_ratio"]),
                ]
            )
    ratios = markdown(headers, rows)
    headers = [
        "system",
        "hold s",
        "msgs acked in hold",
        "requests in hold",
        "dead at hold start",
        "before commit",
        "dead row versions +",
        "per 100k msgs",
        "per request",
        "counted by",
        "lock waits > 1 s (behind the hold)",
        "longest wait s",
    ]
    rows = []
    for o in outcomes:
        s = o.summary()
        growth = s["dead_growth"]
        rows.append(
            [
                o.system,
                f"{s['hold_seconds']:.1f}",
                f"{s['held_messages']:,}",
                f"{s['held_requests']:,}",
                "-" if o.dead_at_open is None else f"{o.dead_at_open.total:,}",
                "-" if o.dead_at_close is None else f"{o.dead_at_close.total:,}",
                "-" if growth is None else f"{growth:,}",
                "-"
                if s["dead_per_100k_messages"] is None
                else f"{s['dead_per_100k_messages']:,.0f}",
                "-" if s["dead_per_request"] is None else f"{s['dead_per_request']:.2f}",
                s["dead_counted_by"],
                f"{s['lock_waits_over_1s']} ({s['lock_waits_over_1s_by_held']})",
                f"{s['longest_lock_wait_s']:.1f}",
            ]
        )
    return ratios + "\n\n" + markdown(headers, rows)


def report(outcomes: list[Outcome], chart: str | None) -> str:
    if not outcomes:
        return ""
    s = outcomes[0].settings
    lines = [
        "",
        f"Held xmin horizon ({s.mode}): blocks of {s.block_seconds:g}s, {s.messages:,} msgs "
        f"per block ({s.producers} producers, batches of {s.batch}, {s.size} B values; "
        f"{s.consumers} consumers pull {s.batch} and ack separately); "
        f"{s.blocks_before} blocks before, a {s.hold_seconds:g}s hold, {s.blocks_after} after",
    ]
    for o in outcomes:
        lines += ["", f"{o.system}:"]
        if o.locked_tables:
            lines.append(
                f"long transaction locked and read {len(o.locked_tables)} tables: "
                + ", ".join(_short(t) for t in o.locked_tables)
            )
        lines.append(block_table(o))
        for w in o.lock_waits[:5]:
            lines.append(
                f"  lock wait {w.waited:.1f}s at {w.started:.0f}s ({w.mode} on "
                f"{w.relation or w.locktype}{', behind the hold' if w.by_held else ''}): "
                f"{w.query}"
            )
        if len(o.lock_waits) > 5:
            lines.append(f"  ... {len(o.lock_waits) - 5} more lock waits > 1 s")
    lines += ["", summary_table(outcomes), ""]
    lines.append(
        "publish msgs/s: the block's messages / the time until the last was stored (whole "
        "block if cut); drain msgs/s: acked in the block / the time until the queue was "
        "drained (whole block if not). dead: pgstattuple's dead_tuple_count where available "
        "(else n_dead_tup), after the block's traffic; 'dead row versions +': from the hold's "
        "start to just before its commit (it can undercount by up to 'dead at hold start', "
        "which vacuum may remove meanwhile)."
    )
    if chart:
        lines.append(f"chart: {chart}")
    return "\n".join(lines)
