"""examples/sdk: the publisher and the worker run as they are (subprocesses, only the SDK on
their path) against a real server: every order processed once, a malformed one parked,
and the worker stops on SIGTERM with exit status 0."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from tests.conftest import ROOT, unique
from tests.sdk_support import sc, server  # noqa: F401 (the fixture)

EXAMPLES = ROOT / "examples" / "sdk"


def _env(base_url: str) -> dict[str, str]:
    return {
        **os.environ,
        "PYTHONPATH": str(ROOT / "clients" / "python"),
        "SLUICE_URL": base_url,
        "PYTHONUNBUFFERED": "1",
    }


def test_the_publisher_and_worker_examples_run_as_they_are(server):
    topic = unique("example")
    count = 300
    published = subprocess.run(
        [sys.executable, str(EXAMPLES / "publisher.py"), "--topic", topic, "--count", str(count)],
        capture_output=True,
        text=True,
        env=_env(server.base_url),
        timeout=60,
        check=False,
    )
    assert published.returncode == 0, published.stderr
    assert published.stdout.strip() == f"published {count} orders to {topic}, offsets 0..299"
    with sc.Client(server.base_url) as c:
        c.publish(topic, [{"value": "not an order"}])  # the worker parks this one

    worker = subprocess.Popen(
        [sys.executable, str(EXAMPLES / "worker.py"), "--topic", topic],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(server.base_url),
    )
    lines: list[str] = []
    try:
        assert worker.stdout is not None
        deadline = time.monotonic() + 60
        while sum(line.startswith("processed") for line in lines) < count:
            assert time.monotonic() < deadline, lines[-5:]
            line = worker.stdout.readline()
            assert line, f"the worker ended: {worker.stderr.read() if worker.stderr else ''}"
            lines.append(line)
        with sc.Client(server.base_url) as c:
            deadline = time.monotonic() + 20
            while (sub := c.get_subscription(topic, "billing")).lag > 0:
                assert time.monotonic() < deadline, sub
                time.sleep(0.1)
        worker.send_signal(signal.SIGTERM)
        rest, err = worker.communicate(timeout=30)
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait(5)
    assert worker.returncode == 0, err
    ids = sorted(int(line.split()[2]) for line in lines if line.startswith("processed"))
    assert ids == list(range(count))  # each once
    assert rest.strip().splitlines()[-1] == (
        f"stopped: {count} processed, 0 failed, 1 dead-lettered, {count} acked"
    )
    with sc.Client(server.base_url) as c:
        parked = c.dead_letters(topic, "billing").messages
        assert [m.value for m in parked] == ["not an order"]
        assert sub.dead_lettered == 1 and sub.in_flight == 0
