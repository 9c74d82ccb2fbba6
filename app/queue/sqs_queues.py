"""SQS queues on Sluice: a queue is a topic plus the subscription `sqs` (SQS_SUBSCRIPTION).

The queue's SQS attributes map onto the topic and the subscription where Sluice has the
same idea (VisibilityTimeout = ack deadline, MessageRetentionPeriod = retention,
RedrivePolicy = max_deliveries + dead_letter_topic, FIFO = ordered_by_key); the rest
(defaults for sends and receives, tags, timestamps) lives in the queue's row
(storage.sqs). Both views stay one set of data: the native API browses the topic, and a
second subscription on it sees every message sent over SQS.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import asyncpg

from sluice.errors import SluiceError
from sluice.queue import subscriptions
from sluice.queue.context import QueueContext
from sluice.queue.sqs_errors import (
    invalid_attribute_name,
    invalid_parameter,
    invalid_value,
    queue_does_not_exist,
    queue_name_exists,
)
from sluice.records import SUBSCRIPTION_DEFAULTS, SqsQueue, TopicConfig
from sluice.storage import sqs as sqs_sql
from sluice.storage import subscriptions as subs_sql
from sluice.storage import topics as topics_sql

# The subscription each queue's messages are received through.
SQS_SUBSCRIPTION = "sqs"
FIFO_SUFFIX = ".fifo"
# A topic name cannot hold the dot of `.fifo`: `orders.fifo` is the topic `orders-fifo`.
FIFO_TOPIC_SUFFIX = "-fifo"
# The topic's own size limit is its largest: SQS's MaximumMessageSize is checked on the
# body and attributes as SQS counts them (the stored JSON of a body can be longer).
TOPIC_MAX_MESSAGE_BYTES = 10 * 1024 * 1024
# SQS keeps deduplication ids for five minutes.
DEDUP_WINDOW_SECONDS = 300

_STANDARD_NAME = re.compile(r"[A-Za-z0-9_-]{1,80}")
_FIFO_NAME = re.compile(r"[A-Za-z0-9_-]{1,75}\.fifo")

# Attributes a client may set, with SQS's defaults (strings, as SQS shows them).
SETTABLE_DEFAULTS: dict[str, str] = {
    "DelaySeconds": "0",
    "MaximumMessageSize": "1048576",
    "MessageRetentionPeriod": "345600",
    "ReceiveMessageWaitTimeSeconds": "0",
    "VisibilityTimeout": "30",
}
FIFO_DEFAULTS: dict[str, str] = {
    "ContentBasedDeduplication": "false",
    "DeduplicationScope": "queue",
    "FifoThroughputLimit": "perQueue",
}
# Accepted and shown back, without effect on Sluice (encryption, policies).
KEPT_ONLY = (
    "Policy",
    "RedriveAllowPolicy",
    "KmsMasterKeyId",
    "KmsDataKeyReusePeriodSeconds",
    "SqsManagedSseEnabled",
)
_INTEGER_RANGES: dict[str, tuple[int, int]] = {
    "DelaySeconds": (0, 900),
    "MaximumMessageSize": (1024, 1048576),
    "MessageRetentionPeriod": (60, 1209600),
    "ReceiveMessageWaitTimeSeconds": (0, 20),
    "VisibilityTimeout": (0, 43200),
    "KmsDataKeyReusePeriodSeconds": (60, 86400),
}
_BOOLEANS = ("FifoQueue", "ContentBasedDeduplication", "SqsManagedSseEnabled")
_CHOICES = {
    "DeduplicationScope": ("messageGroup", "queue"),
    "FifoThroughputLimit": ("perQueue", "perMessageGroupId"),
}
SETTABLE = frozenset([*SETTABLE_DEFAULTS, *FIFO_DEFAULTS, *KEPT_ONLY, "RedrivePolicy", "FifoQueue"])
# Computed on each GetQueueAttributes.
COMPUTED = (
    "ApproximateNumberOfMessages",
    "ApproximateNumberOfMessagesNotVisible",
    "ApproximateNumberOfMessagesDelayed",
    "CreatedTimestamp",
    "LastModifiedTimestamp",
    "QueueArn",
)
READABLE = frozenset([*SETTABLE, *COMPUTED])
MAX_TAGS = 50


def topic_of(queue_name: str) -> str:
    """The topic that holds the queue's messages (no database: scopes are checked on it)."""
    if queue_name.endswith(FIFO_SUFFIX):
        return queue_name[: -len(FIFO_SUFFIX)] + FIFO_TOPIC_SUFFIX
    return queue_name


