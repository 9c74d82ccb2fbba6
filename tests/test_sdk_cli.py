"""sluice_client.cli (`sluice-client`) in-process against a real `sluice serve` process: each
command's output and exit code, in text and in JSON."""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys

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
