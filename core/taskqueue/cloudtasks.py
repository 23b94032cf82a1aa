"""The ``cloudtasks`` TaskQueue: one named HTTP task per job, POSTed to the worker endpoint.

The only module that imports google-cloud-tasks. Against the emulator
(``CLOUD_TASKS_EMULATOR_HOST``) it talks plain gRPC through an insecure channel; the
emulator sends no OIDC token and does not de-duplicate task names, which is why the
shared-secret header and the worker endpoint's own de-duplication exist.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import timedelta
from typing import Any
from uuid import UUID

import grpc
import orjson
from google.api_core import exceptions as api_exceptions
from google.api_core.retry import AsyncRetry, if_exception_type
from google.auth import exceptions as auth_exceptions
from google.cloud import tasks_v2
from google.cloud.tasks_v2.services.cloud_tasks.transports import CloudTasksGrpcAsyncIOTransport

from core.errors import ConfigError, TaskQueueError
from core.settings import Settings
from core.taskqueue import task_id

logger = logging.getLogger("blogpipe.taskqueue")

SECRET_HEADER = "X-Worker-Secret"

# Cloud Tasks accepts dispatch deadlines between 15 seconds and 30 minutes for HTTP tasks.
_MIN_DEADLINE = timedelta(seconds=15)
_MAX_DEADLINE = timedelta(minutes=30)

# A named task makes retrying a create safe: if the first attempt landed, the retry
# answers AlreadyExists, which enqueue treats as success.
_TRANSIENT = if_exception_type(api_exceptions.ServiceUnavailable, api_exceptions.DeadlineExceeded)


@dataclass(frozen=True)
class QueueLimits:
    """Rate and retry limits for the queue ``ensure_queue`` creates (the seed's values)."""

    max_dispatches_per_second: float = 100.0
    max_concurrent_dispatches: int = 500
    max_attempts: int = 3
    max_retry_duration: timedelta = timedelta(seconds=3600)


class CloudTasksQueue:
    """Enqueues jobs as Cloud Tasks HTTP tasks named ``job-<id>``."""

    def __init__(
        self,
        settings: Settings,
        *,
        dispatch_deadline: timedelta = timedelta(minutes=15),
        limits: QueueLimits = QueueLimits(),
        rpc_timeout: float = 30.0,
    ) -> None:
        if not _MIN_DEADLINE <= dispatch_deadline <= _MAX_DEADLINE:
            raise ConfigError("dispatch_deadline must be between 15 seconds and 30 minutes")
        self.settings = settings
        self.dispatch_deadline = dispatch_deadline
        self.limits = limits
        self.rpc_timeout = rpc_timeout
        self._client: tasks_v2.CloudTasksAsyncClient | None = None
        self._closed = False

    @property
    def location_path(self) -> str:
        """``projects/P/locations/L``."""
        return (
            f"projects/{self.settings.google_cloud_project}/locations/{self.settings.gcp_location}"
        )

    @property
    def queue_path(self) -> str:
        """``projects/P/locations/L/queues/Q``."""
        return f"{self.location_path}/queues/{self.settings.cloud_tasks_queue_name}"

    def task_name(self, job_id: UUID) -> str:
        """The full task name for a job: ``…/queues/Q/tasks/job-<id>``."""
        return f"{self.queue_path}/tasks/{task_id(job_id)}"

    def build_task(self, job_id: UUID, request: dict[str, Any]) -> tasks_v2.Task:
        """The HTTP task that POSTs ``{"job_id", "request"}`` to the worker endpoint."""
        settings = self.settings
        headers = {"Content-Type": "application/json"}
        if settings.worker_shared_secret:
            headers[SECRET_HEADER] = settings.worker_shared_secret
        http_request = tasks_v2.HttpRequest(
            url=settings.worker_url,
            http_method=tasks_v2.HttpMethod.POST,
            headers=headers,
            body=orjson.dumps({"job_id": str(job_id), "request": request}),
        )
        if settings.cloud_tasks_service_account:
            http_request.oidc_token = tasks_v2.OidcToken(
                service_account_email=settings.cloud_tasks_service_account,
                audience=settings.worker_audience or settings.worker_url,
            )
        return tasks_v2.Task(
            name=self.task_name(job_id),
            http_request=http_request,
            dispatch_deadline=self.dispatch_deadline,
        )

    def build_queue(self) -> tasks_v2.Queue:
        """The queue definition ``ensure_queue`` creates."""
        limits = self.limits
        return tasks_v2.Queue(
            name=self.queue_path,
            rate_limits=tasks_v2.RateLimits(
                max_dispatches_per_second=limits.max_dispatches_per_second,
                max_concurrent_dispatches=limits.max_concurrent_dispatches,
            ),
            retry_config=tasks_v2.RetryConfig(
                max_attempts=limits.max_attempts,
                max_retry_duration=limits.max_retry_duration,
            ),
        )

    async def enqueue(self, job_id: UUID, request: dict[str, Any]) -> None:
        """Create the job's task; an existing task of the same name counts as success."""
        client = self._get_client()
        task = self.build_task(job_id, request)
        retry = AsyncRetry(predicate=_TRANSIENT, initial=0.2, maximum=5.0, timeout=self.rpc_timeout)
        try:
            await client.create_task(
                parent=self.queue_path, task=task, retry=retry, timeout=self.rpc_timeout
            )
        except api_exceptions.AlreadyExists:
            logger.info(
                "Task for job %s already exists; not enqueued again",
                job_id,
                extra={"action": "job_enqueue_duplicate", "job_id": str(job_id)},
            )
            return
        except api_exceptions.GoogleAPIError as exc:
            raise TaskQueueError(
                f"Could not enqueue job {job_id} on {self.queue_path}: {exc}"
            ) from exc
        logger.info(
            "Enqueued job %s on %s",
            job_id,
            self.queue_path,
            extra={"action": "job_enqueued", "job_id": str(job_id), "task": task.name},
        )

    async def ensure_queue(self) -> None:
        """Create the queue with ``limits`` if missing; an existing queue is left as it is."""
        client = self._get_client()
        try:
            await client.create_queue(
                parent=self.location_path, queue=self.build_queue(), timeout=self.rpc_timeout
            )
        except api_exceptions.AlreadyExists:
            return
        except api_exceptions.PermissionDenied as exc:
            # A runtime account may enqueue without being allowed to create queues;
            # an existing queue is all it needs.
            try:
                await client.get_queue(name=self.queue_path, timeout=self.rpc_timeout)
            except api_exceptions.GoogleAPIError:
                raise TaskQueueError(f"Cannot create or read queue {self.queue_path}") from exc
            return
        except api_exceptions.GoogleAPIError as exc:
            raise TaskQueueError(f"Could not create queue {self.queue_path}: {exc}") from exc
        logger.info(
            "Queue %s ready",
            self.queue_path,
            extra={"action": "queue_ensured", "queue": self.queue_path},
        )

    async def close(self) -> None:
        """Close the gRPC channel; later calls raise TaskQueueError."""
        self._closed = True
        client, self._client = self._client, None
        if client is not None:
            await client.transport.close()

    def _get_client(self) -> tasks_v2.CloudTasksAsyncClient:
        # Created lazily, inside the running loop, because grpc.aio channels bind to it.
        if self._closed:
            raise TaskQueueError("The Cloud Tasks queue is closed")
        if self._client is None:
            self._client = self._new_client()
        return self._client

    def _new_client(self) -> tasks_v2.CloudTasksAsyncClient:
        host = self.settings.cloud_tasks_emulator_host
        if host:
            host = host.removeprefix("http://").rstrip("/")
            transport = CloudTasksGrpcAsyncIOTransport(channel=grpc.aio.insecure_channel(host))
            return tasks_v2.CloudTasksAsyncClient(transport=transport)
        try:
            return tasks_v2.CloudTasksAsyncClient()
        except auth_exceptions.GoogleAuthError as exc:
            raise TaskQueueError(f"No Google credentials for Cloud Tasks: {exc}") from exc
