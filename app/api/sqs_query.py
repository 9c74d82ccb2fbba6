"""SQS's older query protocol (`Action=...` form bodies, XML answers), as older SDKs send
it: the form becomes the JSON protocol's parameters, and the JSON protocol's answer
becomes XML. The actions themselves are the JSON protocol's (app.api.routes.sqs).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import parse_qsl
from xml.sax.saxutils import escape

XMLNS = "http://queue.amazonaws.com/doc/2012-11-05/"

# Flattened lists of the query protocol: prefix -> JSON parameter.
_LISTS = {
    "AttributeName": "AttributeNames",
    "MessageSystemAttributeName": "MessageSystemAttributeNames",
    "MessageAttributeName": "MessageAttributeNames",
    "TagKey": "TagKeys",
}
_ENTRY_LISTS = (
    "SendMessageBatchRequestEntry",
    "DeleteMessageBatchRequestEntry",
    "ChangeMessageVisibilityBatchRequestEntry",
)
_INTEGERS = frozenset(
    {"DelaySeconds", "MaxNumberOfMessages", "WaitTimeSeconds", "VisibilityTimeout", "MaxResults"}
)
_INDEXED = re.compile(r"([A-Za-z]+)\.(\d+)(?:\.(.+))?")


def _value(name: str, text: str) -> Any:
    if name in _INTEGERS and re.fullmatch(r"-?\d{1,12}", text):
        return int(text)
    return text


def _message_attributes(fields: dict[str, dict[str, str]]) -> dict[str, Any]:
    """MessageAttribute.N.Name / .Value.DataType / .Value.StringValue|BinaryValue."""
    out: dict[str, Any] = {}
    for _, item in sorted(fields.items(), key=lambda kv: int(kv[0])):
        name = item.get("Name")
        if name is None:
            continue
        value = {
            key.removeprefix("Value."): text
            for key, text in item.items()
            if key.startswith("Value.")
        }
        out[name] = value
    return out


def _group(pairs: list[tuple[str, str]], prefix: str) -> dict[str, dict[str, str]]:
    """`Prefix.N.Rest=value` -> {N: {Rest: value}}."""
    groups: dict[str, dict[str, str]] = {}
    for key, text in pairs:
        match = _INDEXED.fullmatch(key)
        if match and match[1] == prefix and match[3]:
            groups.setdefault(match[2], {})[match[3]] = text
    return groups


def _entry(fields: dict[str, str]) -> dict[str, Any]:
    entry: dict[str, Any] = {}
    attributes: dict[str, dict[str, str]] = {}
    for key, text in fields.items():
        match = _INDEXED.fullmatch(key)
        if match and match[1] == "MessageAttribute" and match[3]:
            attributes.setdefault(match[2], {})[match[3]] = text
        else:
            entry[key] = _value(key, text)
    if attributes:
        entry["MessageAttributes"] = _message_attributes(attributes)
    return entry


def parse_form(body: bytes) -> tuple[str, dict[str, Any]]:
    """(action, the JSON protocol's parameters) of a query-protocol form body."""
    pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True)
    action = ""
    params: dict[str, Any] = {}
    lists: dict[str, dict[int, str]] = {}
    for key, text in pairs:
        if key == "Action":
            action = text
            continue
        if key == "Version":
            continue
        match = _INDEXED.fullmatch(key)
        if match is None:
            params[key] = _value(key, text)
        elif match[1] in _LISTS and match[3] is None:
            lists.setdefault(_LISTS[match[1]], {})[int(match[2])] = text
    for name, items in lists.items():
        params[name] = [items[i] for i in sorted(items)]
    for prefix, target in (("Attribute", "Attributes"), ("Tag", "Tags")):
        groups = _group(pairs, prefix)
        if groups:
            key_field = "Name" if prefix == "Attribute" else "Key"
            params[target] = {
                g[key_field]: g.get("Value", "")
                for _, g in sorted(groups.items(), key=lambda kv: int(kv[0]))
                if key_field in g
            }
    if action == "CreateQueue" and "Tags" in params:
        params["tags"] = params.pop("Tags")
    message_attributes = _group(pairs, "MessageAttribute")
    if message_attributes:
        params["MessageAttributes"] = _message_attributes(message_attributes)
    for prefix in _ENTRY_LISTS:
        groups = _group(pairs, prefix)
        if groups:
            params["Entries"] = [
                _entry(g) for _, g in sorted(groups.items(), key=lambda kv: int(kv[0]))
            ]
    return action, params


# ---- XML answers ---------------------------------------------------------------------------


# Characters XML 1.0 cannot hold (an error message may echo them from the input).
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return escape(_NOT_XML.sub("\ufffd", str(value)))


def _pairs(tag: str, key_tag: str, mapping: dict[str, Any]) -> str:
    return "".join(
        f"<{tag}><{key_tag}>{_text(k)}</{key_tag}><Value>{_text(v)}</Value></{tag}>"
        for k, v in mapping.items()
    )


def _message_attribute_xml(attributes: dict[str, dict[str, str]]) -> str:
    out = []
    for name, value in attributes.items():
        inner = "".join(f"<{k}>{_text(v)}</{k}>" for k, v in value.items())
        out.append(
            f"<MessageAttribute><Name>{_text(name)}</Name><Value>{inner}</Value></MessageAttribute>"
        )
    return "".join(out)


def _item(tag: str, item: dict[str, Any]) -> str:
    parts = []
    for key, value in item.items():
        if key == "Attributes":
            parts.append(_pairs("Attribute", "Name", value))
        elif key == "MessageAttributes":
            parts.append(_message_attribute_xml(value))
        else:
            parts.append(f"<{key}>{_text(value)}</{key}>")
    return f"<{tag}>{''.join(parts)}</{tag}>"


def result_xml(action: str, answer: dict[str, Any], request_id: str) -> str:
    body = []
    for key, value in answer.items():
        if key in ("QueueUrls", "queueUrls"):
            body += [f"<QueueUrl>{_text(url)}</QueueUrl>" for url in value]
        elif key == "Attributes":
            body.append(_pairs("Attribute", "Name", value))
        elif key == "Tags":
            body.append(_pairs("Tag", "Key", value))
        elif key == "Messages":
            body += [_item("Message", m) for m in value]
        elif key == "Successful":
            body += [_item(f"{action}ResultEntry", e) for e in value]
        elif key == "Failed":
            body += [_item("BatchResultErrorEntry", e) for e in value]
        else:
            body.append(f"<{key}>{_text(value)}</{key}>")
    return (
        f'<?xml version="1.0"?><{action}Response xmlns="{XMLNS}"><{action}Result>'
        f"{''.join(body)}</{action}Result><ResponseMetadata><RequestId>{request_id}"
        f"</RequestId></ResponseMetadata></{action}Response>"
    )


def error_xml(code: str, message: str, sender_fault: bool, request_id: str) -> str:
    fault = "Sender" if sender_fault else "Receiver"
    return (
        f'<?xml version="1.0"?><ErrorResponse xmlns="{XMLNS}"><Error><Type>{fault}</Type>'
        f"<Code>{_text(code)}</Code><Message>{_text(message)}</Message><Detail/></Error>"
        f"<RequestId>{request_id}</RequestId></ErrorResponse>"
    )
