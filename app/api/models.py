"""Request and response bodies of the HTTP API (the contract in SPEC section 4)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    field_validator,
    model_validator,
)

from sluice.records import SUBSCRIPTION_DEFAULTS, TOPIC_DEFAULTS

NAME_PATTERN = r"^[A-Za-z0-9_-]{1,80}$"
MAX_BATCH = 1000
MAX_HEADERS = 64


def _no_nul(value: str) -> str:
    # Postgres text cannot hold NUL; refuse it here instead of failing in storage.
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    # Nor can UTF-8 hold a lone surrogate (a JSON "\ud800" escape without its pair).
    if not value.isascii():
        try:
            value.encode()
        except UnicodeEncodeError:
            raise ValueError("must be valid Unicode (no lone surrogates)") from None
    return value


# Documents the NUL rule in the OpenAPI (validation stays with _no_nul, lone surrogates too).
NO_NUL_PATTERN = "^[^\\u0000]*$"
CleanStr = Annotated[
    str, AfterValidator(_no_nul), Field(json_schema_extra={"pattern": NO_NUL_PATTERN})
]


# What _check_headers enforces, stated in the OpenAPI document.
HEADERS_SCHEMA = {
    "type": "object",
    "maxProperties": MAX_HEADERS,
    "propertyNames": {"minLength": 1, "maxLength": 256, "pattern": NO_NUL_PATTERN},
    "additionalProperties": {"type": "string", "maxLength": 4096, "pattern": NO_NUL_PATTERN},
}


def _check_headers(value: dict[str, str] | None) -> dict[str, str] | None:
    if value is None:
        return None
    if len(value) > MAX_HEADERS:
        raise ValueError(f"at most {MAX_HEADERS} headers")
    for k, v in value.items():
        if not k or len(k) > 256:
            raise ValueError("header names must be 1..256 characters")
        if len(v) > 4096:
            raise ValueError("header values must be at most 4096 characters")
        _no_nul(k)
        _no_nul(v)
    return value


def _integral(value: Any) -> Any:
    # JSON Schema counts 30.0 as an integer, so integer fields take it as 30 (strict mode
    # alone would refuse it); 30.5 is still refused.
    if type(value) is float and value.is_integer():
        return int(value)
    return value


# Integer request fields take INTEGRAL: a field-level hook (not a model-level one), so it
# runs only for fields that are present and the messages of a publish pay nothing for it.
# In a union or a list, bounds go before it (`Annotated[int, Field(ge=1), INTEGRAL]`): put
# after, they would reach the OpenAPI document as "ge"/"le" instead of minimum/maximum.
INTEGRAL = BeforeValidator(_integral)
Integral = Annotated[int, INTEGRAL]


class Strict(BaseModel):
    # Unknown fields are rejected so that typos never pass silently, and values are not
    # coerced: `false` is not the number 0, `1` is not `true`, "5" is not 5 (the OpenAPI
    # document promises those types). Subclasses' model_config merges with this one.
    # Integer fields are declared `Integral`.
    model_config = ConfigDict(extra="forbid", strict=True)


class Problem(BaseModel):
    """RFC 9457 problem details (application/problem+json)."""

    type: str = Field(examples=["https://sluice.dev/problems/not-found"])
    title: str = Field(examples=["Not found"])
    status: int = Field(examples=[404])
    detail: str = Field(examples=["topic 'orders' does not exist"])
    instance: str | None = Field(default=None, examples=["/v1/topics/orders"])
    errors: list[dict[str, Any]] | None = None
    acked: int | None = Field(
        default=None, description="a pull that carried `ack`: receipts applied all the same"
    )
    stale: list[str] | None = Field(
        default=None, description="a pull that carried `ack`: receipts not applied"
    )


# ---- topics --------------------------------------------------------------------------------


def _omit_default(schema: dict[str, Any]) -> None:
    # Optional-but-not-nullable fields: leaving them out keeps the current value; an
    # explicit null is refused (422) rather than reaching a NOT NULL column.
    schema.pop("default", None)


class TopicConfig(Strict):
    retention_seconds: Integral = Field(
        default=None,
        ge=60,
        le=90 * 24 * 3600,
        description=f"default {TOPIC_DEFAULTS.retention_seconds} (7 days)",
        json_schema_extra=_omit_default,
    )
    dedup_window_seconds: Integral = Field(
        default=None,
        ge=0,
        le=7 * 24 * 3600,
        description=f"default {TOPIC_DEFAULTS.dedup_window_seconds}",
        json_schema_extra=_omit_default,
    )
    max_message_bytes: Integral = Field(
        default=None,
        ge=1,
        le=10 * 1024 * 1024,
        description=f"default {TOPIC_DEFAULTS.max_message_bytes} (1 MiB)",
        json_schema_extra=_omit_default,
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"retention_seconds": 86400, "dedup_window_seconds": 300}]},
    )


class Topic(BaseModel):
    name: str
    retention_seconds: int
    dedup_window_seconds: int
    max_message_bytes: int
    created_at: datetime
    updated_at: datetime


class TopicDetails(Topic):
    head_offset: int | None = Field(description="newest message's offset; null when empty")
    oldest_offset: int | None
    message_count: int
    publish_rate_per_second: float = Field(description="average over the last 60 seconds")


class TopicList(BaseModel):
    topics: list[Topic]
    next_after: str | None = Field(description="pass as ?after= for the next page")


# ---- publish and browse ----------------------------------------------------------------------


class PublishMessage(Strict):
    # Required (no default); JSON null is a value.
    value: Any = Field(description="any JSON value, null included; required")
    key: Annotated[CleanStr, Field(max_length=256)] | None = None
    headers: (
        Annotated[dict[str, str], WithJsonSchema(HEADERS_SCHEMA), AfterValidator(_check_headers)]
        | None
    ) = None
    delay_seconds: Integral = Field(default=0, ge=0, le=900)
    dedup_id: Annotated[CleanStr, Field(min_length=1, max_length=128)] | None = None


class PublishRequest(Strict):
    messages: list[PublishMessage] = Field(min_length=1, max_length=MAX_BATCH)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "messages": [
                        {"value": {"order_id": 42, "total": 19.9}, "key": "customer-7"},
                        {
                            "value": "hello",
                            "headers": {"source": "web"},
                            "delay_seconds": 10,
                            "dedup_id": "evt-1",
                        },
                    ]
                }
            ]
        },
    )


class PublishedMessage(BaseModel):
    offset: int
    duplicate: bool


class PublishResponse(BaseModel):
    messages: list[PublishedMessage]


class StoredMessage(BaseModel):
    offset: int
    value: Any
    key: str | None
    headers: dict[str, str] | None
    published_at: datetime
    deliver_at: datetime | None = Field(description="set for delayed messages")


class BrowseResponse(BaseModel):
    messages: list[StoredMessage]
    next_offset: int


# ---- subscriptions -----------------------------------------------------------------------------


# Bounds of the token bucket, so that its arithmetic stays finite: at the slowest rate the
# next token is 1000 s away (a 429's Retry-After is at most that); a subnormal rate such as
# 1e-320 made it infinite, and every pull failed.
MIN_RATE_PER_SECOND = 0.001
MAX_RATE_PER_SECOND = 1_000_000
MAX_BURST = 1_000_000


class SubscriptionConfig(Strict):
    # Not nullable: leaving a field out keeps its value; an explicit null is refused (422).
    ack_deadline_seconds: Integral = Field(
        default=None,
        ge=1,
        le=43200,
        description=f"default {SUBSCRIPTION_DEFAULTS.ack_deadline_seconds}",
        json_schema_extra=_omit_default,
    )
    max_deliveries: Integral = Field(
        default=None,
        ge=0,
        le=1000,
        description=f"default {SUBSCRIPTION_DEFAULTS.max_deliveries}; 0 = unlimited",
        json_schema_extra=_omit_default,
    )
    retry_min_seconds: float = Field(
        default=None,
        ge=0,
        le=3600,
        description=f"default {SUBSCRIPTION_DEFAULTS.retry_min_seconds:g}",
        json_schema_extra=_omit_default,
    )
    retry_max_seconds: float = Field(
        default=None,
        ge=0,
        le=86400,
        description=f"default {SUBSCRIPTION_DEFAULTS.retry_max_seconds:g}",
        json_schema_extra=_omit_default,
    )
    dead_letter_topic: Annotated[str, Field(pattern=NAME_PATTERN)] | None = None
    ordered_by_key: bool = Field(
        default=None, description="default false", json_schema_extra=_omit_default
    )
    rate_limit_per_second: float | None = Field(
        default=None,
        ge=MIN_RATE_PER_SECOND,
        le=MAX_RATE_PER_SECOND,
        description=(
            "messages per second, shared by every consumer and process: 0.001 (one message "
            "every 1000 s) to 1000000; default: no limit"
        ),
    )
    rate_limit_burst: Annotated[int, Field(ge=1, le=MAX_BURST), INTEGRAL] | None = Field(
        default=None,
        description=(
            "messages the token bucket holds (what a pull may take at once after a quiet "
            "spell): 1 to 1000000; default: one second's worth, at least 1. Needs "
            "rate_limit_per_second"
        ),
    )
    max_in_flight: Annotated[int, Field(ge=1, le=1_000_000), INTEGRAL] | None = None
    start: Literal["latest", "earliest"] = Field(
        default="latest", description="where a new subscription starts; ignored on update"
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "ack_deadline_seconds": 30,
                    "max_deliveries": 5,
                    "dead_letter_topic": "orders-dlq",
                    "rate_limit_per_second": 100,
                    "start": "earliest",
                }
            ]
        },
    )


class Subscription(BaseModel):
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
    created_at: datetime
    updated_at: datetime
    backlog: int = Field(description="deliverable now")
    in_flight: int = Field(description="leased, not yet acked")
    delayed: int = Field(description="waiting for a delay, a retry backoff or an earlier key")
    dead_lettered: int
    committed_offset: int = Field(description="lowest offset not yet acked or dead-lettered")
    head_offset: int | None
    lag: int = Field(description="backlog + in_flight + delayed")
    oldest_unacked_age_seconds: float | None
    delivered_total: int
    rates_per_second: SubscriptionRates


class SubscriptionRates(BaseModel):
    """Events per second over the last minute, across every API process."""

    delivered: float
    acked: float
    nacked: float
    expired: float
    dead_lettered: float


class SubscriptionList(BaseModel):
    subscriptions: list[Subscription]
    next_after: str | None


Receipt = Annotated[str, Field(max_length=64)]
ReceiptList = Annotated[list[Receipt], Field(min_length=1, max_length=MAX_BATCH)]


class PullRequest(Strict):
    max_messages: Integral = Field(default=1, ge=1, le=MAX_BATCH)
    wait_seconds: float = Field(default=0, ge=0, le=20)
    ack_deadline_seconds: Annotated[int, Field(ge=1, le=43200), INTEGRAL] | None = None
    ack: list[Receipt] | None = Field(
        default=None,
        max_length=MAX_BATCH,
        description=(
            "receipts to acknowledge before pulling (typically the previous batch): the ack "
            "and the next pull in one round trip. Applied even when the pull then waits, "
            "finds nothing or is rate limited; the answer reports them under `acked`/`stale`."
        ),
    )

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"max_messages": 100, "wait_seconds": 20},
                {
                    "max_messages": 100,
                    "wait_seconds": 20,
                    "ack": ["AAAAAAAAAAC7JjI0aF2HRbqv1pSe3Q0e"],
                },
            ]
        },
    )


class DeliveredMessage(BaseModel):
    receipt: str
    offset: int
    value: Any
    key: str | None
    headers: dict[str, str] | None
    published_at: datetime
    delivery_attempt: int
    ack_deadline: datetime


class PullResponse(BaseModel):
    messages: list[DeliveredMessage]
    acked: int | None = Field(
        default=None, description="present when the request carried `ack`: receipts applied"
    )
    stale: list[str] | None = Field(
        default=None,
        description="present when the request carried `ack`: receipts not applied (see ack)",
    )


class AckRequest(Strict):
    receipts: ReceiptList

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={"examples": [{"receipts": ["AAAAAAAAAAC7JjI0aF2HRbqv1pSe3Q0e"]}]},
    )


class AckResponse(BaseModel):
    acked: int
    stale: list[str]


class NackRequest(Strict):
    receipts: ReceiptList
    delay_seconds: float | None = Field(
        default=None, ge=0, le=43200, description="default: the subscription's backoff"
    )
    dead_letter: bool = Field(
        default=False,
        description=(
            "park the messages now as dead letters (listed under dead-letters, copied to "
            "dead_letter_topic), whatever the attempt and max_deliveries; not with "
            "delay_seconds"
        ),
    )

    @model_validator(mode="after")
    def _delay_or_dead_letter(self) -> NackRequest:
        # A delay means "deliver again later": it contradicts parking the message.
        if self.dead_letter and self.delay_seconds is not None:
            raise ValueError("give either 'delay_seconds' or 'dead_letter', not both")
        return self

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            # What _delay_or_dead_letter refuses, said in the schema too: dead_letter true
            # together with a delay.
            "not": {
                "required": ["dead_letter", "delay_seconds"],
                "properties": {
                    "dead_letter": {"const": True},
                    "delay_seconds": {"type": "number"},
                },
            },
            "examples": [
                {"receipts": ["AAAAAAAAAAC7JjI0aF2HRbqv1pSe3Q0e"], "delay_seconds": 5},
                {"receipts": ["AAAAAAAAAAC7JjI0aF2HRbqv1pSe3Q0e"], "dead_letter": True},
            ],
        },
    )


class NackResponse(BaseModel):
    nacked: int
    stale: list[str]


class ExtendRequest(Strict):
    receipts: ReceiptList
    ack_deadline_seconds: Integral = Field(ge=1, le=43200)

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {"receipts": ["AAAAAAAAAAC7JjI0aF2HRbqv1pSe3Q0e"], "ack_deadline_seconds": 60}
            ]
        },
    )


class ExtendResponse(BaseModel):
    extended: int
    stale: list[str]


class SeekRequest(Strict):
    offset: Annotated[int, Field(ge=0, le=2**63 - 1), INTEGRAL] | None = None
    # JSON has no datetime type: the RFC 3339 string is parsed (strict mode would refuse it).
    time: datetime | None = Field(default=None, strict=False, description="RFC 3339 with offset")
    to: Literal["earliest", "latest"] | None = None

    @field_validator("time", mode="before")
    @classmethod
    def _time_is_text(cls, value: Any) -> Any:
        # Lax datetime parsing would also take a number (a Unix time): only RFC 3339 text.
        if value is not None and not isinstance(value, str):
            raise ValueError("'time' must be an RFC 3339 string, e.g. 2026-11-30T12:00:00Z")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> SeekRequest:
        given = [f for f in ("offset", "time", "to") if getattr(self, f) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of 'offset', 'time' or 'to'")
        if self.time is not None and self.time.tzinfo is None:
            raise ValueError("'time' needs a UTC offset, e.g. 2026-11-30T12:00:00Z")
        return self

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [{"to": "earliest"}, {"offset": 1200}, {"time": "2026-11-30T12:00:00Z"}],
            # Exactly one of the three, given as a non-null value (the validator above).
            "oneOf": [
                {"required": ["offset"], "properties": {"offset": {"type": "integer"}}},
                {"required": ["time"], "properties": {"time": {"type": "string"}}},
                {"required": ["to"], "properties": {"to": {"type": "string"}}},
            ],
        },
    )


class SeekResponse(BaseModel):
    committed_offset: int


class DeadLetter(BaseModel):
    offset: int
    value: Any
    key: str | None
    headers: dict[str, str] | None
    published_at: datetime
    delivery_attempts: int
    dead_lettered_at: datetime | None


class DeadLetterList(BaseModel):
    messages: list[DeadLetter]
    next_offset: int


class RedriveRequest(Strict):
    offsets: list[Annotated[int, Field(ge=0, le=2**63 - 1), INTEGRAL]] | None = Field(
        default=None, max_length=MAX_BATCH, description="default: every parked message"
    )

    model_config = ConfigDict(
        extra="forbid", json_schema_extra={"examples": [{}, {"offsets": [17, 18]}]}
    )


class RedriveResponse(BaseModel):
    redriven: int
