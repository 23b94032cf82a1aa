"""Names shared by every deployable: stages, topics, subscriptions, statuses, progress points."""

from __future__ import annotations

from typing import Final

STAGES: Final = ("research", "outline", "draft", "seo")
TOTAL_STAGES: Final = len(STAGES)

JOB_STATUSES: Final = ("pending", "queued", "processing", "completed", "failed", "cancelled")
FINISHED_STATUSES: Final = frozenset({"completed", "failed", "cancelled"})

EVENTS_TOPIC: Final = "blog-job-events"
NOTIFIER_SUBSCRIPTION: Final = "blog-job-events-notifier"

# Progress shown when a stage starts and when it finishes; "completed" is 100.
STAGE_PROGRESS: Final = {
    "research": (5.0, 25.0),
    "outline": (30.0, 45.0),
    "draft": (50.0, 80.0),
    "seo": (85.0, 95.0),
}


def stage_topic(stage: str) -> str:
    """The topic a stage consumes, e.g. ``blog-draft``."""
    return f"blog-{stage}"


def stage_subscription(stage: str) -> str:
    """The subscription a stage's subscriber pulls from."""
    return f"blog-{stage}-worker"


def dead_letter_topic(topic: str) -> str:
    """The dead-letter topic for a topic."""
    return f"{topic}-dead-letter"


def dead_letter_subscription(topic: str) -> str:
    """The subscription that drains a topic's dead-letter topic."""
    return f"{topic}-dead-letter-sub"


def next_stage(stage: str) -> str | None:
    """The stage after ``stage``, or None after the last one."""
    index = STAGES.index(stage)
    return STAGES[index + 1] if index + 1 < len(STAGES) else None


def stage_number(stage: str) -> int:
    """1-based position of a stage."""
    return STAGES.index(stage) + 1
