"""A scriptable webhook receiver on a free loopback port (Starlette + uvicorn).

Use the ``webhook_receiver`` fixture: register ``tests.support.receiver`` as a pytest
plugin, or import ``webhook_receiver_fixture`` into the test module. It records every
request and answers from a script:

    webhook_receiver.script(500, Reply(delay=5), Reply(429, retry_after="1"), 200)

Once the script runs out it answers ``default`` (200). ``stop()`` / ``start()`` close and
reopen the listening socket on the same port, for "connection refused".
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.server import LoopbackServer, running


@dataclass(frozen=True)
class Reply:
    """One scripted answer: status, optional delay before answering, Retry-After, body."""

    status: int = 200
    delay: float = 0.0
    retry_after: str | None = None
    body: bytes = b"ok"
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class ReceivedRequest:
    """A request the receiver saw."""

    path: str
    headers: dict[str, str]
    body: bytes
    received_at: float
    """``time.monotonic()`` on arrival."""
    wall_time: datetime
    reply: Reply

    def json(self) -> object:
        import orjson

        return orjson.loads(self.body)


class WebhookReceiver:
    """Records requests and answers them from a script."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.requests: list[ReceivedRequest] = []
        self.default = Reply()
        self._script: deque[Reply] = deque()
        self._http: LoopbackServer | None = None
        self.app = Starlette(
            routes=[Route("/{path:path}", self._handle, methods=["POST", "GET", "PUT"])]
        )

    @property
    def url(self) -> str:
        """The default hook URL."""
        return f"http://{self.host}:{self.port}/hook"

    def url_for(self, path: str) -> str:
        return f"http://{self.host}:{self.port}/{path.lstrip('/')}"

    def script(self, *replies: Reply | int) -> None:
        """Queue answers for the next requests (ints are status codes)."""
        for reply in replies:
            self._script.append(Reply(reply) if isinstance(reply, int) else reply)

    async def _handle(self, request: Request) -> Response:
        body = await request.body()
        reply = self._script.popleft() if self._script else self.default
        self.requests.append(
            ReceivedRequest(
                path=request.url.path,
                headers={k.lower(): v for k, v in request.headers.items()},
                body=body,
                received_at=time.monotonic(),
                wall_time=datetime.now(UTC),
                reply=reply,
            )
        )
        if reply.delay:
            await asyncio.sleep(reply.delay)
        headers = dict(reply.headers)
        if reply.retry_after is not None:
            headers["retry-after"] = reply.retry_after
        return Response(reply.body, status_code=reply.status, headers=headers)

    async def start(self) -> None:
        """Listen (again) on the same port; the first call picks a free one."""
        if self._http is None:
            self._http = LoopbackServer(
                self.app, name="webhook receiver", host=self.host, port=self.port
            )
        self.port = await self._http.start()

    async def stop(self) -> None:
        """Stop the server."""
        if self._http is not None:
            await self._http.stop()


@pytest.fixture(name="webhook_receiver")
async def webhook_receiver_fixture() -> AsyncIterator[WebhookReceiver]:
    """A running receiver; ``.url``, ``.requests``, ``.script(...)``, ``.stop()``/``.start()``."""
    async with running(WebhookReceiver()) as receiver:
        yield receiver
