"""What the app needs from outside, handed in by the CLI that wires the deployables."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Protocol
from uuid import UUID

from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute

from core.db.jobs import JobRepository
from core.db.pipeline import PipelineStore
from core.requests import BlogRequest
from core.settings import Settings

Authorizer = Callable[[Request], Awaitable[Response | None]]
"""Returns a response to reject the caller, or None to let it in."""

InlineRunner = Callable[[BlogRequest], Awaitable[dict[str, Any]]]
"""Runs the four stages in-process and returns the result (sync mode)."""


class JobQueue(Protocol):
    """The slice of the TaskQueue port the API uses."""

    async def enqueue(self, job_id: UUID, request: dict[str, Any]) -> None: ...


@dataclass
class ApiDeps:
    """Everything the API's handlers use."""

    settings: Settings
    engine: AsyncEngine
    jobs: JobRepository
    store: PipelineStore
    task_queue: JobQueue
    worker_auth: Authorizer
    run_inline: InlineRunner | None = None
    extra_routes: list[BaseRoute] = field(default_factory=list)
