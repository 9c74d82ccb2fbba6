"""sluice_client.cli (`sluice-client`) against a real `sluice serve` process: each command's
output and exit code, in text and in JSON (in-process); then as a subprocess: 100k lines
piped into publish, `tail | head`, the progress bar on a terminal, and the same commands
under the server's own `sluice` command."""

from __future__ import annotations

import io
import json
import os
import pty
import socket
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, unique
from tests.sdk_support import sc, server  # noqa: F401 (the fixture)

from sluice_client.cli import main  # isort: skip (needs sdk_support's sys.path)


@pytest.fixture
def cli(server, capsys):
    """Run the CLI against the module's server: returns (exit code, stdout, stderr)."""

    def run(*args: str) -> tuple[int, str, str]:
        code = main(["--url", server.base_url, *args])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def _lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def test_topics_create_list_show_delete_round_trip(cli):
    name = unique("cli")
    code, out, _ = cli("topics", "create", name, "--retention-seconds", "3600")
    assert code == 0 and out.strip() == f"created topic {name}"
    code, out, _ = cli("topics", "create", name, "--dedup-window-seconds", "60")
    assert code == 0 and out.strip() == f"updated topic {name}"

    code, out, _ = cli("topics", "list")
    assert code == 0 and name in out.splitlines()
    code, out, _ = cli("--output", "json", "topics", "list")
    assert code == 0 and name in [t["name"] for t in json.loads(out)["topics"]]

    code, out, _ = cli("topics", "show", name)
    assert code == 0
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert rows["retention_seconds"] == "3600" and rows["dedup_window_seconds"] == "60"
    code, out, _ = cli("--output", "json", "topics", "show", name)
    doc = json.loads(out)
    assert code == 0 and doc["name"] == name and doc["retention_seconds"] == 3600

    code, out, _ = cli("--output", "json", "topics", "delete", name)
    assert code == 0 and json.loads(out) == {"deleted": True, "topic": name}
    code, out, err = cli("topics", "show", name)
    assert code == 3 and out == "" and err.startswith("sluice-client: 404")


def test_publish_value_and_stdin_then_tail(cli, monkeypatch):
    topic = unique("cli")
    assert cli("topics", "create", topic)[0] == 0
    code, out, _ = cli("publish", topic, '{"n": 1}', "--key", "k1", "--header", "h=v")
    assert code == 0 and out.strip() == "0"

    lines = "".join(f'{{"n": {i}}}\n' for i in range(2, 152)) + "\n"  # 150 values + blank
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    code, out, err = cli("--output", "json", "publish", topic)
    assert code == 0
    offsets = [m["offset"] for m in json.loads(out)["messages"]]
    assert offsets == list(range(1, 151))

    monkeypatch.setattr(sys, "stdin", io.StringIO('"a"\n"b"\n'))
    code, out, err = cli("publish", topic)
    assert code == 0 and out.split() == ["151", "152"]
    assert "published 2 messages" in err

    code, out, _ = cli("publish", topic, "plain text", "--string")
    assert code == 0 and out.strip() == "153"

    code, out, _ = cli("tail", topic, "--batch", "40")
    docs = _lines(out)
    assert code == 0 and [d["offset"] for d in docs] == list(range(154))
    assert docs[0]["value"] == {"n": 1} and docs[0]["key"] == "k1"
    assert docs[0]["headers"] == {"h": "v"}
    assert [d["value"] for d in docs[-3:]] == ["a", "b", "plain text"]

    code, out, _ = cli("--output", "json", "tail", topic, "--from-offset", "150", "-n", "2")
    assert code == 0 and [d["offset"] for d in _lines(out)] == [150, 151]


def test_tail_follow_stops_at_max(cli):
    topic = unique("cli")
    cli("topics", "create", topic)
    cli("publish", topic, "1")
    code, out, _ = cli("tail", topic, "--follow", "--max", "1")
    assert code == 0 and _lines(out)[0]["value"] == 1


