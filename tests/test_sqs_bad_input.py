"""Bad input to every SQS action answers an SQS error (4xx), never a 500: wrong types,
wrong shapes, out-of-range numbers, for each parameter the actions read."""

from __future__ import annotations

import httpx

from sluice.api.routes.sqs import ACTIONS
from tests.sqs_support import queue_name, sqs, sqs_server

__all__ = ["sqs", "sqs_server"]

ODD_VALUES = [None, 5, -1, 10**20, 1.5, True, "", "x", [], [1], ["x"], {}, {"a": 1}, {"a": None}]
PARAMETERS = [
    "QueueName", "QueueUrl", "Attributes", "tags", "Tags", "TagKeys", "AttributeNames",
    "MessageSystemAttributeNames", "MessageAttributeNames", "MaxNumberOfMessages",
    "WaitTimeSeconds", "VisibilityTimeout", "MessageBody", "DelaySeconds",
    "MessageAttributes", "MessageSystemAttributes", "MessageGroupId",
    "MessageDeduplicationId", "ReceiptHandle", "Entries", "QueueNamePrefix", "MaxResults",
    "NextToken",
]  # fmt: skip


def test_no_action_answers_500_to_odd_parameters(sqs, sqs_server):
    url = sqs.create_queue(QueueName=queue_name("odd"))["QueueUrl"]
    fifo = sqs.create_queue(
        QueueName=queue_name("odd", fifo=True), Attributes={"FifoQueue": "true"}
    )["QueueUrl"]
    endpoint = sqs_server.base_url + "/sqs"
    failures = []
    with httpx.Client(timeout=30) as http:
        for action in ACTIONS:
            if action in ("DeleteQueue", "PurgeQueue"):
                continue  # they would take the queue away from the others
            # FIFO queues validate sends differently; the rest is the same for both.
            queues = (url, fifo) if action.startswith("SendMessage") else (url,)
            for queue in queues:
                base = {"QueueUrl": queue, "QueueName": queue.rsplit("/", 1)[1]}
                for parameter in PARAMETERS:
                    for value in ODD_VALUES:
                        if parameter == "WaitTimeSeconds" and value == 5:
                            continue  # valid: a long poll, not bad input
                        if action == "CreateQueue" and parameter == "QueueName":
                            value = f"{value}-odd" if value == "x" else value
                        body = {"WaitTimeSeconds": 0, **base, parameter: value}
                        if parameter == "Entries" and isinstance(value, list):
                            body[parameter] = [{"Id": "a", "MessageBody": value}, value]
                        answer = http.post(
                            endpoint,
                            headers={
                                "Content-Type": "application/x-amz-json-1.0",
                                "X-Amz-Target": f"AmazonSQS.{action}",
                            },
                            json=body,
                        )
                        if answer.status_code >= 500:
                            failures.append((action, parameter, value, answer.text[:200]))
    assert not failures, failures[:10]
    # The queues are still usable.
    sqs.send_message(QueueUrl=url, MessageBody="still fine")
