"""SQS endpoint, queue actions through boto3 unchanged: create (idempotent, conflicts),
URLs, listing with paging, attributes, tags, dead-letter sources, delete, and errors that
boto3 maps onto its modelled exceptions."""

from __future__ import annotations

import json

import botocore.exceptions
import httpx
import pytest

from tests.sqs_support import queue_name, sqs, sqs_server

__all__ = ["sqs", "sqs_server"]


def _code(exc: pytest.ExceptionInfo) -> str:
    return exc.value.response["Error"]["QueryErrorCode"]


def test_create_queue_is_idempotent_and_refuses_other_attributes(sqs):
    name = queue_name()
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "45"})["QueueUrl"]
    assert url.endswith(f"/sqs/000000000000/{name}")
    again = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "45"})
    assert again["QueueUrl"] == url
    assert sqs.create_queue(QueueName=name)["QueueUrl"] == url  # no attributes: same queue
    with pytest.raises(sqs.exceptions.QueueNameExists) as exc:
        sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "46"})
    assert exc.value.response["Error"]["Code"] == "QueueAlreadyExists"
    assert sqs.get_queue_url(QueueName=name)["QueueUrl"] == url


def test_a_queue_is_a_topic_with_the_sqs_subscription(sqs, sqs_server):
    name = queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.send_message(QueueUrl=url, MessageBody="seen natively")
    base = sqs_server.base_url
    browsed = httpx.get(f"{base}/v1/topics/{name}/messages").json()["messages"]
    assert [m["value"] for m in browsed] == ["seen natively"]
    sub = httpx.get(f"{base}/v1/topics/{name}/subscriptions/sqs").json()
    assert sub["backlog"] == 1
    # A native topic of the same name is not taken over.
    other = queue_name("native")
    assert httpx.put(f"{base}/v1/topics/{other}", json={}).status_code == 201
    with pytest.raises(sqs.exceptions.QueueNameExists):
        sqs.create_queue(QueueName=other)


def test_unknown_queue_raises_queue_does_not_exist(sqs, sqs_server):
    missing = f"{sqs_server.base_url}/sqs/000000000000/{queue_name('gone')}"
    with pytest.raises(sqs.exceptions.QueueDoesNotExist) as exc:
        sqs.get_queue_url(QueueName=queue_name("gone"))
    assert exc.value.response["Error"]["Code"] == "AWS.SimpleQueueService.NonExistentQueue"
    for call in (
        lambda: sqs.send_message(QueueUrl=missing, MessageBody="x"),
        lambda: sqs.receive_message(QueueUrl=missing),
        lambda: sqs.get_queue_attributes(QueueUrl=missing, AttributeNames=["All"]),
        lambda: sqs.delete_queue(QueueUrl=missing),
        lambda: sqs.purge_queue(QueueUrl=missing),
    ):
        with pytest.raises(sqs.exceptions.QueueDoesNotExist):
            call()


def test_invalid_names_and_attributes(sqs):
    for bad in ("has space", "a" * 81, "dot.name", ""):
        with pytest.raises(botocore.exceptions.ClientError) as exc:
            sqs.create_queue(QueueName=bad)
        assert _code(exc) in ("InvalidParameterValue", "MissingParameter")
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.create_queue(QueueName=queue_name(), Attributes={"VisibilityTimeout": "99999"})
    assert _code(exc) == "InvalidParameterValue"
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.create_queue(QueueName=queue_name(), Attributes={"Colour": "blue"})
    assert _code(exc) == "InvalidAttributeName"
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.create_queue(QueueName=queue_name(), Attributes={"FifoQueue": "true"})
    assert _code(exc) == "InvalidParameterValue"  # a FIFO queue's name ends in .fifo


def test_list_queues_prefix_and_paging(sqs):
    prefix = queue_name("list")
    names = sorted(f"{prefix}-{i}" for i in range(5))
    for name in names:
        sqs.create_queue(QueueName=name)
    listed = sqs.list_queues(QueueNamePrefix=prefix)
    assert [u.rsplit("/", 1)[1] for u in listed["QueueUrls"]] == names
    assert "NextToken" not in listed
    seen, token = [], None
    while True:
        kwargs = {"QueueNamePrefix": prefix, "MaxResults": 2}
        if token:
            kwargs["NextToken"] = token
        page = sqs.list_queues(**kwargs)
        seen += [u.rsplit("/", 1)[1] for u in page.get("QueueUrls", [])]
        token = page.get("NextToken")
        if not token:
            break
    assert seen == names
    assert "QueueUrls" not in sqs.list_queues(QueueNamePrefix=queue_name("none"))
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.list_queues(MaxResults=0)
    assert _code(exc) == "InvalidParameterValue"