def test_subscription_tail_acks_seek_and_stats(cli):
    topic = unique("cli")
    cli("topics", "create", topic)
    code, out, _ = cli(
        "subscriptions", "create", topic, "s1", "--start", "earliest", "--max-deliveries", "3"
    )
    assert code == 0 and out.strip() == f"created subscription {topic}/s1"
    code, out, _ = cli("--output", "json", "subscriptions", "list", topic)
    assert code == 0 and [s["name"] for s in json.loads(out)["subscriptions"]] == ["s1"]
    code, out, _ = cli("--output", "json", "subscriptions", "show", topic, "s1")
    assert code == 0 and json.loads(out)["max_deliveries"] == 3

    for i in range(3):
        cli("publish", topic, str(i))
    code, out, _ = cli("stats", topic, "s1")
    rows = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and rows["backlog"] == "3" and rows["lag"] == "3"

    code, out, _ = cli("tail", topic, "s1", "--ack", "--wait", "0")
    docs = _lines(out)
    assert code == 0 and [d["value"] for d in docs] == [0, 1, 2]
    assert docs[0]["delivery_attempt"] == 1
    # all acked: a second pull finds nothing
    code, out, _ = cli("tail", topic, "s1", "--ack", "--wait", "0")
    assert code == 0 and out == ""
    code, out, _ = cli("--output", "json", "stats", topic, "s1")
    doc = json.loads(out)
    assert doc["backlog"] == 0 and doc["in_flight"] == 0 and doc["committed_offset"] == 3

    # seek back: the messages come again
    code, out, _ = cli("subscriptions", "seek", topic, "s1", "--offset", "1")
    assert code == 0 and out.strip() == "committed_offset 1"
    code, out, _ = cli("tail", topic, "s1", "--ack", "--wait", "0")
    assert [d["value"] for d in _lines(out)] == [1, 2]
    code, out, _ = cli("--output", "json", "subscriptions", "seek", topic, "s1", "--to", "earliest")
    assert code == 0 and json.loads(out) == {"committed_offset": 0}

    code, out, _ = cli("--output", "json", "dead-letters", "list", topic, "s1")
    assert code == 0 and out == ""
    code, out, _ = cli("dead-letters", "redrive", topic, "s1")
    assert code == 0 and out.strip() == "redriven 0"

    code, out, _ = cli("subscriptions", "delete", topic, "s1")
    assert code == 0 and out.strip() == f"deleted subscription {topic}/s1"
    assert cli("stats", topic, "s1")[0] == 3


def test_exit_codes_and_json_errors(cli, monkeypatch):
    missing = unique("cli-missing")
    code, out, err = cli("--output", "json", "topics", "show", missing)
    assert code == 3 and json.loads(out)["error"]["status"] == 404
    assert err.startswith("sluice-client: ") and len(err.splitlines()) == 1
    assert cli("publish", missing, "1")[0] == 3

    topic = unique("cli")
    cli("topics", "create", topic)
    # refused by the server: an invalid setting (422)
    code, out, err = cli("--output", "json", "topics", "create", topic, "--retention-seconds", "-5")
    assert code == 4 and json.loads(out)["error"]["status"] == 422
    # refused locally: VALUE that is not JSON, a bad header, a bad stdin line
    code, out, err = cli("publish", topic, "{not json")
    assert code == 4 and out == "" and "not valid JSON" in err
    assert cli("publish", topic, "1", "--header", "novalue")[0] == 4
    monkeypatch.setattr(sys, "stdin", io.StringIO("1\n{oops\n"))
    code, _, err = cli("publish", topic)
    assert code == 4 and "stdin line 2" in err
    assert cli("tail", topic, "nosub")[0] == 4  # a subscription without --ack
    # usage errors (argparse)
    assert cli("subscriptions", "seek", topic, "s")[0] == 2
    assert cli("nonsense")[0] == 2


