"""The notifier's one-statement steps: store, claim with secrets, settle with health."""

from __future__ import annotations

import asyncio
import dataclasses
import uuid
from datetime import UTC, datetime, timedelta

import orjson
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.jobs import JobRepository
from core.db.webhooks import AttemptOutcome, DeliveryRepository, NewDelivery
from core.requests import BlogRequest

URL = "https://hooks.example/x"
SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
TIMEOUT = 10


async def new_delivery(
    engine: AsyncEngine, *, event_type: str = "job.completed", at: datetime | None = None
) -> NewDelivery:
    request = BlogRequest(topic="A topic", keywords=["k"], callback_url=URL)
    job = await JobRepository(engine).create(request)
    return NewDelivery(
        job.id, "default", f"evt_{uuid.uuid4().hex}", event_type, URL, {"n": 1}, at or _now()
    )


def _now() -> datetime:
    return datetime.now(UTC)


async def test_create_is_idempotent_under_concurrency(engine: AsyncEngine) -> None:
    repo = DeliveryRepository(engine)
    new = await new_delivery(engine)
    results = await asyncio.wait_for(asyncio.gather(*(repo.create(new) for _ in range(5))), TIMEOUT)
    assert sum(created for _, created in results) == 1
    assert {delivery.id for delivery, _ in results} == {results[0][0].id}
    assert results[0][0].payload == {"n": 1} and results[0][0].status == "pending"
    endpoint = await repo.endpoint("default", URL)
    assert endpoint is not None and endpoint.consecutive_failures == 0


async def test_disabled_endpoint_gets_held_and_late_progress_is_skipped(
    engine: AsyncEngine,
) -> None:
    repo = DeliveryRepository(engine)
    start = _now()
    first = await new_delivery(engine, event_type="job.progress", at=start)
    stored, _ = await asyncio.wait_for(repo.create(first), TIMEOUT)
    later = NewDelivery(
        first.job_id, "default", "evt_later", "job.completed", URL, {}, start + timedelta(1)
    )
    await asyncio.wait_for(repo.disable_endpoint("default", URL, "test"), TIMEOUT)
    held, _ = await asyncio.wait_for(repo.create(later), TIMEOUT)
    assert held.status == "held"
    superseded = await repo.get(stored.id)
    assert superseded is not None and superseded.status == "skipped"
    late = NewDelivery(
        first.job_id, "default", "evt_late", "job.progress", URL, {}, start + timedelta(hours=1)
    )
    skipped, created = await asyncio.wait_for(repo.create(late), TIMEOUT)
    assert created and skipped.status == "skipped"


async def test_claim_carries_the_endpoint_secrets(engine: AsyncEngine) -> None:
    repo = DeliveryRepository(engine)
    await asyncio.wait_for(repo.create(await new_delivery(engine)), TIMEOUT)
    await asyncio.wait_for(repo.set_endpoint_secret("default", URL, SECRET), TIMEOUT)
    sweep = await asyncio.wait_for(repo.claim_for_sending(limit=10, lease_seconds=30), TIMEOUT)
    [claimed] = sweep.claimed
    assert claimed.delivery.attempt_count == 1 and claimed.delivery.status == "sending"
    assert claimed.secrets is not None and claimed.secrets.secret == SECRET
    empty = await asyncio.wait_for(repo.claim_for_sending(limit=10, lease_seconds=30), TIMEOUT)
    assert empty.claimed == [] and empty.due_in is not None and 0 < empty.due_in <= 30


async def test_settle_counts_health_only_while_the_lease_is_held(engine: AsyncEngine) -> None:
    repo = DeliveryRepository(engine)
    await asyncio.wait_for(repo.create(await new_delivery(engine)), TIMEOUT)
    [delivery] = await asyncio.wait_for(repo.claim_due(limit=10, lease_seconds=30), TIMEOUT)
    failed = AttemptOutcome(url=URL, status_code=500, latency_ms=1.5, error="HTTP 500")
    settlement = await asyncio.wait_for(
        repo.settle(delivery, failed, status="pending", retry_in=0.0, health="failure"), TIMEOUT
    )
    assert settlement.recorded
    assert settlement.endpoint is not None and settlement.endpoint.consecutive_failures == 1
    assert settlement.endpoint.failing_since is not None
    # The same attempt again: the lease is gone, so nothing is logged or counted.
    again = await asyncio.wait_for(
        repo.settle(delivery, failed, status="failed", retry_in=None, health="failure"), TIMEOUT
    )
    assert not again.recorded and again.endpoint is None
    [retry] = await asyncio.wait_for(repo.claim_due(limit=10, lease_seconds=30), TIMEOUT)
    ok = AttemptOutcome(url=URL, status_code=200, latency_ms=1.0, response_excerpt="ok")
    done = await asyncio.wait_for(
        repo.settle(retry, ok, status="succeeded", retry_in=None, health="success"), TIMEOUT
    )
    assert done.recorded and done.endpoint is None
    endpoint = await repo.endpoint("default", URL)
    assert endpoint is not None
    assert (endpoint.consecutive_failures, endpoint.failing_since) == (0, None)
    history = await repo.history(delivery.id)
    assert history is not None and history.delivery.status == "succeeded"
    assert [(a.attempt, a.status_code, a.latency_ms) for a in history.attempts] == [
        (1, 500, 1.5),
        (2, 200, 1.0),
    ]


