"""The ``postgres`` broker: Pub/Sub semantics on a queue table in the application database.

Publishing fans a message out to one ``broker_messages`` row per subscription of the topic.
Consumers lease rows with ``FOR UPDATE SKIP LOCKED`` and a visibility timeout (so several
processes can share a subscription), ack by deleting, nack by pushing ``available_at`` back,
and dead-letter after ``max_delivery_attempts``. A trigger NOTIFYs ``blogpipe_broker`` with the
subscription name at commit; one LISTEN connection per broker wakes the matching consumers,
so an idle consumer sleeps until a message arrives or a backoff ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import asyncpg
import orjson
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.broker import Delivery, Handler, Message, Nack, SubscriptionSpec, backoff_delay
from core.db.engine import plain_url
from core.db.raw import spurious_cancel
from core.errors import BrokerError

logger = logging.getLogger("blogpipe.broker.postgres")

CHANNEL = "blogpipe_broker"
MAX_LEASE_SECONDS = 3600.0  # like the Pub/Sub client's max_lease_duration
LISTENER_PING_SECONDS = 10.0  # a silent dead socket is only noticed by using it
TRANSIENT_ERRORS = (
    SQLAlchemyError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    # A connection left mid-operation by a terminated backend ("another operation is in
    # progress"): recovered like a lost connection, by opening a new one.
    asyncpg.InternalClientError,
)
# (TimeoutError is an OSError.)

_UPSERT_SUBSCRIPTION = """
INSERT INTO broker_subscriptions (name, topic, max_delivery_attempts, dead_letter_topic,
    ack_deadline_seconds, min_backoff_seconds, max_backoff_seconds)
VALUES ($1, $2, $3, $4, $5, $6, $7)
ON CONFLICT (name) DO UPDATE SET topic = EXCLUDED.topic,
    max_delivery_attempts = EXCLUDED.max_delivery_attempts,
    dead_letter_topic = EXCLUDED.dead_letter_topic,
    ack_deadline_seconds = EXCLUDED.ack_deadline_seconds,
    min_backoff_seconds = EXCLUDED.min_backoff_seconds,
    max_backoff_seconds = EXCLUDED.max_backoff_seconds"""
_SUBSCRIPTION = """
SELECT name, topic, max_delivery_attempts, dead_letter_topic, ack_deadline_seconds,
    min_backoff_seconds, max_backoff_seconds FROM broker_subscriptions WHERE name = $1"""
# Publishes of any topics in one statement; ids are drawn in the CTE so each input message
# maps to the rows it fanned out to (none when its topic has no subscriptions).
_PUBLISH_MANY = """
WITH fanned AS (
    SELECT m.n, s.name, m.data, m.attributes,
        nextval(pg_get_serial_sequence('broker_messages', 'id')) AS id
    FROM unnest($1::text[], $2::bytea[], $3::text[])
        WITH ORDINALITY AS m(topic, data, attributes, n)
    JOIN broker_subscriptions s ON s.topic = m.topic ORDER BY m.n, s.name
), inserted AS (
    INSERT INTO broker_messages (id, subscription, data, attributes)
    SELECT id, name, data, attributes::jsonb FROM fanned
)
SELECT n, min(id) FROM fanned GROUP BY n"""
_LEASE = """
WITH next AS (
    SELECT id FROM broker_messages
    WHERE subscription = $1 AND available_at <= now()
    ORDER BY available_at, id LIMIT $2 FOR UPDATE SKIP LOCKED
)
UPDATE broker_messages m
SET attempts = m.attempts + 1, available_at = now() + make_interval(secs => $3)
FROM next WHERE m.id = next.id
RETURNING m.id, m.data, m.attributes::text, m.attempts"""
_NEXT_DUE = """
SELECT extract(epoch FROM min(available_at) - clock_timestamp())::float8
FROM broker_messages WHERE subscription = $1"""
# An ack counts even after its lease expired: the work is done, a redelivery would be waste.
_ACK = "DELETE FROM broker_messages WHERE id = ANY($1::bigint[])"
# Nack, lease extension and release on shutdown. ``attempts`` fences out a stale lease:
# once a lease expired and the row was delivered again, the old holder cannot move it.
_DELAY = """
UPDATE broker_messages m SET available_at = now() + make_interval(secs => d.delay)
FROM unnest($1::bigint[], $2::int[], $3::float8[]) AS d(id, attempts, delay)
WHERE m.id = d.id AND m.attempts = d.attempts"""
# Delete and re-publish to the dead-letter topic's subscriptions in one statement;
# with no dead-letter topic ($5 NULL) the message is only deleted.
_DEAD_LETTER = """
WITH gone AS (
    DELETE FROM broker_messages m
    USING unnest($1::bigint[], $2::int[], $3::int[]) AS d(id, attempts, delivered)
    WHERE m.id = d.id AND m.attempts = d.attempts
    RETURNING m.id, m.data, m.attributes, d.delivered
)
INSERT INTO broker_messages (subscription, data, attributes)
SELECT s.name, g.data, g.attributes || jsonb_build_object('x-dead-letter-source', $4::text,
    'x-delivery-attempts', g.delivered::text, 'x-original-message-id', g.id::text)