def test_get_and_set_queue_attributes(sqs):
    url = sqs.create_queue(QueueName=queue_name(), Attributes={"DelaySeconds": "3"})["QueueUrl"]
    every = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert every["DelaySeconds"] == "3"
    assert every["VisibilityTimeout"] == "30"
    assert every["MessageRetentionPeriod"] == "345600"
    assert every["QueueArn"].startswith("arn:aws:sqs:us-east-1:000000000000:")
    assert every["ApproximateNumberOfMessages"] == "0"
    assert "FifoQueue" not in every
    created = int(every["CreatedTimestamp"])
    sqs.set_queue_attributes(
        QueueUrl=url,
        Attributes={"VisibilityTimeout": "5", "ReceiveMessageWaitTimeSeconds": "2"},
    )
    named = sqs.get_queue_attributes(
        QueueUrl=url,
        AttributeNames=["VisibilityTimeout", "ReceiveMessageWaitTimeSeconds", "CreatedTimestamp"],
    )["Attributes"]
    assert named == {
        "VisibilityTimeout": "5",
        "ReceiveMessageWaitTimeSeconds": "2",
        "CreatedTimestamp": str(created),
    }
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["Nope"])
    assert _code(exc) == "InvalidAttributeName"
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"DelaySeconds": "901"})
    assert _code(exc) == "InvalidParameterValue"
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.set_queue_attributes(QueueUrl=url, Attributes={"FifoQueue": "true"})
    assert _code(exc) == "InvalidAttributeName"


def test_visibility_timeout_is_the_subscription_ack_deadline(sqs, sqs_server):
    name = queue_name()
    url = sqs.create_queue(QueueName=name, Attributes={"VisibilityTimeout": "77"})["QueueUrl"]
    sub = httpx.get(f"{sqs_server.base_url}/v1/topics/{name}/subscriptions/sqs").json()
    assert sub["ack_deadline_seconds"] == 77
    sqs.set_queue_attributes(QueueUrl=url, Attributes={"VisibilityTimeout": "12"})
    sub = httpx.get(f"{sqs_server.base_url}/v1/topics/{name}/subscriptions/sqs").json()
    assert sub["ack_deadline_seconds"] == 12


def test_tags(sqs):
    url = sqs.create_queue(QueueName=queue_name(), tags={"team": "a"})["QueueUrl"]
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "a"}
    sqs.tag_queue(QueueUrl=url, Tags={"env": "test", "team": "b"})
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "b", "env": "test"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["team"])
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"env": "test"}
    sqs.untag_queue(QueueUrl=url, TagKeys=["env"])
    assert "Tags" not in sqs.list_queue_tags(QueueUrl=url)


