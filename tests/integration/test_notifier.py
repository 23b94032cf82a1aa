"""The notifier against real Postgres and a real HTTP receiver on loopback."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import pytest
import standardwebhooks
import svix.webhooks
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.broker import Delivery, Handler, Message, SubscriptionSpec
from core.constants import NOTIFIER_SUBSCRIPTION
from core.db.jobs import JobRepository
from core.db.webhooks import DeliveryHistory, DeliveryRepository
from core.events import JobEvent
from core.requests import BlogRequest
from core.settings import Settings
from notifier.service import Notifier
from tests.support.receiver import Reply, WebhookReceiver
from tests.support.waiting import wait_for

SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
LOOPBACK = ("127.0.0.1",)


def make_settings(schedule: Sequence[float] = (0.0, 0.2, 0.4), timeout: float = 2.0) -> Settings:
    return Settings(
        webhook_secret=SECRET,
        webhook_retry_schedule=tuple(schedule),
        webhook_timeout=timeout,
        public_base_url="https://blogpipe.example",
    )


def make_notifier(engine: AsyncEngine, settings: Settings, **kwargs: Any) -> Notifier:
    options: dict[str, Any] = {"allowed_hosts": LOOPBACK, "allow_http": True, "poll_interval": 0.2}
    return Notifier(engine, None, settings, **{**options, **kwargs})


async def finished_job(
    engine: AsyncEngine,
    url: str,
    *,
    status: str = "completed",
    events: list[str] | None = None,
    result: str = '{"title": "Hello", "content": "Body"}',
) -> UUID:
    request = BlogRequest(
        topic="Webhooks done right", keywords=["webhooks"], callback_url=url, callback_events=events
    )
    job = await JobRepository(engine).create(request)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE jobs SET status = :status, progress_percentage = 100, result = :result,"
                " started_at = now(), completed_at = now(), updated_at = now() WHERE id = :id"
            ),
            {"status": status, "result": result, "id": job.id},
        )
    return job.id


def event_delivery(
    job_id: UUID, type_: str = "job.completed", event_id: str | None = None
) -> Delivery:
    event = JobEvent(
        event_id=event_id or f"evt_{uuid.uuid4().hex}",
        type=type_,
        job_id=job_id,
        generation=1,
        occurred_at=datetime.now(UTC),
    )
    message = event.to_message()
    return Delivery(
        message_id=uuid.uuid4().hex,
        data=message.data,
        attributes=message.attributes,
        delivery_attempt=1,
        subscription=NOTIFIER_SUBSCRIPTION,
    )


@contextlib.asynccontextmanager
async def sending(notifier: Notifier) -> AsyncIterator[Notifier]:
    """Run the notifier's delivery loop in the background for the block."""
    task = asyncio.create_task(notifier.deliver_forever())
    try:
        yield notifier
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)
        await asyncio.wait_for(notifier.close(), timeout=10)


async def settled(engine: AsyncEngine, job_id: UUID, count: int = 1) -> list[DeliveryHistory]:
    async def probe() -> list[DeliveryHistory] | None:
        histories = await DeliveryRepository(engine).list_for_job(job_id)
        done = [h for h in histories if h.delivery.status in ("succeeded", "failed")]
        return histories if len(done) >= count else None

    result = await wait_for(probe, timeout=30, message="deliveries settled")
    assert result is not None
    return result


def verify(request_headers: dict[str, str], body: bytes) -> Any:
    svix.webhooks.Webhook(SECRET).verify(body, request_headers)
    return standardwebhooks.Webhook(SECRET).verify(body, request_headers)


async def test_completed_job_sends_one_signed_webhook(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings())
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)

    assert len(webhook_receiver.requests) == 1
    request = webhook_receiver.requests[0]
    payload = verify(request.headers, request.body)
    assert payload["type"] == "job.completed"
    assert payload["timestamp"].endswith("Z")
    assert payload["data"]["job_id"] == str(job_id)
    assert payload["data"]["status"] == "completed"
    assert payload["data"]["result"] == {"title": "Hello", "content": "Body"}
    assert request.headers["webhook-id"] == history.delivery.message_id
    assert request.headers["content-type"] == "application/json"
    assert history.delivery.status == "succeeded"
    [attempt] = history.attempts
    assert (attempt.attempt, attempt.status_code, attempt.error) == (1, 200, None)
    assert attempt.response_excerpt == "ok"
    assert attempt.latency_ms is not None and attempt.latency_ms >= 0


