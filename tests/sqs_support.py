"""What the SQS endpoint's tests share: one real `sluice serve` per module (boto3 needs a
real HTTP server) and boto3 clients pointed at it, unchanged but for endpoint_url."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import boto3
import pytest
from botocore.config import Config

from tests.conftest import ServerProcess, running_server

__all__ = ["boto_client", "queue_name", "sqs", "sqs_server"]

# Dummy credentials: the endpoint is open while no API key exists.
OPEN_CREDENTIALS = {"aws_access_key_id": "AKIDEXAMPLE", "aws_secret_access_key": "secret"}


def boto_client(endpoint: str, **credentials: str):
    """A boto3 SQS client as an application would build it; no retries, so a refusal
    shows at once."""
    return boto3.client(
        "sqs",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=Config(retries={"max_attempts": 1, "mode": "standard"}, read_timeout=30),
        **(credentials or OPEN_CREDENTIALS),
    )


def queue_name(prefix: str = "q", fifo: bool = False) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}" + (".fifo" if fifo else "")


@pytest.fixture(scope="module")
def sqs_server(db_url: str) -> Iterator[ServerProcess]:
    yield from running_server(db_url)


@pytest.fixture(scope="module")
def sqs(sqs_server: ServerProcess):
    return boto_client(sqs_server.base_url + "/sqs")
