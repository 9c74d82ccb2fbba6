"""Static checks that run with the suite: ruff (lint and format) on the whole repository and
bandit on the service package."""

from __future__ import annotations

import re
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


# The documents that name tests as their evidence (not bench/RESULTS.md: a record of runs,
# whose older entries name what the suite had then).
CITING = [
    "README.md",
    "clients/python/README.md",
    *(f"docs/{p.name}" for p in ROOT.glob("docs/*.md")),
]


def test_the_documents_cite_only_tests_and_files_that_exist():
    """docs/pitfalls.md, design.md and the READMEs give tests as evidence: a renamed or removed
    test must take its citations with it."""
    defined = set()
    for path in ROOT.glob("tests/**/*.py"):
        defined |= set(re.findall(r"^(?:async )?def (test_\w+)\(", path.read_text(), re.M))
    stale = []
    for name in CITING:
        text = (ROOT / name).read_text()
        stale += [f"{name}: {t}" for t in re.findall(r"::(test_\w+)", text) if t not in defined]
        files = re.findall(r"\btests/[\w/]+\.py\b", text)
        stale += [f"{name}: {f}" for f in files if not (ROOT / f).is_file()]
    assert len(defined) > 500  # the search found the suite
    assert stale == []
