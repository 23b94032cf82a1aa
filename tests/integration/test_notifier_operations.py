"""Redelivery, bulk recovery, ping, the webhook API routes, and the SSRF guard at send time."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime, timedelta
from uuid import UUID

import httpx
import pytest
import standardwebhooks
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from api.webhooks import webhook_routes
from core.db.webhooks import DeliveryRepository
from core.errors import ConfigError
from core.settings import Settings
from core.ssrf import check_callback_url
from notifier.operations import WebhookOperations, parse_since
from notifier.service import Notifier
from tests.integration.test_notifier import (
    LOOPBACK,
    SECRET,
    event_delivery,
    finished_job,
    make_notifier,
    make_settings,
    sending,
    settled,
    verify,
)
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for


@pytest.fixture
async def api(engine: AsyncEngine) -> AsyncIterator[httpx.AsyncClient]:
    routes = webhook_routes(engine, make_settings(), allowed_hosts=LOOPBACK, allow_http=True)
    transport = httpx.ASGITransport(app=Starlette(routes=routes))
    async with httpx.AsyncClient(transport=transport, base_url="http://api") as client:
        yield client


async def failed_delivery(engine: AsyncEngine, receiver: WebhookReceiver) -> tuple[UUID, str]:
    """A job whose only webhook attempt failed (single-attempt schedule)."""
    receiver.script(500)
    job_id = await finished_job(engine, receiver.url)
    notifier = make_notifier(engine, make_settings((0.0,)))
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)
    assert history.delivery.status == "failed"
    return job_id, str(history.delivery.id)


async def test_manual_redelivery_is_sent_and_logged_as_manual(
    engine: AsyncEngine,
    webhook_receiver: WebhookReceiver,
    api: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="blogpipe.notifier")
    job_id, delivery_id = await failed_delivery(engine, webhook_receiver)
    response = await asyncio.wait_for(
        api.post(f"/api/v1/webhooks/deliveries/{delivery_id}/redeliver"), timeout=10
    )
    assert response.status_code == 202
    async with sending(make_notifier(engine, make_settings((0.0,)))):

        async def delivered() -> bool:
            found = await DeliveryRepository(engine).list_for_job(job_id)
            return found[0].delivery.status == "succeeded"

        await wait_for(delivered, timeout=20, message="the redelivery")

    listing = await asyncio.wait_for(api.get(f"/api/v1/blog/jobs/{job_id}/deliveries"), timeout=10)
    assert listing.status_code == 200
    [delivery] = listing.json()["deliveries"]
    assert [(a["attempt"], a["trigger"], a["status_code"]) for a in delivery["attempts"]] == [
        (1, "schedule", 500),
        (2, "manual", 200),
    ]
    ids = {r.headers["webhook-id"] for r in webhook_receiver.requests}
    assert ids == {delivery["message_id"]}  # the same webhook-id on redelivery
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert "webhook_redelivery_requested" in actions


async def test_redeliver_unknown_delivery_is_404(api: httpx.AsyncClient) -> None:
    missing = await asyncio.wait_for(
        api.post("/api/v1/webhooks/deliveries/00000000-0000-0000-0000-000000000000/redeliver"),
        timeout=10,
    )
    assert missing.status_code == 404
    bad = await asyncio.wait_for(api.get("/api/v1/blog/jobs/not-a-uuid/deliveries"), timeout=10)
    assert bad.status_code == 404


async def test_bulk_recover_previews_caps_and_requeues(
    engine: AsyncEngine,
    webhook_receiver: WebhookReceiver,
    api: httpx.AsyncClient,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", logger="blogpipe.notifier")
    for _ in range(3):
        await failed_delivery(engine, webhook_receiver)
    sent_before = len(webhook_receiver.requests)

    preview = await asyncio.wait_for(
        api.post("/api/v1/webhooks/deliveries/recover", json={"since": "1h", "dry_run": True}),
        timeout=10,
    )
    assert preview.status_code == 200
    assert preview.json()["matching"] == 3 and preview.json()["queued"] == 0

    recovered = await asyncio.wait_for(
        api.post("/api/v1/webhooks/deliveries/recover?since=1h&cap=2"), timeout=10
    )
    assert recovered.status_code == 202
    body = recovered.json()
    assert body["matching"] == 3 and body["queued"] == 2 and len(body["delivery_ids"]) == 2

    repo = DeliveryRepository(engine)
    async with sending(make_notifier(engine, make_settings((0.0,)))):

        async def two_succeeded() -> bool:
            found = [await repo.history(UUID(i)) for i in body["delivery_ids"]]
            return all(h is not None and h.delivery.status == "succeeded" for h in found)

        await wait_for(two_succeeded, timeout=20, message="recovered deliveries")

    assert len(webhook_receiver.requests) == sent_before + 2
    for raw in body["delivery_ids"]:
        history = await repo.history(UUID(raw))
        assert history is not None and history.attempts[-1].trigger == "recover"
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert "webhook_recovery_previewed" in actions and "webhook_recovery_requested" in actions

    invalid = await asyncio.wait_for(
        api.post("/api/v1/webhooks/deliveries/recover", json={"since": "yesterday"}), timeout=10
    )
    assert invalid.status_code == 422


def test_parse_since() -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    assert parse_since("6h", now=now) == now - timedelta(hours=6)
    assert parse_since("2d", now=now) == now - timedelta(days=2)
    assert parse_since("2026-01-01T00:00:00Z") == datetime(2026, 1, 1, tzinfo=UTC)


async def test_ping_sends_a_signed_test_event(
    webhook_receiver: WebhookReceiver, api: httpx.AsyncClient
) -> None:
    response = await asyncio.wait_for(
        api.post("/api/v1/webhooks/ping", json={"url": webhook_receiver.url}), timeout=10
    )
    assert response.status_code == 200
    assert response.json()["delivered"] is True and response.json()["status_code"] == 200
    [request] = webhook_receiver.requests
    assert verify(request.headers, request.body)["type"] == "ping"


async def test_ping_to_a_private_address_is_refused(api: httpx.AsyncClient) -> None:
    response = await asyncio.wait_for(
        api.post("/api/v1/webhooks/ping", json={"url": "http://10.0.0.1/hook"}), timeout=10
    )
    assert response.status_code == 422
    assert "private address" in response.json()["detail"]


async def test_dns_rebinding_between_check_and_connect_is_refused(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    url = f"http://rebind.example.test:{webhook_receiver.port}/hook"
    # At submission the name resolves to a public address, so the job is accepted ...
    check_callback_url(
        url, allow_http=True, allowed_hosts=(), resolver=lambda host, port: ["93.184.216.34"]
    )
    job_id = await finished_job(engine, url)

    async def rebound(host: str, port: int) -> Sequence[str]:
        return ["127.0.0.1"]  # ... and by delivery time it points at us.

    notifier = make_notifier(engine, make_settings(), allowed_hosts=(), resolver=rebound)
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)
    assert history.delivery.status == "failed"
    [attempt] = history.attempts
    assert attempt.status_code is None and "loopback" in (attempt.error or "")
    assert webhook_receiver.requests == []


async def test_sender_connects_to_the_checked_address_keeping_the_host(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    url = f"http://hooks.example.test:{webhook_receiver.port}/hook"
    job_id = await finished_job(engine, url)

    async def resolver(host: str, port: int) -> Sequence[str]:
        assert host == "hooks.example.test"
        return ["127.0.0.1"]

    notifier = make_notifier(engine, make_settings(), resolver=resolver)
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)
    assert history.delivery.status == "succeeded"
    [request] = webhook_receiver.requests
    assert request.headers["host"] == f"hooks.example.test:{webhook_receiver.port}"


async def test_dns_failure_is_retried(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    url = f"http://flaky-dns.example.test:{webhook_receiver.port}/hook"
    job_id = await finished_job(engine, url)
    answers = iter([OSError("Temporary failure in name resolution")])

    async def resolver(host: str, port: int) -> Sequence[str]:
        failure = next(answers, None)
        if failure is not None:
            raise failure
        return ["127.0.0.1"]

    notifier = make_notifier(engine, make_settings((0.0, 0.1)), resolver=resolver)
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)
    assert [a.status_code for a in history.attempts] == [None, 200]
    assert "DNS" in (history.attempts[0].error or "")


async def test_operations_without_api(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    ops = WebhookOperations(engine, make_settings(), allowed_hosts=LOOPBACK, allow_http=True)
    result = await asyncio.wait_for(ops.ping(webhook_receiver.url), timeout=10)
    assert result.ok and result.response_excerpt == "ok"


async def test_endpoint_secret_rotation_signs_with_both_during_the_overlap(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    new_secret = "whsec_plJ3nmyCDGBKInavdOK15jsl"
    ops = WebhookOperations(engine, make_settings(), allowed_hosts=LOOPBACK, allow_http=True)
    # The endpoint starts on its own secret, then rotates to a new one.
    await asyncio.wait_for(ops.rotate_secret(webhook_receiver.url, SECRET), timeout=10)
    await asyncio.wait_for(ops.rotate_secret(webhook_receiver.url, new_secret), timeout=10)
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings())
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        await settled(engine, job_id)
    [request] = webhook_receiver.requests
    assert len(request.headers["webhook-signature"].split(" ")) == 2
    verify(request.headers, request.body)  # the old secret
    standardwebhooks.Webhook(new_secret).verify(request.body, request.headers)


def test_notifier_requires_a_webhook_secret(engine: AsyncEngine) -> None:
    with pytest.raises(ConfigError, match="WEBHOOK_SECRET"):
        Notifier(engine, None, Settings())
