"""Installed as users install it: a wheel (what a package index or pipx gives them) in a fresh
virtual environment, started from another folder, with the migrations it ships."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import time
import zipfile
from pathlib import Path

import httpx
import pytest

from tests.conftest import ROOT, free_port


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    source = _source(tmp_path_factory)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), str(source)],
        check=True,
        timeout=300,
    )
    (built,) = out.glob("sluice_mq-*.whl")
    return built


def _source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The checkout's files (tracked, or new and not ignored) copied to a folder of their
    own: pip builds in the source folder, and setuptools packs whatever an earlier build
    left in its build/ (a migration deleted since is then shipped again: two heads)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=False,
    )
    if listed.returncode != 0:  # not a git checkout: build from it as it is
        return ROOT
    copy = tmp_path_factory.mktemp("source")
    for name in filter(None, listed.stdout.decode().split("\0")):
        source = ROOT / name
        if source.is_file():
            target = copy / name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    return copy


def test_the_wheel_installs_one_package_named_sluice_with_its_migrations(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top_level = {name.split("/", 1)[0] for name in names}
    assert {n for n in top_level if not n.endswith(".dist-info")} == {"sluice"}, top_level
    assert "sluice/migrations/env.py" in names
    assert "sluice/migrations/script.py.mako" in names
    assert any(n.startswith("sluice/migrations/versions/0001_") for n in names)
    assert "sluice/static/ui.js" in names


def test_a_wheel_in_a_fresh_venv_serves_from_another_folder(
    wheel: Path, fresh_db_url: str, tmp_path: Path
) -> None:
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    # The dependencies come from the test environment's site-packages as a plain path entry
    # (not a site directory, so the editable install's finder there is never loaded): the
    # only `sluice` this venv can import is the wheel's.
    (site,) = (venv / "lib").glob("python3*/site-packages")
    (site / "test-deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)],
        check=True,
        timeout=120,
    )
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run(
        [str(venv / "bin" / "python"), "-c", "import sluice; print(sluice.__file__)"],
        cwd=elsewhere,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert where.startswith(str(site)), where

    port = free_port()
    log = tmp_path / "serve.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(venv / "bin" / "sluice"), "serve", "--port", str(port)],
            cwd=elsewhere,
            env={"PATH": "/usr/bin:/bin", "DATABASE_URL": fresh_db_url, "HOME": str(tmp_path)},
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 60
        ready = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=1)
                if ready.status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        assert ready is not None and ready.status_code == 200, log.read_text()[-3000:]
        base = f"http://127.0.0.1:{port}/v1/topics/packaged"
        assert httpx.put(base, json={}).status_code == 201
        published = httpx.post(base + "/messages", json={"messages": [{"value": 1}]})
        assert published.status_code == 201, published.text
    finally:
        proc.terminate()
        proc.wait(30)
