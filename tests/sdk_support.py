"""What the SDK's tests share: the SDK on the import path (a distribution of its own,
clients/python; put first so the tests use this checkout's, whatever is installed) and one
real `sluice serve` per test module, its log removed when it stops."""

from __future__ import annotations

import sys
from collections.abc import Iterator

import pytest

from tests.conftest import ROOT, ServerProcess, running_server

sys.path.insert(0, str(ROOT / "clients" / "python"))

import sluice_client as sc

__all__ = ["sc", "server"]


@pytest.fixture(scope="module")
def server(db_url: str) -> Iterator[ServerProcess]:
    """One real server process for the module (the same class as `server_factory`'s)."""
    yield from running_server(db_url)
