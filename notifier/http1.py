"""A small HTTP/1.1 client for webhook POSTs, on asyncio streams, with keep-alive.

httpx costs about 2 ms of CPU for one POST on these machines (h11, anyio and its layers);
this does the same POST in about 0.2 ms. It does only what the sender needs: POST a body
to an address the SSRF guard already checked, with the URL's ``Host`` header and TLS
server name (certificates verified against certifi's bundle, as httpx does), read the
status, the headers and the first bytes of the answer, and keep the connection for the
next POST to the same place. No redirects, proxies, cookies or compression.

The caller bounds the whole exchange with a timeout; a connection cut short by it (or by
anything else) is closed, never reused.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import Mapping
from dataclasses import dataclass

MAX_HEAD_BYTES = 64 * 1024
"""The most a response's status line and headers may take."""
MAX_DRAIN_BYTES = 64 * 1024
"""A body longer than this is not read to the end: the connection is closed instead."""
IDLE_SECONDS = 30.0
"""An idle connection older than this is closed rather than reused."""
MAX_IDLE_PER_HOST = 16
"""Idle connections kept per address by default (the notifier keeps as many as it may
have POSTs in flight, ``WEBHOOK_MAX_IN_FLIGHT``)."""


class ProtocolError(Exception):
    """The server's answer is not HTTP/1.x as this client reads it."""


class ConnectFailed(OSError):
    """The TCP or TLS connection could not be made."""


@dataclass(frozen=True)
class Response:
    """What came back: the status, the headers (names lowercased) and the body's start."""

    status_code: int
    headers: dict[str, str]
    body: bytes


@dataclass
class _Connection:
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    idle_since: float = 0.0

    def usable(self) -> bool:
        return (
            not self.writer.is_closing()
            and not self.reader.at_eof()
            and time.monotonic() - self.idle_since < IDLE_SECONDS
        )

    def close(self) -> None:
        self.writer.close()


def _tls_context() -> ssl.SSLContext:
    try:
        import certifi

        return ssl.create_default_context(cafile=certifi.where())
    except ImportError:  # pragma: no cover - certifi comes with the SDKs we depend on
        return ssl.create_default_context()


class Http1Client:
    """Keep-alive HTTP/1.1 POSTs, pooled per (scheme, address, port, host)."""

    def __init__(
        self, *, tls: ssl.SSLContext | None = None, max_idle_per_host: int = MAX_IDLE_PER_HOST
    ) -> None:
        self._tls = tls
        self.max_idle_per_host = max_idle_per_host
        self._idle: dict[tuple[str, str, int, str], list[_Connection]] = {}
        self.connections_opened = 0

    def _context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = _tls_context()
        return self._tls

    async def post(
        self,
        *,
        scheme: str,
        address: str,
        port: int,
        host: str,
        host_header: str,
        target: str,
        body: bytes,
        headers: Mapping[str, str],
        excerpt_limit: int,
    ) -> Response:
        """POST ``body`` to ``target`` (path and query) at ``address``:``port``.

        ``host`` is the TLS server name (and the name the certificate must match),
        ``host_header`` the ``Host`` header. A kept connection the server has meanwhile
        closed is replaced once, when nothing of an answer had arrived on it.
        """
        key = (scheme, address, port, host_header)
        head = _request_head(target, host_header, len(body), headers)
        conn = self._take(key)
        if conn is not None:
            try:
                return await self._exchange(key, conn, head, body, excerpt_limit)
            except _StaleConnection:
                pass
        conn = await self._open(scheme, address, port, host)
        try:
            return await self._exchange(key, conn, head, body, excerpt_limit)
        except _StaleConnection as exc:
            raise ProtocolError("the server closed the connection without answering") from exc

    async def aclose(self) -> None:
        """Close every kept connection."""
        for pool in self._idle.values():
            for conn in pool:
                conn.close()
        self._idle.clear()

    def _take(self, key: tuple[str, str, int, str]) -> _Connection | None:
        pool = self._idle.get(key)
        while pool:
            conn = pool.pop()
            if conn.usable():
                return conn
            conn.close()
        return None

    def _keep(self, key: tuple[str, str, int, str], conn: _Connection) -> None:
        pool = self._idle.setdefault(key, [])
        if len(pool) >= self.max_idle_per_host:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        pool.append(conn)

    async def _open(self, scheme: str, address: str, port: int, host: str) -> _Connection:
        tls = self._context() if scheme == "https" else None
        try:
            reader, writer = await asyncio.open_connection(
                address,
                port,
                ssl=tls,
                server_hostname=host if tls is not None else None,
                limit=MAX_HEAD_BYTES,
            )
        except ssl.SSLError as exc:
            raise ConnectFailed(f"TLS handshake failed: {exc.reason or exc}") from exc
        except OSError as exc:
            raise ConnectFailed(str(exc) or type(exc).__name__) from exc
        self.connections_opened += 1
        return _Connection(reader, writer)

    async def _exchange(
        self,
        key: tuple[str, str, int, str],
        conn: _Connection,
        head: bytes,
        body: bytes,
        excerpt_limit: int,
    ) -> Response:
        reusable = False
        try:
            try:
                conn.writer.write(head + body)
                await conn.writer.drain()
                status, headers = await _read_head(conn.reader)
            except (ConnectionError, asyncio.IncompleteReadError) as exc:
                if isinstance(exc, asyncio.IncompleteReadError) and exc.partial:
                    raise ProtocolError("the answer ended inside its headers") from exc
                raise _StaleConnection from exc
            excerpt, reusable = await _read_body(conn.reader, headers, excerpt_limit)
            if headers.get("connection", "").lower() == "close":
                reusable = False
            return Response(status, headers, excerpt)
        finally:
            if reusable:
                self._keep(key, conn)
            else:
                conn.close()


