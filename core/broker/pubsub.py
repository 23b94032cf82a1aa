"""The ``pubsub`` Broker adapter: Google Cloud Pub/Sub (or its emulator).

The only module that imports google-cloud-pubsub. The SDK is thread-based: admin
calls run in worker threads, publish futures are awaited with ``asyncio.wrap_future``,
and streaming-pull callbacks hand each message to the event loop, where the handler
runs as a task. The message is acked or nacked when that task ends, so the client's
lease management keeps extending its ack deadline for as long as the handler runs
(long LLM calls), and flow control counts it as in flight until then.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from google.api_core.exceptions import AlreadyExists, GoogleAPIError
from google.auth.exceptions import GoogleAuthError
from google.cloud import pubsub_v1  # type: ignore[attr-defined]
from google.cloud.pubsub_v1.subscriber.message import Message as PubSubMessage
from google.pubsub_v1 import types as pubsub_types
from google.pubsub_v1.services.publisher.transports import PublisherGrpcTransport
from google.pubsub_v1.services.subscriber.transports import SubscriberGrpcTransport

from core.broker import Delivery, Handler, Message, Nack, SubscriptionSpec
from core.errors import BrokerError

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Pub/Sub's own limits; the service (and the emulator) reject values outside them.
MIN_ACK_DEADLINE = 10
MAX_ACK_DEADLINE = 600
MAX_BACKOFF = 600.0
MIN_DELIVERY_ATTEMPTS = 5
MAX_DELIVERY_ATTEMPTS = 100

_CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", -1),
    ("grpc.max_receive_message_length", -1),
]


class PubSubBroker:
    """A Broker on Google Cloud Pub/Sub; pass ``emulator_host`` to use the emulator.

    ``max_lease_seconds`` bounds how long the client keeps extending a message's ack
    deadline while its handler runs; ``push_service_account`` makes push
    subscriptions send an OIDC token (real Pub/Sub only; the emulator sends none).
    """

    name = "pubsub"

    def __init__(
        self,
        project_id: str,
        *,
        emulator_host: str | None = None,
        max_in_flight_default: int = 100,
        max_lease_seconds: float = 3600.0,
        batch_max_latency: float = 0.01,
        request_timeout: float = 30.0,
        shutdown_timeout: float = 10.0,
        push_service_account: str | None = None,
        push_audience: str | None = None,
        lease_extension_seconds: float | None = None,
    ) -> None:
        self.project_id = project_id
        # How far each lease extension (and the stream's ack deadline) reaches; the client
        # default is 60 s. It bounds how long a message held by a dead subscriber is away.
        self.lease_extension_seconds = lease_extension_seconds
        self.emulator_host = emulator_host
        self.max_in_flight_default = max_in_flight_default
        self.max_lease_seconds = max_lease_seconds
        self.batch_max_latency = batch_max_latency
        self.request_timeout = request_timeout
        self.shutdown_timeout = shutdown_timeout
        self.push_service_account = push_service_account
        self.push_audience = push_audience
        self._publisher: pubsub_v1.PublisherClient | None = None
        self._admin: pubsub_v1.SubscriberClient | None = None
        self._closed = False

    # -- names and clients ------------------------------------------------------------

    def topic_path(self, topic: str) -> str:
        """``projects/P/topics/T`` for a short topic name (full paths pass through)."""
        if topic.startswith("projects/"):
            return topic
        return f"projects/{self.project_id}/topics/{topic}"

    def subscription_path(self, subscription: str) -> str:
        """``projects/P/subscriptions/S`` for a short subscription name."""
        if subscription.startswith("projects/"):
            return subscription
        return f"projects/{self.project_id}/subscriptions/{subscription}"

    def _client(self, client: type[T], transport: type[Any], **kwargs: Any) -> T:
        if self._closed:
            raise BrokerError("PubSubBroker is closed")
        if self.emulator_host is not None:
            # An explicit insecure channel rather than PUBSUB_EMULATOR_HOST, so brokers
            # in one process can talk to different emulators (tests) or to GCP.
            channel = grpc.insecure_channel(self.emulator_host, options=_CHANNEL_OPTIONS)
            kwargs["transport"] = transport(channel=channel)
        try:
            return client(**kwargs)
        except GoogleAuthError as exc:
            raise BrokerError(f"Pub/Sub credentials are not available: {exc}") from exc

    @property
    def publisher(self) -> pubsub_v1.PublisherClient:
        """The batching publisher client, created on first use."""
        if self._publisher is None:
            batch = pubsub_v1.types.BatchSettings(max_latency=self.batch_max_latency)
            self._publisher = self._client(
                pubsub_v1.PublisherClient, PublisherGrpcTransport, batch_settings=batch
            )
        return self._publisher

    @property
    def admin(self) -> pubsub_v1.SubscriberClient:
        """The subscriber client used for subscription administration."""
        if self._admin is None:
            self._admin = self._client(pubsub_v1.SubscriberClient, SubscriberGrpcTransport)
        return self._admin

    async def _create(self, what: str, call: Callable[[], object]) -> bool:
        """Run a blocking create call in a thread: True if created, False if it existed."""
        try:
            await asyncio.to_thread(call)
        except AlreadyExists:
            return False
        except GoogleAPIError as exc:
            raise BrokerError(f"Pub/Sub could not create {what}: {exc}") from exc
        return True

    # -- topology -----------------------------------------------------------------------

    async def ensure_topic(self, topic: str) -> None:
        """Create the topic if it does not exist."""
        path = self.topic_path(topic)
        publisher = self.publisher
        created = await self._create(
            f"topic {path}",
            lambda: publisher.create_topic(name=path, timeout=self.request_timeout),
        )
        if created:
            logger.info("Created Pub/Sub topic %s", path, extra={"action": "topic_created"})

    async def ensure_subscription(self, spec: SubscriptionSpec) -> None:
        """Create the subscription, its topic and its dead-letter topic if missing.

        An existing subscription is left as it is (its policies are not updated).
        """
        request = self.subscription_request(spec)
        await self.ensure_topic(spec.topic)
        if spec.dead_letter_topic is not None:
            await self.ensure_topic(spec.dead_letter_topic)
        admin = self.admin
        created = await self._create(
            f"subscription {request.name}",
            lambda: admin.create_subscription(request=request, timeout=self.request_timeout),
        )
        if not created:
            return
        logger.info(
            "Created Pub/Sub subscription %s on %s",
            request.name,
            request.topic,
            extra={"action": "subscription_created", "subscription": spec.name},
        )

    def subscription_request(self, spec: SubscriptionSpec) -> pubsub_types.Subscription:
        """The Subscription resource for ``spec``; raise BrokerError on values Pub/Sub refuses."""
        ack_deadline = int(min(MAX_ACK_DEADLINE, max(MIN_ACK_DEADLINE, spec.ack_deadline_seconds)))
        subscription = pubsub_types.Subscription(
            name=self.subscription_path(spec.name),
            topic=self.topic_path(spec.topic),
            ack_deadline_seconds=ack_deadline,
            # An empty expiration policy means "never expire" (the default is 31 days idle).
            expiration_policy=pubsub_types.ExpirationPolicy(),
        )
        minimum = min(MAX_BACKOFF, max(0.0, spec.min_backoff_seconds))
        maximum = min(MAX_BACKOFF, max(minimum, spec.max_backoff_seconds))
        if maximum > 0:
            # No policy at all means immediate redelivery, the same as a zero backoff.
            subscription.retry_policy = pubsub_types.RetryPolicy(
                minimum_backoff=datetime.timedelta(seconds=minimum),
                maximum_backoff=datetime.timedelta(seconds=maximum),
            )
        if spec.dead_letter_topic is not None:
            attempts = spec.max_delivery_attempts
            if not MIN_DELIVERY_ATTEMPTS <= attempts <= MAX_DELIVERY_ATTEMPTS:
                raise BrokerError(
                    f"Pub/Sub dead-letter policies need max_delivery_attempts between "
                    f"{MIN_DELIVERY_ATTEMPTS} and {MAX_DELIVERY_ATTEMPTS}; "
                    f"subscription {spec.name} asks for {attempts}"
                )
            subscription.dead_letter_policy = pubsub_types.DeadLetterPolicy(
                dead_letter_topic=self.topic_path(spec.dead_letter_topic),
                max_delivery_attempts=attempts,
            )
        if spec.push_endpoint is not None:
            push = pubsub_types.PushConfig(push_endpoint=spec.push_endpoint)
            if self.push_service_account is not None:
                push.oidc_token = pubsub_types.PushConfig.OidcToken(
                    service_account_email=self.push_service_account,
                    audience=self.push_audience or "",
                )
            subscription.push_config = push
        return subscription

    # -- publishing ---------------------------------------------------------------------

    def _submit(self, topic: str, message: Message) -> asyncio.Future[str]:
        try:
            future = self.publisher.publish(
                self.topic_path(topic), message.data, **message.attributes
            )
        except (GoogleAPIError, RuntimeError) as exc:
            raise BrokerError(f"Pub/Sub could not publish to {topic}: {exc}") from exc
        return asyncio.wrap_future(future)

    async def _settled(self, topic: str, future: asyncio.Future[str]) -> str:
        try:
            return await future
        except GoogleAPIError as exc:
            raise BrokerError(f"Pub/Sub could not publish to {topic}: {exc}") from exc

    async def publish(self, topic: str, message: Message) -> str:
        """Publish one message (batched with concurrent publishes); return its message id."""
        return await self._settled(topic, self._submit(topic, message))

    async def publish_many(self, topic: str, messages: Sequence[Message]) -> list[str]:
        """Publish several messages in as few batches as possible; ids in input order."""
        futures = [self._submit(topic, message) for message in messages]
        return list(await asyncio.gather(*(self._settled(topic, f) for f in futures)))

    # -- subscribing --------------------------------------------------------------------

    async def subscribe(
        self, subscription: str, handler: Handler, *, max_in_flight: int | None = None
    ) -> None:
        """Stream-pull ``subscription`` into ``handler`` until cancelled.

        At most ``max_in_flight`` handlers run at once. A handler that returns acks its
        message; one that raises (``Nack`` included) nacks it, and the subscription's
        retry policy decides when it comes back (``Nack.delay`` is not honoured here).
        """
        loop = asyncio.get_running_loop()
        limit = max_in_flight if max_in_flight is not None else self.max_in_flight_default
        short_name = subscription.rsplit("/", 1)[-1]
        consumer = _Consumer(loop, short_name, handler)
        subscriber = self._client(pubsub_v1.SubscriberClient, SubscriberGrpcTransport)
        extension = self.lease_extension_seconds
        flow = pubsub_v1.types.FlowControl(
            max_messages=limit,
            max_lease_duration=self.max_lease_seconds,
            max_duration_per_lease_extension=int(max(10, extension)) if extension else 0,
        )
        try:
            streaming = subscriber.subscribe(
                self.subscription_path(subscription), consumer.receive, flow_control=flow
            )
        except GoogleAPIError as exc:
            subscriber.close()
            raise BrokerError(f"Pub/Sub could not subscribe to {subscription}: {exc}") from exc
        finished = _completion(loop, streaming)
        logger.info(
            "Subscribed to %s (max %d in flight)",
            short_name,
            limit,
            extra={"action": "subscribed", "subscription": short_name},
        )
        try:
            await asyncio.shield(finished)
        except GoogleAPIError as exc:
            raise BrokerError(f"Pub/Sub streaming pull on {subscription} failed: {exc}") from exc
        finally:
            # Nack what is still running (nacks travel as unary calls), then end the stream.
            await consumer.stop(self.shutdown_timeout)
            if self.emulator_host is not None:
                _half_close(streaming)
                await asyncio.wait({finished}, timeout=self.shutdown_timeout)
            streaming.cancel()
            await asyncio.wait({finished}, timeout=self.shutdown_timeout)
            if finished.done():
                finished.exception()  # the stream's end during shutdown is expected
            await asyncio.to_thread(subscriber.close)
            logger.info(
                "Unsubscribed from %s",
                short_name,
                extra={"action": "unsubscribed", "subscription": short_name},
            )
        raise BrokerError(f"Pub/Sub streaming pull on {subscription} ended unexpectedly")

    async def close(self) -> None:
        """Flush pending publishes and close the clients."""
        if self._closed:
            return
        self._closed = True
        publisher, admin = self._publisher, self._admin
        self._publisher = self._admin = None
        if publisher is not None:
            await asyncio.to_thread(publisher.stop)
            await asyncio.to_thread(publisher.transport.close)
        if admin is not None:
            await asyncio.to_thread(admin.close)


def _completion(loop: asyncio.AbstractEventLoop, streaming: Any) -> asyncio.Future[None]:
    """An asyncio future that settles with the streaming-pull future (from any thread).

    Not ``asyncio.wrap_future``: a stream that ends cleanly finishes the SDK future
    with ``StopIteration``, which an asyncio future refuses.
    """
    done: asyncio.Future[None] = loop.create_future()

    def copy(source: Any) -> None:
        if done.done():
            return
        error = None if source.cancelled() else source.exception()
        if error is None:
            done.set_result(None)
        elif isinstance(error, Exception) and not isinstance(error, StopIteration):
            done.set_exception(error)
        else:
            done.set_exception(BrokerError(f"streaming pull ended: {error!r}"))

    def on_done(source: Any) -> None:
        try:
            loop.call_soon_threadsafe(copy, source)
        except RuntimeError:  # the loop is already closed
            pass

    streaming.add_done_callback(on_done)
    return done


def _half_close(streaming: Any) -> None:
    """End the request stream so the server closes the streaming pull itself.

    Emulator workaround: the emulator (0.8.20) fails on a client cancel (RST_STREAM)
    and keeps the dead stream registered, and it goes on taking that subscription's
    messages. A half-close lets it end the call normally. Uses SDK internals, so it
    does nothing if they change; the caller cancels the stream afterwards anyway.
    """
    manager = getattr(streaming, "_StreamingPullFuture__manager", None)
    requests = getattr(getattr(manager, "_rpc", None), "_request_queue", None)
    if requests is not None:
        requests.put(None)


class _Consumer:
    """Runs the handler for each received message on the loop and settles the message."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, subscription: str, handler: Handler
    ) -> None:
        self.loop = loop
        self.subscription = subscription
        self.handler = handler
        self.tasks: set[asyncio.Task[None]] = set()
        self.stopping = False

    def receive(self, message: PubSubMessage) -> None:
        """The SDK callback (a client thread): hand over to the loop and return at once."""
        if self.stopping:
            message.nack()
            return
        try:
            self.loop.call_soon_threadsafe(self._start, message)
        except RuntimeError:  # the loop is closed
            message.nack()

    def _start(self, message: PubSubMessage) -> None:
        if self.stopping:
            message.nack()
            return
        delivery = Delivery(
            message_id=message.message_id,
            data=message.data,
            attributes=dict(message.attributes),
            delivery_attempt=message.delivery_attempt or 1,
            subscription=self.subscription,
        )
        task = self.loop.create_task(self._run(delivery))
        self.tasks.add(task)
        task.add_done_callback(lambda done: self._settle(message, delivery, done))

    async def _run(self, delivery: Delivery) -> None:
        await self.handler(delivery)

    def _settle(self, message: PubSubMessage, delivery: Delivery, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        if task.cancelled():
            message.nack()
            return
        error = task.exception()
        if error is None:
            message.ack()
            return
        message.nack()
        nacked = isinstance(error, Nack)
        logger.log(
            logging.INFO if nacked else logging.ERROR,
            "Handler %s message %s on %s (attempt %d)%s",
            "nacked" if nacked else "failed on",
            delivery.message_id,
            self.subscription,
            delivery.delivery_attempt,
            f": {error}" if nacked else "",
            exc_info=None if nacked else error,
            extra={
                "action": "message_nacked" if nacked else "handler_failed",
                "subscription": self.subscription,
                "message_id": delivery.message_id,
                "delivery_attempt": delivery.delivery_attempt,
            },
        )

    async def stop(self, grace: float) -> None:
        """Refuse new messages; cancel running handlers so their messages are nacked."""
        self.stopping = True
        running = set(self.tasks)
        for task in running:
            task.cancel()
        if running:
            await asyncio.wait(running, timeout=grace)
