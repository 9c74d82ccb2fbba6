"""HTTP routes for topics, publishing and browsing. Thin: parse, call app.queue, shape."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, Request, Response

from sluice.access.scopes import Kind, Reach
from sluice.api.access import readable_topics, require
from sluice.api.deps import (
    COMMON,
    WITH_BODY,
    NameAfter,
    Offset,
    OffsetFrom,
    PageLimit,
    TopicName,
    ctx_of,
    errors,
)
from sluice.api.limits import StrictJSONRoute
from sluice.api.models import (
    BrowseResponse,
    PublishRequest,
    PublishResponse,
    StoredMessage,
    TopicConfig,
    TopicDetails,
    TopicList,
)
from sluice.api.responses import JSONBody, raw_json
from sluice.queue import topics as topic_ops
from sluice.records import Message, NewMessage, Topic

router = APIRouter(prefix="/v1/topics", tags=["topics"], route_class=StrictJSONRoute)


def _topic(topic: Topic) -> dict[str, Any]:
    return {
        "name": topic.name,
        "retention_seconds": topic.retention_seconds,
        "dedup_window_seconds": topic.dedup_window_seconds,
        "max_message_bytes": topic.max_message_bytes,
        "created_at": topic.created_at,
        "updated_at": topic.updated_at,
    }


def _message(message: Message) -> dict[str, Any]:
    return {
        "offset": message.offset,
        "value": raw_json(message.value),
        "key": message.key,
        "headers": raw_json(message.headers),
        "published_at": message.published_at,
        "deliver_at": message.deliver_at,
    }


@router.put(
    "/{topic}",
    response_model=TopicDetails,
    status_code=200,
    summary="Create or update a topic",
    dependencies=[require(Kind.admin)],
    responses={201: {"model": TopicDetails, "description": "Created"}, **errors(*WITH_BODY)},
)
async def put_topic(
    topic: TopicName, request: Request, body: TopicConfig | None = None
) -> Response:
    """Creates the topic (201) or changes the given settings of an existing one (200).

    Settings left out keep their current value (or the default, on creation); the body may
    be omitted altogether."""
    ctx = ctx_of(request)
    fields = body.model_dump(exclude_unset=True) if body is not None else {}
    _, created = await topic_ops.put_topic(ctx, topic, fields)
    details = await topic_ops.get_topic(ctx, topic)
    return JSONBody(_details(details), status_code=201 if created else 200)


def _details(stats: topic_ops.TopicStats) -> dict[str, Any]:
    return {
        **_topic(stats.topic),
        "head_offset": stats.head_offset,
        "oldest_offset": stats.oldest_offset,
        "message_count": stats.message_count,
        "publish_rate_per_second": stats.publish_rate_per_second,
    }


@router.get(
    "",
    response_model=TopicList,
    summary="List topics",
    dependencies=[require(Kind.read, Reach.any)],
    responses=errors(*COMMON),
)
async def list_topics(
    request: Request,
    after: NameAfter = None,
    limit: PageLimit = 100,
) -> Response:
    # A key with read:<glob> scopes sees the topics its globs match, and only those.
    page = await topic_ops.list_topics(ctx_of(request), after, limit, readable_topics(request))
    return JSONBody({"topics": [_topic(t) for t in page.topics], "next_after": page.next_after})


@router.get(
    "/{topic}",
    response_model=TopicDetails,
    summary="Topic configuration and stats",
    dependencies=[require(Kind.read)],
    responses=errors(*COMMON, 404),
)
async def get_topic(topic: TopicName, request: Request) -> Response:
    return JSONBody(_details(await topic_ops.get_topic(ctx_of(request), topic)))


@router.delete(
    "/{topic}",
    status_code=204,
    summary="Delete a topic with its messages and subscriptions",
    dependencies=[require(Kind.admin)],
    responses=errors(*COMMON, 404),
)
async def delete_topic(topic: TopicName, request: Request) -> Response:
    await topic_ops.delete_topic(ctx_of(request), topic)
    return Response(status_code=204)


def serialise_value(value: Any) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        # Integers beyond 64 bits: the standard library writes them exactly.
        import json

        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
        if not text.isascii():
            try:
                text.encode()
            except UnicodeEncodeError:
                # A lone surrogate ("\ud800" without its pair) cannot be stored as UTF-8;
                # as a \u escape it can, and it still round-trips exactly.
                text = json.dumps(value, separators=(",", ":"), allow_nan=False)
        return text


@router.post(
    "/{topic}/messages",
    response_model=PublishResponse,
    status_code=201,
    summary="Publish 1..1000 messages atomically",
    dependencies=[require(Kind.publish)],
    responses=errors(*WITH_BODY, 404),
)
async def publish(topic: TopicName, body: PublishRequest, request: Request) -> Response:
    """All messages are stored or none; 201 is answered only after the commit is durable.
    A message whose dedup_id was seen within the topic's dedup window is not stored again:
    its original offset comes back with `duplicate: true`."""
    messages = [
        NewMessage(
            value=serialise_value(m.value),
            key=m.key,
            headers=None if m.headers is None else orjson.dumps(m.headers).decode(),
            delay_seconds=m.delay_seconds,
            dedup_id=m.dedup_id,
        )
        for m in body.messages
    ]
    return await publish_answer(request, topic, messages)


async def publish_answer(request: Request, topic: str, messages: list[NewMessage]) -> Response:
    """The publish itself, from checked messages (also app.api.hot_paths')."""
    published = await topic_ops.publish(ctx_of(request), topic, messages)
    return JSONBody(
        {"messages": [{"offset": p.offset, "duplicate": p.duplicate} for p in published]},
        status_code=201,
    )


@router.get(
    "/{topic}/messages",
    response_model=BrowseResponse,
    summary="Browse messages without consuming them",
    dependencies=[require(Kind.read)],
    responses=errors(*COMMON, 404),
)
async def browse(
    topic: TopicName,
    request: Request,
    from_offset: OffsetFrom = 0,
    limit: PageLimit = 100,
) -> Response:
    messages = await topic_ops.browse(ctx_of(request), topic, from_offset, limit)
    next_offset = messages[-1].offset + 1 if messages else from_offset
    return JSONBody({"messages": [_message(m) for m in messages], "next_offset": next_offset})


@router.get(
    "/{topic}/messages/{offset}",
    response_model=StoredMessage,
    summary="One message by offset",
    dependencies=[require(Kind.read)],
    responses=errors(*COMMON, 404),
)
async def get_message(topic: TopicName, offset: Offset, request: Request) -> Response:
    return JSONBody(_message(await topic_ops.get_message(ctx_of(request), topic, offset)))
