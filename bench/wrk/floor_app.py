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
