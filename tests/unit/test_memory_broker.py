"""The in-memory test double keeps the Broker contract."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from typing import Any

import pytest

from core.broker import Broker, Delivery, Message, Nack, SubscriptionSpec
from core.broker.memory import InMemoryBroker
from core.errors import BrokerError
from tests.support.brokers import Recorder, subscribed
from tests.support.waiting import wait_for

TIMEOUT = 10.0
LOGGER = "blogpipe.broker.memory"


@pytest.fixture
async def broker() -> AsyncIterator[InMemoryBroker]:
    broker = InMemoryBroker()
    yield broker
    await asyncio.wait_for(broker.close(), TIMEOUT)


async def subscription(
    broker: InMemoryBroker, name: str = "sub", topic: str = "topic", **policy: Any
) -> SubscriptionSpec:
    policy = {"min_backoff_seconds": 0.01, "max_backoff_seconds": 0.05, **policy}
    spec = SubscriptionSpec(name=name, topic=topic, **policy)
    await broker.ensure_subscription(spec)
    return spec


async def drain(broker: InMemoryBroker, name: str, handler: Recorder) -> int:
    return await asyncio.wait_for(broker.drain(name, handler), TIMEOUT)


def actions(caplog: pytest.LogCaptureFixture, action: str) -> int:
    return sum(1 for record in caplog.records if getattr(record, "action", None) == action)


def test_is_a_broker() -> None:
    assert isinstance(InMemoryBroker(), Broker)


async def test_delivers_data_and_attributes(broker: InMemoryBroker) -> None:
    await subscription(broker)
    message_id = await broker.publish("topic", Message(b"x", {"job_id": "1"}))
    recorder = Recorder()
    assert await drain(broker, "sub", recorder) == 1
    (delivery,) = recorder.deliveries
    assert delivery == Delivery(message_id, b"x", {"job_id": "1"}, 1, "sub")
    assert broker.pending("sub") == 0
    assert broker.published("topic") == [Message(b"x", {"job_id": "1"})]


async def test_messages_before_the_subscription_or_without_one_are_not_delivered(
    broker: InMemoryBroker,
) -> None:
    await broker.publish("topic", Message(b"early"))
    await subscription(broker)
    await broker.publish("elsewhere", Message(b"unrouted"))
    assert await drain(broker, "sub", Recorder()) == 0


async def test_fans_out_to_every_subscription(broker: InMemoryBroker) -> None:
    await subscription(broker, "one")
    await subscription(broker, "two")
    ids = await broker.publish_many("topic", [Message(b"a"), Message(b"b")])
    for name in ("one", "two"):
        recorder = Recorder()
        assert await drain(broker, name, recorder) == 2
        assert [d.message_id for d in recorder.deliveries] == ids


async def test_nack_redelivers_with_increasing_attempt(broker: InMemoryBroker) -> None:
    await subscription(broker)

    async def fail_twice(delivery: Delivery) -> None:
        if delivery.delivery_attempt == 1:
            raise RuntimeError("crash")
        if delivery.delivery_attempt == 2:
            raise Nack("again")

    recorder = Recorder(fail_twice)
    await broker.publish("topic", Message(b"x"))
    async with subscribed(broker, "sub", recorder):
        await wait_for(lambda: _acked(recorder), timeout=TIMEOUT, message="the ack")
    assert recorder.attempts(b"x") == [1, 2, 3]
    assert broker.pending("sub") == 0


async def test_nack_delay_overrides_backoff(broker: InMemoryBroker) -> None:
    await subscription(broker, min_backoff_seconds=3600, max_backoff_seconds=3600)

    async def once_now(delivery: Delivery) -> None:
        if delivery.delivery_attempt == 1:
            raise Nack("at once", delay=0)

    recorder = Recorder(once_now)
    await broker.publish("topic", Message(b"x"))
    assert await drain(broker, "sub", recorder) == 2
    assert recorder.attempts(b"x") == [1, 2]


async def test_backing_off_message_is_not_drained(broker: InMemoryBroker) -> None:
    await subscription(broker, min_backoff_seconds=3600, max_backoff_seconds=3600)

    async def fail(delivery: Delivery) -> None:
        raise Nack("later")

    await broker.publish("topic", Message(b"x"))
    assert await drain(broker, "sub", Recorder(fail)) == 1
    assert await drain(broker, "sub", Recorder()) == 0
    assert broker.pending("sub") == 1


async def test_dead_letters_after_max_attempts(
    broker: InMemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await subscription(broker, max_delivery_attempts=3, dead_letter_topic="dead")
    await subscription(broker, "dead-sub", "dead")

    async def refuse(delivery: Delivery) -> None:
        raise Nack("no", delay=0)

    failing, dead = Recorder(refuse), Recorder()
    await broker.publish("topic", Message(b"x", {"job_id": "9"}))
    assert await drain(broker, "sub", failing) == 3
    assert await drain(broker, "dead-sub", dead) == 1
    assert failing.attempts(b"x") == [1, 2, 3]
    attributes = dead.deliveries[0].attributes
    assert attributes["job_id"] == "9"
    assert attributes["x-dead-letter-source"] == "sub"
    assert attributes["x-delivery-attempts"] == "3"
    assert actions(caplog, "message_dead_lettered") == 1
    assert broker.pending("sub") == 0


async def test_max_attempts_without_dead_letter_topic_drops_loudly(
    broker: InMemoryBroker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    await subscription(broker, max_delivery_attempts=1)

    async def refuse(delivery: Delivery) -> None:
        raise Nack("no")

    await broker.publish("topic", Message(b"x"))
    assert await drain(broker, "sub", Recorder(refuse)) == 1
    assert broker.pending("sub") == 0
    assert actions(caplog, "message_dropped") == 1


async def test_in_flight_is_bounded(broker: InMemoryBroker) -> None:
    await subscription(broker)
    running = 0
    peak = 0

    async def track(delivery: Delivery) -> None:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0)
        running -= 1

    await broker.publish_many("topic", [Message(str(i).encode()) for i in range(50)])
    recorder = Recorder(track)
    assert await asyncio.wait_for(broker.drain("sub", recorder, max_in_flight=4), TIMEOUT) == 50
    assert 1 <= peak <= 4


async def test_close_stops_subscribers_and_requeues_unfinished(broker: InMemoryBroker) -> None:
    await subscription(broker)
    started = Recorder(lambda _: asyncio.Event().wait())  # never finishes
    await broker.publish("topic", Message(b"x"))
    task = asyncio.create_task(broker.subscribe("sub", started))
    await wait_for(started.count, timeout=TIMEOUT, message="the delivery")
    await asyncio.wait_for(broker.close(), TIMEOUT)
    await asyncio.wait_for(task, TIMEOUT)
    assert broker.pending("sub") == 1


async def test_unknown_subscription_is_an_error(broker: InMemoryBroker) -> None:
    with pytest.raises(BrokerError):
        await drain(broker, "missing", Recorder())


async def _acked(recorder: Recorder) -> bool:
    recorder.check()
    return bool(recorder.acked)
