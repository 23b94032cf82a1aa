"""The Broker contract: every adapter (postgres, pubsub) passes the same tests."""

from __future__ import annotations

import asyncio
from typing import Any

from core.broker import Broker, Delivery, Message, Nack, SubscriptionSpec
from tests.support.brokers import (  # noqa: F401
    BrokerBackend,
    Recorder,
    broker_backend_fixture,
    broker_fixture,
    subscribed,
    unique,
)
from tests.support.waiting import wait_for

TIMEOUT = 60.0


async def make_subscription(
    broker: Broker,
    backend: BrokerBackend,
    *,
    topic: str | None = None,
    max_delivery_attempts: int = 5,
    dead_letter_topic: str | None = None,
) -> SubscriptionSpec:
    """A fresh topic (unless given) with one subscription on it, small backoffs."""
    spec = SubscriptionSpec(
        name=unique("sub"),
        topic=topic or unique("topic"),
        max_delivery_attempts=max_delivery_attempts,
        dead_letter_topic=dead_letter_topic,
        ack_deadline_seconds=backend.min_ack_deadline,
        min_backoff_seconds=0.1,
        max_backoff_seconds=0.5,
    )
    await asyncio.wait_for(broker.ensure_topic(spec.topic), TIMEOUT)
    if dead_letter_topic is not None:
        await asyncio.wait_for(broker.ensure_topic(dead_letter_topic), TIMEOUT)
    await asyncio.wait_for(broker.ensure_subscription(spec), TIMEOUT)
    return spec


async def publish(broker: Broker, topic: str, message: Message) -> str:
    return await asyncio.wait_for(broker.publish(topic, message), TIMEOUT)


async def publish_many(broker: Any, topic: str, messages: list[Message]) -> list[str]:
    """Both adapters offer ``publish_many``, though the ``Broker`` port does not (yet)."""
    return list(await broker.publish_many(topic, messages))


async def received(recorder: Recorder, count: int, what: str) -> None:
    async def enough() -> bool:
        return await recorder.count() >= count

    await wait_for(enough, timeout=TIMEOUT, message=what)


async def test_published_messages_are_delivered(
    broker: Broker, broker_backend: BrokerBackend
) -> None:
    spec = await make_subscription(broker, broker_backend)
    recorder = Recorder()
    async with subscribed(broker, spec.name, recorder):
        ids = [await publish(broker, spec.topic, Message(f"m{i}".encode())) for i in range(3)]
        await received(recorder, 3, "three deliveries")
    assert sorted(recorder.data()) == [b"m0", b"m1", b"m2"]
    assert {d.message_id for d in recorder.deliveries} == set(ids)
    assert {d.delivery_attempt for d in recorder.deliveries} == {1}
    assert {d.subscription for d in recorder.deliveries} == {spec.name}


async def test_data_and_attributes_are_preserved(
    broker: Broker, broker_backend: BrokerBackend
) -> None:
    spec = await make_subscription(broker, broker_backend)
    data = bytes(range(256))  # not UTF-8: must travel as bytes
    attributes = {"job_id": "8c1f", "stage": "draft", "note": "café ✓", "empty": ""}
    recorder = Recorder()
    async with subscribed(broker, spec.name, recorder):
        await publish(broker, spec.topic, Message(data, attributes))
        await received(recorder, 1, "the delivery")
    (delivery,) = recorder.deliveries
    assert delivery.data == data
    assert delivery.attributes == attributes


async def test_acked_message_is_not_redelivered(
    broker: Broker, broker_backend: BrokerBackend
) -> None:
    # A second message cycles through five nacked deliveries (longer than the postgres ack
    # deadline); a lost ack of the first would show up as a second delivery meanwhile.
    dead_letters = unique("dlt")
    spec = await make_subscription(broker, broker_backend, dead_letter_topic=dead_letters)

    async def nack_marker(delivery: Delivery) -> None:
        if delivery.data == b"marker" and delivery.delivery_attempt < 5:
            raise Nack("again")

    recorder = Recorder(nack_marker)
    async with subscribed(broker, spec.name, recorder):
        await publish(broker, spec.topic, Message(b"acked"))
        await received(recorder, 1, "the first delivery")
        await publish(broker, spec.topic, Message(b"marker"))

        async def marker_acked() -> bool:
            recorder.check()
            return any(d.data == b"marker" for d in recorder.acked)

        await wait_for(marker_acked, timeout=TIMEOUT, message="the marker's fifth delivery")
    assert recorder.attempts(b"acked") == [1]
    assert recorder.attempts(b"marker") == [1, 2, 3, 4, 5]


