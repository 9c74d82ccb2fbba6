"""SQS endpoint, message actions through boto3 unchanged (boto3 checks every MD5 it gets):
send and receive with attributes, batches with partial failures, delete, visibility,
FIFO ordering and deduplication, delay, redrive to a dead-letter queue, purge."""

from __future__ import annotations

import base64
import hashlib
import json
import time

import botocore.exceptions
import httpx
import pytest

from tests.sqs_support import queue_name, sqs, sqs_server

__all__ = ["sqs", "sqs_server"]

ATTRIBUTES = {
    "text": {"DataType": "String", "StringValue": "héllo"},
    "count": {"DataType": "Number", "StringValue": "42"},
    "custom": {"DataType": "Number.int", "StringValue": "-7"},
    "blob": {"DataType": "Binary", "BinaryValue": b"\x00\x01\xff"},
    "tagged": {"DataType": "String.json", "StringValue": '{"a": 1}'},
}


def _code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["QueryErrorCode"]


def _queue(sqs, fifo: bool = False, **attributes: str) -> str:
    if fifo:
        attributes["FifoQueue"] = "true"
    return sqs.create_queue(QueueName=queue_name(fifo=fifo), Attributes=attributes)["QueueUrl"]


def _count(sqs, url: str, name: str = "ApproximateNumberOfMessages") -> int:
    return int(sqs.get_queue_attributes(QueueUrl=url, AttributeNames=[name])["Attributes"][name])


def test_send_receive_delete_with_attributes(sqs):
    url = _queue(sqs)
    sent = sqs.send_message(QueueUrl=url, MessageBody="body ✓", MessageAttributes=ATTRIBUTES)
    assert sent["MD5OfMessageBody"] == hashlib.md5("body ✓".encode()).hexdigest()
    assert len(sent["MD5OfMessageAttributes"]) == 32
    got = sqs.receive_message(
        QueueUrl=url,
        MessageAttributeNames=["All"],
        MessageSystemAttributeNames=["All"],
    )["Messages"]
    assert len(got) == 1
    message = got[0]
    assert message["MessageId"] == sent["MessageId"]
    assert message["Body"] == "body ✓"
    assert message["MessageAttributes"] == ATTRIBUTES
    assert message["MD5OfMessageAttributes"] == sent["MD5OfMessageAttributes"]
    system = message["Attributes"]
    assert system["ApproximateReceiveCount"] == "1"
    assert abs(int(system["SentTimestamp"]) - time.time() * 1000) < 60_000
    assert int(system["ApproximateFirstReceiveTimestamp"]) >= int(system["SentTimestamp"])
    assert system["SenderId"]
    assert _count(sqs, url, "ApproximateNumberOfMessagesNotVisible") == 1
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert _count(sqs, url, "ApproximateNumberOfMessagesNotVisible") == 0
    # Deleting again (a handle of an attempt that is over) succeeds without effect.
    sqs.delete_message(QueueUrl=url, ReceiptHandle=message["ReceiptHandle"])
    assert "Messages" not in sqs.receive_message(QueueUrl=url)


def test_attribute_name_selection(sqs):
    url = _queue(sqs)
    dotted = {
        "app.a": {"DataType": "String", "StringValue": "1"},
        "app.b": {"DataType": "String", "StringValue": "2"},
        "apple": {"DataType": "String", "StringValue": "3"},
    }
    sqs.send_message(QueueUrl=url, MessageBody="x", MessageAttributes={**ATTRIBUTES, **dotted})
    got = sqs.receive_message(
        QueueUrl=url,
        # "app.*": names that start with "app." (as SQS: the prefix ends at the dot).
        MessageAttributeNames=["text", "app.*"],
        MessageSystemAttributeNames=["ApproximateReceiveCount"],
        VisibilityTimeout=0,
    )["Messages"][0]
    assert set(got["MessageAttributes"]) == {"text", "app.a", "app.b"}
    assert got["Attributes"] == {"ApproximateReceiveCount": "1"}
    bare = sqs.receive_message(QueueUrl=url)["Messages"][0]
    assert "MessageAttributes" not in bare and "Attributes" not in bare
    assert "MD5OfMessageAttributes" not in bare
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.receive_message(QueueUrl=url, MessageSystemAttributeNames=["Nope"])
    assert _code(exc) == "InvalidAttributeName"


