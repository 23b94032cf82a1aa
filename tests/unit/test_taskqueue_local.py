"""The in-process task queue: runs jobs in the background, once each, and shuts down cleanly."""

from __future__ import annotations

import asyncio
import logging
import uuid
from uuid import UUID

import pytest

from core.errors import TaskQueueError
from core.settings import Settings
from core.taskqueue import TaskQueue, build_task_queue, task_id
from core.taskqueue.local import LocalTaskQueue
from tests.support.waiting import wait_for


class Recorder:
    """A fake worker: records job ids and blocks each job until released."""

    def __init__(self, *, block: bool = False, fail: bool = False) -> None:
        self.started: list[UUID] = []
        self.finished: list[UUID] = []
        self.cancelled: list[UUID] = []
        self.release = asyncio.Event()
        if not block:
            self.release.set()
        self.fail = fail

    async def __call__(self, job_id: UUID) -> None:
        self.started.append(job_id)
        try:
            await self.release.wait()
        except asyncio.CancelledError:
            self.cancelled.append(job_id)
            raise
        if self.fail:
            raise RuntimeError(f"boom {job_id}")
        self.finished.append(job_id)


async def test_enqueue_runs_the_job_in_the_background() -> None:
    worker = Recorder(block=True)
    queue = LocalTaskQueue(worker)
    job = uuid.uuid4()
    await queue.enqueue(job, {"topic": "t"})
    assert queue.pending == 1
    await wait_for(lambda: _async(worker.started == [job]), timeout=5, message="job start")
    worker.release.set()
    await asyncio.wait_for(queue.join(), timeout=5)
    assert worker.finished == [job]
    assert queue.pending == 0
    await asyncio.wait_for(queue.close(), timeout=5)


async def test_duplicate_enqueue_while_running_is_ignored() -> None:
    worker = Recorder(block=True)
    queue = LocalTaskQueue(worker)
    job = uuid.uuid4()
    await queue.enqueue(job, {})
    await queue.enqueue(job, {})
    worker.release.set()
    await asyncio.wait_for(queue.join(), timeout=5)
    assert worker.finished == [job]
    await asyncio.wait_for(queue.close(), timeout=5)


async def test_failures_are_logged_not_raised(caplog: pytest.LogCaptureFixture) -> None:
    worker = Recorder(fail=True)
    queue = LocalTaskQueue(worker)
    job = uuid.uuid4()
    with caplog.at_level(logging.ERROR, logger="blogpipe.taskqueue"):
        await queue.enqueue(job, {})
        await asyncio.wait_for(queue.join(), timeout=5)
    failed = [r for r in caplog.records if getattr(r, "action", None) == "local_job_failed"]
    assert len(failed) == 1
    assert failed[0].job_id == str(job)  # type: ignore[attr-defined]
    assert failed[0].exc_info is not None
    await asyncio.wait_for(queue.close(), timeout=5)


async def test_close_waits_for_running_jobs() -> None:
    worker = Recorder(block=True)
    queue = LocalTaskQueue(worker, close_timeout=5)
    job = uuid.uuid4()
    await queue.enqueue(job, {})
    await wait_for(lambda: _async(bool(worker.started)), timeout=5, message="job start")
    closing = asyncio.create_task(queue.close())
    worker.release.set()
    await asyncio.wait_for(closing, timeout=5)
    assert worker.finished == [job]
    assert worker.cancelled == []


async def test_close_cancels_jobs_that_overrun(caplog: pytest.LogCaptureFixture) -> None:
    worker = Recorder(block=True)
    queue = LocalTaskQueue(worker, close_timeout=0.05)
    job = uuid.uuid4()
    await queue.enqueue(job, {})
    await wait_for(lambda: _async(bool(worker.started)), timeout=5, message="job start")
    with caplog.at_level(logging.WARNING, logger="blogpipe.taskqueue"):
        await asyncio.wait_for(queue.close(), timeout=5)
    assert worker.cancelled == [job]
    assert queue.pending == 0
    assert any(getattr(r, "action", None) == "local_jobs_cancelled" for r in caplog.records)


async def test_enqueue_after_close_is_refused() -> None:
    queue = LocalTaskQueue(Recorder())
    await queue.close()
    with pytest.raises(TaskQueueError):
        await queue.enqueue(uuid.uuid4(), {})


async def test_ensure_queue_is_a_no_op() -> None:
    queue = LocalTaskQueue(Recorder())
    await queue.ensure_queue()
    await queue.ensure_queue()
    await queue.close()


def test_build_task_queue_picks_the_adapter() -> None:
    local = build_task_queue(Settings(task_queue="local"), start_job=Recorder())
    assert isinstance(local, LocalTaskQueue)
    assert isinstance(local, TaskQueue)
    cloud = build_task_queue(Settings(task_queue="cloudtasks"), start_job=Recorder())
    assert type(cloud).__name__ == "CloudTasksQueue"
    assert isinstance(cloud, TaskQueue)


def test_task_id_names_the_job() -> None:
    job = UUID("12345678-1234-5678-1234-567812345678")
    assert task_id(job) == "job-12345678-1234-5678-1234-567812345678"


async def _async(value: bool) -> bool:
    return value
