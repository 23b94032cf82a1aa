"""The ``local`` TaskQueue: runs the worker logic in-process as a background asyncio task.

Nothing survives a restart here; jobs are durable in Postgres and the worker logic
is what de-duplicates. This queue only refuses to start a job twice while the first
run is still going.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from uuid import UUID

from core.errors import TaskQueueError
from core.taskqueue import StartJob

logger = logging.getLogger("blogpipe.taskqueue")


class LocalTaskQueue:
    """Hands each job straight to ``start_job`` in a background task."""

    def __init__(self, start_job: StartJob, *, close_timeout: float = 10.0) -> None:
        self.start_job = start_job
        self.close_timeout = close_timeout
        # Strong references: the event loop keeps only weak ones to running tasks.
        self._tasks: dict[UUID, asyncio.Task[None]] = {}
        self._closed = False

    @property
    def pending(self) -> int:
        """How many jobs are still running."""
        return len(self._tasks)

    async def enqueue(self, job_id: UUID, request: dict[str, Any]) -> None:
        """Start the job in the background; a job already running is not started again."""
        if self._closed:
            raise TaskQueueError("The local task queue is closed")
        if job_id in self._tasks:
            logger.info(
                "Job %s is already running; not started again",
                job_id,
                extra={"action": "job_enqueue_duplicate", "job_id": str(job_id)},
            )
            return
        task = asyncio.create_task(self._run(job_id), name=f"job-{job_id}")
        self._tasks[job_id] = task
        task.add_done_callback(lambda done: self._finished(job_id, done))
        # DEBUG: the start itself logs "Job … started" (or why it did not start).
        logger.debug(
            "Started job %s in-process",
            job_id,
            extra={"action": "job_enqueued", "job_id": str(job_id)},
        )

    async def ensure_queue(self) -> None:
        """Nothing to create."""

    async def join(self) -> None:
        """Wait until every job started so far has finished (tests use it to drain)."""
        while self._tasks:
            await asyncio.wait(list(self._tasks.values()))

    async def close(self) -> None:
        """Refuse new jobs, give running ones ``close_timeout`` seconds, then cancel them."""
        self._closed = True
        tasks = list(self._tasks.values())
        if not tasks:
            return
        _, still_running = await asyncio.wait(tasks, timeout=self.close_timeout)
        for task in still_running:
            task.cancel()
        if still_running:
            logger.warning(
                "Cancelled %d in-process job(s) at shutdown",
                len(still_running),
                extra={"action": "local_jobs_cancelled", "count": len(still_running)},
            )
            await asyncio.wait(still_running)

    async def _run(self, job_id: UUID) -> None:
        await self.start_job(job_id)

    def _finished(self, job_id: UUID, task: asyncio.Task[None]) -> None:
        if self._tasks.get(job_id) is task:
            del self._tasks[job_id]
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None:
            logger.error(
                "In-process job %s failed: %s",
                job_id,
                exc,
                exc_info=exc,
                extra={"action": "local_job_failed", "job_id": str(job_id)},
            )
