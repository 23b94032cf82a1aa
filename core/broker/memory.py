"""An in-process broker with the same semantics as the real ones — a test double.

For unit tests only: messages live in memory and vanish with the process. It keeps the
contract of the ``Broker`` port (fan-out, ack/nack, delivery attempts, backoff,
dead-lettering) so code above the port can be tested without a database.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from dataclasses import dataclass, field

from core.broker import Delivery, Handler, Message, Nack, SubscriptionSpec, backoff_delay
from core.errors import BrokerError

logger = logging.getLogger("blogpipe.broker.memory")


@dataclass
class _Stored:
    message_id: str
    message: Message
    attempts: int = 0


@dataclass
class _Queue:
    spec: SubscriptionSpec
    ready: deque[_Stored] = field(default_factory=deque)
    unacked: int = 0
    waiters: set[asyncio.Event] = field(default_factory=set)

    def put(self, stored: _Stored, *, front: bool = False) -> None:
        if front:
            self.ready.appendleft(stored)
        else:
            self.ready.append(stored)
        for waiter in self.waiters:
            waiter.set()


class InMemoryBroker:
    """Test double of the ``Broker`` port, kept in memory (not for production use)."""

    name = "memory"

    def __init__(self) -> None:
        self._queues: dict[str, _Queue] = {}
        self._published: dict[str, list[Message]] = {}
        self._ids = itertools.count(1)
        self._closed = asyncio.Event()

    async def ensure_topic(self, topic: str) -> None:
        """Topics are implicit; remembered only so ``published`` can list them."""
        self._published.setdefault(topic, [])

    async def ensure_subscription(self, spec: SubscriptionSpec) -> None:
        """Create the subscription, or replace its policies."""
        if spec.name in self._queues:
            self._queues[spec.name].spec = spec
        else:
            self._queues[spec.name] = _Queue(spec)

    async def publish(self, topic: str, message: Message) -> str:
        """Fan the message out to every subscription of ``topic``; return its id."""
        message_id = str(next(self._ids))
        self._published.setdefault(topic, []).append(message)
        for queue in self._queues.values():
            if queue.spec.topic == topic:
                queue.unacked += 1
                queue.put(_Stored(message_id, message))
        return message_id

    async def publish_many(self, topic: str, messages: list[Message]) -> list[str]:
        """Publish several messages; return their ids in order."""
        return [await self.publish(topic, message) for message in messages]

    def published(self, topic: str) -> list[Message]:
        """Every message ever published to ``topic``, in order (for assertions)."""
        return list(self._published.get(topic, []))

    def pending(self, subscription: str) -> int:
        """Messages on ``subscription`` not yet acked, dead-lettered or dropped."""
        return self._queue(subscription).unacked

    async def subscribe(
        self, subscription: str, handler: Handler, *, max_in_flight: int = 100
    ) -> None:
        """Deliver messages to ``handler`` until cancelled or the broker is closed."""
        await self._consume(subscription, handler, max(1, max_in_flight), drain=False)

    async def drain(self, subscription: str, handler: Handler, *, max_in_flight: int = 100) -> int:
        """Handle what is available now (not messages waiting out a backoff); return the count."""
        return await self._consume(subscription, handler, max(1, max_in_flight), drain=True)

    async def close(self) -> None:
        """Stop every subscriber; unfinished deliveries go back to their queues."""
        self._closed.set()
        for queue in self._queues.values():
            for waiter in queue.waiters:
                waiter.set()

    def _queue(self, subscription: str) -> _Queue:
        try:
            return self._queues[subscription]
        except KeyError:
            raise BrokerError(f"Subscription {subscription!r} does not exist") from None

    async def _consume(
        self, subscription: str, handler: Handler, max_in_flight: int, *, drain: bool
    ) -> int:
        queue = self._queue(subscription)
        wake = asyncio.Event()
        queue.waiters.add(wake)
        in_flight: dict[asyncio.Task[bool], _Stored] = {}
        handled = 0

        def finished(task: asyncio.Task[bool]) -> None:
            nonlocal handled
            if in_flight.pop(task, None) is not None and not task.cancelled():
                handled += 1
            wake.set()

        try:
            while not self._closed.is_set():
                wake.clear()
                while queue.ready and len(in_flight) < max_in_flight:
                    stored = queue.ready.popleft()
                    stored.attempts += 1
                    task = asyncio.create_task(self._deliver(queue, stored, handler))
                    in_flight[task] = stored
                    task.add_done_callback(finished)
                if drain and not in_flight and not queue.ready:
                    break
                await wake.wait()
        finally:
            queue.waiters.discard(wake)
            unfinished = dict(in_flight)
            for task in unfinished:
                task.cancel()
            await asyncio.gather(*unfinished, return_exceptions=True)
            for task, stored in unfinished.items():
                if task.cancelled():  # interrupted mid-handler: deliver it again
                    queue.put(stored, front=True)
        return handled

    async def _deliver(self, queue: _Queue, stored: _Stored, handler: Handler) -> bool:
        spec = queue.spec
        delivery = Delivery(
            stored.message_id,
            stored.message.data,
            dict(stored.message.attributes),
            stored.attempts,
            spec.name,
        )
        try:
            await handler(delivery)
        except Nack as exc:
            delay = exc.delay
        except Exception:
            delay = None
            logger.warning(
                "Handler failed for message %s on %s (attempt %d)",
                stored.message_id,
                spec.name,
                stored.attempts,
                exc_info=True,
                extra={"action": "message_nacked", "subscription": spec.name},
            )
        else:
            queue.unacked -= 1
            return True
        if stored.attempts >= spec.max_delivery_attempts:
            await self._dead_letter(queue, stored)
            return False
        if delay is None:
            delay = backoff_delay(
                stored.attempts, spec.min_backoff_seconds, spec.max_backoff_seconds
            )
        if delay <= 0:
            queue.put(stored)
        else:
            asyncio.get_running_loop().call_later(delay, queue.put, stored)
        return False

    async def _dead_letter(self, queue: _Queue, stored: _Stored) -> None:
        queue.unacked -= 1
        spec = queue.spec
        extra = {"subscription": spec.name, "message_id": stored.message_id}
        if spec.dead_letter_topic is None:
            logger.error(
                "Message %s on %s DROPPED after %d attempts: no dead-letter topic",
                stored.message_id,
                spec.name,
                stored.attempts,
                extra={"action": "message_dropped", **extra},
            )
            return
        attributes = {
            **stored.message.attributes,
            "x-dead-letter-source": spec.name,
            "x-delivery-attempts": str(stored.attempts),
            "x-original-message-id": stored.message_id,
        }
        await self.publish(spec.dead_letter_topic, Message(stored.message.data, attributes))
        logger.warning(
            "Message %s on %s dead-lettered to %s after %d attempts",
            stored.message_id,
            spec.name,
            spec.dead_letter_topic,
            stored.attempts,
            extra={"action": "message_dead_lettered", **extra},
        )
