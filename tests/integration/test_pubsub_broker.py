"""PubSubBroker against the official Pub/Sub emulator (one fresh project per test)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable
from typing import Any

import pytest

from core.broker import Broker, Delivery, Handler, Message, Nack, SubscriptionSpec
from core.broker.provision import provision
from core.broker.pubsub import PubSubBroker
from core.constants import (
    EVENTS_TOPIC,
    NOTIFIER_SUBSCRIPTION,
    dead_letter_subscription,
    stage_subscription,
    stage_topic,
)
from core.errors import BrokerError
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
async def subscribed(
    broker: PubSubBroker, subscription: str, handler: Handler, max_in_flight: int = 100
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``broker.subscribe`` as a task for the block; cancel it (and check it stops) after."""
    task = asyncio.create_task(broker.subscribe(subscription, handler, max_in_flight=max_in_flight))
    try:
        yield task
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, TIMEOUT)


class Inbox:
    """A handler that records deliveries, optionally failing or blocking first."""

    def __init__(self, behaviour: Any = None) -> None:
        self.deliveries: list[Delivery] = []
        self.behaviour = behaviour

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self.behaviour is not None:
            result = self.behaviour(delivery)
            if isinstance(result, Awaitable):
                await result

    async def count(self, at_least: int) -> bool:
        return len(self.deliveries) >= at_least


def test_adapter_satisfies_the_broker_port() -> None:
    assert isinstance(PubSubBroker("bp-test", emulator_host="127.0.0.1:1"), Broker)


async def test_published_messages_reach_the_subscriber(broker: PubSubBroker) -> None:
    await broker.ensure_subscription(SubscriptionSpec(name="orders-sub", topic="orders"))
    inbox = Inbox()
    messages = [Message(f"m{i}".encode(), {"n": str(i)}) for i in range(20)]
    async with subscribed(broker, "orders-sub", inbox):
        ids = await asyncio.wait_for(broker.publish_many("orders", messages), TIMEOUT)
        ids.append(await asyncio.wait_for(broker.publish("orders", Message(b"last")), TIMEOUT))
        await wait_for(lambda: inbox.count(21), timeout=TIMEOUT, message="21 deliveries")
    assert sorted(d.message_id for d in inbox.deliveries) == sorted(ids)
    received = {d.data: d for d in inbox.deliveries}
    assert received[b"m7"].attributes == {"n": "7"}
    assert received[b"last"].attributes == {}
    assert {(d.subscription, d.delivery_attempt) for d in inbox.deliveries} == {("orders-sub", 1)}


async def test_flow_control_bounds_handlers_in_flight(broker: PubSubBroker) -> None:
    await broker.ensure_subscription(SubscriptionSpec(name="slow-sub", topic="slow"))
    release = asyncio.Event()
    in_flight = 0
    most = 0
    done: list[bytes] = []

    async def handler(delivery: Delivery) -> None:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await asyncio.wait_for(release.wait(), TIMEOUT)
        finally:
            in_flight -= 1
        done.append(delivery.data)

    async def three_running() -> bool:
        return in_flight == 3

    async def all_done() -> bool:
        return len(set(done)) == 12

    await broker.publish_many("slow", [Message(str(i).encode()) for i in range(12)])
    async with subscribed(broker, "slow-sub", handler, max_in_flight=3):
        await wait_for(three_running, timeout=TIMEOUT, message="3 handlers running")
        release.set()
        await wait_for(all_done, timeout=TIMEOUT, message="all 12 handled")
    assert most == 3


async def test_nacked_message_is_dead_lettered_after_max_attempts(broker: PubSubBroker) -> None:
    spec = SubscriptionSpec(
        name="fragile-sub",
        topic="fragile",
        max_delivery_attempts=5,
        dead_letter_topic="fragile-dead",
        min_backoff_seconds=0,
        max_backoff_seconds=0,
    )
    await broker.ensure_subscription(spec)
    await broker.ensure_subscription(
        SubscriptionSpec(name="fragile-dead-sub", topic="fragile-dead")
    )

    def refuse(delivery: Delivery) -> None:
        raise Nack("not today")

    attempts = Inbox(refuse)
    dead = Inbox()
    async with (
        subscribed(broker, "fragile-sub", attempts),
        subscribed(broker, "fragile-dead-sub", dead),
    ):
        await broker.publish("fragile", Message(b"poison", {"job_id": "j1"}))
        await wait_for(lambda: dead.count(1), timeout=TIMEOUT, message="a dead letter")
    assert sorted({d.delivery_attempt for d in attempts.deliveries}) == [1, 2, 3, 4, 5]
    [letter] = dead.deliveries
    assert letter.data == b"poison"
    assert letter.attributes["job_id"] == "j1"


