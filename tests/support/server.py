"""Serve a test's ASGI app with uvicorn on loopback (the fakes and receivers use it)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import AsyncIterator
from typing import Protocol, TypeVar

import uvicorn
from starlette.types import ASGIApp


class LoopbackServer:
    """uvicorn on ``host``: a free port the first time, the same port on a restart."""

    def __init__(self, app: ASGIApp, *, name: str, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.name = name
        self.host = host
        self.port = port
        self._server: uvicorn.Server | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> int:
        """Listen and return the port, once uvicorn says it has started."""
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        config = uvicorn.Config(
            self.app,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=1,
            access_log=False,
        )
        self._server = uvicorn.Server(config)
        self._task = asyncio.create_task(self._server.serve(sockets=[sock]))
        deadline = time.monotonic() + 10
        while not self._server.started:
            if self._task.done():
                self._task.result()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} did not start")
            await asyncio.sleep(0.01)
        return self.port

    async def stop(self) -> None:
        """Stop listening (connections are refused until ``start()``)."""
        if self._server is None or self._task is None:
            return
        self._server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(self._task, timeout=10)
        self._server = None
        self._task = None


class Startable(Protocol):
    """A test server with ``start()`` and ``stop()``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


S = TypeVar("S", bound=Startable)


@contextlib.asynccontextmanager
async def running(server: S) -> AsyncIterator[S]:
    """``server`` started, and stopped on exit."""
    await server.start()
    try:
        yield server
    finally:
        await server.stop()
