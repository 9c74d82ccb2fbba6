"""GET /ui: a live view of topics and subscriptions (static page; data from the JSON API).

The page and its assets ship inside the package (app/static) and use no CDN, so the view
works offline. It holds no data itself: its script polls /v1 with the visitor's API key.
"""

from __future__ import annotations

from functools import cache
from importlib import resources

from fastapi import APIRouter, Response

from sluice.api.problems import problem

router = APIRouter(tags=["observability"])

_ASSETS = {
    "ui.js": "text/javascript; charset=utf-8",
    "ui.css": "text/css; charset=utf-8",
}
_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "Referrer-Policy": "no-referrer",
}


@cache
def _read(name: str) -> bytes:
    return resources.files("sluice").joinpath("static", name).read_bytes()


@router.get(
    "/ui",
    summary="Live view of topics and subscriptions (HTML)",
    response_class=Response,
    responses={200: {"description": "The page", "content": {"text/html": {}}}},
)
async def ui_page() -> Response:
    """A page for people: topics and subscriptions with backlog, lag, in-flight and rates,
    refreshed every 1.5 s, and charts of backlog and throughput over the last minutes.
    It reads the JSON API; once API keys exist it asks for one (`read:*` is enough)."""
    return Response(_read("ui.html"), media_type="text/html; charset=utf-8", headers=_HEADERS)


@router.get("/ui/{asset}", include_in_schema=False)
async def ui_asset(asset: str) -> Response:
    media_type = _ASSETS.get(asset)
    if media_type is None:
        return problem(404, f"no such asset: {asset[:80]}")
    return Response(_read(asset), media_type=media_type, headers=_HEADERS)
