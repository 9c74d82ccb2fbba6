"""The benchmark harness runs end to end (tiny counts) and reports numbers for each system."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.peers.rabbitmq import rabbitmq_server
from bench.run import DEFAULT_PGMQ_SQL, QUICK_REPEAT, REPEAT, parse_args
from tests.conftest import ROOT


def _bench(*args: str) -> str:
    """`python -m <args>` from the repository's root: its output (the test fails on a
    non-zero exit). A bench that drives wrk is skipped where wrk is not installed."""
    if args[0].startswith("bench.wrk") and shutil.which("wrk") is None:
        pytest.skip("wrk is not installed (apt-get install wrk)")
    done = subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_smoke(pg_server: str, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "bench.run",
        "--database-url", pg_server,
        "--systems", "sluice,sluice-sql,raw,pgmq",
        "--workloads", "publish,consume",
        "--seconds", "0.5", "--warmup", "0",
        "--prefill", "300", "--prefill-single", "200", "--consume-cap", "20",
        "--repeat", "2",
        "--timeout", "150",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| workload" in done.stdout and "msgs/s" in done.stdout, done.stdout

    report = json.loads(out.read_text())
    systems = {"sluice", "raw"} | ({"pgmq"} if DEFAULT_PGMQ_SQL.is_file() else set())
    workloads = {"publish b100", "publish b1", "consume b100", "consume b1"}
    rows = {(r["workload"], r["system"]): r for r in report["results"]}
    for workload in workloads:
        for system in systems:
            row = rows.get((workload, system))
            assert row is not None, (workload, system, done.stdout)
            assert row["errors"] == 0, row
            assert row["rate"] > 0 and row["p50_ms"] > 0 and row["p99_ms"] > 0, row
    # Sluice's one-request-per-batch consumer, compared with the peers' consume b100 rows;
    # every prefilled message was pulled (and acked: the bench fails on a stale ack).
    variant = rows[("consume b100 ack-in-pull", "sluice")]
    assert variant["errors"] == 0 and variant["messages"] == 300, variant
    assert variant["ratios"]["raw"] > 0
    # ... and the single-message one, against the peers' consume b1 rows
    single = rows[("consume b1 ack-in-pull", "sluice")]
    assert single["errors"] == 0 and single["ratios"]["raw"] > 0, single
    for workload in ("publish b100", "consume b100"):
        assert rows[(workload, "sluice")]["ratios"]["raw"] > 0
        # repeated phases: one median row per system, naming every round's rate
        for system in systems:
            assert any("median of 2 runs" in note for note in rows[(workload, system)]["notes"])
    # SQL publish (sluice.send / send_batch) is measured on the publish rows only, and says
    # how long the relay took to have everything in the log.
    for workload in ("publish b100", "publish b1"):
        row = rows[(workload, "sluice-sql")]
        assert row["errors"] == 0 and row["rate"] > 0, row
        assert any(note.startswith("all in the log") for note in row["notes"]), row
    assert ("consume b100", "sluice-sql") not in rows


def test_wrk_bench_smoke() -> None:
    """bench/wrk: the server's CPU per request under wrk next to the floors (wrk is a
    Debian package; .ci/run installs it)."""
    out = _bench("bench.wrk.run", "--seconds", "1", "--connections", "2")
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 2 |")]
    names = [row[2].strip() for row in rows]
    pgmq = DEFAULT_PGMQ_SQL.is_file()
    assert names == [
        "bare ASGI (floor)",
        "bare ASGI, one write per response",
        "Starlette route + orjson",
        "FastAPI route + pydantic",
        "ASGI + INSERT per request (asyncpg pool)",
        "ASGI + INSERT per request (connection list)",
        "ASGI + INSERT per group (one writer)",
        "sluice publish b1",
        *(["pgmq send b1 (pgbench)"] if pgmq else []),
        "sluice pull + ack b1",
        *(["pgmq read + delete b1 (pgbench)"] if pgmq else []),
    ], out
    for row in rows:
        assert float(row[3].replace(",", "")) > 0 and row[9].strip() == "0", row
    by_name = {row[2].strip(): row for row in rows}
    # A consume row's messages were pulled and acked: half as many as its requests, or a
    # little more than half (the last pulls' acks may not have been sent when wrk stopped).
    consume = by_name["sluice pull + ack b1"]
    requests, messages = (float(consume[i].replace(",", "")) for i in (3, 4))
    assert 0.4 * requests <= messages <= 0.5 * requests + 1, consume
    assert float(by_name["sluice publish b1"][8]) > 0  # Postgres' CPU per message
    # The commit floors wrote to Postgres (a failed INSERT is a 500, counted as an error).
    for name in names:
        if name.startswith("ASGI + INSERT"):
            assert float(by_name[name][8]) > 0, by_name[name]
    if not pgmq:
        assert "pgmq rows skipped" in out


def test_wrk_bench_topics_smoke() -> None:
    """`--topics N`: Sluice's publish row spreads its requests over N topics, every one
    answered 201 (a missing topic would be a 404, counted as an error)."""
    out = _bench(
        "bench.wrk.run", "--seconds", "1", "--connections", "4", "--only-sluice",
        "--workloads", "publish", "--topics", "3",
    )  # fmt: skip
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| 4 |")]
    assert [row[2].strip() for row in rows] == ["sluice publish b1, 3 topics"], out
    [row] = rows
    assert float(row[3].replace(",", "")) > 0 and row[9].strip() == "0", row
    assert "--topics 3" in out


def test_bench_held_xmin_smoke(pg_server: str, tmp_path: Path) -> None:
    """The held-xmin workload end to end in its pg_dump form, seconds instead of minutes:
    per system a block before, the long transaction, a block after; rates, ratios, dead
    row versions, lock waits and the chart are all reported."""
    out = tmp_path / "bench.json"
    chart = tmp_path / "held.svg"
    command = [
        sys.executable, "-m", "bench.run",
        "--database-url", pg_server,
        "--systems", "sluice,raw,pgmq",
        "--workloads", "held-xmin",
        "--held-xmin-mode", "pgdump",
        "--held-xmin-block-seconds", "2", "--held-xmin-hold-seconds", "2",
        "--held-xmin-blocks-before", "1", "--held-xmin-blocks-after", "1",
        "--held-xmin-messages", "2000",
        "--held-xmin-chart", str(chart),
        "--timeout", "120",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=180, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Held xmin horizon (pgdump)" in done.stdout, done.stdout

    report = json.loads(out.read_text())
    systems = {"sluice", "raw"} | ({"pgmq"} if DEFAULT_PGMQ_SQL.is_file() else set())
    held = {s["system"]: s for s in report["held_xmin"]["systems"]}
    assert set(held) == systems, done.stdout
    for system, data in held.items():
        phases = [b["phase"] for b in data["blocks"]]
        assert phases[0] == "before" and "held" in phases and phases[-1] == "after", phases
        for block in data["blocks"]:
            assert block["errors"] == 0, (system, block)
            assert block["published"] == 2000 and block["publish_rate"] > 0, (system, block)
            assert block["drain_rate"] > 0, (system, block)
        summary = data["summary"]
        for what in ("publish", "drain"):
            assert summary[what]["held_median_ratio"] > 0, (system, summary)
            assert summary[what]["first_after_ratio"] > 0, (system, summary)
        assert summary["held_messages"] > 0 and summary["dead_growth"] is not None, summary
        assert summary["lock_waits_over_1s"] >= 0
        assert data["hold"]["locked_tables"], data["hold"]  # pgdump locked the tables
    # raw deletes every message it acks, so the hold leaves a dead version of each behind
    assert held["raw"]["summary"]["dead_per_100k_messages"] >= 50_000, held["raw"]["summary"]
    rows = {(r["workload"], r["system"]): r for r in report["results"]}
    assert rows[("held-xmin pgdump drain", "sluice")]["ratios"]["raw"] > 0
    assert chart.read_text().startswith("<svg") and report["held_xmin"]["chart"] == str(chart)


def test_bench_rabbitmq_reference(tmp_path: Path) -> None:
    """The optional RabbitMQ peer: measured when Debian's rabbitmq-server is installed (the
    bench starts and stops its own broker on 127.0.0.1), else skipped by the bench with a
    message saying how to install it. Either way the run ends cleanly."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "bench.run",
        "--systems", "rabbitmq", "--workloads", "publish,consume",
        "--seconds", "0.5", "--warmup", "0", "--repeat", "1",
        "--prefill", "300", "--prefill-single", "200", "--consume-cap", "20",
        "--timeout", "150", "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    if rabbitmq_server() is None:
        assert "skipping rabbitmq: rabbitmq-server is not installed" in done.stderr, done.stderr
        assert "apt install rabbitmq-server" in done.stderr
        return
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {(r["workload"], r["system"]): r for r in json.loads(out.read_text())["results"]}
    for workload in ("publish b100", "publish b1", "consume b100", "consume b1"):
        row = rows[(workload, "rabbitmq")]
        assert row["errors"] == 0 and row["rate"] > 0, row
    # the broker and its epmd were stopped with the run
    assert not [line for line in _processes() if "sluicebench" in line or "epmd -address" in line]


