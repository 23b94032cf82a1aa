"""The Broker port: publish and subscribe with Pub/Sub semantics.

At-least-once delivery, ack/nack, a delivery-attempt count, retry backoff, and
dead-lettering after ``max_delivery_attempts``. Adapters move messages; what a
message means is decided by the stage runner above them.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable


@dataclass(frozen=True)
class Message:
    """A message to publish: a small JSON body plus string attributes."""

    data: bytes
    attributes: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Delivery:
    """One delivery of a message to a subscriber."""

    message_id: str
    data: bytes
    attributes: dict[str, str]
    delivery_attempt: int
    subscription: str


class Nack(Exception):
    """Raised by a handler to ask for redelivery, optionally after ``delay`` seconds."""

    def __init__(self, reason: str = "", delay: float | None = None) -> None:
        super().__init__(reason)
        self.delay = delay


Handler = Callable[[Delivery], Awaitable[None]]
"""A handler returns normally to ack; raising (Nack or anything else) nacks."""


@dataclass(frozen=True)
class SubscriptionSpec:
    """A subscription to create: name, topic, and its retry and dead-letter policy."""

    name: str
    topic: str
    max_delivery_attempts: int = 5
    dead_letter_topic: str | None = None
    ack_deadline_seconds: float = 60.0
    min_backoff_seconds: float = 1.0
    max_backoff_seconds: float = 60.0
    push_endpoint: str | None = None


@runtime_checkable
class Broker(Protocol):
    """Moves messages between topics and subscriptions."""

    name: str

    async def ensure_topic(self, topic: str) -> None:
        """Create the topic if it does not exist."""

    async def ensure_subscription(self, spec: SubscriptionSpec) -> None:
        """Create the subscription (and its policies) if it does not exist."""

    async def publish(self, topic: str, message: Message) -> str:
        """Publish one message; return its id once the broker has it durably."""

    async def subscribe(
        self, subscription: str, handler: Handler, *, max_in_flight: int = 100
    ) -> None:
        """Deliver messages to ``handler`` until cancelled."""

    async def close(self) -> None:
        """Release connections and background tasks."""


class TransactionalBroker(Broker, Protocol):
    """A broker that can write a message inside the caller's database transaction."""

    async def publish_in_transaction(self, connection: Any, topic: str, message: Message) -> None:
        """Enqueue inside ``connection``'s open transaction (visible at commit)."""


def backoff_delay(attempt: int, minimum: float, maximum: float) -> float:
    """Exponential backoff for the ``attempt``-th failed delivery, clamped."""
    if attempt <= 0:
        return minimum
    return float(min(maximum, minimum * (2 ** (attempt - 1))))