def test_unreachable_server_exits_6(capsys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed once the block ends: nothing listens there
    url = f"http://127.0.0.1:{port}"
    assert main(["--url", url, "topics", "list"]) == 6
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err.startswith("sluice-client: cannot reach")
    assert main(["--url", url, "--output", "json", "stats", "t", "s"]) == 6
    assert json.loads(capsys.readouterr().out)["error"]["exit_code"] == 6


def test_module_help_runs_as_a_subprocess():
    env = {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python")}
    proc = subprocess.run(
        [sys.executable, "-m", "sluice_client", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
        check=False,
    )
    assert proc.returncode == 0
    assert "exit codes:" in proc.stdout and "publish" in proc.stdout


def test_stats_watch_repeats_until_interrupted(cli, monkeypatch):
    topic = unique("cli")
    cli("topics", "create", topic)
    cli("subscriptions", "create", topic, "s1")
    sleeps: list[float] = []

    def fake_sleep(seconds: float) -> None:
        sleeps.append(seconds)
        if len(sleeps) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr("sluice_client.cli.time.sleep", fake_sleep)
    code, out, _ = cli("--output", "json", "stats", topic, "s1", "--watch", "0.25")
    assert code == 0 and sleeps == [0.25, 0.25]
    assert [d["backlog"] for d in _lines(out)] == [0, 0]
    sleeps.clear()
    code, out, _ = cli("stats", topic, "s1", "--watch", "1")
    assert code == 0 and out.count("backlog") == 2 and out.startswith("# ")


# ---- as a subprocess: pipes, a terminal, and the server's own `sluice` command -------------

CLIENT = [sys.executable, "-m", "sluice_client"]
SERVER_COMMAND = [sys.executable, "-m", "sluice.cli"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT / "clients" / "python")}


def test_a_pipe_of_100k_lines_into_publish_stores_them_all(server):
    topic = unique("cli-bulk")
    n = 100_000
    with sc.Client(server.base_url) as c:
        c.create_topic(topic)
    data = "".join(f'{{"i": {i}}}\n' for i in range(n)).encode()
    started = time.monotonic()
    proc = subprocess.run(
        [*CLIENT, "--url", server.base_url, "publish", topic],
        input=data,
        capture_output=True,
        env=_env(),
        timeout=180,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert proc.returncode == 0, proc.stderr.decode()[-2000:]
    # In a pipe: one offset a line on stdout, no progress bar (no carriage return).
    assert proc.stdout.decode().split() == [str(i) for i in range(n)]
    assert b"\r" not in proc.stderr and b"published 100000 messages" in proc.stderr
    # 100 requests of 1000; about 10 s on a busy 2-core machine.
    assert elapsed < 90, elapsed
    stored: list[int] = []
    with sc.Client(server.base_url) as c:
        for page in c.browse_pages(topic, limit=1000):
            stored.extend(m.value["i"] for m in page.messages)
    assert stored == list(range(n))

    # `tail TOPIC | head -n 10`: head leaves after ten lines; tail exits 0 at its next
    # write (documented: the reader went away is not an error), without a traceback.
    for follow in ([], ["--follow"]):
        tail = subprocess.Popen(
            [*CLIENT, "--url", server.base_url, "tail", topic, *follow],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=_env(),
        )
        head = subprocess.Popen(["head", "-n", "10"], stdin=tail.stdout, stdout=subprocess.PIPE)
        assert tail.stdout is not None and tail.stderr is not None
        tail.stdout.close()  # only head holds the pipe now
        out, _ = head.communicate(timeout=60)
        try:
            code = tail.wait(timeout=60)
        finally:
            if tail.poll() is None:
                tail.kill()
        err = tail.stderr.read().decode()
        tail.stderr.close()
        assert [json.loads(line)["value"]["i"] for line in out.splitlines()] == list(range(10))
        assert code == 0 and err == "", err


def test_publish_on_a_terminal_shows_progress_with_rate_and_eta(server, tmp_path):
    topic = unique("cli-tty")
    with sc.Client(server.base_url) as c:
        c.create_topic(topic)
    source = tmp_path / "lines.txt"
    source.write_text("".join(f"{i}\n" for i in range(20_000)))
    master, slave = pty.openpty()
    with source.open("rb") as stdin:
        proc = subprocess.Popen(
            [*CLIENT, "--url", server.base_url, "publish", topic],
            stdin=stdin,
            stdout=slave,
            stderr=slave,
            env=_env(),
        )
    os.close(slave)
    chunks = []
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait(timeout=60) == 0
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    screen = b"".join(chunks).decode()
    assert "\r" in screen and "ETA" in screen and "/s)" in screen
    assert "100% published 20000" in screen
    # the bar replaces the offsets on a terminal
    assert "\n19999" not in screen
    with sc.Client(server.base_url) as c:
        assert c.get_topic(topic).message_count == 20_000


def test_the_server_command_offers_the_client_commands(server):
    topic = unique("cli-srv")

    def sluice(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*SERVER_COMMAND, *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=ROOT,
            env={**_env(), "SLUICE_URL": server.base_url},
            timeout=60,
            check=False,
        )

    helped = sluice("--help")
    assert helped.returncode == 0
    for command in ("serve", "migrate", "keys", "topics", "publish", "tail", "stats"):
        assert command in helped.stdout
    assert sluice("topics", "create", topic).returncode == 0
    published = sluice("publish", topic, "--output", "json", stdin="1\n2\n3\n")
    assert published.returncode == 0, published.stderr
    assert [m["offset"] for m in json.loads(published.stdout)["messages"]] == [0, 1, 2]
    listed = sluice("topics", "list", "--url", server.base_url)  # options after the command
    assert listed.returncode == 0 and topic in listed.stdout.splitlines()
    tailed = sluice("tail", topic, "-n", "2")
    assert [json.loads(line)["value"] for line in tailed.stdout.splitlines()] == [1, 2]
    assert sluice("subscriptions", "create", topic, "s", "--start", "earliest").returncode == 0
    stats = sluice("stats", topic, "s", "--output", "json")
    assert stats.returncode == 0 and json.loads(stats.stdout)["lag"] == 3
    missing = sluice("topics", "show", unique("nope"))
    assert missing.returncode == 3 and missing.stderr.startswith("sluice: 404")
