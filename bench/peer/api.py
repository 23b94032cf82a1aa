"""The peer's HTTP API (``uvicorn bench.peer.api:app``): store the job, start the chain."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import orjson
from celery import chain
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from bench.peer.tasks import draft, outline, research, seo
from core.requests import BlogRequest

_state: dict[str, Any] = {}


def _json(body: object, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


async def generate(request: Request) -> Response:
    try:
        blog = BlogRequest.model_validate_json(await request.body())
    except ValidationError as exc:
        return _json({"detail": exc.errors(include_url=False)}, 422)
    job_id = uuid.uuid4()
    await _state["pool"].execute(
        "INSERT INTO peer_jobs (id, status, request, callback_url) VALUES ($1, 'queued', $2, $3)",
        job_id,
        blog.model_dump_json(),
        blog.callback_url,
    )
    chain(research.s(str(job_id)), outline.s(), draft.s(), seo.s()).apply_async()
    return _json({"job_id": str(job_id), "status": "queued"}, 202)


async def ready(request: Request) -> Response:
    return _json({"ok": True})


@asynccontextmanager
async def lifespan(app: Starlette) -> AsyncIterator[None]:
    _state["pool"] = await asyncpg.create_pool(
        os.environ["PEER_DATABASE_URL"], min_size=2, max_size=10
    )
    yield
    await _state["pool"].close()


app = Starlette(
    routes=[
        Route("/api/v1/blog/generate-enhanced", generate, methods=["POST"]),
        Route("/readyz", ready),
    ],
    lifespan=lifespan,
)