async def test_a_new_delivery_can_be_stored_already_claimed(engine: AsyncEngine) -> None:
    repo = DeliveryRepository(engine)
    first = await new_delivery(engine)
    stored, created, claimed = await asyncio.wait_for(
        repo.create_claimed(first, lease_seconds=30), TIMEOUT
    )
    assert created and claimed is not None and claimed.delivery == stored
    assert (stored.status, stored.attempt_count, stored.payload) == ("sending", 1, {"n": 1})
    assert stored.next_attempt_at is not None
    assert 25 < (stored.next_attempt_at - stored.created_at).total_seconds() <= 30
    assert claimed.secrets is None  # a new endpoint: the notifier's own secret signs
    # It is leased: the sweep finds nothing to claim.
    sweep = await asyncio.wait_for(repo.claim_for_sending(limit=10, lease_seconds=30), TIMEOUT)
    assert sweep.claimed == []

    # The same event again: nothing new, nothing claimed.
    again = await asyncio.wait_for(repo.create_claimed(first, lease_seconds=30), TIMEOUT)
    assert (again[1], again[2]) == (False, None) and again[0].id == stored.id

    # A later event of the same job waits for the unsettled one: stored pending.
    later = NewDelivery(first.job_id, "default", "evt_next", "job.failed", URL, {}, _now())
    waiting, created, none = await asyncio.wait_for(
        repo.create_claimed(later, lease_seconds=30), TIMEOUT
    )
    assert created and none is None and waiting.status == "pending"
    assert waiting.attempt_count == 0


async def test_a_claimed_store_signs_with_the_endpoints_secret_and_respects_a_disable(
    engine: AsyncEngine,
) -> None:
    repo = DeliveryRepository(engine)
    await asyncio.wait_for(repo.set_endpoint_secret("default", URL, SECRET), TIMEOUT)
    _, _, claimed = await asyncio.wait_for(
        repo.create_claimed(await new_delivery(engine), lease_seconds=30), TIMEOUT
    )
    assert claimed is not None and claimed.secrets is not None
    assert claimed.secrets.secret == SECRET

    await asyncio.wait_for(repo.disable_endpoint("default", URL, "test"), TIMEOUT)
    held, created, none = await asyncio.wait_for(
        repo.create_claimed(await new_delivery(engine), lease_seconds=30), TIMEOUT
    )
    assert created and none is None and held.status == "held" and held.attempt_count == 0


async def test_a_body_encoded_by_the_caller_is_stored_as_the_payload_and_sent_first(
    engine: AsyncEngine,
) -> None:
    repo = DeliveryRepository(engine)
    plain = await new_delivery(engine)
    payload = {"type": "job.completed", "data": {"title": "Tea \u2615", "n": [1, 2.5, None]}}
    body = orjson.dumps(payload)
    new = dataclasses.replace(plain, payload=payload, body=body)
    stored, created, claimed = await asyncio.wait_for(
        repo.create_claimed(new, lease_seconds=30), TIMEOUT
    )
    assert created and claimed is not None and claimed.body == body
    assert stored.payload == payload  # the caller's, not read back
    reread = await asyncio.wait_for(repo.get(stored.id), TIMEOUT)
    assert reread is not None and reread.payload == payload  # stored as JSON, not a string
    # The same event again: the stored delivery, its payload read back, nothing to send.
    again, created, claimed = await asyncio.wait_for(
        repo.create_claimed(new, lease_seconds=30), TIMEOUT
    )
    assert not created and claimed is None and again.id == stored.id
    assert again.payload == payload
    # Without a body the payload is encoded by the codec, and a claim has no body.
    other = await new_delivery(engine)
    _, created, claimed = await asyncio.wait_for(
        repo.create_claimed(other, lease_seconds=30), TIMEOUT
    )
    assert created and claimed is not None and claimed.body is None
    assert claimed.delivery.payload == {"n": 1}
