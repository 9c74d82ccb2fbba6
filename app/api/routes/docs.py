"""GET /docs (Swagger UI) and GET /redoc (ReDoc), with every asset served by the app.

FastAPI's own pages load Swagger UI and ReDoc from a CDN and a favicon from another site,
so on a machine without internet they are blank. These pages use the copies that the
`fastapi-offline` distribution ships (swagger-ui-dist 5, which renders OpenAPI 3.1, and
redoc 2) and serve them under /docs/assets/. The pages have no inline script, so their
Content-Security-Policy allows scripts and requests to this origin only.
"""

from __future__ import annotations

import hashlib
import json
from functools import cache
from importlib import resources

from fastapi import APIRouter, Request, Response

from sluice.api.problems import problem

router = APIRouter()

ASSET_PREFIX = "/docs/assets"
OPENAPI_URL = "/openapi.json"
TITLE = "Sluice"

# Name served -> (file in the fastapi_offline package's static/ folder, media type).
# swagger-init.js is ours (built here, below); everything else comes from the package.
_VENDORED = {
    "swagger-ui-bundle.js": ("swagger-ui-bundle.js", "text/javascript; charset=utf-8"),
    "swagger-ui.css": ("swagger-ui.css", "text/css; charset=utf-8"),
    "redoc.standalone.js": ("redoc.standalone.js", "text/javascript; charset=utf-8"),
    "favicon.png": ("favicon.png", "image/png"),
}

# Swagger UI as FastAPI configures it, without the online validator badge.
SWAGGER_UI_PARAMETERS = {
    "dom_id": "#swagger-ui",
    "layout": "BaseLayout",
    "deepLinking": True,
    "showExtensions": True,
    "showCommonExtensions": True,
    "validatorUrl": None,
}

_CSP = (
    "default-src 'none'; script-src 'self'; connect-src 'self'; img-src 'self' data:; "
    # Both UIs set style attributes and inject <style> elements at run time; ReDoc runs
    # its search index in a worker it builds from a blob.
    "style-src 'self' 'unsafe-inline'; worker-src blob:; font-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
_PAGE_HEADERS = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": _CSP,
    "Referrer-Policy": "no-referrer",
}

_SWAGGER_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1.0">
<title>{TITLE} - Swagger UI</title>
<link rel="stylesheet" href="{ASSET_PREFIX}/swagger-ui.css">
<link rel="icon" type="image/png" href="{ASSET_PREFIX}/favicon.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="{ASSET_PREFIX}/swagger-ui-bundle.js"></script>
<script src="{ASSET_PREFIX}/swagger-init.js"></script>
</body>
</html>
"""

_REDOC_PAGE = f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{TITLE} - ReDoc</title>
<link rel="icon" type="image/png" href="{ASSET_PREFIX}/favicon.png">
</head>
<body style="margin: 0; padding: 0">
<noscript>ReDoc needs JavaScript; Swagger UI is at /docs.</noscript>
<redoc spec-url="{OPENAPI_URL}"></redoc>
<script src="{ASSET_PREFIX}/redoc.standalone.js"></script>
</body>
</html>
"""


def _swagger_init() -> bytes:
    """The script that starts Swagger UI (a file, not inline, so the CSP needs no hash)."""
    config = {"url": OPENAPI_URL, **SWAGGER_UI_PARAMETERS}
    return (
        f"window.ui = SwaggerUIBundle(Object.assign({json.dumps(config)}, {{\n"
        "  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],\n"
        "}));\n"
    ).encode()


@cache
def _asset(name: str) -> tuple[bytes, str, str] | None:
    """(content, media type, ETag) of an asset, read once per process."""
    if name == "swagger-init.js":
        content, media_type = _swagger_init(), "text/javascript; charset=utf-8"
    elif name in _VENDORED:
        filename, media_type = _VENDORED[name]
        content = resources.files("fastapi_offline").joinpath("static", filename).read_bytes()
    else:
        return None
    etag = '"' + hashlib.sha256(content).hexdigest()[:32] + '"'
    return content, media_type, etag


def _page(html: str) -> Response:
    return Response(html, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@router.get("/docs", include_in_schema=False)
async def swagger_ui() -> Response:
    return _page(_SWAGGER_PAGE)


@router.get("/redoc", include_in_schema=False)
async def redoc() -> Response:
    return _page(_REDOC_PAGE)


@router.get(ASSET_PREFIX + "/{name}", include_in_schema=False)
async def docs_asset(name: str, request: Request) -> Response:
    found = _asset(name)
    if found is None:
        return problem(404, f"no such asset: {name[:80]}")
    content, media_type, etag = found
    # Revalidated on each load (cheap: 304) so an upgraded package is picked up at once.
    headers = {"ETag": etag, "Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"}
    if etag in request.headers.get("if-none-match", ""):
        return Response(status_code=304, headers=headers)
    return Response(content, media_type=media_type, headers=headers)
