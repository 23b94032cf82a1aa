"""Lean HTTP/1.1 over asyncio streams: a keep-alive client and a webhook receiver.

Both are a few hundred microseconds of work per request so that the harness, which
shares two cores with what it measures, is never the bottleneck.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import orjson


class HttpConnection:
    """One keep-alive connection; requests on it run one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader, self.writer, self.host = reader, writer, host

    @classmethod
    async def open(cls, url: str) -> HttpConnection:
        parts = urlsplit(url)
        host, port = parts.hostname or "127.0.0.1", parts.port or 80
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
        return cls(reader, writer, f"{host}:{port}")

    async def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        head = f"{method} {path} HTTP/1.1\r\nHost: {self.host}\r\n"
        if body is not None:
            head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        self.writer.write(head.encode() + b"\r\n" + (body or b""))
        return await read_response(self.reader)

    def close(self) -> None:
        self.writer.close()


async def read_response(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    length, chunked = 0, False
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            length = int(value)
        elif name == "transfer-encoding" and "chunked" in value.lower():
            chunked = True
    if not chunked:
        return status, await reader.readexactly(length) if length else b""
    chunks = []
    while True:
        size = int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16)
        chunks.append(await reader.readexactly(size + 2))
        if size == 0:
            return status, b"".join(chunk[:-2] for chunk in chunks)


@dataclass
class Received:
    """One webhook: job id, event type, arrival on ``time.perf_counter()``."""

    job_id: str
    event: str
    at: float


@dataclass
class WebhookReceiver:
    """Records each webhook's job id and arrival time; answers 200 at once."""

    host: str = "127.0.0.1"
    port: int = 0
    received: dict[str, Received] = field(default_factory=dict)
    duplicates: int = 0
    on_receive: Callable[[Received], None] | None = None
    _server: asyncio.Server | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}/hook"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    def reset(self) -> None:
        self.received.clear()
        self.duplicates = 0

    async def wait_for(self, count: int, within: float) -> bool:
        """Wait until ``count`` distinct jobs were notified; False after ``within`` seconds."""
        deadline = time.monotonic() + within
        while len(self.received) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
        return True

    async def wait_job(self, job_id: str, within: float) -> Received | None:
        """Wait for the webhook of ``job_id``; None after ``within`` seconds."""
        deadline = time.monotonic() + within
        while job_id not in self.received:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 1.0))
        return self.received[job_id]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line[:15].lower() == b"content-length:":
                        length = int(line[15:])
                body = await reader.readexactly(length) if length else b""
                now = time.perf_counter()
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                self._record(body, now)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    def _record(self, body: bytes, now: float) -> None:
        try:
            payload = orjson.loads(body)
            data = payload.get("data") or {}
            job_id = str(data.get("job_id"))
            event = str(payload.get("type") or payload.get("event_type") or "")
        except (orjson.JSONDecodeError, AttributeError):
            return
        if job_id in self.received:
            self.duplicates += 1
            return
        item = Received(job_id, event, now)
        self.received[job_id] = item
        if self.on_receive is not None:
            self.on_receive(item)
        self._changed.set()
