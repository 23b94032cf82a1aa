"""Retry rules, durability across restarts, two senders, endpoint health, ordering, size."""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.engine import create_engine
from core.db.webhooks import DeliveryRepository, NewDelivery
from core.events import JobEvent
from notifier.operations import WebhookOperations
from tests.integration.test_notifier import (
    SECRET,
    event_delivery,
    finished_job,
    make_notifier,
    make_settings,
    sending,
    settled,
    verify,
)
from tests.support.receiver import Reply, WebhookReceiver
from tests.support.waiting import wait_for


async def test_410_gone_stops_retries_and_disables_the_endpoint(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="blogpipe.notifier")
    webhook_receiver.script(410)
    first = await finished_job(engine, webhook_receiver.url)
    second = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings((0.0, 0.1, 0.1)))
    repo = DeliveryRepository(engine)
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(first)), timeout=10)
        [history] = await settled(engine, first)
        await asyncio.wait_for(notifier.handle_event(event_delivery(second)), timeout=10)
        [held] = await asyncio.wait_for(repo.list_for_job(second), timeout=10)

    assert history.delivery.status == "failed"
    assert [a.status_code for a in history.attempts] == [410]
    assert held.delivery.status == "held"
    endpoint = await repo.endpoint("default", webhook_receiver.url)
    assert endpoint is not None and endpoint.disabled
    assert "410" in (endpoint.disabled_reason or "")
    assert len(webhook_receiver.requests) == 1
    assert any(getattr(r, "action", None) == "webhook_endpoint_disabled" for r in caplog.records)


async def test_redirects_are_failures_and_not_followed(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    other = webhook_receiver.url_for("/elsewhere")
    webhook_receiver.script(Reply(302, headers={"location": other}))
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings((0.0, 0.1)))
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)
    assert [a.status_code for a in history.attempts] == [302, 200]
    assert history.attempts[0].error == "HTTP 302"
    assert [r.path for r in webhook_receiver.requests] == ["/hook", "/hook"]


async def test_429_retry_after_delays_the_next_attempt(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    webhook_receiver.script(Reply(429, retry_after="1"), Reply(503, retry_after="1"))
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings((0.0, 0.05, 0.05)))
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)
    assert [a.status_code for a in history.attempts] == [429, 503, 200]
    times = [r.received_at for r in webhook_receiver.requests]
    assert times[1] - times[0] >= 0.95
    assert times[2] - times[1] >= 0.95


async def test_restart_mid_schedule_resumes_without_resending(
    engine: AsyncEngine, database_url: str, webhook_receiver: WebhookReceiver
) -> None:
    schedule = (0.0, 1.0, 1.0)
    webhook_receiver.script(500)
    job_id = await finished_job(engine, webhook_receiver.url)
    repo = DeliveryRepository(engine)

    async def attempts() -> int:
        histories = await repo.list_for_job(job_id)
        return len(histories[0].attempts) if histories else 0

    first = make_notifier(engine, make_settings(schedule))
    async with sending(first):
        await asyncio.wait_for(first.handle_event(event_delivery(job_id)), timeout=10)
        await wait_for(attempts, timeout=20, message="the first attempt")
    # The first notifier is gone; a new one (own engine, as a new process would have)
    # picks the schedule up from Postgres.
    other_engine = create_engine(database_url, pool_size=2)
    try:
        async with sending(make_notifier(other_engine, make_settings(schedule))):
            [history] = await settled(engine, job_id)
    finally:
        await other_engine.dispose()

    assert [a.status_code for a in history.attempts] == [500, 200]
    assert len(webhook_receiver.requests) == 2
    gap = webhook_receiver.requests[1].received_at - webhook_receiver.requests[0].received_at
    assert gap >= 0.8 - 0.05


async def test_a_crashed_senders_lease_expires_and_its_late_write_is_fenced(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings((0.0, 0.1, 0.1)))
    repo = DeliveryRepository(engine)
    await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
    [crashed] = await asyncio.wait_for(repo.claim_due(limit=10, lease_seconds=0.3), timeout=10)
    assert await asyncio.wait_for(repo.claim_due(limit=10, lease_seconds=0.3), timeout=10) == []
    async with sending(notifier):
        [history] = await settled(engine, job_id)
    from core.db.webhooks import AttemptOutcome

    late = await asyncio.wait_for(
        repo.record_attempt(
            crashed, AttemptOutcome(url="x", error="late"), status="failed", retry_in=None
        ),
        timeout=10,
    )
    assert late is False
    assert history.delivery.status == "succeeded"
    assert [a.attempt for a in history.attempts] == [2]
    assert len(webhook_receiver.requests) == 1


async def test_failing_endpoint_is_disabled_then_recovered(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="blogpipe.notifier")
    webhook_receiver.script(500, 500, 500)
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(
        engine, make_settings((0.0, 0.1, 0.1, 0.1, 0.1)), disable_after_failures=3
    )
    repo = DeliveryRepository(engine)

    async def held() -> bool:
        histories = await repo.list_for_job(job_id)
        return bool(histories) and histories[0].delivery.status == "held"

    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        await wait_for(held, timeout=20, message="the delivery held")
        assert len(webhook_receiver.requests) == 3
        resumed = await asyncio.wait_for(
            WebhookOperations(engine, make_settings()).enable_endpoint(webhook_receiver.url),
            timeout=10,
        )
        notifier.wake()
        [history] = await settled(engine, job_id)

    assert resumed == 1
    assert [a.status_code for a in history.attempts] == [500, 500, 500, 200]
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert "webhook_endpoint_disabled" in actions and "webhook_endpoint_enabled" in actions