def is_fifo(queue: SqsQueue) -> bool:
    return queue.attributes.get("FifoQueue") == "true"


def queue_name_of_url(url: str) -> str:
    """SQS takes a queue URL; its last path segment is the queue's name."""
    name = url.rstrip("/").rsplit("/", 1)[-1]
    if not name:
        raise queue_does_not_exist()
    return name


def arn_of(ctx: QueueContext, name: str) -> str:
    settings = ctx.settings
    return f"arn:aws:sqs:{settings.sqs_region}:{settings.sqs_account_id}:{name}"


def url_of(ctx: QueueContext, base: str, name: str) -> str:
    """`base` is where the client reached this server (scheme and host)."""
    return f"{base.rstrip('/')}/sqs/{ctx.settings.sqs_account_id}/{name}"


# ---- attributes ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Redrive:
    dead_letter_queue: str
    max_receive_count: int


def _redrive(text: str) -> Redrive:
    try:
        policy = json.loads(text)
    except ValueError:
        raise invalid_value("RedrivePolicy", text, "Invalid JSON.") from None
    if not isinstance(policy, dict):
        raise invalid_value("RedrivePolicy", text, "Redrive policy is not a JSON object.")
    arn, count = policy.get("deadLetterTargetArn"), policy.get("maxReceiveCount")
    if not isinstance(arn, str) or count is None:
        raise invalid_value(
            "RedrivePolicy",
            text,
            "Redrive policy does not contain mandatory attribute: "
            + ("deadLetterTargetArn." if not isinstance(arn, str) else "maxReceiveCount."),
        )
    try:
        receives = int(count)
    except (TypeError, ValueError):
        raise invalid_value("RedrivePolicy", text, "Invalid value for maxReceiveCount.") from None
    if not 1 <= receives <= 1000:
        raise invalid_value(
            "RedrivePolicy", text, "Value for maxReceiveCount must be between 1 and 1000."
        )
    parts = arn.split(":")
    if len(parts) != 6 or parts[0] != "arn" or parts[2] != "sqs" or not parts[5]:
        raise invalid_value("RedrivePolicy", text, "Invalid value for deadLetterTargetArn.")
    return Redrive(parts[5], receives)


def redrive_of(attributes: Mapping[str, str]) -> Redrive | None:
    text = attributes.get("RedrivePolicy")
    return _redrive(text) if text else None


def _checked(name: str, value: object, fifo: bool) -> str:
    """One attribute value, validated and normalised to SQS's string form."""
    if name not in SETTABLE:
        raise invalid_attribute_name(name)
    if not isinstance(value, str):
        raise invalid_value(name, value, "Attribute values must be strings.")
    if name in _INTEGER_RANGES:
        low, high = _INTEGER_RANGES[name]
        if not re.fullmatch(r"-?[0-9]{1,12}", value.strip()) or not (low <= int(value) <= high):
            raise invalid_parameter(
                f"Invalid value for the parameter {name}. Reason: must be an integer "
                f"between {low} and {high}."
            )
        return str(int(value))
    if name in _BOOLEANS:
        if value.lower() not in ("true", "false"):
            raise invalid_parameter(f"Invalid value for the parameter {name}.")
        value = value.lower()
    if name in _CHOICES and value not in _CHOICES[name]:
        raise invalid_parameter(f"Invalid value for the parameter {name}.")
    if name in ("ContentBasedDeduplication", *_CHOICES) and not fifo:
        raise invalid_parameter(f"Unknown Attribute {name}: it is only valid for FIFO queues.")
    if name == "RedrivePolicy" and value:
        _redrive(value)  # validates
        # Stored compact, as SQS shows it.
        policy = json.loads(value)
        policy["maxReceiveCount"] = int(policy["maxReceiveCount"])
        value = json.dumps(policy, separators=(",", ":"))
    return value


