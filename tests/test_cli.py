"""The `sluice` command: serve with an embedded Postgres (data kept across restarts), what
it prints (text on a terminal, JSON lines otherwise, one banner), how it fails (one sentence
and an exit code of its own per cause, before anything is started), and the OpenAPI
writer."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import httpx
import psutil
import pytest

from sluice.embedded import start_embedded
from sluice.startup import (
    EXIT_DATA_DIR,
    EXIT_DB_AUTH,
    EXIT_DB_MISSING,
    EXIT_DB_UNREACHABLE,
    EXIT_PORT,
    EXIT_USAGE,
)
from tests.conftest import ROOT, database_url, free_port

SLUICE = [sys.executable, "-m", "sluice.cli"]
BANNER_END = "Stop it with Ctrl+C."
ESCAPE = "\x1b"


def _env(**changes: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLUICE_")}
    env.pop("DATABASE_URL", None)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _temp_data_dir() -> Path:
    # Not under pytest's tmp root (0700): the embedded Postgres runs as another user.
    path = Path(tempfile.mkdtemp(prefix="sluice-cli-"))
    path.chmod(0o755)
    return path


def _serve_embedded(data_dir: Path, port: int, **env: str) -> subprocess.Popen:
    return subprocess.Popen(
        [*SLUICE, "serve", "--port", str(port)],
        cwd=ROOT,
        env=_env(SLUICE_DATA_DIR=str(data_dir), **env),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
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


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_serve_without_database_url_runs_embedded_postgres_and_keeps_data():
    data_dir = _temp_data_dir()
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
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
        assert (data_dir / "pgdata" / "PG_VERSION").exists()
        deadline = time.monotonic() + 10
        while _postgres_running_on(data_dir) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _postgres_running_on(data_dir), "embedded Postgres left running"

        # The embedded Postgres says one line: where its data is, its version, how long.
        entries = _json_lines(stderr)
        said = [e for e in entries if "embedded_postgres" in e["logger"] or "embedded" in e["msg"]]
        [line] = [e for e in said if e["level"] != "debug"]
        assert line["logger"] == "sluice.embedded"
        assert line["data_dir"] == str(data_dir / "pgdata")
        assert re.fullmatch(r"\d+\.\d+", line["version"]), line
        assert line["new"] is True and line["seconds"] > 0
        assert "pg_ctl" not in stderr and "initdb" not in stderr  # its command lines: DEBUG

        # Restarted at DEBUG: the data is still there, and the command lines are shown.
        proc = _serve_embedded(data_dir, port, SLUICE_LOG_LEVEL="DEBUG")
        try:
            _wait_ready(base, proc)
            r = httpx.get(base + "/v1/topics/kept/messages")
            assert [m["value"] for m in r.json()["messages"]] == [1]
        finally:
            proc.terminate()
            _, stderr = proc.communicate(timeout=30)
        assert proc.returncode == 0
        debug = [e for e in _json_lines(stderr) if e["logger"] == "embedded_postgres"]
        assert debug and all(e["level"] == "debug" for e in debug)
        assert any("pg_ctl" in e["msg"] for e in debug)
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


# ---- what `sluice serve` prints: on a terminal and elsewhere --------------------------------


def _with_password(url: str, password: str) -> str:
    """The test server trusts every local login, so a password in the URL is accepted (and
    ignored): what matters here is that it is never printed."""
    scheme, rest = url.split("://", 1)
    user, at, host = rest.partition("@")
    return f"{scheme}://{user.split(':')[0]}:{password}{at}{host}"


def _read_until(fd: int, proc: subprocess.Popen, marker: str | None, timeout: float) -> str:
    out = b""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker is not None and marker.encode() in out:
            break
        ready, _, _ = select.select([fd], [], [], 0.1)
        if not ready:
            if proc.poll() is not None and marker is not None:
                break
            continue
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the other side of the terminal is closed
            break
        if not chunk:
            break
        out += chunk
    return out.decode(errors="replace")


def _serve_and_stop(env: dict[str, str], *, terminal: bool, ready: str) -> tuple[str, int]:
    """Runs `sluice serve` (stderr on a pseudo-terminal or on a pipe) until it writes
    `ready`, stops it with SIGTERM; returns what it wrote and its exit code."""
    port = free_port()
    command = [*SLUICE, "serve", "--port", str(port)]
    if terminal:
        master, slave = pty.openpty()
        proc = subprocess.Popen(command, cwd=ROOT, env=env, stdin=slave, stdout=slave, stderr=slave)
        os.close(slave)
        try:
            text = _read_until(master, proc, ready, 60)
            assert ready in text, text
            proc.send_signal(signal.SIGTERM)
            text += _read_until(master, proc, None, 30)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                proc.kill()
            os.close(master)
        return text.replace("\r\n", "\n"), proc.returncode
    proc = subprocess.Popen(
        command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert proc.stderr is not None
        text = _read_until(proc.stderr.fileno(), proc, ready, 60)
        assert ready in text, text
        proc.send_signal(signal.SIGTERM)
        rest, _ = proc.communicate(timeout=30)
        text += rest.decode(errors="replace")
    finally:
        if proc.poll() is None:
            proc.kill()
    return text, proc.returncode


@pytest.mark.parametrize(
    ("terminal", "setting", "expected"),
    [
        (True, None, "text"),
        (False, None, "json"),
        (True, "json", "json"),
        (False, "text", "text"),
    ],
)
def test_serve_prints_text_on_a_terminal_and_json_lines_otherwise(
    db_url, terminal, setting, expected
):
    secret = "pw-never-printed-7d1e"
    env = _env(DATABASE_URL=_with_password(db_url, secret), SLUICE_LOG_FORMAT=setting)
    ready = BANNER_END if expected == "text" else '"msg":"ready"'
    text, code = _serve_and_stop(env, terminal=terminal, ready=ready)
    assert code == 0, text
    assert ESCAPE not in text  # no colours, no escape codes, in either format
    assert secret not in text
    assert "Traceback" not in text
    lines = [line for line in text.splitlines() if line.strip()]
    if expected == "json":
        entries = [json.loads(line) for line in lines]  # every line is one JSON object
        assert not [e for e in entries if "color_message" in e]
        [ready] = [e for e in entries if e["msg"] == "ready"]
        base = ready["url"]
        assert ready["docs"] == base + "/docs"
        assert ready["ui"] == base + "/ui"
        assert ready["metrics"] == base + "/metrics"
        assert ready["api"] == base + "/v1/topics"
        assert ready["schema_revision"]
        assert ready["api_keys"] in ("open", "enforced")
        assert "sluice_test_" in ready["database"]
        # uvicorn's own start-up lines are replaced by the banner.
        assert not [e for e in entries if e["msg"].startswith("Uvicorn running on")]
        return
    assert not [line for line in lines if line.startswith("{")], text
    start = lines.index(next(line for line in lines if line.startswith("Sluice ")))
    banner = lines[start : lines.index(BANNER_END) + 1]
    assert re.fullmatch(r"Sluice \S+ is ready at http://127\.0\.0\.1:\d+", banner[0]), banner
    base = banner[0].rsplit(" ", 1)[1]
    fields = dict(re.split(r"\s{2,}", line.strip(), maxsplit=1) for line in banner[1:-1])
    assert fields["API"] == base + "/v1/topics"
    assert fields["Swagger UI"] == base + "/docs"
    assert fields["Live view"] == base + "/ui"
    assert fields["Metrics"] == base + "/metrics"
    assert "database 'sluice_test_" in fields["Data"] and "as user 'postgres'" in fields["Data"]
    assert re.fullmatch(r"\S+ \(head\)", fields["Schema"]), fields
    assert fields["API keys"].startswith(("none yet", "enforced")), fields
    # Every other line reads `HH:MM:SS LEVEL logger  message`.
    for line in lines[:start]:
        assert re.match(r"\d\d:\d\d:\d\d (INFO|WARNING|ERROR|DEBUG) +\S+  ", line), line
    assert text.count("Sluice ") == 1


def test_version_and_serve_help_describe_every_option():
    version = subprocess.run([*SLUICE, "--version"], capture_output=True, text=True, check=True)
    assert re.fullmatch(r"sluice \d+\.\d+\.\d+\S*\n", version.stdout), version.stdout
    helped = subprocess.run(
        [*SLUICE, "serve", "--help"], capture_output=True, text=True, check=True
    ).stdout
    options = re.findall(r"^  (--[a-z-]+)", helped, flags=re.M)
    assert set(options) == {"--host", "--port", "--workers", "--limit-concurrency"}
    for option, default in (
        ("--host", "127.0.0.1"),
        ("--port", "8000"),
        ("--workers", "1"),
        ("--limit-concurrency", "5000"),
    ):
        described = helped.split(f"  {option} ", 1)[1].split("\n  --", 1)[0]
        assert f"(default: {default})" in " ".join(described.split()), (option, described)
    for setting in ("DATABASE_URL", "SLUICE_DATA_DIR", "SLUICE_LOG_LEVEL", "SLUICE_LOG_FORMAT"):
        assert setting in helped
    for code in (EXIT_PORT, EXIT_DB_UNREACHABLE, EXIT_DB_AUTH, EXIT_DB_MISSING, EXIT_DATA_DIR):
        assert re.search(rf"^  {code} +\S", helped, flags=re.M), code


# ---- failing to start: one sentence, its own exit code, nothing started ---------------------


def _fail(env: dict[str, str], *args: str, timeout: float = 60) -> tuple[str, int, float]:
    started = time.monotonic()
    done = subprocess.run(
        [*SLUICE, "serve", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    return done.stderr, done.returncode, time.monotonic() - started


def _one_sentence(stderr: str) -> str:
    """What a person sees (SLUICE_LOG_FORMAT=text): exactly one line, no traceback."""
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    assert lines[0].startswith("sluice serve: ")
    return lines[0].removeprefix("sluice serve: ")


@pytest.fixture
def taken_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_taken_port_fails_before_postgres_is_started(taken_port):
    data_dir = _temp_data_dir()
    try:
        env = _env(SLUICE_DATA_DIR=str(data_dir), SLUICE_LOG_FORMAT="text")
        stderr, code, seconds = _fail(env, "--port", str(taken_port))
        assert code == EXIT_PORT == 3
        sentence = _one_sentence(stderr)
        assert f"Port {taken_port} on 127.0.0.1 is already in use" in sentence
        assert "--port" in sentence
        assert not (data_dir / "pgdata").exists()  # no Postgres was started, nothing migrated
        assert seconds < 10
        # Not on a terminal: the same sentence as one JSON line.
        stderr, code, _ = _fail(_env(SLUICE_DATA_DIR=str(data_dir)), "--port", str(taken_port))
        [entry] = _json_lines(stderr)
        assert code == EXIT_PORT
        assert (entry["level"], entry["exit_code"], entry["msg"]) == ("error", 3, sentence)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_an_unreachable_database_url():
    nothing = free_port()  # nothing listens there
    url = f"postgresql://app:pw-5c2b@127.0.0.1:{nothing}/db"
    env = _env(DATABASE_URL=url, SLUICE_LOG_FORMAT="text")
    stderr, code, _ = _fail(env, "--port", str(free_port()))
    assert code == EXIT_DB_UNREACHABLE == 4
    sentence = _one_sentence(stderr)
    assert f"Cannot reach PostgreSQL at 127.0.0.1:{nothing} (connection refused)" in sentence
    assert "DATABASE_URL" in sentence and "pw-5c2b" not in stderr


def test_a_role_that_does_not_exist(pg_server):
    url = database_url(pg_server, "postgres").replace("postgres:@", "no_such_role:pw@", 1)
    assert "no_such_role" in url
    env = _env(DATABASE_URL=url, SLUICE_LOG_FORMAT="text")
    stderr, code, _ = _fail(env, "--port", str(free_port()))
    assert code == EXIT_DB_AUTH == 5
    sentence = _one_sentence(stderr)
    assert "refused user 'no_such_role'" in sentence
    assert 'role "no_such_role" does not exist' in sentence
    assert "user or password in DATABASE_URL" in sentence


@pytest.fixture(scope="module")
def password_server() -> Iterator[str]:
    """An embedded Postgres of its own that checks passwords (scram-sha-256) for every role
    but `postgres`; returns the URL of role `sluice_pw`, whose password is `right-pw`.
    (The suite's shared server trusts every local login, so no password can be wrong.)"""
    data_dir = _temp_data_dir()
    url, server = start_embedded(data_dir)
    try:
        pgdata = data_dir / "pgdata"

        async def setup() -> None:
            conn = await asyncpg.connect(url)
            try:
                await conn.execute("CREATE ROLE sluice_pw LOGIN PASSWORD 'right-pw'")
                (pgdata / "pg_hba.conf").write_text(
                    "local all postgres trust\nlocal all all scram-sha-256\n"
                )
                assert await conn.fetchval("SELECT pg_reload_conf()")
            finally:
                await conn.close()

        import asyncio

        asyncio.run(setup())
        yield url.replace("postgres:@", "sluice_pw:right-pw@", 1)
    finally:
        server.cleanup()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_a_wrong_password(password_server):
    import asyncio

    async def right_password_works() -> None:
        conn = await asyncpg.connect(password_server)
        await conn.close()

    asyncio.run(right_password_works())
    wrong = password_server.replace(":right-pw@", ":wrong-pw-3f9a@", 1)
    env = _env(DATABASE_URL=wrong, SLUICE_LOG_FORMAT="text")
    stderr, code, _ = _fail(env, "--port", str(free_port()))
    assert code == EXIT_DB_AUTH == 5
    sentence = _one_sentence(stderr)
    assert "refused user 'sluice_pw'" in sentence
    assert 'password authentication failed for user "sluice_pw"' in sentence
    assert "wrong-pw-3f9a" not in stderr and "right-pw" not in stderr


def test_a_database_that_does_not_exist(pg_server):
    env = _env(DATABASE_URL=database_url(pg_server, "no_such_db"), SLUICE_LOG_FORMAT="text")
    stderr, code, _ = _fail(env, "--port", str(free_port()))
    assert code == EXIT_DB_MISSING == 6
    sentence = _one_sentence(stderr)
    assert "has no database 'no_such_db'" in sentence and "createdb no_such_db" in sentence


def test_a_data_directory_owned_by_someone_else():
    """A cluster created by another user (here: uid 54321, made by chown as root): the
    embedded Postgres could not read it. Said before it is started, with what to do."""
    data_dir = _temp_data_dir()
    try:
        _, server = start_embedded(data_dir)
        server.cleanup()  # a real cluster, stopped
        pgdata = data_dir / "pgdata"
        for path in (pgdata, *pgdata.rglob("*")):
            os.chown(path, 54321, 54321, follow_symlinks=False)
        env = _env(SLUICE_DATA_DIR=str(data_dir), SLUICE_LOG_FORMAT="text")
        stderr, code, _ = _fail(env, "--port", str(free_port()))
        assert code == EXIT_DATA_DIR == 7
        sentence = _one_sentence(stderr)
        assert f"The data directory {pgdata} belongs to uid 54321" in sentence
        assert "SLUICE_DATA_DIR" in sentence and "chown -R" in sentence
        assert not (pgdata / "postmaster.pid").exists()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def test_an_invalid_setting():
    env = _env(SLUICE_LOG_FORMAT="xml", DATABASE_URL="postgresql://u@127.0.0.1:1/d")
    stderr, code, _ = _fail(env, "--port", str(free_port()))
    assert code == EXIT_USAGE == 2
    [entry] = _json_lines(stderr)
    assert entry["msg"].startswith("Invalid setting SLUICE_LOG_FORMAT=xml")
