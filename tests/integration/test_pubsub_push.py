"""Push delivery end to end: the emulator POSTs to ``push_route`` served by uvicorn."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import pytest
import uvicorn
from starlette.applications import Starlette

from api.push import push_route
from core.broker import Delivery, Handler, Message, SubscriptionSpec
from core.broker.provision import push_url
from core.broker.pubsub import PubSubBroker
from tests.support.pubsub_emulator import PubSubEmulator
from tests.support.waiting import wait_for

pytestmark = pytest.mark.pubsub

TIMEOUT = 30.0


@pytest.fixture
async def broker(pubsub_emulator: PubSubEmulator) -> AsyncIterator[PubSubBroker]:
    broker = PubSubBroker(pubsub_emulator.project(), emulator_host=pubsub_emulator.host)
    yield broker
    await asyncio.wait_for(broker.close(), TIMEOUT)


@contextlib.asynccontextmanager
async def serving(handlers: dict[str, Handler]) -> AsyncIterator[str]:
    """Serve a push_route app on a free loopback port; yield its base URL."""
    app = Starlette(routes=[push_route(handlers)])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", lifespan="off", ws="none", access_log=False)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def started() -> bool:
        if task.done():
            task.result()  # surface a startup failure instead of waiting it out
        return server.started

    try:
        await wait_for(started, timeout=TIMEOUT, message="uvicorn to start")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait_for(task, TIMEOUT)
        sock.close()


class Endpoint:
    """A push handler that fails its first ``failures`` deliveries."""

    def __init__(self, failures: int = 0) -> None:
        self.failures = failures
        self.deliveries: list[Delivery] = []
        self.handled: list[Delivery] = []

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if len(self.deliveries) <= self.failures:
            raise RuntimeError("downstream is down")
        self.handled.append(delivery)

    async def has_handled(self) -> bool:
        return bool(self.handled)


async def push_subscription(broker: PubSubBroker, name: str, base_url: str) -> None:
    await broker.ensure_subscription(
        SubscriptionSpec(
            name=name,
            topic=f"{name}-topic",
            dead_letter_topic=f"{name}-dead",
            max_delivery_attempts=5,
            min_backoff_seconds=0,
            max_backoff_seconds=0,
            push_endpoint=push_url(base_url, name),
        )
    )


async def test_published_message_arrives_through_push(broker: PubSubBroker) -> None:
    endpoint = Endpoint()
    async with serving({"draft-push": endpoint}) as base_url:
        await push_subscription(broker, "draft-push", base_url)
        message_id = await asyncio.wait_for(
            broker.publish("draft-push-topic", Message(b'{"job_id": "j1"}', {"stage": "draft"})),
            TIMEOUT,
        )
        await wait_for(endpoint.has_handled, timeout=TIMEOUT, message="a pushed message")
    [delivery] = endpoint.handled
    assert delivery.message_id == message_id
    assert delivery.data == b'{"job_id": "j1"}'
    assert delivery.attributes == {"stage": "draft"}
    assert delivery.subscription == "draft-push"
    assert delivery.delivery_attempt == 1


async def test_failed_push_is_redelivered(broker: PubSubBroker) -> None:
    endpoint = Endpoint(failures=2)
    async with serving({"seo-push": endpoint}) as base_url:
        await push_subscription(broker, "seo-push", base_url)
        await asyncio.wait_for(broker.publish("seo-push-topic", Message(b"retry me")), TIMEOUT)
        await wait_for(endpoint.has_handled, timeout=TIMEOUT, message="a successful redelivery")
    assert [d.data for d in endpoint.deliveries] == [b"retry me"] * 3
    assert len({d.message_id for d in endpoint.deliveries}) == 1
    # The emulator's push envelope has no deliveryAttempt (GCP sends it with a
    # dead-letter policy), so every push parses as attempt 1 here.


async def test_push_that_keeps_failing_is_dead_lettered(broker: PubSubBroker) -> None:
    endpoint = Endpoint(failures=1_000)
    dead: list[Delivery] = []

    async def collect(delivery: Delivery) -> None:
        dead.append(delivery)

    async def dead_lettered() -> bool:
        return bool(dead)

    async with serving({"outline-push": endpoint}) as base_url:
        await push_subscription(broker, "outline-push", base_url)
        await broker.ensure_subscription(
            SubscriptionSpec(name="outline-push-dead-sub", topic="outline-push-dead")
        )
        subscriber = asyncio.create_task(broker.subscribe("outline-push-dead-sub", collect))
        try:
            await broker.publish("outline-push-topic", Message(b"poison"))
            await wait_for(dead_lettered, timeout=TIMEOUT, message="a dead letter")
        finally:
            subscriber.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(subscriber, TIMEOUT)
    assert len(endpoint.deliveries) == 5
    assert dead[0].data == b"poison"
