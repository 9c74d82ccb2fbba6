"""Typed records and the queue's vocabulary, shared by every layer.

Storage turns database rows into these at its boundary; the queue layer and the routers
only ever see them (a router never indexes a database row).

Records are frozen, except those made once per message on the hot paths (NewMessage,
Published, Message, Receipt, Delivery): a frozen dataclass sets each field through
`object.__setattr__`, and building one of ten fields cost 1.2 µs against 0.2 unfrozen, 100
of them per request of 100 messages (bench/RESULTS.md run 34). Nothing changes them after
they are made.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum


class EventKind(StrEnum):
    """What happens to messages of a subscription; counted for rates and metrics."""

    DELIVERED = "delivered"
    ACKED = "acked"
    NACKED = "nacked"
    EXPIRED = "expired"
    DEAD_LETTERED = "dead_lettered"


class Settlement(StrEnum):
    """What a receipt asks for (storage function sluice.settle)."""

    ACK = "ack"
    NACK = "nack"
    EXTEND = "extend"
    # The messages go back at once and the attempt is not counted: the client that pulled
    # them went away before it could see them.
    GIVE_BACK = "give_back"
    # Parked at once as a dead letter, whatever the attempt: the consumer knows it will
    # never succeed (nack with dead_letter; revision 0006).
    DEAD_LETTER = "dead_letter"


@dataclass(frozen=True, slots=True)
class TopicConfig:
    retention_seconds: int
    dedup_window_seconds: int
    max_message_bytes: int


TOPIC_DEFAULTS = TopicConfig(
    retention_seconds=7 * 24 * 3600, dedup_window_seconds=300, max_message_bytes=1024 * 1024
)


@dataclass(frozen=True, slots=True)
class Topic:
    topic_id: int
    name: str
    retention_seconds: int
    dedup_window_seconds: int
    max_message_bytes: int
    created_at: datetime
    updated_at: datetime


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    ack_deadline_seconds: int
    max_deliveries: int
    retry_min_seconds: float
    retry_max_seconds: float
    dead_letter_topic: str | None
    ordered_by_key: bool
    rate_limit_per_second: float | None
    rate_limit_burst: int | None
    max_in_flight: int | None


SUBSCRIPTION_DEFAULTS = SubscriptionConfig(
    ack_deadline_seconds=30,
    max_deliveries=10,
    retry_min_seconds=1.0,
    retry_max_seconds=600.0,
    dead_letter_topic=None,
    ordered_by_key=False,
    rate_limit_per_second=None,
    rate_limit_burst=None,
    max_in_flight=None,
)

SUBSCRIPTION_FIELDS = tuple(SubscriptionConfig.__dataclass_fields__)


@dataclass(frozen=True, slots=True)
class Subscription:
    topic_id: int
    sub_id: int
    topic: str
    name: str
    config: SubscriptionConfig
    created_at: datetime
    updated_at: datetime


@dataclass(slots=True)
class NewMessage:
    value: str  # JSON text
    key: str | None
    headers: str | None  # JSON text of a string -> string object
    delay_seconds: int
    dedup_id: str | None


@dataclass(slots=True)
class Message:
    """A stored message as browsing shows it."""

    offset: int
    published_at: datetime
    deliver_at: datetime | None
    key: str | None
    headers: str | None
    value: str


@dataclass(slots=True)
class Published:
    offset: int
    duplicate: bool


@dataclass(slots=True)
class Receipt:
    """A receipt as the client sent it back (queue.receipts decodes it)."""

    offset: int
    lease_id: int  # 0: a receipt handed out before schema revision 0004
    seg: int
    token: str  # 32 hex digits

    @property
    def key(self) -> tuple[int, str]:
        """What names an applied receipt: a token belongs to one offset of one lease."""
        return self.offset, self.token


@dataclass(slots=True)
class Delivery:
    """A leased message, as a pull hands it out."""

    offset: int
    lease_id: int
    seg: int
    token: uuid.UUID
    attempt: int
    lease_until: datetime
    published_at: datetime
    key: str | None
    headers: str | None
    value: str


@dataclass(slots=True)
class Claim:
    """What one claim did (storage function sluice.claim)."""

    found: bool
    topic_id: int | None = None
    sub_id: int | None = None
    now: datetime | None = None
    messages: list[Delivery] = field(default_factory=list)
    # When nothing was delivered: the earliest moment something may become deliverable by
    # time alone (a delay, a backoff, a deadline), so a waiting pull can sleep till then.
    next_due: datetime | None = None
    # Token bucket: its capacity (the burst), tokens left, and seconds until one token is
    # there when empty.
    burst: float | None = None
    tokens: float | None = None
    token_wait: float | None = None
    messages_available: bool = False
    in_flight_full: bool = False
    expired: int = 0  # deadlines found passed by this claim
    dead_lettered: int = 0


@dataclass(slots=True)
class Settled:
    """Outcome of ack / nack / extend / give-back (storage function sluice.settle)."""

    found: bool
    topic_id: int | None = None
    sub_id: int | None = None
    # (offset, token hex) of each receipt applied: a token belongs to one offset of one lease.
    applied: set[tuple[int, str]] = field(default_factory=set)
    lease_until: datetime | None = None
    dead_lettered: int = 0


@dataclass(frozen=True, slots=True)
class DeliveryState:
    """The raw delivery numbers of a subscription (storage), before queue.stats shapes them."""

    topic_id: int
    sub_id: int
    topic: str
    subscription: str
    cursor: int
    now: datetime
    in_flight: int
    due: int
    waiting: int
    dead_lettered: int
    lowest_pending: int | None
    oldest_offset: int | None
    head_offset: int | None
    delayed_in_log: int
    committed_published_at: datetime | None
    delivered_total: int


@dataclass(slots=True)
class DeliveryCounts:
    """A subscription's numbers as clients see them (GET answers, /metrics, /ui)."""

    backlog: int
    in_flight: int
    delayed: int
    dead_lettered: int
    committed_offset: int
    head_offset: int | None
    lag: int
    oldest_unacked_age_seconds: float | None


@dataclass(frozen=True, slots=True)
class SubscriptionGauges:
    topic: str
    subscription: str
    counts: DeliveryCounts


@dataclass(frozen=True, slots=True)
class DeadLetter:
    offset: int
    attempts: int
    dead_lettered_at: datetime
    published_at: datetime
    key: str | None
    headers: str | None
    value: str


@dataclass(frozen=True, slots=True)
class LogStats:
    oldest_offset: int | None
    head_offset: int | None
    minute_ago_offset: int | None


@dataclass(frozen=True, slots=True)
class SqsQueue:
    """A queue of the SQS endpoint: its topic, and what SQS keeps beside it."""

    topic_id: int
    topic: str
    name: str  # the SQS name (`orders.fifo` for the topic `orders-fifo`)
    attributes: dict[str, str]  # as SQS shows them, e.g. {"VisibilityTimeout": "30"}
    tags: dict[str, str]
    created_at: datetime
    updated_at: datetime
