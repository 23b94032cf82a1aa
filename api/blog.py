"""The seed-compatible blog API: generate (sync and async), job status, job list, worker."""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.callbacks import check_callback
from api.deps import ApiDeps
from api.responses import JSONResponse, detail, error
from api.validation import BadRequest, read_json, validate
from core.constants import JOB_STATUSES
from core.errors import BlogpipeError
from core.requests import BlogRequest

logger = logging.getLogger("blogpipe.api")

QUEUED_MESSAGE = "Blog generation job queued successfully"
MAX_PAGE = 200


def _deps(request: Request) -> ApiDeps:
    return request.app.state.deps  # type: ignore[no-any-return]


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name)
    if raw is None:
        return False
    value = raw.strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    message = f"Query parameter {name} must be a boolean, got {raw!r}"
    raise BadRequest(detail(422, message), message)


def _job_id(raw: str) -> UUID | None:
    try:
        return UUID(raw)
    except ValueError:
        return None


async def generate_enhanced(request: Request) -> Response:
    """POST /api/v1/blog/generate-enhanced — sync by default, ``?async_mode=true`` queues."""
    deps = _deps(request)
    try:
        async_mode = _flag(request, "async_mode")
        body = await read_json(request, max_bytes=deps.settings.max_body_bytes)
        blog = validate(BlogRequest, body)
        await check_callback(blog, deps.settings)
    except BadRequest as bad:
        return bad.response
    if not async_mode:
        if deps.run_inline is None:
            return detail(503, "Synchronous generation is not available here; use async_mode=true")
        return JSONResponse(await deps.run_inline(blog))
    key = request.headers.get("idempotency-key")
    if key is not None:
        from api.operations import idempotent_job

        created = await idempotent_job(request, blog, key)
        if isinstance(created, Response):
            return created
        job = created
    else:
        job = await deps.jobs.create(blog, tenant=request.state.tenant)
    try:
        await deps.task_queue.enqueue(job.id, blog.model_dump(mode="json"))
    except BlogpipeError as exc:
        logger.error(
            "Could not enqueue job %s: %s",
            job.id,
            exc,
            extra={"action": "enqueue_failed", "job_id": str(job.id)},
        )
        await deps.store.fail_job_unstarted(job.id, f"Job could not be queued: {exc}")
        return detail(503, "The job could not be queued; try again shortly", job_id=str(job.id))
    logger.info("Job %s queued", job.id, extra={"action": "job_queued", "job_id": str(job.id)})
    estimate = await deps.jobs.estimated_seconds()
    return JSONResponse(
        {
            "job_id": str(job.id),
            "status": "queued",
            "message": QUEUED_MESSAGE,
            "estimated_completion_time": int(round(estimate)),
        },
        status_code=202,
    )


async def job_status(request: Request) -> Response:
    """GET /api/v1/blog/jobs/{job_id}"""
    raw = request.path_params["job_id"]
    job_id = _job_id(raw)
    jobs = _deps(request).jobs
    body = await jobs.poll_body(job_id, tenant=request.state.tenant) if job_id else None
    if body is None:
        return detail(404, f"Job {raw} not found")
    return Response(body, media_type="application/json")


async def list_jobs(request: Request) -> Response:
    """GET /api/v1/blog/jobs?status=&limit=&cursor= — newest first, cursor paginated."""
    params = request.query_params
    status = params.get("status")
    if status is not None and status not in JOB_STATUSES:
        return detail(422, f"status must be one of {', '.join(JOB_STATUSES)}")
    try:
        limit = int(params.get("limit", "50"))
    except ValueError:
        return detail(422, "limit must be an integer")
    if not 1 <= limit <= MAX_PAGE:
        return detail(422, f"limit must be between 1 and {MAX_PAGE}")
    try:
        jobs, cursor = await _deps(request).jobs.page(
            tenant=request.state.tenant, status=status, limit=limit, cursor=params.get("cursor")
        )
    except ValueError:
        return detail(422, "cursor is not valid; use next_cursor from a previous page")
    items: list[dict[str, Any]] = [
        {
            "job_id": str(job.id),
            "status": job.status,
            "progress_percentage": job.progress_percentage,
            "current_stage": job.current_stage,
            "topic": job.request.get("topic"),
            "created_at": job.created_at.isoformat(),
            "completed_at": job.completed_at.isoformat() if job.completed_at else None,
            "error_message": job.error_message,
            "metadata": job.metadata,
        }
        for job in jobs
    ]
    return JSONResponse({"jobs": items, "next_cursor": cursor})


async def worker(request: Request) -> Response:
    """POST /api/v1/blog/worker — Cloud Tasks only: start the job's pipeline."""
    deps = _deps(request)
    rejected = await deps.worker_auth(request)
    if rejected is not None:
        return rejected
    try:
        body = await read_json(request)
    except BadRequest as bad:
        return error(bad.status_code, bad.message)
    raw = body.get("job_id") if isinstance(body, dict) else None
    if not raw:
        return error(400, "job_id is required")
    job_id = _job_id(str(raw))
    if job_id is None:
        return error(404, f"Job {raw} not found")
    outcome = await deps.store.start_job(job_id)
    if outcome == "missing":
        return error(404, f"Job {raw} not found")
    task = request.headers.get("x-cloudtasks-taskname")
    logger.info(
        "Worker call for job %s: %s",
        job_id,
        outcome,
        extra={"action": "worker_called", "job_id": str(job_id), "outcome": outcome, "task": task},
    )
    return JSONResponse({"job_id": str(job_id), "status": "processing", "outcome": outcome})


# The router tries routes in order: the one clients poll goes first.
routes = [
    Route("/api/v1/blog/jobs/{job_id}", job_status, methods=["GET"]),
    Route("/api/v1/blog/generate-enhanced", generate_enhanced, methods=["POST"]),
    Route("/api/v1/blog/worker", worker, methods=["POST"]),
    Route("/api/v1/blog/jobs", list_jobs, methods=["GET"]),
]