async def test_lease_is_extended_while_a_handler_outlives_the_ack_deadline(
    broker: PubSubBroker,
) -> None:
    # No sleeping: a second message nacked with a 1 s backoff is the clock. By its 9th
    # delivery the 10 s ack deadline of the held message has long passed, so without
    # lease extension the held message would have been delivered a second time.
    await broker.ensure_subscription(
        SubscriptionSpec(
            name="lease-sub",
            topic="lease",
            ack_deadline_seconds=10,
            dead_letter_topic="lease-dead",
            max_delivery_attempts=100,
            min_backoff_seconds=1,
            max_backoff_seconds=1,
        )
    )
    release = asyncio.Event()

    async def behave(delivery: Delivery) -> None:
        if delivery.data == b"held":
            await asyncio.wait_for(release.wait(), 2 * TIMEOUT)
        elif delivery.delivery_attempt < 9:
            raise Nack("tick")

    inbox = Inbox(behave)

    def seen(data: bytes) -> list[int]:
        return [d.delivery_attempt for d in inbox.deliveries if d.data == data]

    async def clock_done() -> bool:
        return 9 in seen(b"clock")

    async with subscribed(broker, "lease-sub", inbox):
        await broker.publish("lease", Message(b"held"))
        await wait_for(lambda: inbox.count(1), timeout=TIMEOUT, message="the held message")
        await broker.publish("lease", Message(b"clock"))
        await wait_for(clock_done, timeout=2 * TIMEOUT, message="the clock's 9th delivery")
        release.set()
    assert seen(b"held") == [1]


async def test_cancelled_subscriber_nacks_running_handlers(broker: PubSubBroker) -> None:
    await broker.ensure_subscription(
        SubscriptionSpec(name="handover-sub", topic="handover", dead_letter_topic="handover-dead")
    )
    stuck = Inbox(lambda delivery: asyncio.Event().wait())
    async with subscribed(broker, "handover-sub", stuck):
        await broker.publish("handover", Message(b"job"))
        await wait_for(lambda: stuck.count(1), timeout=TIMEOUT, message="first delivery")
    second = Inbox()
    async with subscribed(broker, "handover-sub", second):
        await wait_for(lambda: second.count(1), timeout=TIMEOUT, message="redelivery")
    assert second.deliveries[0].data == b"job"
    assert second.deliveries[0].delivery_attempt >= 2


async def test_sdk_errors_become_broker_errors(broker: PubSubBroker) -> None:
    with pytest.raises(BrokerError, match="publish"):
        await asyncio.wait_for(broker.publish("no-such-topic", Message(b"x")), TIMEOUT)
    with pytest.raises(BrokerError, match="no-such-sub"):
        await asyncio.wait_for(broker.subscribe("no-such-sub", Inbox()), TIMEOUT)
    with pytest.raises(BrokerError, match="between 5 and 100"):
        await broker.ensure_subscription(
            SubscriptionSpec(
                name="few-sub", topic="few", max_delivery_attempts=2, dead_letter_topic="few-dl"
            )
        )


async def subscription_names(broker: PubSubBroker) -> set[str]:
    def names() -> set[str]:
        pages = broker.admin.list_subscriptions(project=f"projects/{broker.project_id}")
        return {subscription.name.rsplit("/", 1)[1] for subscription in pages}

    return await asyncio.to_thread(names)


async def test_provision_is_idempotent_and_wires_the_pipeline(broker: PubSubBroker) -> None:
    settings: dict[str, Any] = dict(
        max_delivery_attempts=5, ack_deadline_seconds=60, min_backoff=1, max_backoff=60
    )
    first = await asyncio.wait_for(provision(broker, **settings), TIMEOUT)
    second = await asyncio.wait_for(provision(broker, **settings), TIMEOUT)
    assert first == second
    names = {item.name for item in first if item.kind == "subscription"}
    assert stage_subscription("draft") in names
    assert NOTIFIER_SUBSCRIPTION in names
    assert dead_letter_subscription(EVENTS_TOPIC) in names
    assert await subscription_names(broker) == names

    inbox = Inbox()
    async with subscribed(broker, stage_subscription("draft"), inbox):
        await broker.publish(stage_topic("draft"), Message(b'{"job_id": "j1"}'))
        await wait_for(lambda: inbox.count(1), timeout=TIMEOUT, message="a draft message")
    assert inbox.deliveries[0].subscription == "blog-draft-worker"


async def test_provision_with_push_endpoint_makes_push_subscriptions(broker: PubSubBroker) -> None:
    summary = await asyncio.wait_for(
        provision(
            broker,
            max_delivery_attempts=5,
            ack_deadline_seconds=60,
            min_backoff=1,
            max_backoff=60,
            push_endpoint="https://stages.example/",
        ),
        TIMEOUT,
    )
    described = {item.name: item.detail for item in summary}
    assert (
        "push to https://stages.example/pubsub/push/blog-seo-worker" in described["blog-seo-worker"]
    )
    stage_dead_letters = dead_letter_subscription(stage_topic("seo"))
    assert (
        f"push to https://stages.example/pubsub/push/{stage_dead_letters}"
        in (described[stage_dead_letters])
    )
    assert "pull" in described[NOTIFIER_SUBSCRIPTION]
    assert "pull" in described[dead_letter_subscription(EVENTS_TOPIC)]
    path = broker.subscription_path("blog-seo-worker")
    stored = await asyncio.to_thread(broker.admin.get_subscription, subscription=path)
    assert stored.push_config.push_endpoint == "https://stages.example/pubsub/push/blog-seo-worker"
