"""Request hygiene and per-tenant admission limits.

``RequestLimits`` (outside authentication) rejects what no handler should see: too many
or too large headers (431), a body over ``BLOGPIPE_MAX_BODY_BYTES`` (413), a body that is
not JSON (415), JSON nested deeper than ``BLOGPIPE_MAX_JSON_DEPTH`` or holding NUL
characters, which PostgreSQL cannot store (400).

``SubmissionLimits`` (inside authentication, so the tenant is known) admits job
submissions: a token bucket per tenant and a cap on the tenant's jobs in flight, both
answering 429 with ``Retry-After``. The bucket lives in this process: N API replicas
admit up to N times the rate; the in-flight cap is counted in Postgres and holds across
replicas (loosely: two submissions racing at the cap may both get in).
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.responses import detail

MAX_HEADERS = 100
# The worker and Pub/Sub push bodies wrap a request that was itself up to the limit.
INTERNAL_PATHS = ("/api/v1/blog/worker", "/pubsub/push/")
INTERNAL_MIN_BYTES = 1024 * 1024
# A batch carries up to 100 requests; its handler applies its own, tighter limit.
BATCH_PATHS = frozenset({"/api/v1/blog/batch", "/api/v1/blog/jobs/batch"})
BATCH_BODY_FACTOR = 25
BODY_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
SUBMISSION_PATHS = re.compile(r"^/api/v1/blog/(generate-enhanced|(jobs/)?batch)/?$")
IN_FLIGHT_STATUSES = ("pending", "queued", "processing")
IN_FLIGHT_RETRY_AFTER = 10

_JSON_STRING = re.compile(rb'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(rb"[\[\]{}]")


def json_too_deep(body: bytes, limit: int) -> bool:
    """True when the JSON text nests arrays/objects more than ``limit`` levels deep."""
    if body.count(b"[") + body.count(b"{") <= limit:
        return False
    depth = 0
    for match in _BRACKET.finditer(_JSON_STRING.sub(b'""', body)):
        if match.group() in (b"[", b"{"):
            depth += 1
            if depth > limit:
                return True
        else:
            depth -= 1
    return False


def _is_json(content_type: str) -> bool:
    return content_type.split(";", 1)[0].strip().lower() == "application/json"


class _TooLarge(Exception):
    pass


class RequestLimits:
    """ASGI middleware: header, body size, content type and JSON depth limits."""

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, max_header_bytes: int, max_json_depth: int
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_header_bytes = max_header_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope["headers"]
        if len(headers) > MAX_HEADERS or sum(len(k) + len(v) for k, v in headers) > (
            self.max_header_bytes
        ):
            await detail(431, "Request headers are too many or too large")(scope, receive, send)
            return
        if scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        path: str = scope["path"]
        limit = self.max_body_bytes
        if path.startswith(INTERNAL_PATHS):
            limit = max(4 * limit, INTERNAL_MIN_BYTES)
        elif path.rstrip("/") in BATCH_PATHS:
            limit *= BATCH_BODY_FACTOR
        header_map = {k: v for k, v in headers}
        declared = header_map.get(b"content-length", b"")
        if declared.isdigit() and int(declared) > limit:
            await detail(413, f"Request body is larger than {limit} bytes")(scope, receive, send)
            return
        try:
            body = await _read_body(receive, limit)
        except _TooLarge:
            await detail(413, f"Request body is larger than {limit} bytes")(scope, receive, send)
            return
        if body is None:
            return  # the client went away while sending
        if body:
            content_type = header_map.get(b"content-type", b"").decode("latin-1")
            if not _is_json(content_type):
                await detail(415, "Content-Type must be application/json")(scope, receive, send)
                return
            if b"\\u0000" in body:
                # PostgreSQL text and jsonb cannot store NUL: refuse it here, not with a 500.
                await detail(400, "JSON strings must not contain NUL (\\u0000) characters")(
                    scope, receive, send
                )
                return
            if json_too_deep(body, self.max_json_depth):
                message = f"JSON is nested more than {self.max_json_depth} levels deep"
                await detail(400, message)(scope, receive, send)
                return
        await self.app(scope, _replay(body, receive), send)


async def _read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole body (at most ``limit`` bytes), or None if the client disconnected."""
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return None
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that hands over the buffered body, then waits on the real one."""
    sent = False

    async def replay() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


@dataclass
class _Bucket:
    tokens: float
    updated: float


class TokenBuckets:
    """A token bucket per key: ``rate`` tokens a second, holding at most ``burst``."""

    def __init__(self, rate: float, burst: int, now: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = burst
        self._buckets: dict[str, _Bucket] = {}
        self._now = now

    def take(self, key: str, count: int = 1) -> float | None:
        """Take ``count`` tokens; None when granted, else seconds until they would be."""
        now = self._now()
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        bucket.tokens = min(float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate)
        bucket.updated = now
        if count > self.burst:
            return math.inf
        if bucket.tokens >= count:
            bucket.tokens -= count
            return None
        return (count - bucket.tokens) / self.rate


class SubmissionLimits:
    """ASGI middleware: per-tenant rate limit and in-flight cap on job submissions."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        engine: AsyncEngine,
        rate_per_second: float,
        burst: int,
        max_in_flight: int,
    ) -> None:
        self.app = app
        self.engine = engine
        self.buckets = TokenBuckets(rate_per_second, burst) if rate_per_second > 0 else None
        self.max_in_flight = max_in_flight

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or not SUBMISSION_PATHS.match(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        tenant = scope.get("state", {}).get("tenant", "default")
        if self.buckets is not None:
            wait = self.buckets.take(tenant)
            if wait is not None:
                retry_after = 60 if math.isinf(wait) else max(1, math.ceil(wait))
                response = detail(
                    429, "Too many job submissions; slow down", retry_after=retry_after
                )
                response.headers["Retry-After"] = str(retry_after)
                await response(scope, receive, send)
                return
        if self.max_in_flight > 0 and await self.in_flight(tenant) >= self.max_in_flight:
            response = detail(
                429,
                f"Too many jobs in flight (at most {self.max_in_flight} queued or processing);"
                " wait for some to finish",
                retry_after=IN_FLIGHT_RETRY_AFTER,
            )
            response.headers["Retry-After"] = str(IN_FLIGHT_RETRY_AFTER)
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def in_flight(self, tenant: str) -> int:
        """The tenant's queued and processing jobs, counted up to the cap."""
        async with self.engine.connect() as conn:
            value = await conn.execute(
                text(
                    "SELECT count(*) FROM (SELECT 1 FROM jobs WHERE tenant = :tenant"
                    " AND status IN ('pending', 'queued', 'processing') LIMIT :cap) active"
                ),
                {"tenant": tenant, "cap": self.max_in_flight},
            )
            return int(value.scalar_one())