def _processes() -> list[str]:
    listing = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True)
    return listing.stdout.splitlines()


def test_bench_rounds_default_to_five_three_when_quick_and_at_least_one() -> None:
    assert parse_args([]).repeat == REPEAT == 5
    assert parse_args(["--quick"]).repeat == QUICK_REPEAT == 3
    assert parse_args(["--quick", "--repeat", "2"]).repeat == 2
    with pytest.raises(SystemExit):
        parse_args(["--repeat", "0"])


def test_bench_sdk_smoke(pg_server: str, tmp_path: Path) -> None:
    """The sdk workload: the SDK's Worker and Publisher rows beside the aiohttp client's,
    each with its ratio to it."""
    out = tmp_path / "bench.json"
    command = [
        sys.executable, "-m", "bench.run",
        "--database-url", pg_server,
        "--systems", "sluice", "--workloads", "sdk",
        # A publisher row counts the messages stored within the window: 0.5 s held none
        # once, on a machine running two test suites at once.
        "--seconds", "1.5", "--warmup", "0",
        "--prefill", "500", "--consume-cap", "20",
        "--repeat", "1", "--timeout", "150",
        "--json", str(out),
    ]  # fmt: skip
    done = subprocess.run(
        command, cwd=ROOT, capture_output=True, text=True, timeout=240, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    rows = {r["workload"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["consume b100 ack-in-pull"]["messages"] == 500
    for suffix in ("", " (aiohttp transport)"):
        worker = rows[f"sdk worker b100{suffix}"]
        assert worker["messages"] == 500 and worker["errors"] == 0, worker
        assert worker["ratios"]["ref"] > 0
        for name in ("sdk publisher linger 5ms", "sdk publisher linger 5ms x4 in flight"):
            row = rows[name + suffix]
            assert row["rate"] > 0 and row["errors"] == 0, row
            assert row["ratios"]["ref"] > 0
    assert rows["publish b100"]["rate"] > 0


def test_pgbench_rows_are_measured_and_read_from_pgbench(pg_server: str) -> None:
    """bench/wrk/pgbench.py, which drives pgmq where its install file is (not in a clean
    clone): the embedded Postgres' pgbench runs a script against a server given by URL, and
    its count, rate and failures are read back; the pgmq scripts quote the value."""
    from bench.wrk import pgbench

    assert pgbench.pgbench_binary().is_file()
    found = pgbench.measure(pg_server, None, "SELECT 1;\n", clients=2, seconds=1)
    assert found["messages"] > 0 and found["rate"] > 0 and found["errors"] == 0, found
    with pytest.raises(RuntimeError, match="pgbench failed"):
        pgbench.measure(pg_server, None, "SELECT no_such_column;\n", clients=1, seconds=1)
    scripts = pgbench.scripts("""{"it's": 1}""")
    assert """'{"it''s": 1}'::jsonb""" in scripts["publish"]
    assert "\\gset" in scripts["consume"] and "pgmq.delete" in scripts["consume"]
    env = pgbench._libpq_env("postgresql://bench:s3cret@127.0.0.1:6543/db1")
    assert (env["PGHOST"], env["PGPORT"], env["PGUSER"], env["PGPASSWORD"], env["PGDATABASE"]) == (
        "127.0.0.1",
        "6543",
        "bench",
        "s3cret",
        "db1",
    )


def test_publish_floor_smoke() -> None:
    """bench/publish_floor: the Python load generator's single-message publishes against the
    grouped commit floor, Sluice and pgmq, and a table of their medians."""
    out = _bench("bench.publish_floor", "--rounds", "1", "--seconds", "1")
    rows = {
        line.split("|")[1].strip(): line.split("|")
        for line in out.splitlines()
        if line.startswith("| ") and not line.startswith("| server")
    }
    expected = {"grouped commit floor", "sluice", *(["pgmq"] if DEFAULT_PGMQ_SQL.is_file() else [])}
    assert set(rows) == expected, out
    for row in rows.values():
        assert float(row[2].replace(",", "")) > 0, row
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == len(expected), out
    assert all(", 0 errors" in line for line in rounds), out


def test_consume_floor_smoke() -> None:
    """bench/consume_floor: the bench's consumers (pull, then ack) against the consume floor
    (bare ASGI in front of the raw baseline's SQL), Sluice and pgmq, b100 drained and b1 in
    a window, and a table of their medians."""
    out = _bench(
        "bench.consume_floor", "--rounds", "1", "--seconds", "0.5",
        # b1's window comes after a 1-s warm-up: enough left for it at ~2,000 msgs/s
        "--prefill", "300", "--prefill-single", "6000",
    )  # fmt: skip
    systems = {"consume floor", "sluice", *(["pgmq"] if DEFAULT_PGMQ_SQL.is_file() else [])}
    rows = [line.split("|") for line in out.splitlines() if line.startswith("| consume b")]
    assert {(row[1].strip(), row[2].strip()) for row in rows} == {
        (f"consume b{batch}", system) for batch in (100, 1) for system in systems
    }, out
    for row in rows:
        assert float(row[3].replace(",", "")) > 0, row
    rounds = [line for line in out.splitlines() if line.startswith("round ")]
    assert len(rounds) == 2 * len(systems), out
    assert all(", 0 errors" in line for line in rounds), out


def test_wrk_statements_smoke() -> None:
    """bench/wrk/statements: Postgres' time per statement under wrk, from pg_stat_statements
    loaded into a restarted bench Postgres; the statements inside Sluice's functions count
    on their own (track = all)."""
    out = _bench("bench.wrk.statements", "--seconds", "1", "--top", "40")
    assert re.search(r"^[\d,]+ requests, [\d,]+/s, 0 errors$", out, re.M), out
    rows = [line.split(" | ") for line in out.splitlines() if re.match(r"\| [\d,]+ \|", line)]
    top_level = [row[-1] for row in rows if row[4] == "yes"]
    nested = [row[-1] for row in rows if row[4] == "no"]
    assert any("sluice.publish_topics" in statement for statement in top_level), out
    assert any("INSERT INTO sluice.messages" in statement for statement in nested), out
    assert all(float(row[1]) >= 0 and float(row[2]) >= 0 for row in rows), out


def test_notify_lock_smoke() -> None:
    """bench/notify_lock: pgbench publishing through sluice.publish_batch with nobody waiting
    and with every bucket declared, then sending through the SQL API with a server relaying
    (its relay declaring when idle, or the bench holding the relays' key): a table of the
    two rates per client count for each, and every sent message relayed."""
    out = _bench("bench.notify_lock", "--clients", "2", "--seconds", "1", "--rounds", "1")
    rows = [line.split("|") for line in out.splitlines() if re.match(r"\| \d+ \|", line)]
    assert [row[1].strip() for row in rows] == ["2", "2"], out
    for row in rows:
        assert float(row[2].replace(",", "")) > 0 and float(row[3].replace(",", "")) > 0, out
    assert float(rows[1][5]) < 60, out
