"""SQS endpoint, what takes real time: a long poll woken by a send, visibility timeouts
that run out, ChangeMessageVisibility, and redrive after the last timeout (xdist group
"timing": kept apart from other load)."""

from __future__ import annotations

import json
import threading
import time

from tests.sqs_support import queue_name, sqs, sqs_server

__all__ = ["sqs", "sqs_server"]


def test_long_poll_is_woken_by_a_send(sqs):
    url = sqs.create_queue(QueueName=queue_name())["QueueUrl"]
    outcome: dict[str, object] = {}

    def receive() -> None:
        started = time.monotonic()
        answer = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=15)
        outcome["seconds"] = time.monotonic() - started
        outcome["messages"] = answer.get("Messages", [])

    waiter = threading.Thread(target=receive)
    waiter.start()
    time.sleep(0.5)
    sqs.send_message(QueueUrl=url, MessageBody="wake up")
    waiter.join(20)
    assert [m["Body"] for m in outcome["messages"]] == ["wake up"]
    assert outcome["seconds"] < 5, outcome  # well before WaitTimeSeconds


def test_long_poll_by_queue_default_ends_empty(sqs):
    url = sqs.create_queue(
        QueueName=queue_name(), Attributes={"ReceiveMessageWaitTimeSeconds": "1"}
    )["QueueUrl"]
    started = time.monotonic()
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
    assert 0.9 <= time.monotonic() - started < 5


def test_visibility_timeout_expires_and_the_message_comes_back(sqs):
    url = sqs.create_queue(QueueName=queue_name())["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="retry me")
    first = sqs.receive_message(QueueUrl=url, VisibilityTimeout=1)["Messages"][0]
    assert "Messages" not in sqs.receive_message(QueueUrl=url)
    started = time.monotonic()
    again = sqs.receive_message(
        QueueUrl=url, WaitTimeSeconds=10, MessageSystemAttributeNames=["ApproximateReceiveCount"]
    )["Messages"][0]
    assert time.monotonic() - started < 5
    assert again["MessageId"] == first["MessageId"]
    assert again["Attributes"]["ApproximateReceiveCount"] == "2"
    # The first receipt is stale now: deleting with it does nothing (and succeeds).
    sqs.delete_message(QueueUrl=url, ReceiptHandle=first["ReceiptHandle"])
    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=again["ReceiptHandle"], VisibilityTimeout=0
    )
    third = sqs.receive_message(QueueUrl=url, WaitTimeSeconds=5)["Messages"][0]
    assert third["MessageId"] == first["MessageId"]


def test_change_message_visibility_extends(sqs):
    url = sqs.create_queue(QueueName=queue_name())["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="slow work")
    got = sqs.receive_message(QueueUrl=url, VisibilityTimeout=1)["Messages"][0]
    sqs.change_message_visibility(
        QueueUrl=url, ReceiptHandle=got["ReceiptHandle"], VisibilityTimeout=30
    )
    assert "Messages" not in sqs.receive_message(QueueUrl=url, WaitTimeSeconds=2)
    sqs.delete_message(QueueUrl=url, ReceiptHandle=got["ReceiptHandle"])
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessagesNotVisible"] == "0"
    assert attrs["ApproximateNumberOfMessages"] == "0"


def test_redrive_after_the_last_visibility_timeout(sqs):
    dlq = sqs.create_queue(QueueName=queue_name("dlq"))["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    src = sqs.create_queue(
        QueueName=queue_name("src"),
        Attributes={
            "RedrivePolicy": json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 1}),
            "VisibilityTimeout": "1",
        },
    )["QueueUrl"]
    sqs.send_message(QueueUrl=src, MessageBody="dies once")
    assert sqs.receive_message(QueueUrl=src)["Messages"][0]["Body"] == "dies once"
    assert "Messages" not in sqs.receive_message(QueueUrl=src, WaitTimeSeconds=2)
    dead = sqs.receive_message(QueueUrl=dlq, WaitTimeSeconds=5)["Messages"]
    assert [m["Body"] for m in dead] == ["dies once"]
