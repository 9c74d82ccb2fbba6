"""SQS messages on Sluice: send, receive, delete and visibility, over the queue's topic and
its subscription `sqs` (queue.sqs_queues).

Everything SQS keeps per message rides in the message itself, written once at send
(insert-only, like every message): the body is the message's value (a JSON string), and
headers carry the message id, the message attributes, the deduplication id and the
sender. MessageGroupId is the key (FIFO queues order by key). Receipt handles are Sluice
receipts; ApproximateReceiveCount is the delivery attempt.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import re
import struct
import uuid
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import orjson

from sluice.errors import NotFound, PayloadTooLarge, SluiceError
from sluice.queue import consuming, receipts, topics
from sluice.queue.context import QueueContext
from sluice.queue.sqs_errors import (
    SqsError,
    batch_too_long,
    empty_batch,
    ids_not_distinct,
    invalid_batch_id,
    invalid_parameter,
    invalid_value,
    message_not_inflight,
    missing_parameter,
    queue_does_not_exist,
    receipt_handle_invalid,
    too_many_entries,
)
from sluice.queue.sqs_queues import SQS_SUBSCRIPTION, is_fifo
from sluice.records import Delivery, NewMessage, SqsQueue

# Headers of a message sent over SQS (a native subscriber sees them too).
H_ID = "sqs-message-id"
H_ATTRIBUTES = "sqs-attributes"
H_DEDUP = "sqs-deduplication-id"
H_SENDER = "sqs-sender-id"
H_TRACE = "sqs-trace-header"
# Headers Sluice adds itself (dead-letter copies): not shown as message attributes.
_HIDDEN_PREFIXES = ("sqs-", "sluice-")

MAX_ATTRIBUTES = 10
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_.-]{1,256}")
_DATA_TYPE = re.compile(r"(String|Number|Binary)(\.[^\s]{1,250})?")
_NUMBER = re.compile(r"[+-]?([0-9]+\.?[0-9]*|\.[0-9]+)([eE][+-]?[0-9]+)?")
# XML 1.0 characters, which is what SQS accepts in a body or string value.
_INVALID_CHARS = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")
_DEDUP_ID = re.compile(r"[!-~]{1,128}")
_GROUP_ID = re.compile(r"[!-~]{1,128}")
MAX_RECEIVE = 10
SYSTEM_ATTRIBUTES = (
    "SenderId",
    "SentTimestamp",
    "ApproximateReceiveCount",
    "ApproximateFirstReceiveTimestamp",
    "SequenceNumber",
    "MessageDeduplicationId",
    "MessageGroupId",
    "AWSTraceHeader",
)


# ---- MD5s as SQS computes them (botocore and every SDK check them) ------------------------


def md5_of_body(body: str) -> str:
    return hashlib.md5(body.encode(), usedforsecurity=False).hexdigest()


def _length_prefixed(digest: Any, data: bytes) -> None:
    digest.update(struct.pack("!I", len(data)))
    digest.update(data)


def md5_of_attributes(attributes: Mapping[str, Mapping[str, str]]) -> str:
    """Per attribute, by name: length-prefixed name and data type, then 1 and the
    length-prefixed UTF-8 string value, or 2 and the length-prefixed binary value."""
    digest = hashlib.md5(usedforsecurity=False)
    for name in sorted(attributes):
        value = attributes[name]
        _length_prefixed(digest, name.encode())
        _length_prefixed(digest, value["DataType"].encode())
        if "BinaryValue" in value:
            digest.update(b"\x02")
            _length_prefixed(digest, base64.b64decode(value["BinaryValue"]))
        else:
            digest.update(b"\x01")
            _length_prefixed(digest, value["StringValue"].encode())
    return digest.hexdigest()


# ---- validation -------------------------------------------------------------------------


def _binary(name: str, value: object) -> bytes:
    if not isinstance(value, str):
        raise invalid_parameter(f"The message attribute '{name}' has an invalid binary value.")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise invalid_parameter(
            f"The message attribute '{name}' has an invalid binary value."
        ) from None


def checked_attributes(given: object) -> tuple[dict[str, dict[str, str]], int]:
    """Message attributes as stored (BinaryValue kept base64), and their size as SQS counts
    it (name, type and value bytes)."""
    if given is None:
        return {}, 0
    if not isinstance(given, dict):
        raise invalid_parameter("MessageAttributes must be a map.")
    if len(given) > MAX_ATTRIBUTES:
        raise invalid_parameter(
            f"Number of message attributes [{len(given)}] exceeds the allowed maximum "
            f"[{MAX_ATTRIBUTES}]."
        )
    kept: dict[str, dict[str, str]] = {}
    size = 0
    for name, value in given.items():
        if (
            not _ATTRIBUTE_NAME.fullmatch(name)
            or name.startswith((".", "AWS.", "Amazon.", "aws.", "amazon."))
            or name.endswith(".")
            or ".." in name
        ):
            raise invalid_parameter(f"The message attribute name '{name}' is invalid.")
        if not isinstance(value, dict):
            raise invalid_parameter(f"The message attribute '{name}' must be a structure.")
        data_type = value.get("DataType")
        if not isinstance(data_type, str) or not data_type:
            raise invalid_parameter(
                f"The message attribute '{name}' must contain non-empty message attribute type."
            )
        if not _DATA_TYPE.fullmatch(data_type):
            raise invalid_parameter(
                f"The type of message (user) attribute '{name}' is invalid. You must use "
                "only the following supported type prefixes: Binary, Number, String."
            )
        if value.get("StringListValues") or value.get("BinaryListValues"):
            raise invalid_parameter(f"Message attribute list values in '{name}' are not supported.")
        base = data_type.split(".", 1)[0]
        size += len(name.encode()) + len(data_type.encode())
        if base == "Binary":
            raw = _binary(name, value.get("BinaryValue"))
            if not raw:
                raise invalid_parameter(
                    f"The message attribute '{name}' must contain non-empty message "
                    f"attribute value for message attribute type '{data_type}'."
                )
            kept[name] = {"DataType": data_type, "BinaryValue": value["BinaryValue"]}
            size += len(raw)
            continue
        text = value.get("StringValue")
        if not isinstance(text, str) or not text:
            raise invalid_parameter(
                f"The message attribute '{name}' must contain non-empty message attribute "
                f"value for message attribute type '{data_type}'."
            )
        if _INVALID_CHARS.search(text):
            raise invalid_parameter(
                f"The message attribute '{name}' contains characters outside the allowed set."
            )
        if base == "Number" and not _NUMBER.fullmatch(text):
            raise invalid_parameter(
                f"Can't cast the value of message (user) attribute '{name}' to a number."
            )
        kept[name] = {"DataType": data_type, "StringValue": text}
        size += len(text.encode())
    return kept, size


@dataclass(frozen=True, slots=True)
class SendRequest:
    """One message to send, as the client gave it."""

    body: object
    delay_seconds: object = None
    attributes: object = None
    system_attributes: object = None
    group_id: object = None
    dedup_id: object = None


@dataclass(slots=True)
class Prepared:
    message: NewMessage
    message_id: str
    md5_body: str
    md5_attributes: str | None
    size: int


def prepare(
    queue: SqsQueue, request: SendRequest, sender: str, content_dedup: bool | None = None
) -> Prepared:
    """Validate one message for the queue; raises SqsError (the whole call, or one entry
    of a batch)."""
    body = request.body
    if body is None or body == "":
        raise missing_parameter("MessageBody")
    if not isinstance(body, str):
        raise invalid_parameter("MessageBody must be a string.")
    if _INVALID_CHARS.search(body):
        raise SqsError(
            "InvalidMessageContents",
            "Invalid characters found. Valid unicode characters are #x9 | #xA | #xD | "
            "#x20 to #xD7FF | #xE000 to #xFFFD | #x10000 to #x10FFFF",
        )
    attributes, attributes_size = checked_attributes(request.attributes)
    size = len(body.encode()) + attributes_size
    limit = int(queue.attributes["MaximumMessageSize"])
    if size > limit:
        raise invalid_parameter(
            f"One or more parameters are invalid. Reason: Message must be shorter than "
            f"{limit} bytes."
        )
    fifo = is_fifo(queue)
    delay = _delay(queue, request.delay_seconds, fifo)
    headers: dict[str, str] = {H_ID: str(uuid.uuid4())}
    if attributes:
        headers[H_ATTRIBUTES] = orjson.dumps(attributes).decode()
    if sender:
        headers[H_SENDER] = sender
    trace = _trace_header(request.system_attributes)
    if trace is not None:
        headers[H_TRACE] = trace
    group, dedup = request.group_id, request.dedup_id
    if group is not None and (not isinstance(group, str) or not _GROUP_ID.fullmatch(group)):
        raise invalid_value("MessageGroupId", group, "Invalid MessageGroupId.")
    if fifo:
        if group is None:
            raise missing_parameter("MessageGroupId")
        if dedup is None:
            if not (
                content_dedup
                if content_dedup is not None
                else queue.attributes.get("ContentBasedDeduplication") == "true"
            ):
                raise invalid_parameter(
                    "The queue should either have ContentBasedDeduplication enabled or "
                    "MessageDeduplicationId provided explicitly"
                )
            dedup = hashlib.sha256(body.encode()).hexdigest()
        if not isinstance(dedup, str) or not _DEDUP_ID.fullmatch(dedup):
            raise invalid_value("MessageDeduplicationId", dedup, "Invalid deduplication id.")
        headers[H_DEDUP] = dedup
    elif dedup is not None:
        raise invalid_parameter(
            "The request includes parameter MessageDeduplicationId that is not valid for "
            "this queue type"
        )
    message = NewMessage(
        value=orjson.dumps(body).decode(),
        key=group if isinstance(group, str) else None,
        headers=orjson.dumps(headers).decode(),
        delay_seconds=delay,
        dedup_id=dedup if fifo else None,
    )
    return Prepared(
        message,
        headers[H_ID],
        md5_of_body(body),
        md5_of_attributes(attributes) if attributes else None,
        size,
    )


def _delay(queue: SqsQueue, given: object, fifo: bool) -> int:
    if given is None:
        return int(queue.attributes.get("DelaySeconds", "0"))
    if isinstance(given, bool) or not isinstance(given, int) or not 0 <= given <= 900:
        raise invalid_value("DelaySeconds", given, "DelaySeconds must be >= 0 and <= 900.")
    if fifo and given:
        raise invalid_value(
            "DelaySeconds",
            given,
            "The request include parameter that is not valid for this queue type.",
        )
    return given


def _trace_header(system: object) -> str | None:
    if not system:
        return None
    if not isinstance(system, dict) or set(system) - {"AWSTraceHeader"}:
        raise invalid_parameter("Only AWSTraceHeader is a valid message system attribute.")
    value = system["AWSTraceHeader"]
    if not isinstance(value, dict) or not isinstance(value.get("StringValue"), str):
        raise invalid_parameter("AWSTraceHeader must be a String attribute.")
    return value["StringValue"]


# ---- send ----------------------------------------------------------------------------------


@dataclass(slots=True)
class Sent:
    message_id: str
    md5_body: str
    md5_attributes: str | None
    sequence_number: str | None


def sequence_number(offset: int) -> str:
    """FIFO's SequenceNumber: the offset, which grows in commit order (128-bit in SQS, so
    shown as a 20-digit number)."""
    return f"{offset:020d}"


async def send(ctx: QueueContext, queue: SqsQueue, prepared: list[Prepared]) -> list[Sent]:
    """Store the messages atomically (one publish). A duplicate (FIFO deduplication id
    seen within five minutes) answers with the first message's id, as SQS does."""
    try:
        published = await topics.publish(ctx, queue.topic, [p.message for p in prepared])
    except NotFound:
        raise queue_does_not_exist() from None
    except PayloadTooLarge as exc:
        raise invalid_parameter(exc.detail) from None
    fifo = is_fifo(queue)
    sent: list[Sent] = []
    for item, outcome in zip(prepared, published, strict=True):
        message_id = item.message_id
        if outcome.duplicate:
            message_id = await _message_id_at(ctx, queue, outcome.offset) or message_id
        sent.append(
            Sent(
                message_id,
                item.md5_body,
                item.md5_attributes,
                sequence_number(outcome.offset) if fifo else None,
            )
        )
    return sent


