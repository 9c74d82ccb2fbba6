"""Fast JSON responses (orjson); stored message values are embedded without re-parsing."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import JSONResponse


def _default(value: Any) -> Any:
    if isinstance(value, set | frozenset):
        return list(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class JSONBody(JSONResponse):
    # A JSONResponse subclass, so FastAPI documents the response_model as the body schema
    # (for any other Response class it writes {"type": "string"} into the OpenAPI).
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, default=_default)


def raw_json(text: str | None) -> orjson.Fragment | None:
    """A stored JSON text, written into the response byte for byte."""
    return None if text is None else orjson.Fragment(text)
