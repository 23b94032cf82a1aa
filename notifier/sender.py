"""One HTTP attempt of a webhook: the only module that talks to webhook receivers.

The host is resolved once and every address checked by the SSRF guard; the request then
goes to that very address, with the URL's ``Host`` header and TLS server name kept, so a
DNS answer that changes between check and connect cannot redirect it. Redirects are not
followed, and the whole attempt (connect, send, first 2 KB of the reply) has one deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from core.db.webhooks import EXCERPT_LIMIT, AttemptOutcome
from core.settings import Settings
from core.ssrf import AllowList, AsyncResolver, BlockedDestination, ResolvedTarget, resolve_target
from notifier.http1 import MAX_IDLE_PER_HOST, ConnectFailed, Http1Client, ProtocolError
from notifier.retry import is_success, parse_retry_after

USER_AGENT = "blogpipe-webhooks/1.0"


@dataclass(frozen=True)
class SendResult:
    """What one attempt produced."""

    url: str
    status_code: int | None = None
    latency_ms: float | None = None
    error: str | None = None
    response_excerpt: str | None = None
    retry_after: float | None = None
    blocked: bool = False

    @property
    def ok(self) -> bool:
        return is_success(self.status_code)

    def outcome(self) -> AttemptOutcome:
        """The attempt as the attempt log stores it."""
        error = self.error
        if error is None and not self.ok:
            error = f"HTTP {self.status_code}"
        return AttemptOutcome(
            url=self.url,
            status_code=self.status_code,
            latency_ms=self.latency_ms,
            error=error,
            response_excerpt=self.response_excerpt,
        )


def guard_options(
    settings: Settings, allowed_hosts: Sequence[str] | None, allow_http: bool | None
) -> tuple[tuple[str, ...], bool]:
    """The SSRF allow-list and http switch: the arguments given, else the settings
    (``WEBHOOK_ALLOWED_HOSTS``, ``WEBHOOK_ALLOW_HTTP``)."""
    if allowed_hosts is None:
        allowed_hosts = settings.webhook_allowed_hosts
    if allow_http is None:
        allow_http = settings.webhook_allow_http
    return tuple(allowed_hosts), allow_http


def new_http_client(max_idle_per_host: int = MAX_IDLE_PER_HOST) -> Http1Client:
    """The client the notifier uses when none is given: no proxies, no redirects; as many
    idle connections kept per receiver as the notifier may have POSTs in flight, so a
    burst to one receiver reuses its connections rather than opening and closing most."""
    return Http1Client(max_idle_per_host=max_idle_per_host)


class WebhookSender:
    """Posts signed bodies to callback URLs through the SSRF guard."""

    def __init__(
        self,
        client: Http1Client,
        *,
        timeout: float,
        allow_http: bool,
        allowed_hosts: Sequence[str],
        resolver: AsyncResolver | None = None,
    ) -> None:
        self.client = client
        self.timeout = timeout
        self.allow_http = allow_http
        self.allow = AllowList.parse(allowed_hosts)
        self.resolver = resolver

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> SendResult:
        """POST ``body`` to ``url``; never raises for network or HTTP trouble."""
        started = time.perf_counter()

        def elapsed() -> float:
            return round((time.perf_counter() - started) * 1000.0, 2)

        try:
            async with asyncio.timeout(self.timeout):
                try:
                    target = await resolve_target(
                        url,
                        allow_http=self.allow_http,
                        allowed_hosts=self.allow,
                        resolver=self.resolver,
                    )
                except BlockedDestination as exc:
                    return SendResult(
                        url, latency_ms=elapsed(), error=f"refused: {exc}", blocked=True
                    )
                except OSError as exc:
                    return SendResult(
                        url, latency_ms=elapsed(), error=f"DNS resolution failed: {exc}"
                    )
                last_error = "no address to connect to"
                for address in target.addresses:
                    try:
                        return await self._post_to(target, address, body, headers, started)
                    except ConnectFailed as exc:
                        last_error = f"connection to {address} failed: {exc}"
                return SendResult(url, latency_ms=elapsed(), error=last_error)
        except TimeoutError:
            return SendResult(url, latency_ms=elapsed(), error=f"timed out after {self.timeout:g}s")
        except ProtocolError as exc:
            return SendResult(url, latency_ms=elapsed(), error=f"invalid HTTP response: {exc}")
        except (OSError, ValueError) as exc:
            detail = str(exc) or type(exc).__name__
            return SendResult(url, latency_ms=elapsed(), error=f"{type(exc).__name__}: {detail}")

    async def _post_to(
        self,
        target: ResolvedTarget,
        address: str,
        body: bytes,
        headers: Mapping[str, str],
        started: float,
    ) -> SendResult:
        parts = urlsplit(target.url)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        response = await self.client.post(
            scheme=target.scheme,
            address=address,
            port=target.port,
            host=target.host,
            host_header=target.host_header,
            target=path,
            body=body,
            headers={"content-type": "application/json", "user-agent": USER_AGENT, **headers},
            excerpt_limit=EXCERPT_LIMIT,
        )
        latency_ms = round((time.perf_counter() - started) * 1000.0, 2)
        return SendResult(
            target.url,
            status_code=response.status_code,
            latency_ms=latency_ms,
            response_excerpt=response.body[:EXCERPT_LIMIT].decode("utf-8", "replace"),
            retry_after=parse_retry_after(response.headers.get("retry-after")),
        )