async def test_duplicate_event_makes_one_delivery_and_one_send(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings())
    message = event_delivery(job_id)
    async with sending(notifier):
        await asyncio.wait_for(
            asyncio.gather(*(notifier.handle_event(message) for _ in range(3))), timeout=10
        )
        await settled(engine, job_id)
        await asyncio.wait_for(notifier.handle_event(message), timeout=10)
        assert await asyncio.wait_for(notifier.deliver_due(), timeout=10) == 0

    histories = await DeliveryRepository(engine).list_for_job(job_id)
    assert len(histories) == 1
    assert len(histories[0].attempts) == 1
    assert len(webhook_receiver.requests) == 1


async def test_events_the_job_did_not_ask_for_are_not_sent(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    job_id = await finished_job(engine, webhook_receiver.url, events=["job.failed"])
    notifier = make_notifier(engine, make_settings())
    try:
        stored = await asyncio.wait_for(notifier.enqueue(_event(job_id)), timeout=10)
    finally:
        await notifier.close()
    assert stored is None
    assert await DeliveryRepository(engine).list_for_job(job_id) == []


async def test_an_event_of_a_replaced_generation_is_not_sent(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    job_id = await finished_job(engine, webhook_receiver.url)
    # Replayed after generation 1 completed, before its event was handled: the job's
    # document now describes generation 2, which sends its own events.
    async with engine.begin() as conn:
        await conn.execute(
            text("UPDATE jobs SET generation = 2, status = 'processing' WHERE id = :id"),
            {"id": job_id},
        )
    notifier = make_notifier(engine, make_settings())
    try:
        stale = await asyncio.wait_for(notifier.enqueue(_event(job_id)), timeout=10)
        current = JobEvent("evt_current", "job.completed", job_id, 2, datetime.now(UTC))
        stored = await asyncio.wait_for(notifier.enqueue(current), timeout=10)
    finally:
        await notifier.close()
    assert stale is None
    assert stored is not None and stored.event_id == "evt_current"
    [history] = await DeliveryRepository(engine).list_for_job(job_id)
    assert history.delivery.event_id == "evt_current"


def _event(job_id: UUID, type_: str = "job.completed") -> JobEvent:
    return JobEvent.from_bytes(event_delivery(job_id, type_).data)


async def test_receiver_failing_twice_then_succeeding(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver, caplog: pytest.LogCaptureFixture
) -> None:
    webhook_receiver.script(500, 503)
    schedule = (0.0, 0.2, 0.4)
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings(schedule))
    caplog.set_level("INFO", logger="blogpipe.notifier")
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)

    assert history.delivery.status == "succeeded"
    assert [a.status_code for a in history.attempts] == [500, 503, 200]
    assert [a.attempt for a in history.attempts] == [1, 2, 3]
    assert [a.error for a in history.attempts] == ["HTTP 500", "HTTP 503", None]
    ids = {r.headers["webhook-id"] for r in webhook_receiver.requests}
    assert ids == {history.delivery.message_id}
    for request in webhook_receiver.requests:
        verify(request.headers, request.body)
    times = [r.received_at for r in webhook_receiver.requests]
    for gap, wait in zip(
        [b - a for a, b in zip(times, times[1:], strict=False)], schedule[1:], strict=True
    ):
        assert gap >= wait * 0.8 - 0.05
    actions = [getattr(r, "action", None) for r in caplog.records]
    assert actions.count("webhook_retry_scheduled") == 2
    assert actions.count("webhook_delivered") == 1


async def test_500_timeout_refused_then_success(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    schedule = (0.0, 0.5, 1.5, 1.0, 1.0)
    webhook_receiver.script(500, Reply(200, delay=3.0))
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings(schedule, timeout=0.5))
    repo = DeliveryRepository(engine)

    async def attempts(count: int) -> bool:
        histories = await repo.list_for_job(job_id)
        return bool(histories) and len(histories[0].attempts) >= count

    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        await wait_for(lambda: attempts(2), timeout=20, message="two attempts")
        await asyncio.wait_for(webhook_receiver.stop(), timeout=15)
        await wait_for(lambda: attempts(3), timeout=20, message="a refused attempt")
        await asyncio.wait_for(webhook_receiver.start(), timeout=15)
        [history] = await settled(engine, job_id)

    assert history.delivery.status == "succeeded"
    first, second, third, fourth = history.attempts
    assert first.status_code == 500
    assert second.status_code is None and "timed out" in (second.error or "")
    assert third.status_code is None and "connection" in (third.error or "")
    assert fourth.status_code == 200 and fourth.error is None
    gaps = [
        (b.created_at - a.created_at).total_seconds()
        for a, b in zip(history.attempts, history.attempts[1:], strict=False)
    ]
    for gap, wait in zip(gaps, schedule[1:], strict=False):
        assert gap >= wait * 0.8 - 0.05


