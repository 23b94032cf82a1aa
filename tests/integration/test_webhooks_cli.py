"""``blogpipe deliveries`` and ``blogpipe redeliver`` against a real database."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.jobs import JobRepository
from core.db.webhooks import AttemptOutcome, DeliveryRepository, NewDelivery
from core.requests import BlogRequest
from tests.integration.test_cli import run_cli

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"


async def failed_delivery(engine: AsyncEngine) -> tuple[uuid.UUID, uuid.UUID]:
    request = BlogRequest(topic="A topic", keywords=["k"], callback_url="https://hooks.example/x")
    job = await JobRepository(engine).create(request)
    repo = DeliveryRepository(engine)
    delivery, _ = await repo.create(
        NewDelivery(
            job_id=job.id,
            tenant="default",
            event_id=str(uuid.uuid4()),
            event_type="job.completed",
            url="https://hooks.example/x",
            payload={"type": "job.completed"},
            occurred_at=datetime.now(UTC),
        )
    )
    [claimed] = await repo.claim_due(limit=10, lease_seconds=30)
    await repo.record_attempt(
        claimed,
        AttemptOutcome(url=claimed.url, status_code=500, latency_ms=12.0, response_excerpt="boom"),
        status="failed",
        retry_in=None,
    )
    return job.id, delivery.id


async def test_deliveries_lists_attempts(engine: AsyncEngine, database_url: str) -> None:
    job_id, delivery_id = await failed_delivery(engine)
    env = {"DATABASE_URL": database_url, "WEBHOOK_SECRET": SECRET}
    result = await run_cli("deliveries", str(job_id), env=env)
    assert result.returncode == 0, result.stderr
    assert str(delivery_id) in result.stdout and "failed" in result.stdout
    assert "#1" in result.stdout and "500" in result.stdout
    none = await run_cli("deliveries", str(uuid.uuid4()), env=env)
    assert "No webhook deliveries" in none.stdout


async def test_redeliver_one_and_bulk(engine: AsyncEngine, database_url: str) -> None:
    _, delivery_id = await failed_delivery(engine)
    _, other_id = await failed_delivery(engine)
    env = {"DATABASE_URL": database_url, "WEBHOOK_SECRET": SECRET}

    preview = await run_cli("redeliver", "--failed", "--since", "1h", "--dry-run", env=env)
    assert preview.returncode == 0, preview.stderr
    assert "2 failed deliveries" in preview.stdout and "Dry run" in preview.stdout
    async with engine.connect() as conn:
        statuses = (
            (await conn.execute(text("SELECT status FROM webhook_deliveries"))).scalars().all()
        )
    assert statuses == ["failed", "failed"]

    one = await run_cli("redeliver", str(delivery_id), env=env)
    assert one.returncode == 0, one.stderr
    bulk = await run_cli("redeliver", "--failed", "--since", "1h", "--cap", "5", env=env)
    assert "Re-queued 1 of 1" in bulk.stdout
    async with engine.connect() as conn:
        rows = dict((await conn.execute(text("SELECT id, status FROM webhook_deliveries"))).all())
    assert rows == {delivery_id: "pending", other_id: "pending"}


async def test_redeliver_rejects_bad_flags(database_url: str) -> None:
    env = {"DATABASE_URL": database_url, "WEBHOOK_SECRET": SECRET}
    both = await run_cli("redeliver", str(uuid.uuid4()), "--failed", env=env)
    assert both.returncode == 2 and "either DELIVERY_ID or --failed" in both.stderr
    since = await run_cli("redeliver", "--failed", "--since", "yesterday", env=env)
    assert since.returncode == 2 and "--since" in since.stderr
    unknown = await run_cli("redeliver", str(uuid.uuid4()), env=env)
    assert unknown.returncode == 1 and "not found" in unknown.stderr
