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
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from tests.support.server import LoopbackServer, running


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
        self._http: LoopbackServer | None = None
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
        """Listen on a free loopback port."""
        self._closing = asyncio.Event()
        if self._http is None:
            self._http = LoopbackServer(
                self.app, name="fake search server", host=self.host, port=self.port
            )
        self.port = await self._http.start()

    async def stop(self) -> None:
        """Stop the server (releasing slow answers first)."""
        self._closing.set()
        if self._http is not None:
            await self._http.stop()


def running_fake_search() -> contextlib.AbstractAsyncContextManager[FakeSearch]:
    """A started fake search server, stopped on exit."""
    return running(FakeSearch())


@pytest.fixture
async def fake_search() -> AsyncIterator[FakeSearch]:
    """A running fake search server."""
    async with running_fake_search() as fake:
        yield fake