class QueueBroker:
    """Just enough of a broker to drive ``Notifier.run()``: one in-memory subscription."""

    name = "test-queue"

    def __init__(self) -> None:
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.acked: list[str] = []
        self.max_in_flight = 0

    async def ensure_topic(self, topic: str) -> None:
        return None

    async def ensure_subscription(self, spec: SubscriptionSpec) -> None:
        return None

    async def publish(self, topic: str, message: Message) -> str:
        await self.queue.put(message)
        return str(self.queue.qsize())

    async def subscribe(
        self, subscription: str, handler: Handler, *, max_in_flight: int = 100
    ) -> None:
        self.max_in_flight = max_in_flight
        while True:
            message = await self.queue.get()
            message_id = uuid.uuid4().hex
            await handler(Delivery(message_id, message.data, message.attributes, 1, subscription))
            self.acked.append(message_id)

    async def close(self) -> None:
        return None


async def test_run_consumes_events_and_sends(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    job_id = await finished_job(engine, webhook_receiver.url, status="failed")
    broker = QueueBroker()
    settings = replace(make_settings(), webhook_max_in_flight=7)
    notifier = Notifier(
        engine, broker, settings, allowed_hosts=LOOPBACK, allow_http=True, poll_interval=5.0
    )
    task = asyncio.create_task(notifier.run())
    try:
        await broker.publish("blog-job-events", _event(job_id, "job.failed").to_message())
        [history] = await settled(engine, job_id)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=10)
    assert history.delivery.status == "succeeded"
    assert len(broker.acked) == 1
    assert webhook_receiver.requests[0].json()["type"] == "job.failed"  # type: ignore[index]
    # Events and POSTs in flight, and idle connections kept, as WEBHOOK_MAX_IN_FLIGHT says.
    assert broker.max_in_flight == 7
    assert notifier.batch_size == 7 and notifier.http_client.max_idle_per_host == 7


async def test_a_new_delivery_goes_out_without_waiting_for_the_delivery_loop(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    """While the loop runs, a stored delivery is claimed in the same statement and sent
    by a task of its own: here the loop sleeps for an hour and is never woken."""
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings(), poll_interval=3600.0)
    notifier.wake = lambda: None  # type: ignore[method-assign]
    async with sending(notifier):
        await asyncio.wait_for(notifier.handle_event(event_delivery(job_id)), timeout=10)
        [history] = await settled(engine, job_id)
    assert history.delivery.status == "succeeded" and len(webhook_receiver.requests) == 1
    assert [attempt.attempt for attempt in history.attempts] == [1]


async def test_without_the_delivery_loop_a_new_delivery_waits_for_a_sweep(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings())
    stored = await asyncio.wait_for(notifier.enqueue(_event(job_id)), timeout=10)
    assert stored is not None and (stored.status, stored.attempt_count) == ("pending", 0)
    assert await asyncio.wait_for(notifier.deliver_due(), timeout=10) == 1
    assert len(webhook_receiver.requests) == 1
    await asyncio.wait_for(notifier.close(), timeout=10)


async def test_first_attempts_in_flight_are_bounded_by_the_batch_size(
    engine: AsyncEngine, webhook_receiver: WebhookReceiver
) -> None:
    job_id = await finished_job(engine, webhook_receiver.url)
    notifier = make_notifier(engine, make_settings(), batch_size=1, poll_interval=3600.0)
    notifier.wake = lambda: None  # type: ignore[method-assign]
    busy = asyncio.Event()
    blocker = asyncio.create_task(busy.wait())  # stands for one attempt still in flight
    notifier._first_attempts.add(blocker)
    try:
        async with sending(notifier):
            stored = await asyncio.wait_for(notifier.enqueue(_event(job_id)), timeout=10)
            assert stored is not None and (stored.status, stored.attempt_count) == ("pending", 0)
            assert webhook_receiver.requests == []
    finally:
        busy.set()
        with contextlib.suppress(asyncio.CancelledError):  # stopping the loop cancels it
            await asyncio.wait_for(blocker, timeout=10)
