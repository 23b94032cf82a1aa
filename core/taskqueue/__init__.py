"""The TaskQueue port: hand a stored job to the worker endpoint exactly once per job id.

Two adapters: ``cloudtasks`` (google-cloud-tasks, an HTTP task that POSTs
``{"job_id", "request"}`` to the worker endpoint) and ``local`` (the worker logic runs
in-process as a background task). Both accept a second enqueue of the same job without
error; the worker endpoint remains the final de-duplicator (the Cloud Tasks emulator,
unlike the real service, does not de-duplicate task names).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable
from uuid import UUID

if TYPE_CHECKING:
    from core.settings import Settings

StartJob = Callable[[UUID], Awaitable[None]]
"""The in-process worker logic the ``local`` queue calls with a job id."""


def task_id(job_id: UUID) -> str:
    """The task id used for a job (``job-<uuid>``); its name de-duplicates enqueues."""
    return f"job-{job_id}"


@runtime_checkable
class TaskQueue(Protocol):
    """Enqueues a stored job so the worker picks it up."""

    async def enqueue(self, job_id: UUID, request: dict[str, Any]) -> None:
        """Enqueue the job; a duplicate enqueue of the same job is not an error."""

    async def ensure_queue(self) -> None:
        """Create the queue if it does not exist (idempotent)."""

    async def close(self) -> None:
        """Release clients and background tasks."""


def build_task_queue(settings: Settings, *, start_job: StartJob) -> TaskQueue:
    """The adapter ``settings.task_queue`` selects (the SDK is imported only when needed)."""
    if settings.task_queue == "cloudtasks":
        from core.taskqueue.cloudtasks import CloudTasksQueue

        return CloudTasksQueue(settings)
    from core.taskqueue.local import LocalTaskQueue

    return LocalTaskQueue(start_job)
