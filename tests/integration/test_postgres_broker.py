"""What only the postgres broker promises: transactional publish, leases, reconnection."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.broker import Delivery, Message, Nack, SubscriptionSpec
from core.broker.postgres import CHANNEL, PostgresBroker
from core.broker.postgres_consumer import Hold
from core.db.engine import plain_url
from core.db.raw import raw_connection
from core.db.statements import Statement
from core.dispatch import Dispatcher
from tests.support.brokers import Recorder, subscribed, unique
from tests.support.waiting import wait_for

TIMEOUT = 30.0
LOGGER = "blogpipe.broker.postgres"
NEVER = 3600.0  # a safety-net poll that never fires within a test


@pytest.fixture
async def broker(engine: AsyncEngine) -> AsyncIterator[PostgresBroker]:
    broker = PostgresBroker(engine)
    yield broker
    await asyncio.wait_for(broker.close(), TIMEOUT)


async def make_subscription(
    broker: PostgresBroker, topic: str | None = None, **policy: Any
) -> SubscriptionSpec:
    policy = {"min_backoff_seconds": 0.1, "max_backoff_seconds": 0.5, **policy}
    spec = SubscriptionSpec(name=unique("sub"), topic=topic or unique("topic"), **policy)
    await asyncio.wait_for(broker.ensure_subscription(spec), TIMEOUT)
    return spec


async def rows(engine: AsyncEngine, subscription: str) -> list[tuple[int, int]]:
    """(id, attempts) of the queue rows of ``subscription``, seen from another connection."""
    async with engine.connect() as conn:
        result = await conn.execute(
            text("SELECT id, attempts FROM broker_messages WHERE subscription = :s ORDER BY id"),
            {"s": subscription},
        )
        return [(row[0], row[1]) for row in result]


async def lease_as_crashed_consumer(engine: AsyncEngine, subscription: str, seconds: float) -> None:
    """Lease every message like a consumer would, then never come back (it "crashed")."""
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "UPDATE broker_messages SET attempts = attempts + 1, "
                "available_at = now() + make_interval(secs => :s) WHERE subscription = :sub"
            ),
            {"s": seconds, "sub": subscription},
        )


def actions(caplog: pytest.LogCaptureFixture, action: str) -> int:
    return sum(1 for record in caplog.records if getattr(record, "action", None) == action)


async def drain(broker: PostgresBroker, subscription: str, handler: Recorder) -> int:
    return await asyncio.wait_for(broker.drain(subscription, handler), TIMEOUT)


async def test_publish_in_transaction_appears_at_commit(
    broker: PostgresBroker, engine: AsyncEngine
) -> None:
    spec = await make_subscription(broker)
    recorder = Recorder()
    async with engine.connect() as conn:
        async with conn.begin():
            await broker.publish_in_transaction(conn, spec.topic, Message(b"x", {"a": "b"}))
            assert await rows(engine, spec.name) == []
            assert await drain(broker, spec.name, recorder) == 0
    assert await drain(broker, spec.name, recorder) == 1
    assert recorder.deliveries[0].attributes == {"a": "b"}


async def test_publish_in_transaction_rolls_back_with_it(
    broker: PostgresBroker, engine: AsyncEngine
) -> None:
    spec = await make_subscription(broker)
    async with engine.connect() as conn:
        transaction = await conn.begin()
        await broker.publish_in_transaction(conn, spec.topic, Message(b"x"))
        await transaction.rollback()
    assert await drain(broker, spec.name, Recorder()) == 0
    assert await rows(engine, spec.name) == []


async def test_ack_deletes_and_unrouted_messages_are_dropped(
    broker: PostgresBroker, engine: AsyncEngine
) -> None:
    spec = await make_subscription(broker)
    message_id = await broker.publish(spec.topic, Message(b"x"))
    assert await rows(engine, spec.name) == [(int(message_id), 0)]
    assert await drain(broker, spec.name, Recorder()) == 1
    assert await rows(engine, spec.name) == []
    assert (await broker.publish(unique("nobody"), Message(b"x"))).startswith("unrouted-")


async def test_expired_lease_is_redelivered(broker: PostgresBroker, engine: AsyncEngine) -> None:
    # poll_interval NEVER: only the consumer's own timer for the lease's end can wake it.
    broker.poll_interval = NEVER
    spec = await make_subscription(broker)
    await broker.publish(spec.topic, Message(b"x"))
    await lease_as_crashed_consumer(engine, spec.name, seconds=0.3)
    recorder = Recorder()
    assert await drain(broker, spec.name, recorder) == 0  # leased: invisible
    async with subscribed(broker, spec.name, recorder):
        await wait_for(recorder.count, timeout=TIMEOUT, message="the redelivery")
    assert recorder.attempts(b"x") == [2]


async def test_expired_lease_on_last_attempt_dead_letters(
    broker: PostgresBroker, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    dead_letters = unique("dlt")
    spec = await make_subscription(broker, max_delivery_attempts=1, dead_letter_topic=dead_letters)
    dead_spec = await make_subscription(broker, topic=dead_letters)
    await broker.publish(spec.topic, Message(b"x", {"job_id": "7"}))
    await lease_as_crashed_consumer(engine, spec.name, seconds=0.0)
    main, dead = Recorder(), Recorder()
    async with subscribed(broker, spec.name, main), subscribed(broker, dead_spec.name, dead):
        await wait_for(dead.count, timeout=TIMEOUT, message="the dead letter")
    assert main.deliveries == []
    attributes = dead.deliveries[0].attributes
    assert attributes["job_id"] == "7"
    assert attributes["x-dead-letter-source"] == spec.name
    assert attributes["x-delivery-attempts"] == "1"
    assert actions(caplog, "message_dead_lettered") == 1


async def test_max_attempts_without_dead_letter_topic_drops_loudly(
    broker: PostgresBroker, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    spec = await make_subscription(broker, max_delivery_attempts=2)

    async def refuse(delivery: Delivery) -> None:
        raise Nack("no", delay=0)

    recorder = Recorder(refuse)
    await broker.publish(spec.topic, Message(b"x"))
    assert await drain(broker, spec.name, recorder) == 2
    assert recorder.attempts(b"x") == [1, 2]
    assert await rows(engine, spec.name) == []
    assert actions(caplog, "message_dropped") == 1


async def test_nack_delay_overrides_backoff(broker: PostgresBroker) -> None:
    spec = await make_subscription(broker, min_backoff_seconds=NEVER, max_backoff_seconds=NEVER)

    async def once_now(delivery: Delivery) -> None:
        if delivery.delivery_attempt == 1:
            raise Nack("again, at once", delay=0)

    recorder = Recorder(once_now)
    await broker.publish(spec.topic, Message(b"x"))
    assert await drain(broker, spec.name, recorder) == 2
    assert recorder.attempts(b"x") == [1, 2]


async def test_failed_message_waits_out_its_backoff(
    broker: PostgresBroker, engine: AsyncEngine
) -> None:
    spec = await make_subscription(broker, min_backoff_seconds=NEVER, max_backoff_seconds=NEVER)

    async def fail(delivery: Delivery) -> None:
        raise RuntimeError("boom")

    await broker.publish(spec.topic, Message(b"x"))
    assert await drain(broker, spec.name, Recorder(fail)) == 1
    assert await drain(broker, spec.name, Recorder()) == 0  # still backing off
    assert [attempts for _, attempts in await rows(engine, spec.name)] == [1]


async def test_long_handler_keeps_its_lease(broker: PostgresBroker, engine: AsyncEngine) -> None:
    spec = await make_subscription(broker, ack_deadline_seconds=0.5)
    release = asyncio.Event()
    recorder = Recorder(lambda _: release.wait())
    await broker.publish(spec.topic, Message(b"x"))
    async with subscribed(broker, spec.name, recorder):
        await wait_for(recorder.count, timeout=TIMEOUT, message="the delivery")
        first_lease_end = await lease_end(engine, spec.name)

        async def past_first_deadline() -> bool:
            async with engine.connect() as conn:
                now = (await conn.execute(text("SELECT now()"))).scalar_one()
            return bool(now > first_lease_end)

        await wait_for(past_first_deadline, timeout=TIMEOUT, message="the first deadline")
        assert await lease_end(engine, spec.name) > first_lease_end  # extended
        assert await rows(engine, spec.name) == [(int(recorder.deliveries[0].message_id), 1)]
        release.set()
        await wait_for(lambda: _empty(engine, spec.name), timeout=TIMEOUT, message="the ack")
    assert recorder.attempts(b"x") == [1]


async def lease_end(engine: AsyncEngine, subscription: str) -> Any:
    async with engine.connect() as conn:
        query = text("SELECT available_at FROM broker_messages WHERE subscription = :s")
        return (await conn.execute(query, {"s": subscription})).scalar_one()


async def _empty(engine: AsyncEngine, subscription: str) -> bool:
    return await rows(engine, subscription) == []


async def test_close_releases_unfinished_messages(
    broker: PostgresBroker, engine: AsyncEngine
) -> None:
    spec = await make_subscription(broker)
    started = Recorder(lambda _: asyncio.Event().wait())  # never finishes
    await broker.publish(spec.topic, Message(b"x"))
    task = asyncio.create_task(broker.subscribe(spec.name, started))
    await wait_for(started.count, timeout=TIMEOUT, message="the delivery")
    await asyncio.wait_for(broker.close(), TIMEOUT)
    await asyncio.wait_for(task, TIMEOUT)  # subscribe returns once the broker closes
    other = PostgresBroker(engine)
    recorder = Recorder()
    try:
        assert await drain(other, spec.name, recorder) == 1  # available again at once
    finally:
        await asyncio.wait_for(other.close(), TIMEOUT)
    assert recorder.attempts(b"x") == [2]


async def test_notify_wakes_an_idle_consumer(broker: PostgresBroker) -> None:
    # With the safety-net poll disabled, a message published while the consumer sleeps
    # (its next timer is the first message's 60 s ack deadline) can only arrive by NOTIFY.
    broker.poll_interval = NEVER
    spec = await make_subscription(broker, ack_deadline_seconds=60.0)
    recorder = Recorder()
    async with subscribed(broker, spec.name, recorder):
        await wait_for(_listening(broker), timeout=TIMEOUT, message="LISTEN")
        await broker.publish(spec.topic, Message(b"first"))
        await wait_for(recorder.count, timeout=TIMEOUT, message="the first message")
        await broker.publish(spec.topic, Message(b"second"))
        await wait_for(lambda: _at_least(recorder, 2), timeout=10, message="a NOTIFY wake-up")
    assert recorder.data() == [b"first", b"second"]


async def test_consumer_survives_terminated_connections(
    broker: PostgresBroker, engine: AsyncEngine, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    broker.poll_interval = NEVER  # recovery must come from reconnecting, not from polling
    spec = await make_subscription(broker)
    recorder = Recorder()
    async with subscribed(broker, spec.name, recorder):
        await wait_for(_listening(broker), timeout=TIMEOUT, message="LISTEN")
        await broker.publish(spec.topic, Message(b"before"))
        await wait_for(recorder.count, timeout=TIMEOUT, message="the first message")
        await terminate_other_backends(engine)

        async def relistening() -> bool:
            return broker.listening and actions(caplog, "broker_listening") >= 2

        await wait_for(relistening, timeout=TIMEOUT, message="LISTEN to reconnect")
        await asyncio.wait_for(broker.publish(spec.topic, Message(b"after")), TIMEOUT)
        await wait_for(lambda: _at_least(recorder, 2), timeout=TIMEOUT, message="the second")
    assert recorder.data() == [b"before", b"after"]
    assert actions(caplog, "broker_listener_lost") >= 1
    assert actions(caplog, "broker_consumer_error") >= 1


async def terminate_other_backends(engine: AsyncEngine) -> None:
    url = plain_url(engine.url.render_as_string(hide_password=False))
    admin = await asyncio.wait_for(asyncpg.connect(url), TIMEOUT)
    try:
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert killed >= 2  # at least the consumer's and the listener's connections
    finally:
        await admin.close()


def _listening(broker: PostgresBroker) -> Callable[[], Awaitable[bool]]:
    async def probe() -> bool:
        return broker.listening

    return probe


async def _at_least(recorder: Recorder, count: int) -> bool:
    return await recorder.count() >= count


async def stage(
    engine: AsyncEngine,
    broker: PostgresBroker,
    topic: str,
    message: Message,
    hold: Hold | None,
    ack: Delivery | None = None,
) -> int | None:
    """Stage ``message`` the way a hand-off statement does (acking ``ack``); the id of a
    held copy."""
    sql = f"WITH {broker.staging_sql('staged', 'true', 'm')} SELECT max(held_id) FROM staged"
    held = hold.args("m") if hold is not None else {"m_hold": None, "m_hold_secs": None}
    held["m_ack"] = int(ack.message_id) if ack is not None else None
    async with raw_connection(engine) as conn:
        statement = Statement(sql)
        args = statement.args(**Dispatcher.staging_args("m", topic, message), **held)
        return await asyncio.wait_for(conn.fetchval(statement.sql, *args), TIMEOUT)


async def room_with(broker: PostgresBroker, topic: str) -> Hold:
    """A hold with the local consumer of ``topic``, once it is up."""
    holds: list[Hold] = []

    async def held() -> bool:
        hold = broker.hold(topic)
        if hold is not None:
            holds.append(hold)
        return hold is not None

    await wait_for(held, timeout=TIMEOUT, message="a local consumer with room")
    return holds[0]


async def test_a_held_message_is_handed_to_the_local_consumer_leased(
    broker: PostgresBroker, engine: AsyncEngine
) -> None:
    broker.poll_interval = NEVER  # nothing but the hand-over can bring it
    spec = await make_subscription(broker)
    recorder = Recorder()
    async with subscribed(broker, spec.name, recorder):
        hold = await room_with(broker, spec.topic)
        message = Message(b"held", {"k": "v"})
        held_id = await stage(engine, broker, spec.topic, message, hold)
        assert held_id is not None
        assert await rows(engine, spec.name) == [(held_id, 1)]  # leased: first attempt
        async with engine.connect() as conn:
            query = text("SELECT available_at > now() FROM broker_messages WHERE id = :id")
            assert (await conn.execute(query, {"id": held_id})).scalar_one()
        hold.deliver(held_id, message)
        await wait_for(recorder.count, timeout=TIMEOUT, message="the hand-over")
        await wait_for(lambda: _empty(engine, spec.name), timeout=TIMEOUT, message="the ack")
    (delivery,) = recorder.deliveries
    assert (delivery.message_id, delivery.data, delivery.attributes) == (
        str(held_id),
        b"held",
        {"k": "v"},
    )
    assert delivery.delivery_attempt == 1 and delivery.subscription == spec.name


async def test_a_held_message_never_handed_over_is_delivered_when_its_lease_ends(
    broker: PostgresBroker, engine: AsyncEngine
) -> None:
    # The process that staged it died between commit and hand-over: the row is durable
    # and its lease lapses like any other.
    broker.poll_interval = NEVER
    spec = await make_subscription(broker, ack_deadline_seconds=0.5)
    async with subscribed(broker, spec.name, Recorder()):
        hold = await room_with(broker, spec.topic)
        held_id = await stage(engine, broker, spec.topic, Message(b"orphan"), hold)
        hold.release()
    other = PostgresBroker(engine)
    recorder = Recorder()
    try:

        async def redelivered() -> bool:
            await drain(other, spec.name, recorder)
            return recorder.attempts(b"orphan") == [2]

        await wait_for(redelivered, timeout=TIMEOUT, message="the lapsed lease")
    finally:
        await asyncio.wait_for(other.close(), TIMEOUT)
    assert recorder.deliveries[0].message_id == str(held_id)


async def test_no_hold_without_a_local_consumer_with_room(broker: PostgresBroker) -> None:
    spec = await make_subscription(broker)
    assert broker.hold(spec.topic) is None  # nobody subscribed here
    release = asyncio.Event()
    busy = Recorder(lambda _: release.wait())
    async with subscribed(broker, spec.name, busy, max_in_flight=2):
        hold = await room_with(broker, spec.topic)  # one of the two places, reserved
        await broker.publish(spec.topic, Message(b"x"))
        await wait_for(busy.count, timeout=TIMEOUT, message="the delivery")
        assert broker.hold(spec.topic) is None  # one handling, one reserved: full
        assert broker.hold(unique("topic")) is None
        hold.release()
        assert broker.hold(spec.topic) is not None
        release.set()


async def test_room_for_lets_starts_in_as_the_local_consumer_frees_slots(
    broker: PostgresBroker,
) -> None:
    spec = await make_subscription(broker)
    async with asyncio.timeout(TIMEOUT):
        async with broker.room_for(spec.topic, within=NEVER):
            pass  # nobody consumes the topic here: nothing to wait for
    release = asyncio.Event()
    busy = Recorder(lambda _: release.wait())
    async with subscribed(broker, spec.name, busy, max_in_flight=2):
        (await room_with(broker, spec.topic)).release()  # the consumer is up
        entered: list[str] = []

        async def delivered(count: int) -> bool:
            return await busy.count() >= count

        async def start(name: str) -> None:
            async with broker.room_for(spec.topic, within=NEVER):
                entered.append(name)
                await broker.publish(spec.topic, Message(name.encode()))
                # Inside, the slot is promised to this start: nobody else gets it.
                await wait_for(lambda: delivered(len(entered)), timeout=TIMEOUT)

        starts = [asyncio.create_task(start(f"job-{n}")) for n in range(4)]
        try:
            # The first two take both slots and finish their starts; their messages keep
            # the consumer full, so the other two, woken as each start ends, stay out.
            await asyncio.wait_for(asyncio.gather(*starts[:2]), TIMEOUT)
            assert entered == ["job-0", "job-1"]
            assert not starts[2].done() and not starts[3].done()
            release.set()  # both slots free up: the next two go in, first come first served
            await asyncio.wait_for(asyncio.gather(*starts[2:]), TIMEOUT)
            assert entered == ["job-0", "job-1", "job-2", "job-3"]
        finally:
            for task in starts:
                task.cancel()


async def test_room_for_gives_up_waiting_after_its_time(broker: PostgresBroker) -> None:
    spec = await make_subscription(broker)
    release = asyncio.Event()
    busy = Recorder(lambda _: release.wait())
    async with subscribed(broker, spec.name, busy, max_in_flight=1):
        hold = await room_with(broker, spec.topic)  # the only slot, reserved
        try:
            loop = asyncio.get_running_loop()
            began = loop.time()
            async with asyncio.timeout(TIMEOUT):
                async with broker.room_for(spec.topic, within=0.2):
                    waited = loop.time() - began
            assert waited >= 0.2  # it waited its time, then let the start go on anyway
            assert broker.hold(spec.topic) is None
        finally:
            hold.release()
            release.set()


async def test_only_available_rows_notify(
    broker: PostgresBroker, engine: AsyncEngine, database_url: str
) -> None:
    held_spec, other_spec = await make_subscription(broker), await make_subscription(broker)
    heard: list[str] = []
    listener = await asyncio.wait_for(asyncpg.connect(plain_url(database_url)), TIMEOUT)
    try:
        await listener.add_listener(CHANNEL, lambda *args: heard.append(args[-1]))
        async with subscribed(broker, held_spec.name, Recorder(lambda _: asyncio.Event().wait())):
            hold = await room_with(broker, held_spec.topic)
            await stage(engine, broker, held_spec.topic, Message(b"held"), hold)
            hold.release()
            await stage(engine, broker, other_spec.topic, Message(b"available"), None)

            # Notifications arrive in commit order: the held row's would come first.
            async def notified() -> bool:
                return other_spec.name in heard

            await wait_for(notified, timeout=TIMEOUT, message="a NOTIFY")
    finally:
        await asyncio.wait_for(listener.close(), TIMEOUT)
    assert heard == [other_spec.name]


async def test_a_consumer_full_of_reservations_waits_without_spinning(
    broker: PostgresBroker,
) -> None:
    # Its one place is reserved for a message being staged when another arrives: the
    # consumer must sleep (a loop that never yields would stall the statement that is to
    # end the reservation), and lease the message once the reservation ends without one.
    broker.poll_interval = NEVER
    spec = await make_subscription(broker)
    recorder = Recorder()
    async with subscribed(broker, spec.name, recorder, max_in_flight=1):
        await wait_for(_listening(broker), timeout=TIMEOUT, message="LISTEN")
        hold = await room_with(broker, spec.topic)
        await broker.publish(spec.topic, Message(b"waiting"))
        ticks = 0
        for _ in range(20):  # the event loop keeps turning while the consumer is full
            await asyncio.wait_for(asyncio.sleep(0.01), 5)
            ticks += 1
        assert ticks == 20 and await recorder.count() == 0
        hold.release()
        await wait_for(recorder.count, timeout=TIMEOUT, message="the delivery after release")
    assert recorder.data() == [b"waiting"]


async def test_a_hand_off_statement_acks_the_delivery_it_finishes(
    broker: PostgresBroker, engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec, following = await make_subscription(broker), await make_subscription(broker)
    deleted: list[list[int]] = []
    execute = asyncpg.Connection.execute

    async def recording(self: asyncpg.Connection, query: str, *args: Any, **kw: Any) -> Any:
        if query.startswith("DELETE FROM broker_messages WHERE id = ANY"):
            deleted.append(list(args[0]))
        return await execute(self, query, *args, **kw)

    monkeypatch.setattr(asyncpg.Connection, "execute", recording)
    while_handling: list[list[tuple[int, int]]] = []

    async def hand_off(delivery: Delivery) -> None:
        await stage(engine, broker, following.topic, Message(b"next"), None, ack=delivery)
        broker.acked(delivery)
        while_handling.append(await rows(engine, spec.name))

    recorder = Recorder(hand_off)
    acked_by_consumer = Recorder()
    await broker.publish(spec.topic, Message(b"first"))
    await broker.publish(spec.topic, Message(b"second"))
    async with (
        subscribed(broker, spec.name, recorder),
        subscribed(broker, following.name, acked_by_consumer),
    ):
        await wait_for(lambda: _at_least(recorder, 2), timeout=TIMEOUT, message="deliveries")
        await wait_for(lambda: _at_least(acked_by_consumer, 2), timeout=TIMEOUT, message="next")
        await wait_for(lambda: _empty(engine, following.name), timeout=TIMEOUT, message="acks")
    assert len(recorder.acked) == 2 and await rows(engine, spec.name) == []
    assert [] in while_handling  # gone while the last handler still ran: the statement acked
    first_ids = {int(d.message_id) for d in recorder.deliveries}
    assert not any(first_ids & set(ids) for ids in deleted)  # never deleted again
    assert any(int(d.message_id) in ids for d in acked_by_consumer.deliveries for ids in deleted)


async def test_a_hand_over_to_a_stopping_consumer_is_released_for_another(
    broker: PostgresBroker, engine: AsyncEngine
) -> None:
    # The consumer is told to stop between the hand-off's commit and its hand-over: the
    # message is not started there, and its lease is given up at shutdown rather than
    # left to lapse (ack deadline 60 s here), so another consumer takes it at once.
    broker.poll_interval = NEVER
    spec = await make_subscription(broker, ack_deadline_seconds=60.0)
    recorder = Recorder()
    task = asyncio.create_task(broker.subscribe(spec.name, recorder))
    hold = await room_with(broker, spec.topic)
    held_id = await stage(engine, broker, spec.topic, Message(b"late"), hold)
    (consumer,) = broker._consumers[spec.name]
    consumer.stop()
    hold.deliver(held_id, Message(b"late"))
    await asyncio.wait_for(task, TIMEOUT)
    assert recorder.deliveries == []
    other = PostgresBroker(engine)
    taken = Recorder()
    try:
        assert await drain(other, spec.name, taken) == 1
    finally:
        await asyncio.wait_for(other.close(), TIMEOUT)
    assert taken.attempts(b"late") == [2]