def checked_attributes(given: Mapping[str, object], fifo: bool) -> dict[str, str]:
    return {name: _checked(name, value, fifo) for name, value in given.items()}


def _configs(
    ctx: QueueContext, attributes: Mapping[str, str], dead_letter_topic: str | None
) -> tuple[int, dict[str, Any]]:
    """(retention seconds of the topic, subscription fields) of a queue's attributes."""
    redrive = redrive_of(attributes)
    fields: dict[str, Any] = {
        # SQS's VisibilityTimeout may be 0; a subscription's default deadline is at least
        # 1 s, and every ReceiveMessage passes the queue's own value anyway.
        "ack_deadline_seconds": max(1, int(attributes["VisibilityTimeout"])),
        "max_deliveries": redrive.max_receive_count if redrive else 0,
        "dead_letter_topic": dead_letter_topic,
        # SQS redelivers as soon as the visibility timeout ends: no backoff.
        "retry_min_seconds": 0.0,
        "retry_max_seconds": 0.0,
        "ordered_by_key": attributes.get("FifoQueue") == "true",
    }
    return int(attributes["MessageRetentionPeriod"]), fields


async def _dead_letter_topic(
    conn: asyncpg.Connection, attributes: Mapping[str, str], fifo: bool
) -> str | None:
    redrive = redrive_of(attributes)
    if redrive is None:
        return None
    target = await sqs_sql.get_queue(conn, redrive.dead_letter_queue)
    if target is None:
        raise invalid_value(
            "RedrivePolicy",
            attributes["RedrivePolicy"],
            "Dead-letter target does not exist.",
        )
    if is_fifo(target) != fifo:
        raise invalid_value(
            "RedrivePolicy",
            attributes["RedrivePolicy"],
            "Dead-letter queue must be of the same type (standard or FIFO) as the source.",
        )
    return target.topic


# ---- operations --------------------------------------------------------------------------


def _check_name(name: str, fifo: bool) -> None:
    pattern = _FIFO_NAME if fifo else _STANDARD_NAME
    if not pattern.fullmatch(name):
        raise invalid_parameter(
            "Can only include alphanumeric characters, hyphens, or underscores. 1 to 80 in "
            "length. A FIFO queue's name ends in .fifo and its FifoQueue attribute is true."
        )


def _check_tags(tags: Mapping[str, object]) -> dict[str, str]:
    if len(tags) > MAX_TAGS:
        raise invalid_parameter(f"Too many tags: a queue has at most {MAX_TAGS}.")
    for key, value in tags.items():
        if not isinstance(value, str) or not 1 <= len(key) <= 128 or len(value) > 256:
            raise invalid_parameter(f"Invalid tag {key!r}.")
    return dict(tags)  # type: ignore[arg-type]


async def create_queue(
    ctx: QueueContext, name: str, given: Mapping[str, object], tags: Mapping[str, object]
) -> SqsQueue:
    """Create the queue, or return it when it exists with the same given attributes (as
    SQS: different ones are QueueNameExists). A native topic of the same name is not
    taken over."""
    fifo_name = name.endswith(FIFO_SUFFIX)
    fifo = given.get("FifoQueue") in ("true", "True", "TRUE")
    _check_name(name, fifo)
    if fifo_name and not fifo:
        _check_name(name, False)  # refuses: a standard queue's name has no dot
    attributes = checked_attributes(given, fifo)
    tags = _check_tags(tags)
    async with ctx.pool.acquire() as conn:
        existing = await sqs_sql.get_queue(conn, name)
        if existing is not None:
            return _same_or_refuse(existing, attributes)
        full = {**SETTABLE_DEFAULTS, **(FIFO_DEFAULTS if fifo else {}), **attributes}
        if fifo:
            full["FifoQueue"] = "true"
        else:
            full.pop("FifoQueue", None)
        if full.get("RedrivePolicy") == "":
            full.pop("RedrivePolicy")
        async with conn.transaction():
            dead_letter_topic = await _dead_letter_topic(conn, full, fifo)
            retention, fields = _configs(ctx, full, dead_letter_topic)
            config = TopicConfig(
                retention_seconds=retention,
                dedup_window_seconds=DEDUP_WINDOW_SECONDS,
                max_message_bytes=TOPIC_MAX_MESSAGE_BYTES,
            )
            topic, created = await topics_sql.upsert_topic(conn, topic_of(name), config, [])
            if not created:
                # Either a native topic of that name, or a concurrent CreateQueue that
                # committed first (the upsert waited for it).
                raced = await sqs_sql.get_queue(conn, name)
                if raced is not None:
                    return _same_or_refuse(raced, attributes)
                raise queue_name_exists(
                    f"A topic named '{topic.name}' exists and is not an SQS queue."
                )
            sub_config = dataclasses.replace(SUBSCRIPTION_DEFAULTS, **fields)
            await subs_sql.create_subscription(
                conn, topic.topic_id, SQS_SUBSCRIPTION, sub_config, "earliest", ctx.clock.skew
            )
            row = await sqs_sql.create_queue(conn, topic.topic_id, name, full, tags)
            if row is None:
                raise queue_name_exists()
    return row


