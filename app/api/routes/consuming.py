"""HTTP routes for consumers: pull (long-poll), ack, nack, extend."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response

from sluice.access.scopes import Kind
from sluice.api.access import require
from sluice.api.deps import WITH_BODY, SubscriptionName, TopicName, ctx_of, errors
from sluice.api.disconnect import watch_disconnect
from sluice.api.limits import StrictJSONRoute
from sluice.api.models import (
    AckRequest,
    AckResponse,
    ExtendRequest,
    ExtendResponse,
    NackRequest,
    NackResponse,
    PullRequest,
    PullResponse,
)
from sluice.api.responses import JSONBody, raw_json
from sluice.queue import consuming

router = APIRouter(
    prefix="/v1/topics/{topic}/subscriptions/{subscription}",
    tags=["consuming"],
    route_class=StrictJSONRoute,
)


@router.post(
    "/pull",
    response_model=PullResponse,
    summary="Lease up to max_messages, waiting up to wait_seconds for some",
    dependencies=[require(Kind.consume)],
    responses=errors(*WITH_BODY, 404, 429),
)
async def pull(
    topic: TopicName, subscription: SubscriptionName, body: PullRequest, request: Request
) -> Response:
    """Returns as soon as at least one message is deliverable, or empty after
    `wait_seconds`. Each message must be acked (or nacked/extended) with its `receipt`
    before `ack_deadline`, or it is delivered again after a backoff.

    `ack` acknowledges receipts first (as `/ack` does, durably), then pulls: a consumer
    acks its previous batch in the same round trip as it asks for the next one. The
    answer then also carries `acked` and `stale`; a problem answer (e.g. 429) carries them
    too, as the acks were applied anyway."""
    return await pull_answer(
        request,
        topic,
        subscription,
        body.max_messages,
        body.wait_seconds,
        body.ack_deadline_seconds,
        body.ack,
    )


async def pull_answer(
    request: Request,
    topic: str,
    subscription: str,
    max_messages: int,
    wait_seconds: float,
    ack_deadline_seconds: int | None,
    ack: list[str] | None,
) -> Response:
    """The pull itself, from checked values (also app.api.hot_paths')."""
    async with watch_disconnect(request, enabled=wait_seconds > 0) as client_gone:
        params = consuming.PullParams(
            topic, subscription, max_messages, wait_seconds, ack_deadline_seconds
        )
        outcome = await consuming.pull(
            ctx_of(request), params, ack_first=ack, client_gone=client_gone
        )
    messages: list[dict[str, Any]] = [
        {
            "receipt": receipt,
            "offset": m.offset,
            "value": raw_json(m.value),
            "key": m.key,
            "headers": raw_json(m.headers),
            "published_at": m.published_at,
            "delivery_attempt": m.attempt,
            "ack_deadline": m.lease_until,
        }
        for m, receipt in zip(
            outcome.messages, consuming.receipts_of(outcome.messages), strict=True
        )
    ]
    answer: dict[str, Any] = {"messages": messages}
    if outcome.acked is not None:
        answer["acked"] = outcome.acked.applied
        answer["stale"] = outcome.acked.stale
    return JSONBody(answer, headers=outcome.rate_headers)


@router.post(
    "/ack",
    response_model=AckResponse,
    summary="Acknowledge deliveries: they are never delivered again",
    dependencies=[require(Kind.consume)],
    responses=errors(*WITH_BODY, 404),
)
async def ack(
    topic: TopicName, subscription: SubscriptionName, body: AckRequest, request: Request
) -> Response:
    """Receipts of an attempt that is no longer current (expired, redelivered, already
    acked) are not applied and come back under `stale`."""
    return await ack_answer(request, topic, subscription, body.receipts)


async def ack_answer(
    request: Request, topic: str, subscription: str, receipts: list[str]
) -> Response:
    """The ack itself, from checked receipts (also app.api.hot_paths')."""
    result = await consuming.ack(ctx_of(request), topic, subscription, receipts)
    return JSONBody({"acked": result.applied, "stale": result.stale})


@router.post(
    "/nack",
    response_model=NackResponse,
    summary="Give deliveries back: deliverable again after delay_seconds, or dead-lettered",
    dependencies=[require(Kind.consume)],
    responses=errors(*WITH_BODY, 404),
)
async def nack(
    topic: TopicName, subscription: SubscriptionName, body: NackRequest, request: Request
) -> Response:
    """`nacked` counts the receipts applied. With `dead_letter: true` those are parked at
    once, as after the last of `max_deliveries` attempts (even with max_deliveries 0):
    listed under dead-letters, re-drivable, copied to `dead_letter_topic`."""
    result = await consuming.nack(
        ctx_of(request), topic, subscription, body.receipts, body.delay_seconds, body.dead_letter
    )
    return JSONBody({"nacked": result.applied, "stale": result.stale})


@router.post(
    "/extend",
    response_model=ExtendResponse,
    summary="Move the ack deadline of deliveries",
    dependencies=[require(Kind.consume)],
    responses=errors(*WITH_BODY, 404),
)
async def extend(
    topic: TopicName, subscription: SubscriptionName, body: ExtendRequest, request: Request
) -> Response:
    """The new deadline is now + ack_deadline_seconds."""
    result = await consuming.extend(
        ctx_of(request), topic, subscription, body.receipts, body.ack_deadline_seconds
    )
    return JSONBody({"extended": result.applied, "stale": result.stale})