def test_invalid_messages_are_refused(sqs):
    url = _queue(sqs, MaximumMessageSize="1024")
    cases = [
        ({"MessageBody": "x" * 1025}, "InvalidParameterValue"),
        ({"MessageBody": "bad \x01 char"}, "InvalidMessageContents"),
        ({"MessageBody": "x", "DelaySeconds": 901}, "InvalidParameterValue"),
        ({"MessageBody": "x", "MessageDeduplicationId": "d"}, "InvalidParameterValue"),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {"n": {"DataType": "Number", "StringValue": "abc"}},
            },
            "InvalidParameterValue",
        ),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {"n": {"DataType": "Weird", "StringValue": "a"}},
            },
            "InvalidParameterValue",
        ),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {"AWS.x": {"DataType": "String", "StringValue": "a"}},
            },
            "InvalidParameterValue",
        ),
        (
            {
                "MessageBody": "x",
                "MessageAttributes": {
                    f"a{i}": {"DataType": "String", "StringValue": "v"} for i in range(11)
                },
            },
            "InvalidParameterValue",
        ),
    ]
    for params, code in cases:
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            sqs.send_message(QueueUrl=url, **params)
        assert _code(exc) == code, params
    assert _count(sqs, url) == 0
    for handle in ("garbage", "A" * 48 + "!"):
        with pytest.raises(sqs.exceptions.ReceiptHandleIsInvalid):
            sqs.delete_message(QueueUrl=url, ReceiptHandle=handle)
        with pytest.raises(sqs.exceptions.ReceiptHandleIsInvalid):
            sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=1)
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=11)
    assert _code(exc) == "InvalidParameterValue"


def test_send_batch_with_partial_failure(sqs):
    url = _queue(sqs)
    answer = sqs.send_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "a", "MessageBody": "one"},
            {"Id": "b", "MessageBody": "bad \x02"},
            {"Id": "c", "MessageBody": "three", "MessageAttributes": ATTRIBUTES},
            {"Id": "d", "MessageBody": "four", "DelaySeconds": 1000},
        ],
    )
    assert [s["Id"] for s in answer["Successful"]] == ["a", "c"]
    assert {f["Id"]: f["Code"] for f in answer["Failed"]} == {
        "b": "InvalidMessageContents",
        "d": "InvalidParameterValue",
    }
    assert all(f["SenderFault"] for f in answer["Failed"])
    bodies = set()
    for _ in range(5):
        for m in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", []):
            bodies.add(m["Body"])
        if len(bodies) == 2:
            break
    assert bodies == {"one", "three"}


def test_batch_request_errors(sqs):
    url = _queue(sqs)
    with pytest.raises(sqs.exceptions.TooManyEntriesInBatchRequest):
        sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": "x"} for i in range(11)]
        )
    with pytest.raises(sqs.exceptions.BatchEntryIdsNotDistinct):
        sqs.send_message_batch(
            QueueUrl=url, Entries=[{"Id": "a", "MessageBody": "x"}, {"Id": "a", "MessageBody": "y"}]
        )
    with pytest.raises(sqs.exceptions.EmptyBatchRequest):
        sqs.delete_message_batch(QueueUrl=url, Entries=[])
    with pytest.raises(sqs.exceptions.InvalidBatchEntryId):
        sqs.send_message_batch(QueueUrl=url, Entries=[{"Id": "a.b", "MessageBody": "x"}])
    with pytest.raises(sqs.exceptions.BatchRequestTooLong):
        sqs.send_message_batch(
            QueueUrl=url,
            Entries=[{"Id": str(i), "MessageBody": "x" * 200_000} for i in range(6)],
        )
    assert _count(sqs, url) == 0


