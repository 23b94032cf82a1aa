"""When to try a webhook again: the schedule with jitter, Retry-After, what counts as success."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Final

RETRY_AFTER_STATUSES: Final = frozenset({429, 503})
GONE: Final = 410


def is_success(status_code: int | None) -> bool:
    """Any 2xx; a 3xx is a failure because redirects are not followed."""
    return status_code is not None and 200 <= status_code < 300


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date).

    None when the header is absent or unreadable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - (now or datetime.now(UTC))).total_seconds()
    if seconds != seconds:  # NaN
        return None
    return max(0.0, seconds)


@dataclass(frozen=True)
class RetryPolicy:
    """The retry schedule: ``schedule[n]`` is the wait before attempt ``n + 1`` (the first is
    usually 0, "immediately"), each with ±``jitter``; after the last one the delivery fails."""

    schedule: tuple[float, ...]
    jitter: float = 0.2
    max_retry_after: float = 3600.0
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    @classmethod
    def from_schedule(cls, schedule: Sequence[float], **kwargs: float) -> RetryPolicy:
        if not schedule:
            raise ValueError("the webhook retry schedule needs at least one entry")
        return cls(tuple(float(s) for s in schedule), **kwargs)  # type: ignore[arg-type]

    @property
    def max_attempts(self) -> int:
        return len(self.schedule)

    def jittered(self, seconds: float) -> float:
        """``seconds`` scaled by a random factor in [1 - jitter, 1 + jitter]."""
        return seconds * self.rng.uniform(1.0 - self.jitter, 1.0 + self.jitter)

    def delay_after(self, attempt: int, *, retry_after: float | None = None) -> float | None:
        """Seconds before the next attempt once attempt ``attempt`` (1-based) failed, or None
        when the schedule is exhausted. A ``Retry-After`` (clamped) can only lengthen the wait."""
        if attempt >= self.max_attempts:
            return None
        delay = self.jittered(self.schedule[attempt])
        if retry_after is not None:
            delay = max(delay, min(retry_after, self.max_retry_after))
        return delay
