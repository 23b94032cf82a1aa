"""JSON responses encoded with orjson, and the error shapes clients see."""

from __future__ import annotations

from typing import Any

import orjson
from starlette.responses import Response


class JSONResponse(Response):
    """A JSON response encoded with orjson (fast, UTC datetimes, UUIDs)."""

    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_NON_STR_KEYS)


def detail(status_code: int, message: str, **extra: Any) -> JSONResponse:
    """The public API's error shape: ``{"detail": "..."}`` (as the seed's API answered)."""
    return JSONResponse({"detail": message, **extra}, status_code=status_code)


def error(status_code: int, message: str) -> JSONResponse:
    """The worker endpoint's error shape: ``{"error": "..."}`` (per CONTRACT.md)."""
    return JSONResponse({"error": message}, status_code=status_code)