def test_redrive_policy_and_dead_letter_sources(sqs, sqs_server):
    dlq = sqs.create_queue(QueueName=queue_name("dlq"))["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = json.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "3"})
    name = queue_name("src")
    src = sqs.create_queue(QueueName=name, Attributes={"RedrivePolicy": policy})["QueueUrl"]
    shown = sqs.get_queue_attributes(QueueUrl=src, AttributeNames=["RedrivePolicy"])
    assert json.loads(shown["Attributes"]["RedrivePolicy"]) == {
        "deadLetterTargetArn": arn,
        "maxReceiveCount": 3,
    }
    sub = httpx.get(f"{sqs_server.base_url}/v1/topics/{name}/subscriptions/sqs").json()
    assert sub["max_deliveries"] == 3
    assert sub["dead_letter_topic"] == arn.rsplit(":", 1)[1]
    assert sqs.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"] == [src]
    missing = json.dumps({"deadLetterTargetArn": arn + "-missing", "maxReceiveCount": 3})
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.set_queue_attributes(QueueUrl=src, Attributes={"RedrivePolicy": missing})
    assert _code(exc) == "InvalidParameterValue"
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.set_queue_attributes(QueueUrl=src, Attributes={"RedrivePolicy": "{not json"})
    assert _code(exc) == "InvalidParameterValue"
    # An empty policy removes it: no more redrive, no longer a source of the DLQ.
    sqs.set_queue_attributes(QueueUrl=src, Attributes={"RedrivePolicy": ""})
    assert "Attributes" not in sqs.get_queue_attributes(
        QueueUrl=src, AttributeNames=["RedrivePolicy"]
    )
    sub = httpx.get(f"{sqs_server.base_url}/v1/topics/{name}/subscriptions/sqs").json()
    assert sub["max_deliveries"] == 0 and sub["dead_letter_topic"] is None
    assert sqs.list_dead_letter_source_queues(QueueUrl=dlq)["queueUrls"] == []
    # The dead-letter queue can be deleted while a queue still names it (as in SQS).
    sqs.set_queue_attributes(QueueUrl=src, Attributes={"RedrivePolicy": policy})
    sqs.delete_queue(QueueUrl=dlq)
    sqs.send_message(QueueUrl=src, MessageBody="still works")


def test_delete_queue_deletes_the_topic(sqs, sqs_server):
    name = queue_name()
    url = sqs.create_queue(QueueName=name)["QueueUrl"]
    sqs.delete_queue(QueueUrl=url)
    assert httpx.get(f"{sqs_server.base_url}/v1/topics/{name}").status_code == 404
    with pytest.raises(sqs.exceptions.QueueDoesNotExist):
        sqs.get_queue_url(QueueName=name)
    # The name is free again.
    assert sqs.create_queue(QueueName=name)["QueueUrl"] == url


def test_fifo_queue_attributes(sqs, sqs_server):
    name = queue_name(fifo=True)
    url = sqs.create_queue(
        QueueName=name,
        Attributes={"FifoQueue": "true", "ContentBasedDeduplication": "true"},
    )["QueueUrl"]
    assert url.endswith(name)
    attrs = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["All"])["Attributes"]
    assert attrs["FifoQueue"] == "true"
    assert attrs["ContentBasedDeduplication"] == "true"
    topic = name.removesuffix(".fifo") + "-fifo"
    sub = httpx.get(f"{sqs_server.base_url}/v1/topics/{topic}/subscriptions/sqs").json()
    assert sub["ordered_by_key"] is True
    with pytest.raises(botocore.exceptions.ClientError) as exc:
        sqs.create_queue(QueueName=queue_name(), Attributes={"ContentBasedDeduplication": "true"})
    assert _code(exc) == "InvalidParameterValue"


def test_protocol_errors_are_sqs_errors_never_500(sqs_server):
    url = sqs_server.base_url + "/sqs"
    headers = {"Content-Type": "application/x-amz-json-1.0"}
    cases = [
        ({**headers, "X-Amz-Target": "AmazonSQS.Nope"}, b"{}", "InvalidAction"),
        ({**headers, "X-Amz-Target": "AmazonSQS.AddPermission"}, b"{}", "UnsupportedOperation"),
        ({**headers, "X-Amz-Target": "AmazonSQS.ListQueues"}, b"{nope", "SerializationException"),
        ({**headers, "X-Amz-Target": "AmazonSQS.ListQueues"}, b"[1]", "SerializationException"),
        ({**headers, "X-Amz-Target": "AmazonSQS.CreateQueue"}, b"{}", "MissingParameter"),
        (
            {**headers, "X-Amz-Target": "AmazonSQS.CreateQueue"},
            b'{"QueueName": 5}',
            "InvalidParameterValue",
        ),
        (
            {**headers, "X-Amz-Target": "AmazonSQS.SendMessage"},
            b'{"QueueUrl": "never-created-0f3c9", "MessageBody": {"a": 1}}',
            "QueueDoesNotExist",
        ),
    ]
    for sent_headers, body, name in cases:
        answer = httpx.post(url, headers=sent_headers, content=body)
        assert answer.status_code == 400, (name, answer.text)
        assert answer.json()["__type"] == f"com.amazonaws.sqs#{name}"
        assert answer.headers["x-amzn-query-error"].endswith(";Sender")
