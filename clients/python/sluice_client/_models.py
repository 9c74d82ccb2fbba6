"""Typed results: the API's JSON answers as dataclasses."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def _dt(value: str | None) -> datetime | None:
    return datetime.fromisoformat(value) if value else None


@dataclass(frozen=True)
class OutgoingMessage:
    """A message to publish. `dedup_id`: a message with an id already seen on the topic
    within its dedup window is not stored again (the original offset comes back)."""

    value: Any
    key: str | None = None
    headers: dict[str, str] | None = None
    delay_seconds: int = 0
    dedup_id: str | None = None

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {"value": self.value}
        if self.key is not None:
            body["key"] = self.key
        if self.headers is not None:
            body["headers"] = self.headers
        if self.delay_seconds:
            body["delay_seconds"] = self.delay_seconds
        if self.dedup_id is not None:
            body["dedup_id"] = self.dedup_id
        return body


@dataclass(frozen=True)
class Topic:
    name: str
    retention_seconds: int
    dedup_window_seconds: int
    max_message_bytes: int
    created_at: datetime | None
    updated_at: datetime | None
    # only in the answers about one topic (get, create/update), None in lists
    head_offset: int | None = None
    oldest_offset: int | None = None
    message_count: int | None = None
    publish_rate_per_second: float | None = None
    #: True when the PUT created the topic (201); None for other answers
    created: bool | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any], created: bool | None = None) -> Topic:
        return cls(
            name=d["name"],
            retention_seconds=d["retention_seconds"],
            dedup_window_seconds=d["dedup_window_seconds"],
            max_message_bytes=d["max_message_bytes"],
            created_at=_dt(d.get("created_at")),
            updated_at=_dt(d.get("updated_at")),
            head_offset=d.get("head_offset"),
            oldest_offset=d.get("oldest_offset"),
            message_count=d.get("message_count"),
            publish_rate_per_second=d.get("publish_rate_per_second"),
            created=created,
        )


@dataclass(frozen=True)
class SubscriptionRates:
    delivered: float = 0.0
    acked: float = 0.0
    nacked: float = 0.0
    expired: float = 0.0
    dead_lettered: float = 0.0


@dataclass(frozen=True)
class Subscription:
    topic: str
    name: str
    ack_deadline_seconds: int
    max_deliveries: int
    retry_min_seconds: float
    retry_max_seconds: float
    dead_letter_topic: str | None
    ordered_by_key: bool
    rate_limit_per_second: float | None
    rate_limit_burst: int | None
    max_in_flight: int | None
    created_at: datetime | None
    updated_at: datetime | None
    backlog: int
    in_flight: int
    delayed: int
    dead_lettered: int
    committed_offset: int
    head_offset: int | None
    lag: int
    oldest_unacked_age_seconds: float | None
    delivered_total: int
    rates_per_second: SubscriptionRates = field(default_factory=SubscriptionRates)
    created: bool | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any], created: bool | None = None) -> Subscription:
        return cls(
            topic=d["topic"],
            name=d["name"],
            ack_deadline_seconds=d["ack_deadline_seconds"],
            max_deliveries=d["max_deliveries"],
            retry_min_seconds=d["retry_min_seconds"],
            retry_max_seconds=d["retry_max_seconds"],
            dead_letter_topic=d.get("dead_letter_topic"),
            ordered_by_key=d["ordered_by_key"],
            rate_limit_per_second=d.get("rate_limit_per_second"),
            rate_limit_burst=d.get("rate_limit_burst"),
            max_in_flight=d.get("max_in_flight"),
            created_at=_dt(d.get("created_at")),
            updated_at=_dt(d.get("updated_at")),
            backlog=d["backlog"],
            in_flight=d["in_flight"],
            delayed=d["delayed"],
            dead_lettered=d["dead_lettered"],
            committed_offset=d["committed_offset"],
            head_offset=d.get("head_offset"),
            lag=d["lag"],
            oldest_unacked_age_seconds=d.get("oldest_unacked_age_seconds"),
            delivered_total=d["delivered_total"],
            rates_per_second=SubscriptionRates(**(d.get("rates_per_second") or {})),
            created=created,
        )


@dataclass(frozen=True)
class Page(Generic[T]):
    """One page of a list; pass `next_after` as `after` for the next (None: last page)."""

    items: list[T]
    next_after: str | None


@dataclass(frozen=True)
class Message:
    """A stored message (browse, get_message)."""

    offset: int
    value: Any
    key: str | None
    headers: dict[str, str] | None
    published_at: datetime | None
    deliver_at: datetime | None = None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Message:
        return cls(
            offset=d["offset"],
            value=d["value"],
            key=d.get("key"),
            headers=d.get("headers"),
            published_at=_dt(d.get("published_at")),
            deliver_at=_dt(d.get("deliver_at")),
        )


@dataclass(frozen=True)
class BrowsePage:
    messages: list[Message]
    next_offset: int


@dataclass(frozen=True)
class Delivery:
    """A leased message from a pull: ack, nack or extend it with `receipt`."""

    receipt: str
    offset: int
    value: Any
    key: str | None
    headers: dict[str, str] | None
    published_at: datetime | None
    delivery_attempt: int
    ack_deadline: datetime | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Delivery:
        # Filled through __dict__: a frozen dataclass's __init__ sets each field with
        # object.__setattr__, and a pull makes one Delivery per message (one of the
        # largest items of the Worker's own cost in a profile, bench/RESULTS.md run 23).
        delivery = object.__new__(cls)
        published_at = d.get("published_at")
        ack_deadline = d.get("ack_deadline")
        delivery.__dict__.update(
            receipt=d["receipt"],
            offset=d["offset"],
            value=d["value"],
            key=d.get("key"),
            headers=d.get("headers"),
            published_at=datetime.fromisoformat(published_at) if published_at else None,
            delivery_attempt=d["delivery_attempt"],
            ack_deadline=datetime.fromisoformat(ack_deadline) if ack_deadline else None,
        )
        return delivery


@dataclass(frozen=True)
class PullResult:
    """The messages of a pull; `acked`/`stale` only when the pull carried `ack` receipts."""

    messages: list[Delivery]
    acked: int | None = None
    stale: list[str] = field(default_factory=list)

    def __iter__(self):
        return iter(self.messages)

    def __len__(self) -> int:
        return len(self.messages)


@dataclass(frozen=True)
class PublishResult:
    offset: int
    duplicate: bool


@dataclass(frozen=True)
class AckResult:
    acked: int
    stale: list[str]


@dataclass(frozen=True)
class NackResult:
    nacked: int
    stale: list[str]


@dataclass(frozen=True)
class ExtendResult:
    extended: int
    stale: list[str]


@dataclass(frozen=True)
class SeekResult:
    committed_offset: int


@dataclass(frozen=True)
class DeadLetterMessage:
    offset: int
    value: Any
    key: str | None
    headers: dict[str, str] | None
    published_at: datetime | None
    delivery_attempts: int
    dead_lettered_at: datetime | None

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> DeadLetterMessage:
        return cls(
            offset=d["offset"],
            value=d["value"],
            key=d.get("key"),
            headers=d.get("headers"),
            published_at=_dt(d.get("published_at")),
            delivery_attempts=d["delivery_attempts"],
            dead_lettered_at=_dt(d.get("dead_lettered_at")),
        )


@dataclass(frozen=True)
class DeadLetterPage:
    messages: list[DeadLetterMessage]
    next_offset: int


@dataclass(frozen=True)
class RedriveResult:
    redriven: int
