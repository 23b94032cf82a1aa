"""A 503 with ``Retry-After`` when the database cannot be reached, wherever it is noticed.

A restart, a failover or a full connection limit is not a bug in the request: the
caller should try again shortly, and polling clients and Cloud Tasks do. The check
wraps the routes and the middleware that reads the database (API keys, submission
limits) alike; it sits inside CORS so a browser can read the answer.
"""

from __future__ import annotations

import logging

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.responses import detail
from core.db.raw import database_unavailable

logger = logging.getLogger("blogpipe.api")

RETRY_AFTER_SECONDS = 1
MESSAGE = "Service temporarily unavailable: the database could not be reached; retry shortly"


class DatabaseUnavailable:
    """Answers 503 for an error that ``database_unavailable`` recognises, when nothing of
    the response was sent yet; every other error goes on to the 500 handler."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def sending(message: Message) -> None:
            nonlocal started
            started = True
            await send(message)

        try:
            await self.app(scope, receive, sending)
        except Exception as exc:
            if started or not database_unavailable(exc):
                raise
            logger.warning(
                "Database unavailable on %s %s: %s: %s",
                scope["method"],
                scope["path"],
                type(exc).__name__,
                exc,
                extra={"action": "http_503"},
            )
            response = detail(503, MESSAGE)
            response.headers["Retry-After"] = str(RETRY_AFTER_SECONDS)
            await response(scope, receive, send)
