"""bench/sqs.py runs end to end (tiny counts) and reports every system and phase."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def test_sqs_bench_smoke(pg_server: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "bench.sqs", "--database-url", pg_server, "--messages", "30"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=180,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    for system in ("sluice native", "sluice sqs", "moto sqs"):
        for phase in ("send", "drain"):
            assert any(
                line.startswith(f"| {system}") and f"| {phase}" in line
                for line in done.stdout.splitlines()
            ), (system, phase, done.stdout)
