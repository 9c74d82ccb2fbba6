"""Fixtures of the fault tests: server processes we may kill, a Postgres we may restart."""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.conftest import remove_log, report_log_on_failure
from tests.faults.procs import OwnPostgres, SluiceServer


@pytest.fixture
def sluice_servers(
    tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[Callable[..., SluiceServer]]:
    """start(url, env=None) -> a ready SluiceServer; every one is stopped at the end, and
    its log deleted (a failing test's report shows the log's tail)."""
    started: list[SluiceServer] = []

    def start(url: str, env: dict[str, str] | None = None) -> SluiceServer:
        server = SluiceServer(url, tmp_path, env)
        started.append(server)
        report_log_on_failure(request.node, server.log_path)
        server.start_ready()
        return server

    yield start
    for server in started:
        if server.running():
            server.kill9()
        remove_log(server.log_path)


@pytest.fixture
def own_pg() -> Iterator[OwnPostgres]:
    """A Postgres of this test alone (its own data directory and socket). Not under
    pytest's tmp root, which is private (0700) while Postgres runs as another user."""
    data_dir = Path(tempfile.mkdtemp(prefix="sluice-fault-pg-"))
    try:
        pg = OwnPostgres(data_dir)
        yield pg
        pg.close()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
