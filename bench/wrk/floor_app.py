"""The floor of the HTTP path: a bare ASGI app that reads the request body and answers a
fixed 201 with a small JSON body, served by the same uvicorn (uvloop, httptools) as Sluice.
What wrk measures against it is the cost of the socket, HTTP parsing and the ASGI hand-off,
which no change in Sluice can go below.

    .venv/bin/python -m uvicorn bench.wrk.floor_app:app --port 8001 --log-level warning \\
        --loop uvloop --http httptools --no-access-log
"""

from __future__ import annotations

from typing import Any

BODY = b'{"messages":[{"offset":0,"duplicate":false}]}'
HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode())]


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    more = True
    while more:
        message = await receive()
        more = message.get("more_body", False)
    await send({"type": "http.response.start", "status": 201, "headers": HEADERS})
    await send({"type": "http.response.body", "body": BODY})


# The same answer through the frameworks, to see what each layer costs before any of
# Sluice's own work: a Starlette route that parses the body with orjson, and a FastAPI route
# that validates it with a pydantic model (what Sluice's routes do, minus everything else).

import orjson  # noqa: E402
from fastapi import FastAPI  # noqa: E402
from fastapi.responses import Response as FastAPIResponse  # noqa: E402
from pydantic import BaseModel  # noqa: E402
from starlette.applications import Starlette  # noqa: E402
from starlette.requests import Request  # noqa: E402
from starlette.responses import Response  # noqa: E402
from starlette.routing import Route  # noqa: E402


async def _starlette_publish(request: Request) -> Response:
    orjson.loads(await request.body())
    return Response(BODY, status_code=201, media_type="application/json")


starlette_app = Starlette(
    routes=[Route("/v1/topics/{topic}/messages", _starlette_publish, methods=["POST"])]
)


class _Message(BaseModel):
    value: Any
    key: str | None = None


class _Publish(BaseModel):
    messages: list[_Message]


fastapi_app = FastAPI()


@fastapi_app.post("/v1/topics/{topic}/messages", status_code=201)
async def _fastapi_publish(topic: str, body: _Publish) -> FastAPIResponse:
    return FastAPIResponse(BODY, status_code=201, media_type="application/json")
