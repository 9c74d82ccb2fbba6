"""HTTP routes for subscriptions: configuration, stats, seek and dead letters."""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request, Response

from sluice.access.scopes import Kind
from sluice.api.access import require
from sluice.api.deps import (
    COMMON,
    WITH_BODY,
    NameAfter,
    OffsetFrom,
    PageLimit,
    SubscriptionName,
    TopicName,
    ctx_of,
    errors,
)
from sluice.api.limits import StrictJSONRoute
from sluice.api.models import (
    DeadLetterList,
    RedriveRequest,
    RedriveResponse,
    SeekRequest,
    SeekResponse,
    Subscription,
    SubscriptionConfig,
    SubscriptionList,
)
from sluice.api.responses import JSONBody, raw_json
from sluice.queue import subscriptions as sub_ops

router = APIRouter(
    prefix="/v1/topics/{topic}/subscriptions", tags=["subscriptions"], route_class=StrictJSONRoute
)


def _subscription(stats: sub_ops.SubscriptionStats) -> dict[str, Any]:
    sub = stats.subscription
    return {
        "topic": sub.topic,
        "name": sub.name,
        **asdict(sub.config),
        "created_at": sub.created_at,
        "updated_at": sub.updated_at,
        **asdict(stats.counts),
        "delivered_total": stats.delivered_total,
        "rates_per_second": stats.rates,
    }


@router.put(
    "/{subscription}",
    response_model=Subscription,
    summary="Create or update a subscription",
    dependencies=[require(Kind.admin)],
    responses={201: {"model": Subscription, "description": "Created"}, **errors(*WITH_BODY, 404)},
)
async def put_subscription(
    topic: TopicName,
    subscription: SubscriptionName,
    request: Request,
    body: SubscriptionConfig | None = None,
) -> Response:
    """Creates the subscription (201), starting at `latest` (only messages published from
    now on) or `earliest` (everything retained). On an existing subscription (200) the
    settings given change and the rest keep their value; `start` applies only on creation.
    The body may be omitted altogether."""
    ctx = ctx_of(request)
    fields = body.model_dump(exclude_unset=True) if body is not None else {}
    start = fields.pop("start", "latest")
    _, created = await sub_ops.put_subscription(ctx, topic, subscription, fields, start)
    stats = await sub_ops.get_subscription(ctx, topic, subscription)
    return JSONBody(_subscription(stats), status_code=201 if created else 200)


@router.get(
    "",
    response_model=SubscriptionList,
    summary="List the subscriptions of a topic, with stats",
    dependencies=[require(Kind.read)],
    responses=errors(*COMMON, 404),
)
async def list_subscriptions(
    topic: TopicName,
    request: Request,
    after: NameAfter = None,
    limit: PageLimit = 100,
) -> Response:
    subs = await sub_ops.list_subscriptions(ctx_of(request), topic, after, limit)
    next_after = subs[-1].subscription.name if len(subs) == limit else None
    return JSONBody({"subscriptions": [_subscription(s) for s in subs], "next_after": next_after})


@router.get(
    "/{subscription}",
    response_model=Subscription,
    summary="Subscription configuration and stats",
    dependencies=[require(Kind.read)],
    responses=errors(*COMMON, 404),
)
async def get_subscription(
    topic: TopicName, subscription: SubscriptionName, request: Request
) -> Response:
    stats = await sub_ops.get_subscription(ctx_of(request), topic, subscription)
    return JSONBody(_subscription(stats))


@router.delete(
    "/{subscription}",
    status_code=204,
    summary="Delete a subscription",
    dependencies=[require(Kind.admin)],
    responses=errors(*COMMON, 404),
)
async def delete_subscription(
    topic: TopicName, subscription: SubscriptionName, request: Request
) -> Response:
    await sub_ops.delete_subscription(ctx_of(request), topic, subscription)
    return Response(status_code=204)


@router.post(
    "/{subscription}/seek",
    response_model=SeekResponse,
    summary="Replay or skip: move the subscription to an offset, a time, earliest or latest",
    dependencies=[require(Kind.consume)],
    responses=errors(*WITH_BODY, 404),
)
async def seek(
    topic: TopicName, subscription: SubscriptionName, body: SeekRequest, request: Request
) -> Response:
    """Messages at or after the target become pending again; earlier ones count as
    acknowledged. Leases in flight are dropped (their receipts become stale)."""
    target = await sub_ops.seek(
        ctx_of(request), topic, subscription, offset=body.offset, time=body.time, to=body.to
    )
    return JSONBody({"committed_offset": target})


@router.get(
    "/{subscription}/dead-letters",
    response_model=DeadLetterList,
    summary="List parked (dead-lettered) messages",
    dependencies=[require(Kind.consume)],
    responses=errors(*COMMON, 404),
)
async def dead_letters(
    topic: TopicName,
    subscription: SubscriptionName,
    request: Request,
    from_offset: OffsetFrom = 0,
    limit: PageLimit = 100,
) -> Response:
    parked = await sub_ops.dead_letters(ctx_of(request), topic, subscription, from_offset, limit)
    next_offset = parked[-1].offset + 1 if parked else from_offset
    return JSONBody(
        {
            "messages": [
                {
                    "offset": d.offset,
                    "value": raw_json(d.value),
                    "key": d.key,
                    "headers": raw_json(d.headers),
                    "published_at": d.published_at,
                    "delivery_attempts": d.attempts,
                    "dead_lettered_at": d.dead_lettered_at,
                }
                for d in parked
            ],
            "next_offset": next_offset,
        }
    )


@router.post(
    "/{subscription}/dead-letters/redrive",
    response_model=RedriveResponse,
    summary="Deliver parked messages again",
    dependencies=[require(Kind.consume)],
    responses=errors(*WITH_BODY, 404),
)
async def redrive(
    topic: TopicName,
    subscription: SubscriptionName,
    request: Request,
    body: RedriveRequest | None = None,
) -> Response:
    """Re-drives every parked message, or only `offsets`; attempts start again at 1."""
    offsets = body.offsets if body is not None else None
    count = await sub_ops.redrive(ctx_of(request), topic, subscription, offsets)
    return JSONBody({"redriven": count})
