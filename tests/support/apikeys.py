"""An API app in ``BLOGPIPE_AUTH=apikey`` mode with webhook routes, and keys for tenants."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from typing import Any
from uuid import UUID

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from api.app import create_app
from api.caller_auth import worker_authorizer
from api.deps import ApiDeps
from api.operations import routes as operation_routes
from api.webhooks import webhook_routes
from core.broker.postgres import PostgresBroker
from core.db.apikeys import SCOPES, ApiKeyRepository
from core.db.jobs import JobRepository
from core.db.pipeline import PipelineStore
from core.dispatch import Dispatcher
from core.requests import BlogRequest
from core.settings import Settings

WORKER_SECRET = "test-worker-secret"
VALID = {"topic": "Best presents for teenagers", "keywords": ["gifts for teens"]}


class RecordingQueue:
    """A task queue that records what it was asked to enqueue."""

    def __init__(self) -> None:
        self.enqueued: list[UUID] = []

    async def enqueue(self, job_id: UUID, request: dict[str, Any]) -> None:
        self.enqueued.append(job_id)


def secure_settings(**changes: Any) -> Settings:
    """API-key mode with generous limits unless a test narrows them."""
    base: dict[str, Any] = {
        "worker_shared_secret": WORKER_SECRET,
        "auth": "apikey",
        "rate_limit_per_second": 0.0,
        "max_in_flight": 0,
        "webhook_allowed_hosts": ("127.0.0.1", "localhost"),
        "webhook_allow_http": True,
    }
    base.update(changes)
    return Settings(**base)


def build_app(
    engine: AsyncEngine, settings: Settings, queue: RecordingQueue | None = None
) -> Starlette:
    store = PipelineStore(engine, Dispatcher(engine, PostgresBroker(engine)))

    async def inline(request: BlogRequest) -> dict[str, Any]:
        return {"title": request.topic, "success": True}

    routes = webhook_routes(
        engine, settings, allowed_hosts=settings.webhook_allowed_hosts, allow_http=True
    )
    deps = ApiDeps(
        settings=settings,
        engine=engine,
        jobs=JobRepository(engine),
        store=store,
        task_queue=queue or RecordingQueue(),
        worker_auth=worker_authorizer(settings),
        run_inline=inline,
        extra_routes=[*routes, *operation_routes],
    )
    return create_app(deps)


@asynccontextmanager
async def client_for(app: Starlette, key: str | None = None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://test", timeout=10, headers=headers
    ) as client:
        yield client


async def make_key(engine: AsyncEngine, tenant: str, scopes: Iterable[str] = SCOPES) -> str:
    _, secret = await ApiKeyRepository(engine).create(tenant, scopes)
    return secret