class _StaleConnection(Exception):
    """A connection failed before any byte of an answer arrived."""


def _request_head(target: str, host_header: str, length: int, headers: Mapping[str, str]) -> bytes:
    lines = [f"POST {target or '/'} HTTP/1.1", f"host: {host_header}", f"content-length: {length}"]
    for name, value in headers.items():
        lowered = name.lower()
        if lowered in ("host", "content-length", "transfer-encoding", "connection"):
            continue
        if "\r" in value or "\n" in value or "\r" in name or "\n" in name:
            raise ValueError(f"header {name!r} holds a line break")
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


async def _read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    while True:
        try:
            raw = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError as exc:
            raise ProtocolError(f"response headers over {MAX_HEAD_BYTES} bytes") from exc
        lines = raw.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
            raise ProtocolError(f"not an HTTP/1.x status line: {lines[0][:80]!r}")
        status = int(parts[1])
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if not line:
                continue
            name, sep, value = line.partition(":")
            if not sep:
                raise ProtocolError(f"malformed header line: {line[:80]!r}")
            headers[name.strip().lower()] = value.strip()
        if 100 <= status < 200:
            continue  # an interim answer (100 Continue, 103 Early Hints): the real one follows
        return status, headers


async def _read_body(
    reader: asyncio.StreamReader, headers: Mapping[str, str], excerpt_limit: int
) -> tuple[bytes, bool]:
    """The body's first ``excerpt_limit`` bytes, and whether the connection can be reused
    (the whole body was read, within ``MAX_DRAIN_BYTES``)."""
    if "chunked" in headers.get("transfer-encoding", "").lower():
        return await _read_chunked(reader, excerpt_limit)
    length_text = headers.get("content-length")
    if length_text is not None:
        try:
            length = int(length_text)
        except ValueError as exc:
            raise ProtocolError(f"bad content-length {length_text!r}") from exc
        if length < 0:
            raise ProtocolError(f"bad content-length {length_text!r}")
        if length > MAX_DRAIN_BYTES:
            return await _read_some(reader, min(length, excerpt_limit)), False
        data = await _read_exactly(reader, length)
        return data[:excerpt_limit], True
    # No length: the body runs to the end of the connection.
    return await _read_some(reader, excerpt_limit), False


async def _read_chunked(reader: asyncio.StreamReader, excerpt_limit: int) -> tuple[bytes, bool]:
    data = bytearray()
    read = 0
    while True:
        size_line = await _read_line(reader)
        try:
            size = int(size_line.split(";", 1)[0].strip() or "x", 16)
        except ValueError as exc:
            raise ProtocolError(f"bad chunk size {size_line[:40]!r}") from exc
        if size == 0:
            while await _read_line(reader):  # trailers, up to the blank line
                pass
            return bytes(data[:excerpt_limit]), True
        read += size
        if read > MAX_DRAIN_BYTES:
            if len(data) < excerpt_limit:
                data.extend(await _read_some(reader, min(size, excerpt_limit - len(data))))
            return bytes(data[:excerpt_limit]), False
        chunk = await _read_exactly(reader, size + 2)
        if len(data) < excerpt_limit:
            data.extend(chunk[:size])


async def _read_line(reader: asyncio.StreamReader) -> str:
    try:
        line = await reader.readuntil(b"\r\n")
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("the answer ended inside its body") from exc
    except asyncio.LimitOverrunError as exc:
        raise ProtocolError("a chunk header is too long") from exc
    return line[:-2].decode("latin-1")


async def _read_exactly(reader: asyncio.StreamReader, size: int) -> bytes:
    try:
        return await reader.readexactly(size)
    except asyncio.IncompleteReadError as exc:
        raise ProtocolError("the answer ended inside its body") from exc


async def _read_some(reader: asyncio.StreamReader, limit: int) -> bytes:
    """Up to ``limit`` bytes, fewer if the connection ends first."""
    data = bytearray()
    with contextlib.suppress(ConnectionError):
        while len(data) < limit:
            chunk = await reader.read(limit - len(data))
            if not chunk:
                break
            data.extend(chunk)
    return bytes(data)