def test_delete_and_visibility_batches(sqs):
    url = _queue(sqs)
    sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": f"m{i}"} for i in range(3)]
    )
    got = []
    while len(got) < 3:
        got += sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10).get("Messages", [])
    deleted = sqs.delete_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "ok", "ReceiptHandle": got[0]["ReceiptHandle"]},
            {"Id": "bad", "ReceiptHandle": "nope"},
        ],
    )
    assert [s["Id"] for s in deleted["Successful"]] == ["ok"]
    assert [(f["Id"], f["Code"]) for f in deleted["Failed"]] == [("bad", "ReceiptHandleIsInvalid")]
    changed = sqs.change_message_visibility_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "now", "ReceiptHandle": got[1]["ReceiptHandle"], "VisibilityTimeout": 0},
            {"Id": "later", "ReceiptHandle": got[2]["ReceiptHandle"], "VisibilityTimeout": 600},
            {"Id": "gone", "ReceiptHandle": got[0]["ReceiptHandle"], "VisibilityTimeout": 5},
            {"Id": "bad", "ReceiptHandle": "nope", "VisibilityTimeout": 5},
        ],
    )
    assert sorted(s["Id"] for s in changed["Successful"]) == ["later", "now"]
    assert {f["Id"]: f["Code"] for f in changed["Failed"]} == {
        "gone": "MessageNotInflight",
        "bad": "ReceiptHandleIsInvalid",
    }
    again = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in again] == [got[1]["Body"]]
    assert again[0]["ReceiptHandle"] != got[1]["ReceiptHandle"]


def test_change_visibility_of_a_deleted_message_is_not_in_flight(sqs):
    url = _queue(sqs)
    sqs.send_message(QueueUrl=url, MessageBody="x")
    handle = sqs.receive_message(QueueUrl=url)["Messages"][0]["ReceiptHandle"]
    sqs.delete_message(QueueUrl=url, ReceiptHandle=handle)
    with pytest.raises(sqs.exceptions.MessageNotInflight):
        sqs.change_message_visibility(QueueUrl=url, ReceiptHandle=handle, VisibilityTimeout=5)


def test_fifo_groups_order_and_deduplication(sqs):
    url = _queue(sqs, fifo=True)
    first = sqs.send_message(
        QueueUrl=url, MessageBody="a1", MessageGroupId="a", MessageDeduplicationId="d1"
    )
    duplicate = sqs.send_message(
        QueueUrl=url, MessageBody="a1 again", MessageGroupId="a", MessageDeduplicationId="d1"
    )
    assert duplicate["MessageId"] == first["MessageId"]
    assert duplicate["SequenceNumber"] == first["SequenceNumber"]
    batch = sqs.send_message_batch(
        QueueUrl=url,
        Entries=[
            {"Id": "1", "MessageBody": "a2", "MessageGroupId": "a", "MessageDeduplicationId": "d2"},
            {"Id": "2", "MessageBody": "b1", "MessageGroupId": "b", "MessageDeduplicationId": "d3"},
            {"Id": "3", "MessageBody": "nogroup", "MessageDeduplicationId": "d4"},
            {"Id": "4", "MessageBody": "nodedup", "MessageGroupId": "b"},
        ],
    )
    assert {f["Id"]: f["Code"] for f in batch["Failed"]} == {
        "3": "MissingParameter",
        "4": "InvalidParameterValue",
    }
    assert int(batch["Successful"][1]["SequenceNumber"]) > int(first["SequenceNumber"])
    # One message per group is in flight at a time, in order within the group.
    got = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["All"]
    )["Messages"]
    assert sorted(m["Body"] for m in got) == ["a1", "b1"]
    by_body = {m["Body"]: m for m in got}
    assert by_body["a1"]["Attributes"]["MessageGroupId"] == "a"
    assert by_body["a1"]["Attributes"]["MessageDeduplicationId"] == "d1"
    assert by_body["a1"]["Attributes"]["SequenceNumber"] == first["SequenceNumber"]
    assert "Messages" not in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)
    sqs.delete_message(QueueUrl=url, ReceiptHandle=by_body["a1"]["ReceiptHandle"])
    nxt = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in nxt] == ["a2"]
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.send_message(
            QueueUrl=url,
            MessageBody="x",
            MessageGroupId="a",
            MessageDeduplicationId="d9",
            DelaySeconds=5,
        )
    assert _code(exc) == "InvalidParameterValue"


def test_fifo_content_based_deduplication(sqs):
    url = _queue(sqs, fifo=True, ContentBasedDeduplication="true")
    one = sqs.send_message(QueueUrl=url, MessageBody="same", MessageGroupId="g")
    two = sqs.send_message(QueueUrl=url, MessageBody="same", MessageGroupId="g")
    assert one["MessageId"] == two["MessageId"]
    got = sqs.receive_message(
        QueueUrl=url, MaxNumberOfMessages=10, MessageSystemAttributeNames=["MessageDeduplicationId"]
    )["Messages"]
    assert len(got) == 1
    assert got[0]["Attributes"]["MessageDeduplicationId"] == hashlib.sha256(b"same").hexdigest()


