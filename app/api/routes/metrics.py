"""GET /metrics: Prometheus exposition of the service's counters and the queue's gauges."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from sluice import metrics
from sluice.access.scopes import Kind, Reach
from sluice.api.access import require
from sluice.api.deps import ctx_of
from sluice.queue import gauges as queue_gauges

router = APIRouter(tags=["observability"])

_EXAMPLE = """\
# HELP sluice_messages_published_total Messages stored by publish (duplicates excluded)
# TYPE sluice_messages_published_total counter
sluice_messages_published_total{topic="orders"} 1200.0
# HELP sluice_subscription_backlog Messages deliverable now
# TYPE sluice_subscription_backlog gauge
sluice_subscription_backlog{subscription="billing",topic="orders"} 42.0
"""


@router.get(
    "/metrics",
    summary="Prometheus metrics",
    # Metrics name every topic and subscription: reading them needs read on all topics.
    dependencies=[require(Kind.read, Reach.all)],
    response_class=Response,
    responses={
        200: {
            "description": (
                "Prometheus text format (OpenMetrics when the Accept header asks for it)"
            ),
            "content": {
                "text/plain": {"schema": {"type": "string"}, "example": _EXAMPLE},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        }
    },
)
async def get_metrics(request: Request) -> Response:
    """Counters (all API processes added up): `sluice_messages_published_total{topic}`,
    `sluice_messages_{delivered,acked,nacked,expired,dead_lettered}_total{topic,subscription}`,
    `sluice_http_requests_total` and the histogram `sluice_http_request_duration_seconds`
    by `method`, `route` (the path template) and `status`.

    Gauges read from the database at scrape time, per `{topic,subscription}`:
    `sluice_subscription_backlog`, `_lag`, `_in_flight`, `_delayed`, `_dead_lettered` and
    `_oldest_unacked_age_seconds`; `sluice_database_up` is 0 when they could not be read."""
    gauges = await queue_gauges.read(ctx_of(request))
    body, content_type = metrics.render(gauges, request.headers.get("accept"))
    return Response(body, media_type=content_type)
