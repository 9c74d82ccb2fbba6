"""`python -m bench.sqs`: the SQS endpoint through boto3, against Sluice and against moto's
server in the same run, and Sluice's native API for the same messages.

Two phases per system, one client thread, batches of 10 (SQS's largest):
- send:  SendMessageBatch (native: POST /v1/topics/{t}/messages with 10 messages)
- drain: ReceiveMessage(10) + DeleteMessageBatch (native: pull 10 + ack)

Reported: messages per second, and the Sluice server's CPU seconds per 1000 messages (the
cost the issue compares: SQS path <= 1.5x the native API). boto3's own client cost (signing,
parsing, MD5 checks) shows in the rates, not in the server's CPU.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from tempfile import TemporaryDirectory
from typing import Any

import boto3
import httpx
from botocore.config import Config

from bench.infra import Postgres, SluiceServer, free_port, tree_cpu_seconds


def _boto(endpoint: str) -> Any:
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="bench",
        aws_secret_access_key="bench",
        config=Config(retries={"max_attempts": 1}, max_pool_connections=4),
    )


def _measure(
    name: str, messages: int, work: Callable[[], None], server_pid: int | None
) -> dict[str, Any]:
    cpu_before = tree_cpu_seconds(server_pid) if server_pid else None
    started = time.perf_counter()
    work()
    seconds = time.perf_counter() - started
    cpu_after = tree_cpu_seconds(server_pid) if server_pid else None
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    return {
        "phase": name,
        "rate": messages / seconds,
        "server_cpu_ms_per_1000": None if cpu is None else 1e6 * cpu / messages,
    }


def sqs_phases(client: Any, messages: int, size: int, server_pid: int | None) -> list[dict]:
    url = client.create_queue(QueueName=f"bench-{uuid.uuid4().hex[:8]}")["QueueUrl"]
    body = "x" * size

    def send() -> None:
        for start in range(0, messages, 10):
            entries = [
                {"Id": str(i), "MessageBody": body} for i in range(min(10, messages - start))
            ]
            answer = client.send_message_batch(QueueUrl=url, Entries=entries)
            assert not answer.get("Failed"), answer["Failed"]

    def drain() -> None:
        left = messages
        while left > 0:
            got = client.receive_message(
                QueueUrl=url, MaxNumberOfMessages=10, WaitTimeSeconds=1
            ).get("Messages", [])
            if not got:
                raise RuntimeError(f"queue ran dry with {left} messages left")
            entries = [
                {"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]} for i, m in enumerate(got)
            ]
            answer = client.delete_message_batch(QueueUrl=url, Entries=entries)
            assert not answer.get("Failed"), answer["Failed"]
            left -= len(got)

    return [
        _measure("send", messages, send, server_pid),
        _measure("drain", messages, drain, server_pid),
    ]


def native_phases(base: str, messages: int, size: int, server_pid: int | None) -> list[dict]:
    topic = f"bench-native-{uuid.uuid4().hex[:8]}"
    body = "x" * size
    with httpx.Client(base_url=base, timeout=30) as http:
        http.put(f"/v1/topics/{topic}", json={}).raise_for_status()
        sub = f"/v1/topics/{topic}/subscriptions/s"
        http.put(sub, json={"start": "earliest"}).raise_for_status()

        def send() -> None:
            for start in range(0, messages, 10):
                batch = [{"value": body} for _ in range(min(10, messages - start))]
                http.post(
                    f"/v1/topics/{topic}/messages", json={"messages": batch}
                ).raise_for_status()

        def drain() -> None:
            left = messages
            while left > 0:
                got = http.post(sub + "/pull", json={"max_messages": 10, "wait_seconds": 1})
                pulled = got.json()["messages"]
                if not pulled:
                    raise RuntimeError(f"subscription ran dry with {left} messages left")
                acked = http.post(sub + "/ack", json={"receipts": [m["receipt"] for m in pulled]})
                assert acked.json()["acked"] == len(pulled)
                left -= len(pulled)

        return [
            _measure("send", messages, send, server_pid),
            _measure("drain", messages, drain, server_pid),
        ]


async def main(args: argparse.Namespace) -> None:
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # moto's access log

    postgres = Postgres(args.database_url)
    postgres.start()
    rows: list[tuple[str, dict]] = []
    with TemporaryDirectory(prefix="sluice-bench-sqs-") as logs:
        url = await postgres.create_database(f"bench_sqs_{uuid.uuid4().hex[:8]}")
        server = SluiceServer(url, 1, Path(logs))
        await server.start()
        moto_port = free_port()
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=moto_port, verbose=False)
        moto.start()
        try:
            pid = server.pid
            for _ in range(args.repeat):
                for row in native_phases(server.base_url, args.messages, args.size, pid):
                    rows.append(("sluice native", row))
                client = _boto(server.base_url + "/sqs")
                for row in sqs_phases(client, args.messages, args.size, pid):
                    rows.append(("sluice sqs", row))
                for row in sqs_phases(
                    _boto(f"http://127.0.0.1:{moto_port}"), args.messages, args.size, None
                ):
                    rows.append(("moto sqs", row))
        finally:
            moto.stop()
            await server.stop()
            await postgres.drop_created()
            postgres.stop()
    print(f"{args.messages} messages of {args.size} B, batches of 10, {args.repeat} round(s)")
    print(f"| {'system':<14} | {'phase':<6} | {'msgs/s':>8} | {'server CPU ms / 1000 msgs':>26} |")
    print(f"|{'-' * 16}|{'-' * 8}|{'-' * 10}|{'-' * 28}|")
    best: dict[tuple[str, str], dict] = {}
    for system, row in rows:
        key = (system, row["phase"])
        if key not in best or row["rate"] > best[key]["rate"]:
            best[key] = row
    for (system, phase), row in best.items():
        cpu = row["server_cpu_ms_per_1000"]
        shown = "-" if cpu is None else f"{cpu:.0f}"
        print(f"| {system:<14} | {phase:<6} | {row['rate']:>8.0f} | {shown:>26} |")
    for phase in ("send", "drain"):
        sqs_row, native = best[("sluice sqs", phase)], best[("sluice native", phase)]
        if sqs_row["server_cpu_ms_per_1000"] and native["server_cpu_ms_per_1000"]:
            ratio = sqs_row["server_cpu_ms_per_1000"] / native["server_cpu_ms_per_1000"]
            print(f"{phase}: Sluice SQS server CPU per message = {ratio:.2f}x native")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.sqs", description=__doc__)
    p.add_argument("--database-url", help="an existing Postgres; default: embedded")
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", type=int, default=256, help="body bytes")
    p.add_argument("--repeat", type=int, default=1, help="rounds; the best of each is shown")
    return p.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse_args()))
