"""Operator actions on webhooks: inspect, redeliver one, recover many, ping a URL.

Redelivery and recovery only re-queue deliveries (due now, trigger ``manual`` or
``recover``); the notifier sends them, so the attempt log records them as such and two
processes still never send the same attempt. A ping is sent at once and stored nowhere.
"""

from __future__ import annotations

import logging
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.webhooks import DeliveryHistory, DeliveryRepository, WebhookDelivery
from core.settings import Settings
from core.ssrf import AsyncResolver
from notifier.http1 import Http1Client
from notifier.payload import encode_body, ping_payload
from notifier.sender import SendResult, WebhookSender, guard_options, new_http_client
from notifier.signing import Signer

logger = logging.getLogger("blogpipe.notifier")

DEFAULT_RECOVER_CAP = 1000
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*$", re.IGNORECASE)
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """``6h``, ``30m``, ``2d`` (ago) or an ISO 8601 time → an aware UTC datetime."""
    now = now or datetime.now(UTC)
    match = _DURATION.match(value)
    if match:
        return now - timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2].lower()])
    try:
        when = datetime.fromisoformat(value.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(
            f"since must be a duration like 6h, 30m, 2d or an ISO 8601 time, got {value!r}"
        ) from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RecoverResult:
    """What a bulk recovery matched and re-queued (or would, on a dry run)."""

    since: datetime
    matching: int
    cap: int
    dry_run: bool
    delivery_ids: list[UUID] = field(default_factory=list)

    def to_json(self) -> dict[str, object]:
        return {
            "since": self.since.isoformat(),
            "matching": self.matching,
            "cap": self.cap,
            "dry_run": self.dry_run,
            "queued": 0 if self.dry_run else len(self.delivery_ids),
            "delivery_ids": [str(i) for i in self.delivery_ids],
        }


class WebhookOperations:
    """The operator's webhook actions (API routes and CLI commands call these)."""

    def __init__(
        self,
        engine: AsyncEngine,
        settings: Settings,
        *,
        http_client: Http1Client | None = None,
        allowed_hosts: Sequence[str] | None = None,
        allow_http: bool | None = None,
        resolver: AsyncResolver | None = None,
    ) -> None:
        self.settings = settings
        self.deliveries = DeliveryRepository(engine)
        self.http_client = http_client
        self.allowed_hosts, self.allow_http = guard_options(settings, allowed_hosts, allow_http)
        self.resolver = resolver

    async def deliveries_for_job(self, job_id: UUID) -> list[DeliveryHistory]:
        """A job's deliveries with their attempts."""
        return await self.deliveries.list_for_job(job_id)

    async def redeliver(self, delivery_id: UUID) -> WebhookDelivery | None:
        """Queue one more attempt of a delivery now; None if unknown or an attempt is in flight."""
        delivery = await self.deliveries.redeliver(delivery_id, trigger="manual")
        if delivery is not None:
            logger.info(
                "Redelivery of webhook %s requested (job %s)",
                delivery.id,
                delivery.job_id,
                extra={
                    "action": "webhook_redelivery_requested",
                    "delivery_id": str(delivery.id),
                    "job_id": str(delivery.job_id),
                },
            )
        return delivery

    async def recover_failed(
        self,
        *,
        since: datetime,
        cap: int = DEFAULT_RECOVER_CAP,
        dry_run: bool = False,
        tenant: str | None = None,
    ) -> RecoverResult:
        """Re-queue failed deliveries created since ``since``, oldest first, at most ``cap``."""
        if cap < 1:
            raise ValueError("cap must be at least 1")
        matching, ids = await self.deliveries.recover(
            since=since, cap=cap, dry_run=dry_run, tenant=tenant
        )
        result = RecoverResult(since, matching, cap, dry_run, ids)
        verb = "would re-queue" if dry_run else "re-queued"
        logger.info(
            "Webhook recovery since %s: %d failed, %s %d",
            since.isoformat(),
            matching,
            verb,
            len(ids),
            extra={
                "action": "webhook_recovery_previewed" if dry_run else "webhook_recovery_requested",
                "matching": matching,
                "queued": 0 if dry_run else len(ids),
                "cap": cap,
            },
        )
        return result

    async def enable_endpoint(
        self, url: str, *, tenant: str = "default", recover: bool = True
    ) -> int:
        """Re-enable a disabled endpoint, resuming its held deliveries; return how many."""
        resumed = await self.deliveries.enable_endpoint(tenant, url, recover_held=recover)
        logger.info(
            "Webhook endpoint %s re-enabled; %d held deliveries resumed",
            url,
            resumed,
            extra={"action": "webhook_endpoint_enabled", "url": url, "resumed": resumed},
        )
        return resumed

    async def rotate_secret(
        self,
        url: str,
        secret: str,
        *,
        tenant: str = "default",
        overlap: timedelta = timedelta(hours=24),
    ) -> None:
        """Give an endpoint its own secret; the one it had keeps signing for ``overlap``."""
        Signer((secret,))  # validates it
        await self.deliveries.set_endpoint_secret(tenant, url, secret, overlap=overlap)
        logger.info(
            "Webhook secret of %s rotated; the previous one signs for %s more",
            url,
            overlap,
            extra={"action": "webhook_secret_rotated", "url": url, "tenant": tenant},
        )

    async def ping(self, url: str, *, tenant: str = "default") -> SendResult:
        """Send a signed ``ping`` event to ``url`` once (through the SSRF guard)."""
        previous = self.settings.webhook_previous_secrets
        signer = Signer.from_secrets(self.settings.webhook_secret, previous)
        endpoint = await self.deliveries.endpoint(tenant, url)
        if endpoint is not None:
            signer = signer.for_endpoint(
                endpoint.secret, endpoint.previous_secret, endpoint.previous_secret_expires_at
            )
        body = encode_body(ping_payload())
        headers = signer.headers(f"msg_{uuid.uuid4().hex}", body)
        client = self.http_client or new_http_client()
        try:
            sender = WebhookSender(
                client,
                timeout=self.settings.webhook_timeout,
                allow_http=self.allow_http,
                allowed_hosts=self.allowed_hosts,
                resolver=self.resolver,
            )
            result = await sender.post(url, body, headers)
        finally:
            if self.http_client is None:
                await client.aclose()
        logger.info(
            "Ping to %s: %s",
            url,
            result.status_code if result.status_code is not None else result.error,
            extra={"action": "webhook_ping", "url": url, "status_code": result.status_code},
        )
        return result