def _same_or_refuse(existing: SqsQueue, attributes: Mapping[str, str]) -> SqsQueue:
    for key, value in attributes.items():
        if key == "FifoQueue" and value == "false" and not is_fifo(existing):
            continue
        if existing.attributes.get(key) != value:
            raise queue_name_exists()
    return existing


# How long a process uses a queue's row before reading it again. Changes made through this
# process apply at once (forget); another process's SetQueueAttributes within this long.
# A deleted queue is noticed at once anyway: its topic is gone.
QUEUE_CACHE_SECONDS = 1.0
QUEUE_CACHE_SIZE = 10_000


async def get_queue(ctx: QueueContext, name: str) -> SqsQueue:
    now = time.monotonic()
    cached = ctx.sqs_queues.get(name)
    if cached is not None and now - cached[0] < QUEUE_CACHE_SECONDS:
        return cached[1]  # type: ignore[return-value]
    async with ctx.pool.acquire() as conn:
        queue = await sqs_sql.get_queue(conn, name)
    if queue is None:
        ctx.sqs_queues.pop(name, None)
        raise queue_does_not_exist()
    if len(ctx.sqs_queues) >= QUEUE_CACHE_SIZE:
        ctx.sqs_queues.clear()
    ctx.sqs_queues[name] = (now, queue)
    return queue


def forget(ctx: QueueContext, name: str) -> None:
    """This process changed the queue: read it again next time."""
    ctx.sqs_queues.pop(name, None)


@dataclass(slots=True)
class QueuePage:
    names: list[str]
    next_token: str | None


def _token_of(name: str) -> str:
    return base64.urlsafe_b64encode(name.encode()).decode()


def _name_of_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raise invalid_parameter("Invalid NextToken value.") from None


async def list_queues(
    ctx: QueueContext,
    prefix: str,
    max_results: int | None,
    next_token: str | None,
    visible: Callable[[str], bool] | None = None,
) -> QueuePage:
    """Queues whose name starts with `prefix`, by name; paged only with max_results (as
    SQS: without it, up to 1000 and no token). `visible` filters by the caller's key."""
    limit = max_results or 1000
    after = _name_of_token(next_token) if next_token else None
    names: list[str] = []
    async with ctx.pool.acquire() as conn:
        while len(names) < limit:
            batch = await sqs_sql.list_queues(conn, prefix, after, limit)
            for queue in batch:
                if visible is None or visible(queue.topic):
                    names.append(queue.name)
                    if len(names) == limit:
                        break
            if len(batch) < limit:
                break
            after = batch[-1].name
    more = max_results is not None and len(names) == limit
    return QueuePage(names, _token_of(names[-1]) if more and names else None)


async def delete_queue(ctx: QueueContext, name: str) -> None:
    """The topic goes, with its subscriptions and the queue's row (cascade)."""
    queue = await get_queue(ctx, name)
    forget(ctx, name)
    async with ctx.pool.acquire() as conn:
        await topics_sql.delete_topic(conn, queue.topic)


def _seconds(value: Any) -> str:
    return str(int(value.timestamp()))


