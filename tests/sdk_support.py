"""What the SDK's tests share: the SDK on the import path (it is a distribution of its own,
clients/python, not installed by the README's command) and one real `sluice serve` per
test module, its log removed when it stops."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, ServerProcess, remove_log

sys.path.insert(0, str(ROOT / "clients" / "python"))

import sluice_client as sc

__all__ = ["sc", "server"]


@pytest.fixture(scope="module")
def server(db_url: str) -> Iterator[ServerProcess]:
    """One real server process for the module (the same class as `server_factory`'s)."""
    proc = ServerProcess(db_url)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()
        remove_log(proc.log_path)
