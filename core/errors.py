"""The one exception root of blogpipe, and its families."""

from __future__ import annotations


class BlogpipeError(Exception):
    """Root of every error blogpipe raises on purpose."""


class ConfigError(BlogpipeError):
    """A setting is missing or invalid; the message names the environment variable."""


class BrokerError(BlogpipeError):
    """A broker could not publish, subscribe or acknowledge."""


class TaskQueueError(BlogpipeError):
    """The task queue could not enqueue a job."""


class StageError(BlogpipeError):
    """A stage failed. `retryable` says whether another attempt may succeed."""

    retryable: bool = True

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class RetryableError(StageError):
    """Timeouts, rate limits, 5xx, connection errors, invalid structured output."""

    retryable = True


class PermanentError(StageError):
    """Errors another attempt cannot fix: refusals, content filters, bad requests."""

    retryable = False


class JobNotFound(BlogpipeError):
    """No job with that id (for this tenant)."""

    def __init__(self, job_id: object) -> None:
        super().__init__(f"Job {job_id} not found")
        self.job_id = job_id


class ConflictError(BlogpipeError):
    """The request conflicts with the job's current state (e.g. cancelling a finished job)."""