async def _message_id_at(ctx: QueueContext, queue: SqsQueue, offset: int) -> str | None:
    try:
        message = await topics.get_message(ctx, queue.topic, offset)
    except SluiceError:
        return None  # gone with retention meanwhile
    return _headers(message.headers).get(H_ID)


def _headers(text: str | None) -> dict[str, str]:
    if not text:
        return {}
    headers = orjson.loads(text)
    return headers if isinstance(headers, dict) else {}


def derived_message_id(topic_id: int, offset: int) -> str:
    """The id of a message published natively (it carries none): stable per message."""
    digest = hashlib.sha256(f"sluice:{topic_id}:{offset}".encode()).digest()
    return str(uuid.UUID(bytes=digest[:16], version=4))


# ---- receive ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ReceiveRequest:
    max_messages: int
    wait_seconds: float
    visibility_timeout: int
    system_names: tuple[str, ...] = ()
    attribute_names: tuple[str, ...] = ()


def _bounded(name: str, value: object, low: int, high: int, default: int) -> int:
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise invalid_value(name, value, f"must be between {low} and {high}, if provided.")
    return value


def receive_request(
    queue: SqsQueue,
    max_messages: object,
    wait_seconds: object,
    visibility_timeout: object,
    system_names: Iterable[str],
    attribute_names: Iterable[str],
) -> ReceiveRequest:
    wanted = tuple(system_names)
    for name in wanted:
        if name != "All" and name not in SYSTEM_ATTRIBUTES:
            raise SqsError("InvalidAttributeName", f"Unknown Attribute {name}.")
    return ReceiveRequest(
        _bounded("MaxNumberOfMessages", max_messages, 1, MAX_RECEIVE, 1),
        _bounded(
            "WaitTimeSeconds",
            wait_seconds,
            0,
            20,
            int(queue.attributes.get("ReceiveMessageWaitTimeSeconds", "0")),
        ),
        _bounded(
            "VisibilityTimeout",
            visibility_timeout,
            0,
            43200,
            int(queue.attributes.get("VisibilityTimeout", "30")),
        ),
        wanted,
        tuple(attribute_names),
    )