async def get_attributes(ctx: QueueContext, name: str, wanted: list[str]) -> dict[str, str]:
    """The named attributes ("All" for every one); unknown names are InvalidAttributeName."""
    for attribute in wanted:
        if attribute != "All" and attribute not in READABLE:
            raise invalid_attribute_name(attribute)
    queue = await get_queue(ctx, name)
    every = "All" in wanted
    names = set(wanted)
    answer: dict[str, str] = {}
    if every or names & {
        "ApproximateNumberOfMessages",
        "ApproximateNumberOfMessagesNotVisible",
        "ApproximateNumberOfMessagesDelayed",
    }:
        try:
            stats = await subscriptions.get_subscription(ctx, queue.topic, SQS_SUBSCRIPTION)
        except SluiceError:
            raise queue_does_not_exist() from None
        answer["ApproximateNumberOfMessages"] = str(stats.counts.backlog)
        answer["ApproximateNumberOfMessagesNotVisible"] = str(stats.counts.in_flight)
        answer["ApproximateNumberOfMessagesDelayed"] = str(stats.counts.delayed)
    answer["CreatedTimestamp"] = _seconds(queue.created_at)
    answer["LastModifiedTimestamp"] = _seconds(queue.updated_at)
    answer["QueueArn"] = arn_of(ctx, queue.name)
    answer.update(queue.attributes)
    if every:
        return answer
    return {key: value for key, value in answer.items() if key in names}


async def set_attributes(ctx: QueueContext, name: str, given: Mapping[str, object]) -> None:
    queue = await get_queue(ctx, name)
    fifo = is_fifo(queue)
    # FifoQueue is set only at creation, as SQS.
    if "FifoQueue" in given and str(given["FifoQueue"]).lower() != str(fifo).lower():
        raise invalid_attribute_name("FifoQueue")
    attributes = checked_attributes(given, fifo)
    merged = {**queue.attributes, **attributes}
    if merged.get("RedrivePolicy") == "":
        merged.pop("RedrivePolicy")
    async with ctx.pool.acquire() as conn:
        dead_letter_topic = await _dead_letter_topic(conn, merged, fifo)
    retention, fields = _configs(ctx, merged, dead_letter_topic)
    try:
        await subscriptions.put_subscription(ctx, queue.topic, SQS_SUBSCRIPTION, fields, "earliest")
    except SluiceError:
        raise queue_does_not_exist() from None
    async with ctx.pool.acquire() as conn, conn.transaction():
        config = TopicConfig(
            retention_seconds=retention,
            dedup_window_seconds=DEDUP_WINDOW_SECONDS,
            max_message_bytes=TOPIC_MAX_MESSAGE_BYTES,
        )
        await topics_sql.upsert_topic(conn, queue.topic, config, ["retention_seconds"])
        await sqs_sql.set_attributes(conn, queue.topic_id, merged)
    forget(ctx, name)


async def purge(ctx: QueueContext, name: str) -> None:
    """Every message sent so far counts as deleted: the subscription moves to the log's
    end (one state row; nothing per message)."""
    queue = await get_queue(ctx, name)
    try:
        await subscriptions.seek(ctx, queue.topic, SQS_SUBSCRIPTION, to="latest")
    except SluiceError:
        raise queue_does_not_exist() from None


async def tag(ctx: QueueContext, name: str, tags: Mapping[str, object]) -> None:
    queue = await get_queue(ctx, name)
    merged = _check_tags({**queue.tags, **tags})
    async with ctx.pool.acquire() as conn:
        await sqs_sql.set_tags(conn, queue.topic_id, merged)
    forget(ctx, name)


async def untag(ctx: QueueContext, name: str, keys: list[str]) -> None:
    queue = await get_queue(ctx, name)
    remaining = {key: value for key, value in queue.tags.items() if key not in keys}
    async with ctx.pool.acquire() as conn:
        await sqs_sql.set_tags(conn, queue.topic_id, remaining)
    forget(ctx, name)


async def dead_letter_sources(
    ctx: QueueContext, name: str, visible: Callable[[str], bool] | None = None
) -> list[str]:
    await get_queue(ctx, name)
    async with ctx.pool.acquire() as conn:
        sources = await sqs_sql.dead_letter_sources(conn, name)
    return [q.name for q in sources if visible is None or visible(q.topic)]
