"""The `sluice` command: serve with an embedded Postgres (data kept across restarts),
and the OpenAPI writer."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

from tests.conftest import ROOT, free_port


def _serve_embedded(data_dir: Path, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["SLUICE_DATA_DIR"] = str(data_dir)
    return subprocess.Popen(
        [sys.executable, "-m", "sluice.cli", "serve", "--port", str(port)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


def _wait_ready(base: str, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "server exited"
        try:
            if httpx.get(base + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise AssertionError("server did not become ready")


def _postgres_running_on(data_dir: Path) -> bool:
    for proc in psutil.process_iter(attrs=["name", "cmdline"]):
        cmdline = " ".join(proc.info.get("cmdline") or [])
        if proc.info.get("name") == "postgres" and str(data_dir) in cmdline:
            return True
    return False


def test_serve_without_database_url_runs_embedded_postgres_and_keeps_data():
    data_dir = Path(tempfile.mkdtemp(prefix="sluice-cli-"))
    data_dir.chmod(0o755)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        proc = _serve_embedded(data_dir, port)
        try:
            _wait_ready(base, proc)
            assert httpx.put(base + "/v1/topics/kept", json={}).status_code == 201
            r = httpx.post(base + "/v1/topics/kept/messages", json={"messages": [{"value": 1}]})
            assert r.status_code == 201
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
        assert (data_dir / "pgdata" / "PG_VERSION").exists()
        deadline = time.monotonic() + 10
        while _postgres_running_on(data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _postgres_running_on(data_dir), "embedded Postgres left running"

        proc = _serve_embedded(data_dir, port)
        try:
            _wait_ready(base, proc)
            r = httpx.get(base + "/v1/topics/kept/messages")
            assert [m["value"] for m in r.json()["messages"]] == [1]
        finally:
            proc.terminate()
            assert proc.wait(30) == 0
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_openapi_command_writes_the_served_document(tmp_path):
    out = tmp_path / "openapi.json"
    subprocess.run(
        [sys.executable, "-m", "sluice.cli", "openapi", "--output", str(out)], cwd=ROOT, check=True
    )
    document = json.loads(out.read_text())
    assert document["info"]["title"] == "Sluice"
    assert "/v1/topics/{topic}/messages" in document["paths"]