async def test_nacked_message_is_redelivered_with_increasing_attempt(
    broker: Broker, broker_backend: BrokerBackend
) -> None:
    # Pub/Sub only counts delivery attempts on subscriptions with a dead-letter policy.
    spec = await make_subscription(broker, broker_backend, dead_letter_topic=unique("dlt"))

    async def fail_twice(delivery: Delivery) -> None:
        if delivery.delivery_attempt == 1:
            raise RuntimeError("handler crashed")  # any exception nacks
        if delivery.delivery_attempt == 2:
            raise Nack("not yet")

    recorder = Recorder(fail_twice)
    async with subscribed(broker, spec.name, recorder):
        await publish(broker, spec.topic, Message(b"retry-me", {"k": "v"}))

        async def acked() -> bool:
            recorder.check()
            return bool(recorder.acked)

        await wait_for(acked, timeout=TIMEOUT, message="the third delivery")
    assert recorder.attempts(b"retry-me") == [1, 2, 3]
    assert {d.message_id for d in recorder.deliveries} == {recorder.deliveries[0].message_id}
    assert all(d.attributes == {"k": "v"} for d in recorder.deliveries)


async def test_message_dead_letters_after_max_attempts(
    broker: Broker, broker_backend: BrokerBackend
) -> None:
    dead_letters = unique("dlt")
    spec = await make_subscription(broker, broker_backend, dead_letter_topic=dead_letters)
    dead_spec = await make_subscription(broker, broker_backend, topic=dead_letters)

    async def always_fail(delivery: Delivery) -> None:
        raise Nack("never")

    failing = Recorder(always_fail)
    dead = Recorder()
    async with subscribed(broker, spec.name, failing), subscribed(broker, dead_spec.name, dead):
        await publish(broker, spec.topic, Message(b"doomed", {"job_id": "42"}))
        await received(dead, 1, "the dead letter")
    assert failing.attempts(b"doomed") == [1, 2, 3, 4, 5]
    (letter,) = dead.deliveries
    assert letter.data == b"doomed"
    assert letter.attributes["job_id"] == "42"
    assert letter.subscription == dead_spec.name


async def test_each_subscription_gets_every_message(
    broker: Broker, broker_backend: BrokerBackend
) -> None:
    first = await make_subscription(broker, broker_backend)
    second = await make_subscription(broker, broker_backend, topic=first.topic)
    one, two = Recorder(), Recorder()
    async with subscribed(broker, first.name, one), subscribed(broker, second.name, two):
        for i in range(5):
            await publish(broker, first.topic, Message(f"m{i}".encode()))
        await received(one, 5, "five deliveries on the first subscription")
        await received(two, 5, "five deliveries on the second subscription")
    expected = [f"m{i}".encode() for i in range(5)]
    assert sorted(one.data()) == expected
    assert sorted(two.data()) == expected


async def test_publish_many_keeps_order_of_ids(
    broker: Broker, broker_backend: BrokerBackend
) -> None:
    spec = await make_subscription(broker, broker_backend)
    messages = [Message(f"b{i}".encode(), {"i": str(i)}) for i in range(20)]
    ids = await asyncio.wait_for(publish_many(broker, spec.topic, messages), TIMEOUT)
    recorder = Recorder()
    async with subscribed(broker, spec.name, recorder):
        await received(recorder, 20, "twenty deliveries")
    by_id = {d.message_id: d.attributes["i"] for d in recorder.deliveries}
    assert [by_id[message_id] for message_id in ids] == [str(i) for i in range(20)]


async def test_two_consumers_share_a_subscription(
    broker: Broker, broker_backend: BrokerBackend
) -> None:
    spec = await make_subscription(broker, broker_backend)
    other = broker_backend.new()  # as if from another process
    recorder = Recorder()
    messages = [Message(f"{i:03d}".encode()) for i in range(200)]
    async with (
        subscribed(broker, spec.name, recorder, max_in_flight=10),
        subscribed(other, spec.name, recorder, max_in_flight=10),
    ):
        await asyncio.wait_for(publish_many(broker, spec.topic, messages), TIMEOUT)
        await received(recorder, 200, "200 deliveries")
        # Whatever else arrives now would be a duplicate; none is expected.
    assert sorted(recorder.data()) == [message.data for message in messages]
    assert {d.delivery_attempt for d in recorder.deliveries} == {1}