FROM gone g JOIN broker_subscriptions s ON s.topic = $5 ORDER BY g.id, s.name"""


def _log(level: int, action: str, message: str, *args: object, **fields: Any) -> None:
    exc_info = fields.pop("exc_info", False)
    logger.log(level, message, *args, exc_info=exc_info, extra={"action": action, **fields})


def _publish_params(messages: list[tuple[str, Message]]) -> tuple[list[Any], ...]:
    return (
        [topic for topic, _ in messages],
        [message.data for _, message in messages],
        [orjson.dumps(message.attributes).decode() for _, message in messages],
    )


def _unrouted_id(topic: str) -> str:
    # Pub/Sub accepts and drops a message published to a topic nobody subscribes to.
    _log(logging.DEBUG, "message_unrouted", "Message to %s dropped: no subscriptions", topic)
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
        self._consumers: dict[str, set[_Consumer]] = {}
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
        await self._execute(_UPSERT_SUBSCRIPTION, params, "ensure subscription " + spec.name)
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
        rows = await self._execute(_PUBLISH_MANY, _publish_params(messages), what)
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
            await connection.exec_driver_sql(_PUBLISH_MANY, _publish_params([(topic, message)]))
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
        best: _Consumer | None = None
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
        consumer = _Consumer(self, subscription, handler, max_in_flight, drain=False)
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
        consumer = _Consumer(self, subscription, handler, max_in_flight, drain=True)
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

    async def _consumer_connection(self) -> asyncpg.Connection:
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
                _log(logging.WARNING, "broker_listener_lost", message, exc, delay)
                await asyncio.sleep(delay)
                delay = min(5.0, delay * 2)
                continue
            connection.add_termination_listener(lambda _conn, lost=lost: lost.set())
            try:
                await connection.add_listener(CHANNEL, self._on_notify)
                self._listening, delay = True, 0.1
                _log(logging.INFO, "broker_listening", "Broker listening on %s", CHANNEL)
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
            _log(logging.WARNING, "broker_listener_lost", "Broker LISTEN lost; reconnecting")
            self._wake_all()  # consumers poll while the listener is down


class Hold:
    """Room reserved with a local consumer for one message being staged (``PostgresBroker.hold``).

    Exactly one of ``deliver`` and ``release`` takes effect; later calls do nothing.
    """

    __slots__ = ("_consumer", "_open")

    def __init__(self, consumer: _Consumer) -> None:
        self._consumer = consumer
        self._open = True

    def args(self, prefix: str) -> dict[str, object]:
        """The ``staging_sql`` parameters that lease the copy to the reserving consumer."""
        spec = self._consumer.spec
        assert spec is not None
        return {
            f"{prefix}_hold": self._consumer.name,
            f"{prefix}_hold_secs": spec.ack_deadline_seconds,
        }

    def deliver(self, row_id: int | None, message: Message) -> None:
        """After commit: hand the leased copy ``row_id`` to the consumer (None: nothing was
        staged, so only the room is given back)."""
        if row_id is None:
            self.release()
        elif self._end():
            self._consumer.adopt(row_id, message)

    def release(self) -> None:
        """The statement failed or staged nothing: give the room back."""
        if self._end():
            self._consumer.room_freed()
            self._consumer.room_made()

    def _end(self) -> bool:
        """Give up the reservation; False if it already was."""
        if not self._open:
            return False
        self._open = False
        self._consumer.reserved -= 1
        return True


@dataclass
class _Lease:
    row_id: int
    attempts: int
    first_leased: float
    leased_at: float


class _Consumer:
    """One subscription loop: lease, run handlers concurrently, settle outcomes in batches.

    All database work happens in the loop on one connection; handler tasks only record
    their outcome and wake it, so acks and nacks are batched naturally.
    """

    def __init__(
        self,
        broker: PostgresBroker,
        subscription: str,
        handler: Handler,
        max_in_flight: int,
        *,
        drain: bool,
    ) -> None:
        self.broker, self.name, self.handler, self.drain = broker, subscription, handler, drain
        self.max_in_flight = max(1, max_in_flight)
        self.spec: SubscriptionSpec | None = None
        self._reload_spec = False  # on idle wake-ups, to see policy changes by others
        self.handled = 0
        self.done = asyncio.Event()
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._dirty = True  # there may be available messages: lease before sleeping
        self._due_at = float("inf")  # when a message we know of becomes available
        self._extend_at = float("inf")
        self._error_delay = 0.1
        self._conn: asyncpg.Connection | None = None
        self._in_flight: dict[int, tuple[_Lease, asyncio.Task[None]]] = {}
        self._outcomes: list[tuple[_Lease, float | None]] = []  # delay None means ack
        self.reserved = 0  # room promised to messages being staged (``Hold``)
        self._settled: set[int] = set()  # in flight, already deleted by their handler's statement
        self._unstarted: list[_Lease] = []  # handed over while stopping: released at shutdown

    @property
    def room(self) -> int:
        return self.max_in_flight - len(self._in_flight) - self.reserved

    def consumes(self, topic: str) -> bool:
        """Whether this consumer takes ``topic``'s messages (not a dead-letter drain)."""
        return not self.drain and self.spec is not None and self.spec.topic == topic

    def room_made(self) -> None:
        """A slot of this consumer freed up (``PostgresBroker.wait_for_room``)."""
        if self.spec is not None and not self.drain:
            self.broker.room_made(self.spec.topic)

    def can_hold(self, topic: str) -> bool:
        """Whether a message of ``topic`` may be staged leased to this consumer."""
        return (
            self.consumes(topic)
            and self._conn is not None
            and not self._stopping.is_set()
            and self.room > 0
        )

    def acked(self, message_id: str) -> None:
        if message_id.isdigit() and int(message_id) in self._in_flight:
            self._settled.add(int(message_id))

    def room_freed(self) -> None:
        """A reservation ended without a message: lease what it may have kept waiting."""
        if self._dirty:
            self._wake.set()

    def adopt(self, row_id: int, message: Message) -> None:
        """Handle a message staged already leased to this consumer, as its first attempt."""
        assert self.spec is not None
        now = self._loop.time()
        lease = _Lease(row_id, 1, now, now)
        if self._stopping.is_set():
            self._unstarted.append(lease)
            return
        delivery = Delivery(str(row_id), message.data, dict(message.attributes), 1, self.name)
        self._in_flight[row_id] = (lease, asyncio.create_task(self._deliver(lease, delivery)))
        extend_at = now + self.spec.ack_deadline_seconds / 3
        if extend_at < self._extend_at:
            self._extend_at = extend_at
            self._wake.set()  # it may be asleep past the first extension

    def poke(self) -> None:
        self._dirty = True
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        try:
            while not self._stopping.is_set():
                self._wake.clear()
                try:
                    timeout = await self._step()
                except TRANSIENT_ERRORS as exc:
                    await self._recover(exc)
                    continue
                except asyncio.CancelledError as exc:
                    if not spurious_cancel(exc):
                        raise
                    await self._recover(exc)  # our connection was terminated mid-statement
                    continue
                if timeout is None:
                    return
                if timeout > 0:
                    # asyncio.timeout, not wait_for: on Python 3.11 wait_for loses a
                    # cancellation that arrives as the event is set (a handler finishing as
                    # the consumer is stopped), and the consumer would never stop.
                    try:
                        async with asyncio.timeout(timeout):
                            await self._wake.wait()
                    except TimeoutError:
                        self._dirty = self._reload_spec = True
        finally:
            await self._shutdown()
            self.done.set()

    async def _step(self) -> float | None:
        """One round of database work; return how long to sleep (None: drain is done)."""
        if self._conn is None:
            self._conn = await self.broker._consumer_connection()
        conn = self._conn
        if self.spec is None or self._reload_spec:
            self._reload_spec = False
            row = await conn.fetchrow(_SUBSCRIPTION, self.name)
            if row is None:
                raise BrokerError(f"Subscription {self.name!r} does not exist")
            self.spec = SubscriptionSpec(**dict(row))
        await self._settle(conn)
        now = self._loop.time()
        if self._in_flight and now >= self._extend_at:
            await self._extend(conn, now)
        if now >= self._due_at:
            self._dirty, self._due_at = True, float("inf")
        leased = -1
        capacity = self.room
        if (self._dirty or self.drain) and capacity > 0:
            self._dirty = False
            leased = await self._lease(conn, capacity)
            if leased == capacity:
                self._dirty = True
            elif not self.drain:
                # Rows another consumer is leasing right now read as due: look again shortly.
                due = await conn.fetchval(_NEXT_DUE, self.name)
                self._due_at = float("inf") if due is None else now + max(0.01, due)
        self._error_delay = 0.1
        if self._outcomes or (self._dirty and self.room > 0):
            return 0.0
        if self.drain:
            return None if leased == 0 and not self._in_flight else self.broker.poll_interval
        wake_at = min(self._due_at, now + self.broker.poll_interval)
        if self._in_flight:
            wake_at = min(wake_at, self._extend_at)
        return max(0.0, wake_at - self._loop.time())

    async def _lease(self, conn: asyncpg.Connection, limit: int) -> int:
        assert self.spec is not None
        params = (self.name, limit, self.spec.ack_deadline_seconds)
        rows = sorted(tuple(row) for row in await conn.fetch(_LEASE, *params))
        now = self._loop.time()
        expired = [row for row in rows if row[3] > self.spec.max_delivery_attempts]
        if expired:
            # A consumer died holding these on their last attempt: no further delivery.
            leases = [_Lease(row[0], row[3], now, now) for row in expired]
            await self._dead_letter(conn, leases, [lease.attempts - 1 for lease in leases])
        for row_id, data, attributes, attempts in rows:
            if attempts <= self.spec.max_delivery_attempts:
                lease = _Lease(row_id, attempts, now, now)
                delivery = Delivery(
                    str(row_id), data, orjson.loads(attributes), attempts, self.name
                )
                self._in_flight[row_id] = (
                    lease,
                    asyncio.create_task(self._deliver(lease, delivery)),
                )
        if rows:
            self._extend_at = min(self._extend_at, now + self.spec.ack_deadline_seconds / 3)
        return len(rows)

    async def _deliver(self, lease: _Lease, delivery: Delivery) -> None:
        assert self.spec is not None
        backoff = backoff_delay(
            lease.attempts, self.spec.min_backoff_seconds, self.spec.max_backoff_seconds
        )
        delay: float | None = None
        try:
            await self.handler(delivery)
        except Nack as exc:
            delay = backoff if exc.delay is None else exc.delay
        except Exception:
            delay = backoff
            message = "Handler failed for message %s on %s (attempt %d)"
            args = (delivery.message_id, self.name, lease.attempts)
            _log(logging.WARNING, "message_nacked", message, *args, exc_info=True)
        except asyncio.CancelledError as exc:
            if not spurious_cancel(exc):
                raise  # shutting down: _shutdown releases the lease
            delay = backoff  # a database connection terminated under the handler
            message = "Handler for message %s on %s lost its database connection (attempt %d)"
            args = (delivery.message_id, self.name, lease.attempts)
            _log(logging.WARNING, "message_nacked", message, *args)
        self._in_flight.pop(lease.row_id, None)
        self._outcomes.append((lease, delay))
        self._wake.set()
        self.room_made()

    async def _settle(self, conn: asyncpg.Connection) -> None:
        if not self._outcomes:
            return
        assert self.spec is not None
        outcomes, self._outcomes = self._outcomes, []
        limit = self.spec.max_delivery_attempts
        try:
            acks = [
                lease.row_id
                for lease, delay in outcomes
                if delay is None and lease.row_id not in self._settled
            ]
            self._settled.difference_update(lease.row_id for lease, _ in outcomes)
            retries = [
                (lease, d) for lease, d in outcomes if d is not None and lease.attempts < limit
            ]
            dead = [lease for lease, d in outcomes if d is not None and lease.attempts >= limit]
            if acks:
                await conn.execute(_ACK, acks)
            if retries:
                await self._delay(conn, [lease for lease, _ in retries], [d for _, d in retries])
                soonest = self._loop.time() + min(d for _, d in retries)
                self._due_at = min(self._due_at, soonest)
            if dead:
                await self._dead_letter(conn, dead, [lease.attempts for lease in dead])
        except BaseException:
            self._outcomes[:0] = outcomes  # every statement above is safe to repeat
            raise
        self.handled += len(outcomes)

    async def _delay(
        self, conn: asyncpg.Connection, leases: list[_Lease], delays: list[float]
    ) -> None:
        ids = [lease.row_id for lease in leases]
        await conn.execute(_DELAY, ids, [lease.attempts for lease in leases], delays)

    async def _extend(self, conn: asyncpg.Connection, now: float) -> None:
        """Keep leases of messages still being handled, like the Pub/Sub client does."""
        assert self.spec is not None
        deadline = self.spec.ack_deadline_seconds
        leases = [
            lease
            for lease, _ in self._in_flight.values()
            if now - lease.leased_at >= deadline / 3
            and now - lease.first_leased < MAX_LEASE_SECONDS
        ]
        if leases:
            await self._delay(conn, leases, [deadline] * len(leases))
            for lease in leases:
                lease.leased_at = now
        self._extend_at = now + deadline / 3

    async def _dead_letter(
        self, conn: asyncpg.Connection, leases: list[_Lease], delivered: list[int]
    ) -> None:
        assert self.spec is not None
        topic = self.spec.dead_letter_topic
        ids = [lease.row_id for lease in leases]
        params = (ids, [lease.attempts for lease in leases], delivered, self.name, topic)
        await conn.execute(_DEAD_LETTER, *params)
        for row_id, attempts in zip(ids, delivered, strict=True):
            fields = {"subscription": self.name, "message_id": str(row_id), "attempts": attempts}
            if topic:
                message = "Message %s on %s dead-lettered to %s after %d delivery attempts"
                args = (row_id, self.name, topic, attempts)
                _log(logging.WARNING, "message_dead_lettered", message, *args, **fields)
            else:
                message = "Message %s on %s DROPPED after %d attempts: no dead-letter topic"
                _log(
                    logging.ERROR, "message_dropped", message, row_id, self.name, attempts, **fields
                )

    async def _recover(self, exc: BaseException) -> None:
        message = "Consumer of %s lost the database (%s); retrying in %.1fs"
        args = (self.name, exc, self._error_delay)
        _log(logging.WARNING, "broker_consumer_error", message, *args, subscription=self.name)
        await self._drop_connection()
        self._dirty = self._reload_spec = True
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self._error_delay):
                await self._stopping.wait()
        self._error_delay = min(5.0, self._error_delay * 2)

    async def _drop_connection(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.terminate()  # it may be dead or mid-protocol: no goodbye

    async def _shutdown(self) -> None:
        """Cancel handlers, then settle what finished and release the rest for redelivery."""
        tasks = [task for _, task in self._in_flight.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        unfinished = [lease for lease, _ in self._in_flight.values()] + self._unstarted
        self._in_flight.clear()
        self._unstarted = []
        # A cancelled query may have left the connection mid-protocol: start afresh.
        await self._drop_connection()
        if not (self._outcomes or unfinished) or self.spec is None:
            return
        try:
            conn = await asyncio.wait_for(self.broker._consumer_connection(), 5)
            try:
                await asyncio.wait_for(self._settle(conn), 5)
                if unfinished:
                    await asyncio.wait_for(
                        self._delay(conn, unfinished, [0.0] * len(unfinished)), 5
                    )
            finally:
                with contextlib.suppress(Exception):
                    await conn.close(timeout=2)
        except TRANSIENT_ERRORS as exc:
            message = "Could not release leases on %s at shutdown (%s); they will expire"
            _log(logging.WARNING, "broker_release_failed", message, self.name, exc)
