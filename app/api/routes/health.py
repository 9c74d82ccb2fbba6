"""Liveness and readiness (always open, no API key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response

from sluice.api.deps import errors
from sluice.api.problems import problem
from sluice.api.responses import JSONBody
from sluice.queue import health

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="Liveness: the process answers")
async def healthz() -> Response:
    return JSONBody({"status": "ok"})


@router.get(
    "/readyz",
    summary="Readiness: database reachable and schema at head",
    responses=errors(503),
)
async def readyz(request: Request) -> Response:
    state = request.app.state
    try:
        revision = await health.schema_revision(state.ctx)
    except Exception as exc:
        return problem(503, f"database unreachable: {type(exc).__name__}")
    if revision != state.head_revision:
        return problem(503, f"schema at {revision}, expected {state.head_revision}")
    listening = state.listener.connected.is_set()
    if not listening:
        return problem(503, "notification listener is reconnecting")
    return JSONBody({"status": "ready", "schema": revision})
