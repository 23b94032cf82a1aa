"""Create the pipeline's topics and subscriptions on any Broker, idempotently.

Every topic gets a dead-letter topic and a subscription draining it; every stage
gets its worker subscription and the notifier its events subscription. With a
``push_endpoint`` the stage subscriptions, and the dead-letter subscriptions of the
stage topics, become push subscriptions to ``{push_endpoint}/pubsub/push/{subscription}``
(stages served by ``api.push``, e.g. on Cloud Run); the notifier's stay pull.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from core.broker import Broker, SubscriptionSpec
from core.constants import (
    EVENTS_TOPIC,
    NOTIFIER_SUBSCRIPTION,
    STAGES,
    dead_letter_subscription,
    dead_letter_topic,
    stage_subscription,
    stage_topic,
)

PUSH_PATH = "/pubsub/push"


@dataclass(frozen=True)
class Ensured:
    """One topic or subscription that ``provision`` made sure exists."""

    kind: Literal["topic", "subscription"]
    name: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.kind} {self.name}" + (f" ({self.detail})" if self.detail else "")


def push_url(push_endpoint: str, subscription: str) -> str:
    """Where a push subscription delivers: ``{push_endpoint}/pubsub/push/{subscription}``."""
    return f"{push_endpoint.rstrip('/')}{PUSH_PATH}/{subscription}"


def pipeline_topics() -> tuple[str, ...]:
    """Every topic the pipeline publishes to: one per stage, then the job events."""
    return (*(stage_topic(stage) for stage in STAGES), EVENTS_TOPIC)


async def provision(
    broker: Broker,
    *,
    max_delivery_attempts: int,
    ack_deadline_seconds: float,
    min_backoff: float,
    max_backoff: float,
    push_endpoint: str | None = None,
) -> list[Ensured]:
    """Ensure the whole topology exists on ``broker``; return what was ensured, in order.

    Safe to run any number of times: existing topics and subscriptions are kept.
    """
    ensured: list[Ensured] = []

    async def subscription(spec: SubscriptionSpec) -> None:
        await broker.ensure_subscription(spec)
        ensured.append(Ensured("subscription", spec.name, _describe(spec)))

    def consumer(name: str, topic: str, push: str | None) -> SubscriptionSpec:
        return SubscriptionSpec(
            name=name,
            topic=topic,
            max_delivery_attempts=max_delivery_attempts,
            dead_letter_topic=dead_letter_topic(topic),
            ack_deadline_seconds=ack_deadline_seconds,
            min_backoff_seconds=min_backoff,
            max_backoff_seconds=max_backoff,
            push_endpoint=push,
        )

    stage_topics = {stage_topic(stage) for stage in STAGES}
    for topic in pipeline_topics():
        dead_letters = dead_letter_topic(topic)
        name = dead_letter_subscription(topic)
        for each in (topic, dead_letters):
            await broker.ensure_topic(each)
            ensured.append(Ensured("topic", each))
        # The stage runner drains a stage's dead letters (it fails the job), so in push
        # mode they are pushed too. A dead letter has nowhere further to go: the
        # subscription draining it has no dead-letter topic of its own.
        push = push_url(push_endpoint, name) if push_endpoint and topic in stage_topics else None
        await subscription(
            SubscriptionSpec(
                name=name,
                topic=dead_letters,
                max_delivery_attempts=max_delivery_attempts,
                ack_deadline_seconds=ack_deadline_seconds,
                min_backoff_seconds=min_backoff,
                max_backoff_seconds=max_backoff,
                push_endpoint=push,
            )
        )

    for stage in STAGES:
        name = stage_subscription(stage)
        push = push_url(push_endpoint, name) if push_endpoint else None
        await subscription(consumer(name, stage_topic(stage), push))
    await subscription(consumer(NOTIFIER_SUBSCRIPTION, EVENTS_TOPIC, None))
    return ensured


def _describe(spec: SubscriptionSpec) -> str:
    parts = [f"on {spec.topic}"]
    if spec.dead_letter_topic:
        parts.append(
            f"dead-letters to {spec.dead_letter_topic} after {spec.max_delivery_attempts} attempts"
        )
    parts.append(f"push to {spec.push_endpoint}" if spec.push_endpoint else "pull")
    return ", ".join(parts)