@dataclass(slots=True)
class Received:
    message_id: str
    receipt_handle: str
    body: str
    md5_body: str
    attributes: dict[str, str] = field(default_factory=dict)
    message_attributes: dict[str, dict[str, str]] = field(default_factory=dict)
    md5_attributes: str | None = None


async def receive(
    ctx: QueueContext,
    queue: SqsQueue,
    request: ReceiveRequest,
    client_gone: consuming.ClientWatch | None = None,
) -> list[Received]:
    params = consuming.PullParams(
        queue.topic,
        SQS_SUBSCRIPTION,
        request.max_messages,
        float(request.wait_seconds),
        request.visibility_timeout,
    )
    try:
        outcome = await consuming.pull(ctx, params, client_gone=client_gone)
    except NotFound:
        raise queue_does_not_exist() from None
    return [_received(queue, m, request) for m in outcome.messages]


def _millis(moment: datetime) -> str:
    return str(int(moment.timestamp() * 1000))


def _wanted_attribute(name: str, patterns: tuple[str, ...]) -> bool:
    for pattern in patterns:
        if pattern in ("All", ".*") or pattern == name:
            return True
        if pattern.endswith(".*") and name.startswith(pattern[:-1]):
            return True
    return False


def _received(queue: SqsQueue, m: Delivery, request: ReceiveRequest) -> Received:
    headers = _headers(m.headers)
    value = orjson.loads(m.value)
    # A message published natively may hold any JSON: its text is the body.
    body = value if isinstance(value, str) else m.value
    attributes: dict[str, dict[str, str]] = (
        orjson.loads(headers[H_ATTRIBUTES]) if H_ATTRIBUTES in headers else {}
    )
    for name, text in headers.items():
        # Headers of natively published messages are String attributes over SQS.
        if not name.startswith(_HIDDEN_PREFIXES) and _ATTRIBUTE_NAME.fullmatch(name):
            attributes.setdefault(name, {"DataType": "String", "StringValue": text})
    shown = {
        name: value
        for name, value in attributes.items()
        if _wanted_attribute(name, request.attribute_names)
    }
    received = Received(
        message_id=headers.get(H_ID) or derived_message_id(queue.topic_id, m.offset),
        receipt_handle=consuming.receipt_of(m),
        body=body,
        md5_body=md5_of_body(body),
        message_attributes=shown,
        md5_attributes=md5_of_attributes(shown) if shown else None,
    )
    names = request.system_names
    if names:
        every = "All" in names
        received_at = m.lease_until - timedelta(seconds=request.visibility_timeout)
        system = {
            "SenderId": headers.get(H_SENDER, ""),
            "SentTimestamp": _millis(m.published_at),
            "ApproximateReceiveCount": str(m.attempt),
            # Not kept (that would be a write per message): the first receive is this one
            # when the count is 1; later receives show their own time (docs/sqs.md).
            "ApproximateFirstReceiveTimestamp": _millis(received_at),
        }
        if H_TRACE in headers:
            system["AWSTraceHeader"] = headers[H_TRACE]
        if is_fifo(queue):
            system["SequenceNumber"] = sequence_number(m.offset)
            if m.key is not None:
                system["MessageGroupId"] = m.key
            if H_DEDUP in headers:
                system["MessageDeduplicationId"] = headers[H_DEDUP]
        received.attributes = {
            name: value for name, value in system.items() if every or name in names
        }
    return received


