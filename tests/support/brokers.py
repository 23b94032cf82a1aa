"""The ``broker`` fixture (one contract suite, every adapter) and helpers to drive brokers.

``broker_backend`` is parametrized over ``postgres`` (a fresh migrated database per test)
and ``pubsub`` (the emulator, a fresh project per test); ``broker`` is one instance of it,
and ``broker_backend.new()`` makes more (as if from other processes). Import the fixtures
into a test module as ``broker_fixture, broker_backend_fixture`` (or list this module in
``pytest_plugins`` of the root conftest).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest

from core.broker import Broker, Delivery, Handler
from core.broker.postgres import PostgresBroker

CLOSE_TIMEOUT = 30.0


def unique(prefix: str) -> str:
    """A topic or subscription name no other test uses (Pub/Sub wants 3+ characters)."""
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


@dataclass
class BrokerBackend:
    """Makes brokers of one kind; remembers them so the fixture can close them all."""

    kind: str
    factory: Callable[[], Broker]
    # Pub/Sub refuses ack deadlines under 10 s; the postgres broker takes any.
    min_ack_deadline: float = 1.0
    created: list[Broker] = field(default_factory=list)

    def new(self) -> Broker:
        """Another broker instance on the same backend (like another process)."""
        broker = self.factory()
        self.created.append(broker)
        return broker


@pytest.fixture(
    name="broker_backend",
    params=["postgres", pytest.param("pubsub", marks=pytest.mark.pubsub)],
)
def broker_backend_fixture(request: pytest.FixtureRequest) -> BrokerBackend:
    """How to make brokers of each kind; ``pubsub`` skips until its pieces exist."""
    if request.param == "postgres":
        engine = request.getfixturevalue("engine")
        return BrokerBackend("postgres", lambda: PostgresBroker(engine))
    try:
        from core.broker.pubsub import PubSubBroker
    except ImportError as exc:
        pytest.skip(f"core.broker.pubsub cannot be imported yet: {exc}")
    try:
        emulator = request.getfixturevalue("pubsub_emulator")
    except pytest.FixtureLookupError:
        pytest.skip("the pubsub_emulator fixture (tests/support/pubsub_emulator.py) is not defined")
    project = f"bp-contract-{uuid.uuid4().hex[:10]}"
    return BrokerBackend(
        "pubsub",
        lambda: PubSubBroker(project, emulator_host=emulator.host),
        min_ack_deadline=10.0,
    )


@pytest.fixture(name="broker")
async def broker_fixture(broker_backend: BrokerBackend) -> AsyncIterator[Broker]:
    """A broker of each kind; every broker the test made is closed afterwards."""
    first = broker_backend.new()
    yield first
    for made in broker_backend.created:
        await asyncio.wait_for(made.close(), CLOSE_TIMEOUT)


@asynccontextmanager
async def subscribed(
    broker: Broker, subscription: str, handler: Handler, *, max_in_flight: int = 100
) -> AsyncIterator[asyncio.Task[None]]:
    """Run ``broker.subscribe`` in a task for the duration of the block, then cancel it."""
    task = asyncio.create_task(broker.subscribe(subscription, handler, max_in_flight=max_in_flight))
    if isinstance(handler, Recorder):
        handler.subscribers.append(task)
    try:
        yield task
    finally:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CLOSE_TIMEOUT)
        assert done, f"subscriber of {subscription} did not stop within {CLOSE_TIMEOUT}s"
        if not task.cancelled() and task.exception() is not None:
            raise AssertionError(f"subscriber of {subscription} crashed") from task.exception()


class Recorder:
    """A handler that records deliveries and acks, unless ``decide`` raises to nack."""

    def __init__(self, decide: Callable[[Delivery], Awaitable[Any]] | None = None) -> None:
        self.deliveries: list[Delivery] = []
        self.acked: list[Delivery] = []
        self.subscribers: list[asyncio.Task[None]] = []
        self._decide = decide

    async def __call__(self, delivery: Delivery) -> None:
        self.deliveries.append(delivery)
        if self._decide is not None:
            await self._decide(delivery)
        self.acked.append(delivery)

    def data(self) -> list[bytes]:
        """The payloads delivered so far, in delivery order."""
        return [delivery.data for delivery in self.deliveries]

    def attempts(self, data: bytes) -> list[int]:
        """The delivery attempts seen for the message with payload ``data``."""
        return [d.delivery_attempt for d in self.deliveries if d.data == data]

    def check(self) -> None:
        """Fail at once if a subscriber feeding this recorder has crashed."""
        for task in self.subscribers:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise AssertionError("a subscriber crashed") from task.exception()

    async def count(self) -> int:
        """Deliveries so far (an awaitable probe for ``waiting.wait_for``)."""
        self.check()
        return len(self.deliveries)
