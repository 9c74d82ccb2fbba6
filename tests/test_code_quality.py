"""Static checks that run with the suite: ruff (lint and format) on the whole repository and
bandit on the service package."""

from __future__ import annotations

import subprocess
import sys

from tests.conftest import ROOT


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=120
    )


def test_ruff_lint_is_clean():
    result = _run("ruff", "check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_ruff_format_is_clean():
    result = _run("ruff", "format", "--check", ".")
    assert result.returncode == 0, result.stdout + result.stderr


def test_bandit_finds_nothing_in_the_service():
    # app/storage is the one place with SQL; its statements are assembled only from module
    # constants (column lists, fragments) and every value is a bound parameter, which
    # bandit's B608 cannot tell from string-built SQL. It is checked without B608, the rest
    # of the package with every test.
    rest = _run("bandit", "-q", "-r", "app", "-x", "app/storage", "-ll")
    assert rest.returncode == 0, rest.stdout + rest.stderr
    storage = _run("bandit", "-q", "-r", "app/storage", "-ll", "-s", "B608")
    assert storage.returncode == 0, storage.stdout + storage.stderr
