"""The notifier: job events in, signed webhooks out, retried on a durable schedule.

``run()`` does two things at once: it consumes ``blog-job-events`` and stores one
delivery per event (idempotently, so a redelivered message changes nothing), and it
sends due deliveries. A new delivery is stored already claimed and sent at once by a
task of its own (up to ``WEBHOOK_MAX_IN_FLIGHT`` in flight; past that, or behind an unsettled
earlier delivery of its job, it waits for the delivery loop); a modest poll is the
safety net for retries and for deliveries stored or re-queued by other processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from core.broker import Broker, Delivery, SubscriptionSpec
from core.constants import EVENTS_TOPIC, FINISHED_STATUSES, NOTIFIER_SUBSCRIPTION
from core.db.jobs import DEFAULT_ESTIMATE_SECONDS, JobRepository
from core.db.webhooks import (
    FAILED,
    PENDING,
    PROGRESS_EVENT,
    SUCCEEDED,
    ClaimedDelivery,
    DeliveryRepository,
    EndpointSecrets,
    Health,
    NewDelivery,
    Sweep,
    WebhookDelivery,
    WebhookEndpoint,
)
from core.events import JobEvent
from core.requests import DEFAULT_CALLBACK_EVENTS
from core.settings import Settings
from core.ssrf import AsyncResolver
from notifier.http1 import Http1Client
from notifier.payload import build_payload, encode_body
from notifier.retry import GONE, RETRY_AFTER_STATUSES, RetryPolicy
from notifier.sender import SendResult, WebhookSender, guard_options, new_http_client
from notifier.signing import Signer

logger = logging.getLogger("blogpipe.notifier")


class Notifier:
    """Turns job events into webhook deliveries and sends them.

    ``allowed_hosts``/``allow_http`` default to the settings ``webhook_allowed_hosts`` /
    ``webhook_allow_http`` (``WEBHOOK_ALLOWED_HOSTS``, ``WEBHOOK_ALLOW_HTTP``). An endpoint
    is disabled after ``disable_after_failures`` consecutive failed attempts or
    ``disable_after`` of continuous failure.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        broker: Broker | None,
        settings: Settings,
        *,
        http_client: Http1Client | None = None,
        allowed_hosts: Sequence[str] | None = None,
        allow_http: bool | None = None,
        resolver: AsyncResolver | None = None,
        previous_secrets: Sequence[str] | None = None,
        poll_interval: float = 2.0,
        batch_size: int | None = None,
        lease_seconds: float | None = None,
        disable_after_failures: int = 50,
        disable_after: timedelta = timedelta(days=5),
        max_retry_after: float = 3600.0,
    ) -> None:
        self.engine = engine
        self.broker = broker
        self.settings = settings
        self.jobs = JobRepository(engine)
        self.deliveries = DeliveryRepository(engine)
        if previous_secrets is None:  # WEBHOOK_PREVIOUS_SECRETS, during a rotation
            previous_secrets = settings.webhook_previous_secrets
        self.signer = Signer.from_secrets(settings.webhook_secret, previous_secrets)
        self.policy = RetryPolicy(
            tuple(settings.webhook_retry_schedule), max_retry_after=max_retry_after
        )
        # POSTs in flight: first attempts, and each sweep's claims (WEBHOOK_MAX_IN_FLIGHT).
        self.batch_size = batch_size or settings.webhook_max_in_flight
        self._own_client = http_client is None
        self.http_client = http_client or new_http_client(self.batch_size)
        allowed_hosts, allow_http = guard_options(settings, allowed_hosts, allow_http)
        self.sender = WebhookSender(
            self.http_client,
            timeout=settings.webhook_timeout,
            allow_http=allow_http,
            allowed_hosts=allowed_hosts,
            resolver=resolver,
        )
        self.poll_interval = poll_interval
        # Longer than any attempt can take, so a live sender never loses its lease.
        self.lease_seconds = lease_seconds or settings.webhook_timeout * 3 + 30.0
        self.disable_after_failures = disable_after_failures
        self.disable_after = disable_after
        self._wake = asyncio.Event()
        # While the delivery loop runs, a new delivery is stored already claimed and sent
        # at once by a task of its own, rather than waiting for the loop's next claim.
        self._sending = False
        self._first_attempts: set[asyncio.Task[None]] = set()

    async def run(self, *, ensure_subscription: bool = False) -> None:
        """Consume job events and send webhooks until cancelled.

        ``blogpipe init`` provisions the subscription; ``ensure_subscription`` is for tests.
        """
        if self.broker is None:
            raise RuntimeError("Notifier.run() needs a broker; use deliver_forever() without one")
        if ensure_subscription:
            await self.broker.ensure_topic(EVENTS_TOPIC)
            await self.broker.ensure_subscription(
                SubscriptionSpec(name=NOTIFIER_SUBSCRIPTION, topic=EVENTS_TOPIC)
            )
        logger.info("Notifier started", extra={"action": "notifier_started"})
        try:
            async with asyncio.TaskGroup() as group:
                # As many events in flight as POSTs (WEBHOOK_MAX_IN_FLIGHT): an event waits
                # mostly on two database round trips, so under a burst of completions a
                # small limit, not the work, set the pace (100 lagged 2,000 jobs by 2 s);
                # each holds its job's document, so not the stages' limit either.
                group.create_task(
                    self.broker.subscribe(
                        NOTIFIER_SUBSCRIPTION, self.handle_event, max_in_flight=self.batch_size
                    )
                )
                group.create_task(self.deliver_forever())
        finally:
            await self.close()

    async def close(self) -> None:
        """Release the HTTP client if the notifier made it."""
        if self._own_client:
            await self.http_client.aclose()

    def wake(self) -> None:
        """Make the sender look for due deliveries now."""
        self._wake.set()

    async def handle_event(self, delivery: Delivery) -> None:
        """Broker handler: store the webhook delivery an event calls for, then ack.

        A malformed message is logged and acked (retrying cannot fix it); database errors
        propagate, so the broker redelivers the event.
        """
        try:
            event = JobEvent.from_bytes(delivery.data)
        except (ValueError, KeyError, TypeError, orjson.JSONDecodeError) as exc:
            logger.error(
                "Dropping malformed job event %s: %s",
                delivery.message_id,
                exc,
                extra={"action": "webhook_event_malformed", "message_id": delivery.message_id},
            )
            return
        await self.enqueue(event)

    async def enqueue(self, event: JobEvent) -> WebhookDelivery | None:
        """Store the delivery for ``event`` if the job wants it; None if it does not."""
        found = await self.deliveries.event_job(event.job_id)
        if found is None:
            logger.warning(
                "Job %s of event %s not found; no webhook",
                event.job_id,
                event.event_id,
                extra={"action": "webhook_job_missing", "job_id": str(event.job_id)},
            )
            return None
        job = found.job
        wanted = job.callback_events or list(DEFAULT_CALLBACK_EVENTS)
        if not job.callback_url or event.type not in wanted:
            return None
        if event.generation < job.generation:
            # A replay or a cancel started a new generation before this event was handled:
            # the document now describes that one, so sending it as this event's would
            # contradict the event. The new generation sends its own.
            logger.info(
                "Skipping %s for job %s: generation %s was superseded by %s",
                event.type,
                job.id,
                event.generation,
                job.generation,
                extra={"action": "webhook_event_superseded", "job_id": str(job.id)},
            )
            return None
        if event.type == PROGRESS_EVENT and job.status in FINISHED_STATUSES:
            logger.info(
                "Skipping %s for job %s: the job already finished",
                event.type,
                job.id,
                extra={"action": "webhook_progress_skipped", "job_id": str(job.id)},
            )
            return None
        # A finished job's document has no time remaining: only others need the estimate.
        estimate = DEFAULT_ESTIMATE_SECONDS
        if job.status not in FINISHED_STATUSES:
            estimate = await self.jobs.estimated_seconds()
        document = found.document(estimate)
        payload, body = build_payload(
            event.type, event.occurred_at, document, public_base_url=self.settings.public_base_url
        )
        new = NewDelivery(
            job_id=job.id,
            tenant=job.tenant,
            event_id=event.event_id,
            event_type=event.type,
            url=job.callback_url,
            payload=payload,
            occurred_at=event.occurred_at,
            body=body,
        )
        claimed = None
        # At most ``batch_size`` first attempts in flight, as a sweep would: past that, the
        # delivery is stored pending and the loop sends it.
        if self._sending and len(self._first_attempts) < self.batch_size:
            stored, created, claimed = await self.deliveries.create_claimed(
                new, lease_seconds=self.lease_seconds
            )
        else:
            stored, created = await self.deliveries.create(new)
        if created:
            # A delivery sent at once is logged by its attempt; one left for the delivery
            # loop (pending, held, skipped) is worth a line of its own.
            logger.log(
                logging.DEBUG if claimed is not None else logging.INFO,
                "Queued %s webhook %s for job %s (%s)",
                event.type,
                stored.id,
                job.id,
                stored.status,
                extra=self._extra("webhook_queued", stored),
            )
            if claimed is not None:
                task = asyncio.create_task(self._attempt_logged(_sending_body_only(claimed)))
                self._first_attempts.add(task)
                task.add_done_callback(self._first_attempts.discard)
            elif stored.status == PENDING:
                self.wake()
        return stored

    async def _attempt_logged(self, claimed: ClaimedDelivery) -> None:
        """``_attempt``; a failure to record it is logged (its lease runs out and a later
        sweep retries the delivery)."""
        try:
            await self._attempt(claimed)
        except Exception as exc:
            logger.error(
                "Could not record webhook attempt %s: %s",
                claimed.delivery.id,
                exc,
                exc_info=exc,
                extra=self._extra("webhook_record_failed", claimed.delivery),
            )

    async def deliver_forever(self) -> None:
        """Send due deliveries until cancelled: at once when woken, else on the poll.

        While it runs, deliveries stored by ``enqueue`` go out at once (see ``_sending``);
        when it stops, the attempts still in flight are cancelled and their deliveries
        handed back unsent.
        """
        self._sending = True
        try:
            await self._deliver_until_cancelled()
        finally:
            self._sending = False
            attempts = list(self._first_attempts)
            for task in attempts:
                task.cancel()
            if attempts:
                await asyncio.wait(attempts, timeout=10.0)

    async def _deliver_until_cancelled(self) -> None:
        while True:
            self._wake.clear()
            try:
                sweep = await self._sweep()
            except Exception:
                logger.exception("Webhook sweep failed", extra={"action": "webhook_sweep_failed"})
                sweep = Sweep([])
            if sweep.claimed:
                continue  # retries due "immediately" and deliveries unblocked by these ones
            due_in = sweep.due_in
            wait = self.poll_interval if due_in is None else min(self.poll_interval, due_in)
            if wait <= 0.0:
                # Due but not claimable (held back behind an earlier event of its job, or
                # leased elsewhere): look again soon rather than spin.
                wait = min(self.poll_interval, 0.25)
            # asyncio.timeout, not wait_for, which on Python 3.11 can lose a cancellation
            # that arrives as the event is set (the loop would then never stop).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._wake.wait()

    async def deliver_due(self) -> int:
        """One sweep: claim the due deliveries and make one attempt each; return how many."""
        return len((await self._sweep()).claimed)

    async def _sweep(self) -> Sweep:
        sweep = await self.deliveries.claim_for_sending(
            limit=self.batch_size, lease_seconds=self.lease_seconds
        )
        await asyncio.gather(*(self._attempt_logged(c) for c in sweep.claimed))
        return sweep

    async def _attempt(self, claimed: ClaimedDelivery) -> None:
        delivery = claimed.delivery
        try:
            signer = self._signer_for(claimed.secrets)
            body = claimed.body if claimed.body is not None else encode_body(delivery.payload)
            headers = signer.headers(delivery.message_id, body)
            result = await self.sender.post(delivery.url, body, headers)
        except asyncio.CancelledError:
            await asyncio.shield(self.deliveries.release(delivery))
            raise
        except Exception as exc:  # never lose the lease silently: log it as a failed attempt
            logger.exception("Webhook attempt %s crashed", delivery.id)
            result = SendResult(delivery.url, error=f"internal error: {type(exc).__name__}: {exc}")
        status, retry_in = self._decide(delivery, result)
        health: Health | None = None
        if not result.blocked:
            health = "success" if result.ok else "failure"
        settlement = await self.deliveries.settle(
            delivery, result.outcome(), status=status, retry_in=retry_in, health=health
        )
        if not settlement.recorded:
            logger.warning(
                "Lost the lease on webhook %s; another sender took it over",
                delivery.id,
                extra=self._extra("webhook_lease_lost", delivery),
            )
            return
        self._log_attempt(delivery, result, status, retry_in)
        if settlement.endpoint is not None:
            await self._after_failure(delivery, result, settlement.endpoint)
        if status != PENDING:
            self.wake()  # a settled delivery may unblock the next event of its job

    def _decide(self, delivery: WebhookDelivery, result: SendResult) -> tuple[str, float | None]:
        if result.ok:
            return SUCCEEDED, None
        if result.blocked or result.status_code == GONE or delivery.trigger != "schedule":
            return FAILED, None
        retry_after = result.retry_after if result.status_code in RETRY_AFTER_STATUSES else None
        retry_in = self.policy.delay_after(delivery.attempt_count, retry_after=retry_after)
        return (FAILED, None) if retry_in is None else (PENDING, retry_in)

    async def _after_failure(
        self, delivery: WebhookDelivery, result: SendResult, endpoint: WebhookEndpoint
    ) -> None:
        """Disable an endpoint that keeps failing (its failure run is already counted)."""
        if endpoint.disabled:  # disabled meanwhile: what this attempt re-scheduled waits too
            await self.deliveries.hold_pending(delivery.tenant, delivery.url)
            return
        reason = None
        if result.status_code == GONE:
            reason = "the endpoint answered 410 Gone"
        elif endpoint.consecutive_failures >= self.disable_after_failures:
            reason = f"{endpoint.consecutive_failures} consecutive failed attempts"
        elif (
            endpoint.failing_since
            and datetime.now(UTC) - endpoint.failing_since >= self.disable_after
        ):
            reason = f"failing since {endpoint.failing_since.isoformat()}"
        if reason is None:
            return
        held = await self.deliveries.disable_endpoint(delivery.tenant, delivery.url, reason)
        logger.warning(
            "Disabled webhook endpoint %s (tenant %s): %s; %d deliveries held",
            delivery.url,
            delivery.tenant,
            reason,
            held,
            extra={
                "action": "webhook_endpoint_disabled",
                "url": delivery.url,
                "tenant": delivery.tenant,
                "reason": reason,
                "held": held,
            },
        )

    def _signer_for(self, secrets: EndpointSecrets | None) -> Signer:
        if secrets is None:
            return self.signer
        return self.signer.for_endpoint(
            secrets.secret, secrets.previous_secret, secrets.previous_secret_expires_at
        )

    def _log_attempt(
        self, delivery: WebhookDelivery, result: SendResult, status: str, retry_in: float | None
    ) -> None:
        extra = self._extra("", delivery)
        extra.update(status_code=result.status_code, latency_ms=result.latency_ms)
        if status == SUCCEEDED:
            extra["action"] = "webhook_delivered"
            logger.info(
                "Delivered %s webhook %s to %s on attempt %d (HTTP %s, %.0f ms)",
                delivery.event_type,
                delivery.id,
                delivery.url,
                delivery.attempt_count,
                result.status_code,
                result.latency_ms or 0.0,
                extra=extra,
            )
        elif status == PENDING:
            extra.update(action="webhook_retry_scheduled", retry_in=retry_in, error=result.error)
            logger.info(
                "Webhook %s attempt %d failed (%s); retrying in %.1f s",
                delivery.id,
                delivery.attempt_count,
                result.outcome().error,
                retry_in or 0.0,
                extra=extra,
            )
        else:
            extra.update(action="webhook_failed", error=result.error)
            logger.warning(
                "Webhook %s failed for good after attempt %d: %s",
                delivery.id,
                delivery.attempt_count,
                result.outcome().error,
                extra=extra,
            )

    @staticmethod
    def _extra(action: str, delivery: WebhookDelivery) -> dict[str, Any]:
        return {
            "action": action,
            "delivery_id": str(delivery.id),
            "job_id": str(delivery.job_id),
            "event_type": delivery.event_type,
            "attempt": delivery.attempt_count,
            "trigger": delivery.trigger,
        }


def _sending_body_only(claimed: ClaimedDelivery) -> ClaimedDelivery:
    """A first attempt that sends the body encoded for it keeps that body, not also the
    payload it was encoded from: the job's whole document, result included, parsed (tens
    of KB), and up to ``WEBHOOK_MAX_IN_FLIGHT`` first attempts wait on their POSTs at once."""
    if claimed.body is None:
        return claimed
    return replace(claimed, delivery=replace(claimed.delivery, payload={}))