# ---- delete and visibility ----------------------------------------------------------------


def check_handle(handle: object) -> str:
    if not isinstance(handle, str) or not handle:
        raise missing_parameter("ReceiptHandle")
    if receipts.decode(handle) is None:
        raise receipt_handle_invalid(handle)
    return handle


async def delete(ctx: QueueContext, queue: SqsQueue, handles: list[str]) -> None:
    """Ack. A valid handle of an attempt that is over (expired, redelivered, deleted)
    succeeds without effect, as SQS does."""
    if not handles:
        return
    try:
        await consuming.ack(ctx, queue.topic, SQS_SUBSCRIPTION, handles)
    except NotFound:
        raise queue_does_not_exist() from None


async def change_visibility(
    ctx: QueueContext, queue: SqsQueue, handles: list[str], seconds: int
) -> list[str]:
    """New visibility timeout from now (0: visible at once); returns the stale handles
    (their message is not in flight with that handle)."""
    try:
        if seconds == 0:
            outcome = await consuming.nack(ctx, queue.topic, SQS_SUBSCRIPTION, handles, 0.0)
        else:
            outcome = await consuming.extend(
                ctx, queue.topic, SQS_SUBSCRIPTION, handles, float(seconds)
            )
    except NotFound:
        raise queue_does_not_exist() from None
    return outcome.stale


