"""A fake Google Programmable Search (Custom Search JSON API) server on loopback.

``GET /customsearch/v1?key=…&cx=…&q=…`` answers ``{"items": [{title, link, snippet,
displayLink}]}`` from ``fake.results`` (the same list for every query unless
``fake.per_query[q]`` is set). Faults are consumed in order::

    fake.fail(500)                 # that HTTP status with a Google-style error body
    fake.fail(403, reason="accessNotConfigured")
    fake.fail("slow", delay=5)     # answer after ``delay`` seconds
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def item(url: str, title: str, snippet: str) -> dict[str, str]:
    """One result as the API returns it."""
    host = url.split("/")[2]
    return {
        "kind": "customsearch#result",
        "title": title,
        "link": url,
        "snippet": snippet,
        "displayLink": host,
    }


@dataclass
class SearchFault:
    """The next ``times`` requests fail: an HTTP status, or ``"slow"``."""

    kind: int | str
    times: int = 1
    reason: str = "backendError"
    delay: float = 5.0


class FakeSearch:
    """Start it, point ``GOOGLE_SEARCH_BASE_URL`` at ``.base_url``, read ``.queries``."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host
        self.port = 0
        self.results: list[dict[str, str]] = []
        self.per_query: dict[str, list[dict[str, str]]] = {}
        self.queries: list[str] = []
        self.params: list[dict[str, str]] = []
        self.faults: list[SearchFault] = []
        self._closing = asyncio.Event()
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.app = Starlette(routes=[Route("/customsearch/v1", self._handle, methods=["GET"])])

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/customsearch/v1"

    def fail(self, kind: int | str, *, times: int = 1, **options: Any) -> None:
        self.faults.append(SearchFault(kind, times, **options))

    async def _handle(self, request: Request) -> Response:
        params = dict(request.query_params)
        self.params.append(params)
        self.queries.append(params.get("q", ""))
        fault = next((f for f in self.faults if f.times > 0), None)
        if fault is not None:
            fault.times -= 1
            if fault.kind == "slow":
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._closing.wait(), fault.delay)
            elif isinstance(fault.kind, int):
                error = {
                    "code": fault.kind,
                    "message": f"fake error {fault.kind}",
                    "errors": [{"reason": fault.reason}],
                }
                return JSONResponse({"error": error}, status_code=fault.kind)
        if not params.get("key") or not params.get("cx"):
            error = {
                "code": 400,
                "message": "Missing key or cx",
                "errors": [{"reason": "badRequest"}],
            }
            return JSONResponse({"error": error}, status_code=400)
        items = self.per_query.get(params.get("q", ""), self.results)
        count = int(params.get("num", "10"))
        body: dict[str, Any] = {"kind": "customsearch#search"}
        if items:
            body["items"] = items[:count]
        return JSONResponse(body)

    async def start(self) -> None:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, 0))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
            access_log=False,
        )
        self._closing = asyncio.Event()
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                raise TimeoutError("fake search server did not start")
            await asyncio.sleep(0.01)

    async def stop(self) -> None:
        self._closing.set()
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout=10)
        self._server = None
        self._task = None


@contextlib.asynccontextmanager
async def running_fake_search() -> AsyncIterator[FakeSearch]:
    """A started fake search server, stopped on exit."""
    fake = FakeSearch()
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop()


@pytest.fixture
async def fake_search() -> AsyncIterator[FakeSearch]:
    """A running fake search server."""
    async with running_fake_search() as fake:
        yield fake
