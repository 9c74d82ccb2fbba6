"""Server processes started by tests leave no log behind: each log is deleted when the
test's servers stop, and a failing test's report shows the log's tail instead.

Checked on an inner pytest run (its own temp directory and embedded Postgres), with one
failing and one passing test for each kind of server process the suite starts."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import ROOT

INNER = """
import time

import httpx

from tests.conftest import unique


def _touch(server):
    # An access line naming this request id lands in the server's log. The server writes it
    # after the answer (at the end of that turn of its event loop): wait until it is there,
    # or a busy machine reports the failure before the line is written.
    r = httpx.get(server.base_url + "/v1/topics", headers={"X-Request-ID": "marker-" + MARK})
    assert r.status_code == 200
    deadline = time.monotonic() + 10
    while "marker-" + MARK not in server.log_path.read_text() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_server_factory_fails(server_factory):
    server = server_factory(env={"SLUICE_LOG_LEVEL": "INFO"})
    _touch(server)
    print("LOG", server.log_path)
    assert False, "failing on purpose"


def test_server_factory_passes(server_factory):
    server = server_factory(env={"SLUICE_LOG_LEVEL": "INFO"})
    _touch(server)
    print("LOG", server.log_path)


async def test_sluice_servers_fails(sluice_servers, db_url):
    server = sluice_servers(db_url, env={"SLUICE_LOG_LEVEL": "INFO"})
    _touch(server)
    print("LOG", server.log_path)
    assert False, "failing on purpose"


async def test_sluice_servers_passes(sluice_servers, db_url):
    server = sluice_servers(db_url, env={"SLUICE_LOG_LEVEL": "INFO"})
    _touch(server)
    print("LOG", server.log_path)
"""


@pytest.mark.timeout(240)
def test_server_logs_are_removed_and_shown_on_failure(tmp_path: Path) -> None:
    inner_dir = tmp_path / "inner"
    inner_dir.mkdir()
    (inner_dir / "test_inner.py").write_text(INNER.replace("MARK", repr("x")))
    temp = Path(tempfile.mkdtemp(prefix="sluice-logs-"))
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "TMPDIR": str(temp), "PYTHONPATH": path}
    try:
        result = run_inner(inner_dir, env)
        left_in_temp = sorted(temp.glob("sluice-*.log"))
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    out = result.stdout + result.stderr
    assert "2 failed, 2 passed" in out, out[-5000:]
    logs = [Path(found) for found in re.findall(r"LOG (\S+/sluice-\d+\.log)", out)]
    assert len(logs) == 4, out[-5000:]
    # Nothing left behind: neither in the temp directory nor where the fault servers wrote.
    assert [p for p in logs if p.exists()] == [], out[-5000:]
    assert left_in_temp == [], out[-5000:]
    # The failing tests' reports show their server's log tail, with the access line.
    sections = [line for line in out.splitlines() if "server log sluice-" in line]
    assert len(sections) == 2, out[-5000:]
    assert out.count("marker-x") == 2, out[-5000:]


def run_inner(inner_dir: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "tests.conftest",
            "-p",
            "tests.faults.conftest",
            "-rA",
            "-s",
            "--rootdir",
            str(inner_dir),
            "-c",
            os.devnull,
            "-o",
            "asyncio_mode=auto",
            "-o",
            "asyncio_default_fixture_loop_scope=session",
            "-o",
            "asyncio_default_test_loop_scope=session",
            "-p",
            "no:cacheprovider",
            str(inner_dir / "test_inner.py"),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=220,
    )
