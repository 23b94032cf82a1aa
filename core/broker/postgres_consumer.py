"""The consuming side of the ``postgres`` broker (``core.broker.postgres``).

A ``Consumer`` is one subscription loop in this process: it leases ``broker_messages``
rows with ``FOR UPDATE SKIP LOCKED`` and a visibility timeout, runs handlers
concurrently, and settles their outcomes in batches on its own connection (ack by
deleting, nack by pushing ``available_at`` back, dead-letter after
``max_delivery_attempts``). A ``Hold`` is room reserved with a consumer for a message
being staged by a hand-off, which is then given to it in memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import asyncpg
import orjson
from sqlalchemy.exc import SQLAlchemyError

from core.broker import Delivery, Handler, Message, Nack, SubscriptionSpec, backoff_delay
from core.broker import postgres_sql as sql
from core.db.raw import spurious_cancel
from core.errors import BrokerError

if TYPE_CHECKING:
    from core.broker.postgres import PostgresBroker

logger = logging.getLogger("blogpipe.broker.postgres")

MAX_LEASE_SECONDS = 3600.0  # like the Pub/Sub client's max_lease_duration
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


def log(level: int, action: str, message: str, *args: object, **fields: Any) -> None:
    """Log with the structured ``action`` field (and any others) the broker's records carry."""
    exc_info = fields.pop("exc_info", False)
    logger.log(level, message, *args, exc_info=exc_info, extra={"action": action, **fields})


class Hold:
    """Room reserved with a local consumer for one message being staged (``PostgresBroker.hold``).

    Exactly one of ``deliver`` and ``release`` takes effect; later calls do nothing.
    """

    __slots__ = ("_consumer", "_open")

    def __init__(self, consumer: Consumer) -> None:
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
class Lease:
    row_id: int
    attempts: int
    first_leased: float
    leased_at: float


class Consumer:
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
        self._in_flight: dict[int, tuple[Lease, asyncio.Task[None]]] = {}
        self._outcomes: list[tuple[Lease, float | None]] = []  # delay None means ack
        self.reserved = 0  # room promised to messages being staged (``Hold``)
        self._settled: set[int] = set()  # in flight, already deleted by their handler's statement
        self._unstarted: list[Lease] = []  # handed over while stopping: released at shutdown

    @property
    def room(self) -> int:
        return self.max_in_flight - len(self._in_flight) - self.reserved

    def consumes(self, topic: str) -> bool:
        """Whether this consumer takes ``topic``'s messages (not a dead-letter drain)."""
        return not self.drain and self.spec is not None and self.spec.topic == topic

    def room_made(self) -> None:
        """A slot of this consumer freed up: wake a ``PostgresBroker.room_for`` waiter."""
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
        lease = Lease(row_id, 1, now, now)
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
            self._conn = await self.broker.consumer_connection()
        conn = self._conn
        if self.spec is None or self._reload_spec:
            self._reload_spec = False
            row = await conn.fetchrow(sql.SUBSCRIPTION, self.name)
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
                due = await conn.fetchval(sql.NEXT_DUE, self.name)
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
        rows = sorted(tuple(row) for row in await conn.fetch(sql.LEASE, *params))
        now = self._loop.time()
        expired = [row for row in rows if row[3] > self.spec.max_delivery_attempts]
        if expired:
            # A consumer died holding these on their last attempt: no further delivery.
            leases = [Lease(row[0], row[3], now, now) for row in expired]
            await self._dead_letter(conn, leases, [lease.attempts - 1 for lease in leases])
        for row_id, data, attributes, attempts in rows:
            if attempts <= self.spec.max_delivery_attempts:
                lease = Lease(row_id, attempts, now, now)
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

    async def _deliver(self, lease: Lease, delivery: Delivery) -> None:
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
            log(logging.WARNING, "message_nacked", message, *args, exc_info=True)
        except asyncio.CancelledError as exc:
            if not spurious_cancel(exc):
                raise  # shutting down: _shutdown releases the lease
            delay = backoff  # a database connection terminated under the handler
            message = "Handler for message %s on %s lost its database connection (attempt %d)"
            args = (delivery.message_id, self.name, lease.attempts)
            log(logging.WARNING, "message_nacked", message, *args)
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
                await conn.execute(sql.ACK, acks)
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
        self, conn: asyncpg.Connection, leases: list[Lease], delays: list[float]
    ) -> None:
        ids = [lease.row_id for lease in leases]
        await conn.execute(sql.DELAY, ids, [lease.attempts for lease in leases], delays)

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
        self, conn: asyncpg.Connection, leases: list[Lease], delivered: list[int]
    ) -> None:
        assert self.spec is not None
        topic = self.spec.dead_letter_topic
        ids = [lease.row_id for lease in leases]
        params = (ids, [lease.attempts for lease in leases], delivered, self.name, topic)
        await conn.execute(sql.DEAD_LETTER, *params)
        for row_id, attempts in zip(ids, delivered, strict=True):
            fields = {"subscription": self.name, "message_id": str(row_id), "attempts": attempts}
            if topic:
                message = "Message %s on %s dead-lettered to %s after %d delivery attempts"
                args = (row_id, self.name, topic, attempts)
                log(logging.WARNING, "message_dead_lettered", message, *args, **fields)
            else:
                message = "Message %s on %s DROPPED after %d attempts: no dead-letter topic"
                log(
                    logging.ERROR, "message_dropped", message, row_id, self.name, attempts, **fields
                )

    async def _recover(self, exc: BaseException) -> None:
        message = "Consumer of %s lost the database (%s); retrying in %.1fs"
        args = (self.name, exc, self._error_delay)
        log(logging.WARNING, "broker_consumer_error", message, *args, subscription=self.name)
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
            conn = await asyncio.wait_for(self.broker.consumer_connection(), 5)
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
            log(logging.WARNING, "broker_release_failed", message, self.name, exc)