def check_visibility(value: object) -> int:
    if value is None:
        raise missing_parameter("VisibilityTimeout")
    return _bounded("VisibilityTimeout", value, 0, 43200, 0)


# ---- batches: whole-request checks, then one outcome per entry -----------------------------

MAX_BATCH = 10
_BATCH_ID = re.compile(r"[A-Za-z0-9_-]{1,80}")


@dataclass(frozen=True, slots=True)
class BatchFailure:
    id: str
    code: str
    message: str
    sender_fault: bool = True


def check_batch_ids(ids: list[object]) -> list[str]:
    """SQS refuses the whole batch for these; anything else fails one entry."""
    if not ids:
        raise empty_batch()
    if len(ids) > MAX_BATCH:
        raise too_many_entries(len(ids))
    for entry_id in ids:
        if not isinstance(entry_id, str) or not _BATCH_ID.fullmatch(entry_id):
            raise invalid_batch_id()
    if len(set(ids)) != len(ids):
        raise ids_not_distinct()
    return ids  # type: ignore[return-value]


def _failure(entry_id: str, error: SqsError) -> BatchFailure:
    return BatchFailure(entry_id, error.name, error.message, error.sender_fault)


async def send_batch(
    ctx: QueueContext, queue: SqsQueue, entries: list[tuple[str, SendRequest]], sender: str
) -> tuple[list[tuple[str, Sent]], list[BatchFailure]]:
    """The valid entries go in one atomic publish; invalid ones are reported in Failed."""
    prepared: list[tuple[str, Prepared]] = []
    failed: list[BatchFailure] = []
    for entry_id, request in entries:
        try:
            prepared.append((entry_id, prepare(queue, request, sender)))
        except SqsError as error:
            failed.append(_failure(entry_id, error))
    limit = int(queue.attributes["MaximumMessageSize"])
    if sum(p.size for _, p in prepared) > limit:
        raise batch_too_long(limit)
    sent = await send(ctx, queue, [p for _, p in prepared]) if prepared else []
    return [(entry_id, s) for (entry_id, _), s in zip(prepared, sent, strict=True)], failed


async def delete_batch(
    ctx: QueueContext, queue: SqsQueue, entries: list[tuple[str, object]]
) -> tuple[list[str], list[BatchFailure]]:
    valid: list[tuple[str, str]] = []
    failed: list[BatchFailure] = []
    for entry_id, handle in entries:
        try:
            valid.append((entry_id, check_handle(handle)))
        except SqsError as error:
            failed.append(_failure(entry_id, error))
    await delete(ctx, queue, [handle for _, handle in valid])
    return [entry_id for entry_id, _ in valid], failed


async def change_visibility_batch(
    ctx: QueueContext, queue: SqsQueue, entries: list[tuple[str, object, object]]
) -> tuple[list[str], list[BatchFailure]]:
    """Entries with the same timeout go in one call."""
    by_timeout: dict[int, list[tuple[str, str]]] = {}
    failed: list[BatchFailure] = []
    for entry_id, handle, timeout in entries:
        try:
            checked = check_handle(handle)
            by_timeout.setdefault(check_visibility(timeout), []).append((entry_id, checked))
        except SqsError as error:
            failed.append(_failure(entry_id, error))
    done: list[str] = []
    for seconds, group in by_timeout.items():
        stale = set(await change_visibility(ctx, queue, [h for _, h in group], seconds))
        for entry_id, handle in group:
            if handle in stale:
                failed.append(_failure(entry_id, message_not_inflight()))
            else:
                done.append(entry_id)
    return done, failed
