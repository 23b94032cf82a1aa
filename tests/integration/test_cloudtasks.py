"""CloudTasksQueue against the real Cloud Tasks emulator, delivering to a loopback worker."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any
from uuid import UUID

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from api.caller_auth import guarded, worker_authorizer
from core.errors import TaskQueueError
from core.settings import Settings
from core.taskqueue import TaskQueue
from core.taskqueue.cloudtasks import CloudTasksQueue
from tests.support.cloudtasks_emulator import CloudTasksEmulator
from tests.support.waiting import wait_for

pytestmark = pytest.mark.cloudtasks

SECRET = "emulator-secret"
MakeQueue = Callable[..., Awaitable[CloudTasksQueue]]
WORKER_PATH = "/api/v1/blog/worker"


@dataclass(frozen=True)
class Delivery:
    """One POST the worker endpoint received."""

    headers: dict[str, str]
    body: dict[str, Any]


@dataclass
class Receiver:
    """A stand-in worker endpoint: records every attempt and what got past auth."""

    url: str = ""
    attempts: list[Delivery] = field(default_factory=list)
    accepted: list[Delivery] = field(default_factory=list)
    fail_once: set[str] = field(default_factory=set)

    def for_job(self, job_id: UUID) -> list[Delivery]:
        return [d for d in self.accepted if d.body.get("job_id") == str(job_id)]


@pytest.fixture(scope="module")
async def receiver() -> AsyncIterator[Receiver]:
    state = Receiver()
    authorize = worker_authorizer(Settings(worker_shared_secret=SECRET))

    async def record_attempt(request: Request) -> Response:
        state.attempts.append(Delivery(dict(request.headers), await request.json()))
        return await guarded(authorize, worker)(request)

    async def worker(request: Request) -> Response:
        body = await request.json()
        if not body.get("job_id"):
            return JSONResponse({"error": "job_id is required"}, status_code=400)
        if body["job_id"] in state.fail_once:
            state.fail_once.discard(body["job_id"])
            return JSONResponse({"error": "try again"}, status_code=503)
        state.accepted.append(Delivery(dict(request.headers), body))
        return JSONResponse({"status": "processing", "job_id": body["job_id"]})

    app = Starlette(routes=[Route(WORKER_PATH, record_attempt, methods=["POST"])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    state.url = f"http://127.0.0.1:{sock.getsockname()[1]}{WORKER_PATH}"
    config = uvicorn.Config(
        app, log_level="warning", lifespan="off", ws="none", http="h11", access_log=False
    )
    server = uvicorn.Server(config)
    serving = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_for(lambda: _now(server.started), timeout=10, message="uvicorn to start")
        yield state
    finally:
        server.should_exit = True
        await asyncio.wait_for(serving, timeout=10)
        sock.close()


def settings_for(emulator: CloudTasksEmulator, receiver: Receiver, **changes: Any) -> Settings:
    """Settings pointing a fresh queue of the emulator at the receiver."""
    base = Settings(
        task_queue="cloudtasks",
        cloud_tasks_emulator_host=emulator.host,
        google_cloud_project="blogpipe-test",
        gcp_location="europe-west1",
        cloud_tasks_queue_name=f"blog-q-{uuid.uuid4().hex[:8]}",
        cloud_run_worker_url=receiver.url,
        worker_shared_secret=SECRET,
    )
    return base.with_changes(**changes)


@pytest.fixture
async def make_queue(
    cloudtasks_emulator: CloudTasksEmulator, receiver: Receiver
) -> AsyncIterator[MakeQueue]:
    queues: list[CloudTasksQueue] = []

    async def make(**changes: Any) -> CloudTasksQueue:
        queue = CloudTasksQueue(settings_for(cloudtasks_emulator, receiver, **changes))
        queues.append(queue)
        await asyncio.wait_for(queue.ensure_queue(), timeout=15)
        return queue

    yield make
    for queue in queues:
        await asyncio.wait_for(queue.close(), timeout=10)


async def test_enqueue_posts_the_job_to_the_worker(
    make_queue: MakeQueue, receiver: Receiver
) -> None:
    queue = await make_queue()
    assert isinstance(queue, TaskQueue)
    job = uuid.uuid4()
    await asyncio.wait_for(queue.enqueue(job, {"topic": "Tea", "keywords": ["tea"]}), timeout=15)

    deliveries = await wait_for(
        lambda: _now(receiver.for_job(job)), timeout=15, message="the task to be delivered"
    )
    delivery = deliveries[0]
    assert delivery.body == {"job_id": str(job), "request": {"topic": "Tea", "keywords": ["tea"]}}
    assert delivery.headers["x-worker-secret"] == SECRET
    assert delivery.headers["content-type"] == "application/json"
    assert delivery.headers["x-cloudtasks-taskname"] == f"job-{job}"
    assert delivery.headers["x-cloudtasks-queuename"] == queue.queue_path


async def test_ensure_queue_is_idempotent_and_sets_limits(make_queue: MakeQueue) -> None:
    queue = await make_queue()
    await asyncio.wait_for(queue.ensure_queue(), timeout=15)
    await asyncio.wait_for(queue.ensure_queue(), timeout=15)
    stored = await asyncio.wait_for(queue._get_client().get_queue(name=queue.queue_path), 15)
    assert stored.rate_limits.max_dispatches_per_second == 100
    assert stored.rate_limits.max_concurrent_dispatches == 500
    assert stored.retry_config.max_attempts == 3
    assert stored.retry_config.max_retry_duration == timedelta(seconds=3600)


async def test_second_enqueue_of_a_job_is_not_an_error(
    make_queue: MakeQueue, receiver: Receiver
) -> None:
    queue = await make_queue()
    job = uuid.uuid4()
    await asyncio.wait_for(queue.enqueue(job, {"topic": "Once"}), timeout=15)
    await asyncio.wait_for(queue.enqueue(job, {"topic": "Once"}), timeout=15)
    # The emulator does not de-duplicate names (real Cloud Tasks does); the worker
    # endpoint does. Every delivery carries the same task name.
    deliveries = await wait_for(lambda: _now(receiver.for_job(job)), timeout=15, message="delivery")
    assert {d.headers["x-cloudtasks-taskname"] for d in deliveries} == {f"job-{job}"}


async def test_failed_delivery_is_retried(make_queue: MakeQueue, receiver: Receiver) -> None:
    queue = await make_queue()
    job = uuid.uuid4()
    receiver.fail_once.add(str(job))
    await asyncio.wait_for(queue.enqueue(job, {"topic": "Retry"}), timeout=15)
    deliveries = await wait_for(lambda: _now(receiver.for_job(job)), timeout=15, message="retry")
    assert deliveries[0].headers["x-cloudtasks-taskretrycount"] == "1"


async def test_wrong_secret_is_refused_by_the_worker(
    make_queue: MakeQueue, receiver: Receiver
) -> None:
    queue = await make_queue(worker_shared_secret="not-the-secret")
    job = uuid.uuid4()
    await asyncio.wait_for(queue.enqueue(job, {"topic": "Intruder"}), timeout=15)
    await wait_for(
        lambda: _now([a for a in receiver.attempts if a.body.get("job_id") == str(job)]),
        timeout=15,
        message="the refused attempt",
    )
    assert receiver.for_job(job) == []


async def test_oidc_task_is_accepted_by_the_emulator(
    make_queue: MakeQueue, receiver: Receiver
) -> None:
    queue = await make_queue(
        cloud_tasks_service_account="tasks@blogpipe-test.iam.gserviceaccount.com"
    )
    job = uuid.uuid4()
    task = queue.build_task(job, {})
    assert task.http_request.oidc_token.service_account_email.startswith("tasks@")
    assert task.http_request.oidc_token.audience == receiver.url
    assert task.dispatch_deadline == timedelta(minutes=15)
    assert task.name == f"{queue.queue_path}/tasks/job-{job}"
    await asyncio.wait_for(queue.enqueue(job, {}), timeout=15)
    # The emulator sends no OIDC token, so the shared secret is what gets it in.
    deliveries = await wait_for(lambda: _now(receiver.for_job(job)), timeout=15, message="delivery")
    assert "authorization" not in deliveries[0].headers


async def test_missing_queue_raises_task_queue_error(
    cloudtasks_emulator: CloudTasksEmulator, receiver: Receiver
) -> None:
    queue = CloudTasksQueue(settings_for(cloudtasks_emulator, receiver))
    try:
        with pytest.raises(TaskQueueError, match="Could not enqueue"):
            await asyncio.wait_for(queue.enqueue(uuid.uuid4(), {}), timeout=15)
    finally:
        await asyncio.wait_for(queue.close(), timeout=10)


async def test_unreachable_emulator_raises_task_queue_error(receiver: Receiver) -> None:
    settings = Settings(
        cloud_tasks_emulator_host=f"127.0.0.1:{_closed_port()}", cloud_run_worker_url=receiver.url
    )
    queue = CloudTasksQueue(settings, rpc_timeout=1.0)
    try:
        with pytest.raises(TaskQueueError):
            await asyncio.wait_for(queue.enqueue(uuid.uuid4(), {}), timeout=15)
    finally:
        await asyncio.wait_for(queue.close(), timeout=10)
    with pytest.raises(TaskQueueError, match="closed"):
        await queue.enqueue(uuid.uuid4(), {})


def _closed_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def _now(value: Any) -> Any:
    return value
