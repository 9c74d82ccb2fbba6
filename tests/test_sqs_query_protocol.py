"""The older SQS query protocol (form bodies, XML answers), as older SDKs send it: the same
actions as the JSON protocol, answered in SQS's XML shapes."""

from __future__ import annotations

import hashlib
import xml.etree.ElementTree as ET

import httpx

from tests.sqs_support import queue_name, sqs, sqs_server

__all__ = ["sqs", "sqs_server"]

NS = {"sqs": "http://queue.amazonaws.com/doc/2012-11-05/"}


def _post(server, form: dict[str, str]) -> tuple[int, ET.Element]:
    answer = httpx.post(
        server.base_url + "/sqs",
        data={**form, "Version": "2012-11-05"},
        headers={"Content-Type": "application/x-www-form-urlencoded"},
    )
    assert answer.headers["content-type"].startswith("text/xml"), answer.text
    return answer.status_code, ET.fromstring(answer.text)


def _all(root: ET.Element, path: str) -> list[str]:
    return [e.text or "" for e in root.iterfind(path, NS)]


def test_query_protocol_round_trip(sqs_server, sqs):
    name = queue_name("query")
    status, root = _post(
        sqs_server,
        {
            "Action": "CreateQueue",
            "QueueName": name,
            "Attribute.1.Name": "VisibilityTimeout",
            "Attribute.1.Value": "40",
            "Tag.1.Key": "team",
            "Tag.1.Value": "q",
        },
    )
    assert status == 200
    (url,) = _all(root, ".//sqs:CreateQueueResult/sqs:QueueUrl")
    assert url.endswith(name)
    assert sqs.list_queue_tags(QueueUrl=url)["Tags"] == {"team": "q"}

    status, root = _post(
        sqs_server,
        {
            "Action": "SendMessage",
            "QueueUrl": url,
            "MessageBody": "über <xml> & more",
            "MessageAttribute.1.Name": "kind",
            "MessageAttribute.1.Value.DataType": "String",
            "MessageAttribute.1.Value.StringValue": "k",
        },
    )
    assert status == 200
    (md5,) = _all(root, ".//sqs:MD5OfMessageBody")
    assert md5 == hashlib.md5("über <xml> & more".encode()).hexdigest()
    (sent_id,) = _all(root, ".//sqs:MessageId")

    status, root = _post(
        sqs_server,
        {
            "Action": "SendMessageBatch",
            "QueueUrl": url,
            "SendMessageBatchRequestEntry.1.Id": "ok",
            "SendMessageBatchRequestEntry.1.MessageBody": "second",
            "SendMessageBatchRequestEntry.2.Id": "bad",
            "SendMessageBatchRequestEntry.2.MessageBody": "third",
            "SendMessageBatchRequestEntry.2.DelaySeconds": "1000",
        },
    )
    assert _all(root, ".//sqs:SendMessageBatchResultEntry/sqs:Id") == ["ok"]
    assert _all(root, ".//sqs:BatchResultErrorEntry/sqs:Code") == ["InvalidParameterValue"]

    status, root = _post(
        sqs_server,
        {
            "Action": "ReceiveMessage",
            "QueueUrl": url,
            "MaxNumberOfMessages": "10",
            "AttributeName.1": "All",
            "MessageAttributeName.1": "All",
        },
    )
    messages = root.findall(".//sqs:Message", NS)
    assert [m.findtext("sqs:Body", namespaces=NS) for m in messages] == [
        "über <xml> & more",
        "second",
    ]
    first = messages[0]
    assert first.findtext("sqs:MessageId", namespaces=NS) == sent_id
    attributes = {
        a.findtext("sqs:Name", namespaces=NS): a.findtext("sqs:Value", namespaces=NS)
        for a in first.findall("sqs:Attribute", NS)
    }
    assert attributes["ApproximateReceiveCount"] == "1"
    assert first.findtext("sqs:MessageAttribute/sqs:Value/sqs:StringValue", namespaces=NS) == "k"
    handles = [m.findtext("sqs:ReceiptHandle", namespaces=NS) for m in messages]

    status, root = _post(
        sqs_server,
        {
            "Action": "DeleteMessageBatch",
            "QueueUrl": url,
            "DeleteMessageBatchRequestEntry.1.Id": "a",
            "DeleteMessageBatchRequestEntry.1.ReceiptHandle": handles[0],
            "DeleteMessageBatchRequestEntry.2.Id": "b",
            "DeleteMessageBatchRequestEntry.2.ReceiptHandle": handles[1],
        },
    )
    assert _all(root, ".//sqs:DeleteMessageBatchResultEntry/sqs:Id") == ["a", "b"]

    status, root = _post(
        sqs_server,
        {"Action": "GetQueueAttributes", "QueueUrl": url, "AttributeName.1": "All"},
    )
    shown = dict(
        zip(
            _all(root, ".//sqs:Attribute/sqs:Name"),
            _all(root, ".//sqs:Attribute/sqs:Value"),
            strict=True,
        )
    )
    assert shown["VisibilityTimeout"] == "40"
    assert shown["ApproximateNumberOfMessagesNotVisible"] == "0"

    status, root = _post(sqs_server, {"Action": "GetQueueUrl", "QueueName": name + "-none"})
    assert status == 400
    assert _all(root, ".//sqs:Error/sqs:Code") == ["AWS.SimpleQueueService.NonExistentQueue"]
    assert _all(root, ".//sqs:Error/sqs:Type") == ["Sender"]
    status, root = _post(sqs_server, {"Action": "Nope"})
    assert status == 400 and _all(root, ".//sqs:Error/sqs:Code") == ["InvalidAction"]


def test_odd_forms_answer_xml_errors_never_500(sqs_server, sqs):
    url = sqs.create_queue(QueueName=queue_name("query-odd"))["QueueUrl"]
    odd = [
        b"%%%",
        b"Action=SendMessage",
        f"Action=SendMessage&QueueUrl={url}&MessageAttribute.1.Name=a".encode(),
        f"Action=SendMessage&QueueUrl={url}&MessageBody=x&DelaySeconds=abc".encode(),
        f"Action=ReceiveMessage&QueueUrl={url}&MaxNumberOfMessages=99".encode(),
        b"Action=CreateQueue&QueueName=x.y&Attribute.1.Value=1",
        f"Action=DeleteMessage&QueueUrl={url}&ReceiptHandle=%00".encode(),
        f"Action=TagQueue&QueueUrl={url}&Tag.1.Value=v".encode(),
    ]
    for body in odd:
        answer = httpx.post(
            sqs_server.base_url + "/sqs",
            content=body,
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert 400 <= answer.status_code < 500, (body, answer.text)
        assert ET.fromstring(answer.text).find(".//sqs:Error/sqs:Code", NS) is not None
    # A batch entry without a body fails alone (the batch itself is answered 200).
    status, root = _post(
        sqs_server,
        {"Action": "SendMessageBatch", "QueueUrl": url, "SendMessageBatchRequestEntry.1.Id": "a"},
    )
    assert status == 200
    assert _all(root, ".//sqs:BatchResultErrorEntry/sqs:Code") == ["MissingParameter"]