def test_delay_seconds_queue_default_and_per_message(sqs):
    url = _queue(sqs, DelaySeconds="600")
    sqs.send_message(QueueUrl=url, MessageBody="queue default")
    sqs.send_message(QueueUrl=url, MessageBody="now", DelaySeconds=0)
    got = sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)["Messages"]
    assert [m["Body"] for m in got] == ["now"]
    assert _count(sqs, url, "ApproximateNumberOfMessagesDelayed") == 1


def test_purge_queue(sqs):
    url = _queue(sqs)
    sqs.send_message_batch(
        QueueUrl=url, Entries=[{"Id": str(i), "MessageBody": "x"} for i in range(5)]
    )
    sqs.receive_message(QueueUrl=url)  # one in flight too
    sqs.purge_queue(QueueUrl=url)
    assert _count(sqs, url) == 0
    assert _count(sqs, url, "ApproximateNumberOfMessagesNotVisible") == 0
    assert "Messages" not in sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10)
    sqs.send_message(QueueUrl=url, MessageBody="after purge")
    assert sqs.receive_message(QueueUrl=url)["Messages"][0]["Body"] == "after purge"


def test_redrive_to_a_dead_letter_queue(sqs):
    dlq = _queue(sqs)
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": 2})
    src = _queue(sqs, RedrivePolicy=policy)
    sent = sqs.send_message(QueueUrl=src, MessageBody="poison", MessageAttributes=ATTRIBUTES)
    for attempt in (1, 2):
        got = sqs.receive_message(QueueUrl=src, MessageSystemAttributeNames=["All"])["Messages"]
        assert got[0]["Attributes"]["ApproximateReceiveCount"] == str(attempt)
        # Give it back at once, as a failed consumer whose timeout ran out would.
        sqs.change_message_visibility(
            QueueUrl=src, ReceiptHandle=got[0]["ReceiptHandle"], VisibilityTimeout=0
        )
    assert "Messages" not in sqs.receive_message(QueueUrl=src)
    dead = sqs.receive_message(QueueUrl=dlq, MessageAttributeNames=["All"], WaitTimeSeconds=5)[
        "Messages"
    ]
    assert dead[0]["Body"] == "poison"
    assert dead[0]["MessageId"] == sent["MessageId"]  # SQS keeps the id in the DLQ
    assert dead[0]["MessageAttributes"] == ATTRIBUTES


def test_native_messages_are_received_over_sqs(sqs, sqs_server):
    name = queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    published = httpx.post(
        f"{sqs_server.base_url}/v1/topics/{name}/messages",
        json={"messages": [{"value": {"n": 1}, "headers": {"origin": "native"}}]},
    )
    assert published.status_code == 201
    got = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"])["Messages"][0]
    assert json.loads(got["Body"]) == {"n": 1}
    assert got["MessageAttributes"] == {"origin": {"DataType": "String", "StringValue": "native"}}
    # And a second, native subscription tails what SQS sends.
    tail = f"{sqs_server.base_url}/v1/topics/{name}/subscriptions/tail"
    assert httpx.put(tail, json={"start": "earliest"}).status_code == 201
    sqs.send_message(QueueUrl=url, MessageBody="to both")
    pulled = httpx.post(tail + "/pull", json={"max_messages": 10}).json()["messages"]
    assert [m["value"] for m in pulled] == [{"n": 1}, "to both"]
    assert "sqs-message-id" in pulled[1]["headers"]


def test_binary_attribute_round_trip_over_raw_json(sqs, sqs_server):
    """What boto3 puts on the wire for a Binary attribute: base64 text."""
    url = _queue(sqs)
    raw = base64.b64encode(b"\xde\xad").decode()
    answer = httpx.post(
        sqs_server.base_url + "/sqs",
        headers={
            "Content-Type": "application/x-amz-json-1.0",
            "X-Amz-Target": "AmazonSQS.SendMessage",
        },
        json={
            "QueueUrl": url,
            "MessageBody": "b",
            "MessageAttributes": {"bin": {"DataType": "Binary", "BinaryValue": raw}},
        },
    )
    assert answer.status_code == 200, answer.text
    got = sqs.receive_message(QueueUrl=url, MessageAttributeNames=["All"])["Messages"][0]
    assert got["MessageAttributes"]["bin"]["BinaryValue"] == b"\xde\xad"
