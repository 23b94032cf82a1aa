"""The ``postgres`` broker: Pub/Sub semantics on a queue table in the application database.

Publishing fans a message out to one ``broker_messages`` row per subscription of the topic.
Consumers lease rows with ``FOR UPDATE SKIP LOCKED`` and a visibility timeout (so several
processes can share a subscription), ack by deleting, nack by pushing ``available_at`` back,
and dead-letter after ``max_delivery_attempts``. A trigger NOTIFYs ``blogpipe_broker`` with the
subscription name at commit; one LISTEN connection per broker wakes the matching consumers,
so an idle consumer sleeps until a message arrives or a backoff ends.

This module publishes and routes; ``core.broker.postgres_consumer`` holds the subscription
loop, and ``core.broker.postgres_sql`` the statements of both.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import orjson
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.broker import Delivery, Handler, Message, SubscriptionSpec
from core.broker import postgres_sql as sql
from core.broker.postgres_consumer import TRANSIENT_ERRORS, Consumer, Hold, log, logger
from core.db.engine import plain_url
from core.db.raw import spurious_cancel
from core.errors import BrokerError

CHANNEL = "blogpipe_broker"
LISTENER_PING_SECONDS = 10.0  # a silent dead socket is only noticed by using it


def _publish_params(messages: list[tuple[str, Message]]) -> tuple[list[Any], ...]:
    return (
        [topic for topic, _ in messages],
        [message.data for _, message in messages],
        [orjson.dumps(message.attributes).decode() for _, message in messages],
    )


def _unrouted_id(topic: str) -> str:
    # Pub/Sub accepts and drops a message published to a topic nobody subscribes to.
    log(logging.DEBUG, "message_unrouted", "Message to %s dropped: no subscriptions", topic)
    return f"unrouted-{uuid.uuid4().hex}"


class PostgresBroker:
    """The embedded default broker; also a ``TransactionalBroker``.

    Message ids are queue-row ids: with fan-out each subscription's copy has its own id,
    and ``publish`` returns the first. Topics are implicit (they exist while subscribed).
    ``poll_interval`` is the safety net: an idle consumer looks anyway after that long,
    in case a NOTIFY was missed. Each running ``subscribe`` holds one connection of its own.
    """

    name = "postgres"

    def __init__(
        self, engine: AsyncEngine, *, listen_url: str | None = None, poll_interval: float = 5.0
    ) -> None:
        self._autocommit = engine.execution_options(isolation_level="AUTOCOMMIT")
        self._url = plain_url(engine.url.render_as_string(hide_password=False))
        self._listen_url = listen_url or self._url
        self.poll_interval = poll_interval
        self._consumers: dict[str, set[Consumer]] = {}
        self._listener: asyncio.Task[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self._unsent: list[tuple[str, Message, asyncio.Future[str]]] = []
        self._listening = False
        self._closed = False
        # Per topic, callers of ``room_for`` in arrival order; a slot that frees up wakes
        # one of them.
        self._room_waiters: dict[str, collections.deque[list[asyncio.Future[None]]]] = {}
        self._starting: dict[str, int] = {}  # per topic, slots promised by ``room_for``

    @property
    def listening(self) -> bool:
        """True while the LISTEN connection is up (consumers are woken by NOTIFY)."""
        return self._listening

    async def ensure_topic(self, topic: str) -> None:
        """Nothing to do: a topic is the set of subscriptions naming it."""

    async def ensure_subscription(self, spec: SubscriptionSpec) -> None:
        """Create the subscription, or update its topic and policies."""
        params = (
            *(spec.name, spec.topic, spec.max_delivery_attempts, spec.dead_letter_topic),
            *(spec.ack_deadline_seconds, spec.min_backoff_seconds, spec.max_backoff_seconds),
        )
        await self._execute(sql.UPSERT_SUBSCRIPTION, params, "ensure subscription " + spec.name)
        for consumer in self._consumers.get(spec.name, ()):
            consumer.spec = spec

    async def publish(self, topic: str, message: Message) -> str:
        """Publish one message to every subscription of ``topic``; return the first copy's id.

        Concurrent calls are coalesced into one statement, like the Pub/Sub client's batching.
        """
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._unsent.append((topic, message, future))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send(), name="blogpipe-broker-publish")
        return await future

    async def publish_many(self, topic: str, messages: list[Message]) -> list[str]:
        """Publish a batch in one statement; return one id per message, in order."""
        return await self._insert([(topic, message) for message in messages])

    async def _send(self) -> None:
        while self._unsent:
            batch, self._unsent = self._unsent, []
            try:
                ids = await self._insert([(topic, message) for topic, message, _ in batch])
            except BaseException as exc:  # the callers must hear of it, whatever it is
                for *_, future in batch:
                    if future.done():
                        continue
                    if isinstance(exc, Exception):
                        future.set_exception(exc)
                    else:
                        future.cancel()
                if not isinstance(exc, Exception):
                    raise
                continue
            for (*_, future), message_id in zip(batch, ids, strict=True):
                if not future.done():
                    future.set_result(message_id)

    async def _insert(self, messages: list[tuple[str, Message]]) -> list[str]:
        if not messages:
            return []
        what = f"publish {len(messages)} message(s)"
        rows = await self._execute(sql.PUBLISH_MANY, _publish_params(messages), what)
        first_ids = {n: row_id for n, row_id in rows}
        return [
            str(first_ids[n]) if n in first_ids else _unrouted_id(messages[n - 1][0])
            for n in range(1, len(messages) + 1)
        ]

    async def publish_in_transaction(
        self, connection: AsyncConnection, topic: str, message: Message
    ) -> None:
        """Enqueue inside the caller's open transaction; consumers see it at commit."""
        try:
            await connection.exec_driver_sql(sql.PUBLISH_MANY, _publish_params([(topic, message)]))
        except TRANSIENT_ERRORS as exc:
            raise BrokerError(f"Could not publish to {topic}: {exc}") from exc

    @staticmethod
    def staging_sql(name: str, guard: str, prefix: str) -> str:
        """The CTE ``Dispatcher.staging`` uses: fan one message out to the topic's
        subscriptions where ``guard`` holds, inside the caller's statement.

        ``:<prefix>_ack`` (or NULL) is the id of the delivery the statement finishes: its
        row is deleted in the same statement, an ack that commits with the hand-off
        (``acked`` then keeps the consumer from deleting it again).

        The copy for the subscription named by ``:<prefix>_hold`` (see ``hold``) goes in
        already leased, as its first delivery attempt, for ``:<prefix>_hold_secs``; the
        CTE yields its id as ``held_id``. With ``:<prefix>_hold`` NULL every copy is
        available at once, as a plain publish."""
        held = f"s.name = :{prefix}_hold::text"
        return (
            f"{name}_acked AS (DELETE FROM broker_messages WHERE id = :{prefix}_ack::bigint),"
            f" {name} AS (INSERT INTO broker_messages"
            f" (subscription, data, attributes, attempts, available_at)"
            f" SELECT s.name, :{prefix}_data::bytea, :{prefix}_attributes::jsonb,"
            f" CASE WHEN {held} THEN 1 ELSE 0 END, CASE WHEN {held}"
            f" THEN now() + make_interval(secs => :{prefix}_hold_secs::float8) ELSE now() END"
            f" FROM broker_subscriptions s WHERE s.topic = :{prefix}_topic::text AND {guard}"
            f" ORDER BY s.name"
            f" RETURNING NULL::bigint AS outbox_id, CASE WHEN attempts = 1 THEN id END AS held_id)"
        )

    def acked(self, delivery: Delivery) -> None:
        """``delivery``'s row was deleted by a statement that staged with ``:<prefix>_ack``:
        its consumer in this process need not ack it when the handler returns."""
        for consumer in self._consumers.get(delivery.subscription, ()):
            consumer.acked(delivery.message_id)

    @contextlib.asynccontextmanager
    async def room_for(self, topic: str, within: float) -> AsyncIterator[None]:
        """Enter once a consumer of ``topic`` in this process has a slot for one more
        message that no other ``room_for`` holds (so ``hold`` inside finds it, unless a
        hand-off in between takes it), or
        after ``within`` seconds; at once if none consumes ``topic`` here.

        The local task queue starts each job inside this: a burst of submissions is
        started as the first stage frees slots, each handed over in memory, instead of
        overflowing into queue rows that are leased and claimed later. Waiters enter first
        come, first served, woken one per freed slot.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        waiters = self._room_waiters.setdefault(topic, collections.deque())
        # This caller's place in the queue: it keeps it, with a new future, when woken for
        # a slot that was taken before it ran.
        place: list[asyncio.Future[None]] = []
        granted = False
        try:
            while True:
                free = self._free_room(topic)
                if free is None:
                    break  # no consumer of the topic here: nothing to wait for
                if free > self._starting.get(topic, 0):
                    granted = True
                    break
                if place:
                    place[0] = loop.create_future()
                else:
                    place.append(loop.create_future())
                    waiters.append(place)
                try:
                    async with asyncio.timeout_at(deadline):
                        await place[0]
                except TimeoutError:
                    break
        finally:
            if place:
                place[0].cancel()
                with contextlib.suppress(ValueError):
                    waiters.remove(place)
        if granted:
            self._starting[topic] = self._starting.get(topic, 0) + 1
        try:
            yield
        finally:
            if granted:
                self._starting[topic] -= 1
                self.room_made(topic)  # unless the start took the slot, it is free again

    def _free_room(self, topic: str) -> int | None:
        """Slots for ``topic`` in this process's consumers; None if none consumes it."""
        mine = [c for g in self._consumers.values() for c in g if c.consumes(topic)]
        if not mine:
            return None
        return sum(c.room for c in mine if c.can_hold(topic))

    def room_made(self, topic: str) -> None:
        """A consumer of ``topic`` freed a slot: wake the longest waiter not yet woken."""
        for place in self._room_waiters.get(topic, ()):
            if not place[0].done():
                place[0].set_result(None)
                return

    def hold(self, topic: str) -> Hold | None:
        """Room with a consumer of ``topic`` in this process for a message about to be
        staged, or None when no local consumer has room.

        The statement that stages the message writes that consumer's copy already leased to
        it (``staging_sql``), and after commit ``Hold.deliver`` hands it over in memory: no
        NOTIFY, no lease statement, no wait for a wake-up. The row is as durable as any
        other; if this process dies first, its lease lapses and any consumer takes it.
        """
        best: Consumer | None = None
        for group in self._consumers.values():
            for consumer in group:
                if consumer.can_hold(topic) and (best is None or consumer.room > best.room):
                    best = consumer
        if best is None:
            return None
        best.reserved += 1
        return Hold(best)

    async def subscribe(
        self, subscription: str, handler: Handler, *, max_in_flight: int = 100
    ) -> None:
        """Deliver messages to ``handler`` until cancelled or the broker is closed."""
        if self._closed:
            raise BrokerError("The broker is closed")
        consumer = Consumer(self, subscription, handler, max_in_flight, drain=False)
        self._consumers.setdefault(subscription, set()).add(consumer)
        if self._listener is None:
            self._listener = asyncio.create_task(self._listen(), name="blogpipe-broker-listen")
        try:
            await consumer.run()
        finally:
            self._consumers[subscription].discard(consumer)

    async def drain(self, subscription: str, handler: Handler, *, max_in_flight: int = 100) -> int:
        """Handle what is available now, then return how many deliveries were handled.

        Messages nacked with a delay are not waited for. Meant for tests and tooling.
        """
        consumer = Consumer(self, subscription, handler, max_in_flight, drain=True)
        await consumer.run()
        return consumer.handled

    async def close(self) -> None:
        """Stop every consumer of this broker (releasing their leases) and the listener."""
        self._closed = True
        consumers = [c for group in self._consumers.values() for c in group]
        for consumer in consumers:
            consumer.stop()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(c.done.wait() for c in consumers)), 15)
        if self._sender is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._sender), 15)
        if self._listener is not None:
            self._listener.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._listener
            self._listener = None

    async def _execute(self, sql: str, params: tuple[Any, ...], what: str) -> list[tuple[Any, ...]]:
        try:
            async with self._autocommit.connect() as connection:
                result = await connection.exec_driver_sql(sql, params)
                return [tuple(row) for row in result] if result.returns_rows else []
        except TRANSIENT_ERRORS as exc:
            raise BrokerError(f"Could not {what}: {exc}") from exc

    async def consumer_connection(self) -> asyncpg.Connection:
        # Each consumer holds one asyncpg connection for its lifetime, outside the
        # application's pools, so consumers and stage transactions never starve each
        # other. Leases, acks and nacks do not wait for the WAL flush: one lost in a crash
        # only means a redelivery, which the stage runner drops as a duplicate.
        return await asyncpg.connect(self._url, server_settings={"synchronous_commit": "off"})

    def _wake_all(self) -> None:
        for group in self._consumers.values():
            for consumer in group:
                consumer.poke()

    def _on_notify(self, _conn: object, _pid: int, _channel: str, payload: str) -> None:
        for consumer in self._consumers.get(payload, ()):
            consumer.poke()

    async def _listen(self) -> None:
        """Keep one LISTEN connection up, reconnecting with backoff when it drops."""
        delay = 0.1
        while not self._closed:
            lost = asyncio.Event()
            try:
                connection = await asyncio.wait_for(asyncpg.connect(self._listen_url), 10)
            except TRANSIENT_ERRORS as exc:
                message = "Broker LISTEN failed (%s); retrying in %.1fs"
                log(logging.WARNING, "broker_listener_lost", message, exc, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            connection.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                await connection.add_listener(CHANNEL, self._on_notify)
                self._listening, delay = True, 0.1
                log(logging.INFO, "broker_listening", "Broker listening on %s", CHANNEL)
                self._wake_all()  # notifications sent while we were away are lost
                while not lost.is_set():
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(LISTENER_PING_SECONDS):
                            await lost.wait()
                    if not lost.is_set():
                        await asyncio.wait_for(connection.execute("SELECT 1"), 5)
            except TRANSIENT_ERRORS as exc:
                logger.debug("Broker LISTEN connection error: %s", exc)
            except asyncio.CancelledError as exc:
                if not spurious_cancel(exc):
                    raise
                logger.debug("Broker LISTEN connection terminated mid-statement")
            finally:
                self._listening = False
                connection.terminate()
            log(logging.WARNING, "broker_listener_lost", "Broker LISTEN lost; reconnecting")
            self._wake_all()  # consumers poll while the listener is down
