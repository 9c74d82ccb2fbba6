"""The AWS CLI (awscli from PyPI, in the venv) against the SQS endpoint: a second real
client, with its own request building and output."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.sqs_support import queue_name, sqs, sqs_server

__all__ = ["sqs", "sqs_server"]


def _aws(endpoint: str, *args: str) -> dict:
    aws = shutil.which("aws", path=str(Path(sys.executable).parent)) or "aws"
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": "AKIDEXAMPLE",
        "AWS_SECRET_ACCESS_KEY": "secret",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    }
    result = subprocess.run(
        [aws, "sqs", *args, "--endpoint-url", endpoint, "--output", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout) if result.stdout.strip() else {}


def test_aws_cli_round_trip(sqs_server, sqs):
    endpoint = sqs_server.base_url + "/sqs"
    name = queue_name("cli")
    url = _aws(endpoint, "create-queue", "--queue-name", name)["QueueUrl"]
    assert url.endswith(name)
    sent = _aws(
        endpoint,
        "send-message",
        "--queue-url",
        url,
        "--message-body",
        "from the cli",
        "--message-attributes",
        '{"k": {"DataType": "String", "StringValue": "v"}}',
    )
    got = _aws(
        endpoint,
        "receive-message",
        "--queue-url",
        url,
        "--message-attribute-names",
        "All",
        "--wait-time-seconds",
        "1",
    )["Messages"]
    assert got[0]["MessageId"] == sent["MessageId"]
    assert got[0]["Body"] == "from the cli"
    assert got[0]["MessageAttributes"]["k"]["StringValue"] == "v"
    _aws(
        endpoint, "delete-message", "--queue-url", url, "--receipt-handle", got[0]["ReceiptHandle"]
    )
    attributes = _aws(
        endpoint, "get-queue-attributes", "--queue-url", url, "--attribute-names", "All"
    )["Attributes"]
    assert attributes["ApproximateNumberOfMessages"] == "0"
    assert attributes["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert url in _aws(endpoint, "list-queues", "--queue-name-prefix", name)["QueueUrls"]
    _aws(endpoint, "delete-queue", "--queue-url", url)
    assert not any(u.endswith(name) for u in sqs.list_queues().get("QueueUrls", []))