def _event(job_id: uuid.UUID, type_: str = "job.completed", at: datetime | None = None) -> JobEvent:
    return JobEvent(f"evt_{uuid.uuid4().hex}", type_, job_id, 1, at or datetime.now(UTC))


async def test_progress_is_never_delivered_after_completion(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    events = ["job.progress", "job.completed"]
    job_id = await finished_job(engine, webhook_receiver.url, status="processing", events=events)
    # The first progress webhook is slow to answer; completion arrives meanwhile.
    webhook_receiver.script(Reply(200, delay=1.0))
    notifier = make_notifier(engine, make_settings((0.0, 0.1)))
    repo = DeliveryRepository(engine)
    start = datetime.now(UTC)
    async with sending(notifier):
        await asyncio.wait_for(notifier.enqueue(_event(job_id, "job.progress", start)), timeout=10)
        await wait_for(lambda: _count(webhook_receiver, 1), timeout=10, message="progress sent")
        # A second progress event, then completion, while the first is still in flight.
        await asyncio.wait_for(
            notifier.enqueue(_event(job_id, "job.progress", start + timedelta(seconds=1))),
            timeout=10,
        )
        async with engine.begin() as conn:
            await conn.execute(
                text("UPDATE jobs SET status = 'completed' WHERE id = :id"), {"id": job_id}
            )
        await asyncio.wait_for(
            notifier.enqueue(_event(job_id, "job.completed", start + timedelta(seconds=2))),
            timeout=10,
        )
        # Late progress, whether it reaches the service or the repository, goes nowhere.
        assert (
            await notifier.enqueue(_event(job_id, "job.progress", start + timedelta(seconds=1.5)))
            is None
        )
        late, created = await repo.create(
            NewDelivery(
                job_id, "default", "evt_late", "job.progress", webhook_receiver.url, {"x": 1}, start
            )
        )
        assert created and late.status == "skipped"
        histories = await settled(engine, job_id, count=2)

    types = [orjson.loads(r.body)["type"] for r in webhook_receiver.requests]
    assert types == ["job.progress", "job.completed"]
    first, completed = webhook_receiver.requests
    assert completed.received_at >= first.received_at + 0.9  # waited for the slow one
    statuses = {h.delivery.event_type + "@" + h.delivery.status for h in histories}
    assert "job.progress@skipped" in statuses
    verify(completed.headers, completed.body)


async def _count(receiver: WebhookReceiver, n: int) -> bool:
    return len(receiver.requests) >= n


async def test_large_result_is_referenced_by_url(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    big = orjson.dumps({"title": "Long", "content": "word " * 20_000}).decode()
    job_id = await finished_job(engine, webhook_receiver.url, result=big)
    notifier = make_notifier(engine, make_settings())
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        await settled(engine, job_id)
    [request] = webhook_receiver.requests
    assert len(request.body) < 20 * 1024
    data = verify(request.headers, request.body)["data"]
    assert data["result"] is None
    assert data["result_url"] == f"https://blogpipe.example/api/v1/blog/jobs/{job_id}"


REPO_ROOT = str(Path(__file__).resolve().parents[2])
SENDER_PROCESS = """
import asyncio, os, signal
from core.db.engine import create_engine
from core.settings import Settings
from notifier.service import Notifier

async def main() -> None:
    engine = create_engine(os.environ["NOTIFIER_TEST_DB"], pool_size=4)
    notifier = Notifier(engine, None, Settings.from_env(), poll_interval=0.2, batch_size=20)
    task = asyncio.create_task(notifier.deliver_forever())
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    print("ready", flush=True)
    try:
        await task
    except asyncio.CancelledError:
        pass
    finally:
        await notifier.close()
        await engine.dispose()

asyncio.run(main())
"""


async def test_two_notifier_processes_deliver_200_each_exactly_once(
    engine: AsyncEngine, database_url: str, webhook_receiver: WebhookReceiver
) -> None:
    producer = make_notifier(engine, make_settings((0.0, 0.2)))
    for _ in range(200):
        job_id = await finished_job(engine, webhook_receiver.url)
        await asyncio.wait_for(producer.enqueue(_event(job_id)), timeout=10)
    await producer.close()

    env = {
        **os.environ,
        "PYTHONPATH": REPO_ROOT,
        "NOTIFIER_TEST_DB": database_url,
        "WEBHOOK_SECRET": SECRET,
        "WEBHOOK_RETRY_SCHEDULE": "0,0.2",
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_ALLOW_HTTP": "true",
    }
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", SENDER_PROCESS, env=env, stdout=asyncio.subprocess.PIPE
        )
        for _ in range(2)
    ]
    try:
        for process in processes:
            assert process.stdout is not None
            assert await asyncio.wait_for(process.stdout.readline(), timeout=60) == b"ready\n"

        async def all_sent() -> bool:
            async with engine.connect() as conn:
                done = await conn.scalar(
                    text("SELECT count(*) FROM webhook_deliveries WHERE status = 'succeeded'")
                )
            return done == 200

        await wait_for(all_sent, timeout=90, message="200 deliveries from two processes")
    finally:
        for process in processes:
            if process.returncode is None:
                process.terminate()
        for process in processes:
            try:
                await asyncio.wait_for(process.wait(), timeout=20)
            except TimeoutError:
                process.kill()
                await asyncio.wait_for(process.wait(), timeout=10)

    ids = [r.headers["webhook-id"] for r in webhook_receiver.requests]
    assert len(ids) == 200 and len(set(ids)) == 200
    async with engine.connect() as conn:
        attempts = await conn.scalar(text("SELECT count(*) FROM webhook_attempts"))
    assert attempts == 200
    assert all(process.returncode == 0 for process in processes)
