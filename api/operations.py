"""Operator endpoints: replay and cancel a job, bulk replay by filter, batch submit and poll.

Handlers take the tenant from ``request.state.tenant`` and the actor from
``request.state.actor`` when an authentication layer set them (else the actor is "api").
"""

from __future__ import annotations

import logging
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from api.auth import actor_of
from api.callbacks import check_callback
from api.deps import ApiDeps
from api.responses import JSONResponse, detail
from api.validation import BadRequest, read_json, validate
from core.db import audit
from core.db.batches import MAX_BATCH, BatchRepository
from core.db.idempotency import IdempotencyMismatch, IdempotencyStore, valid_key
from core.db.jobs import JobRecord
from core.db.operations import (
    InvalidOperation,
    JobFilter,
    OperationsStore,
    check_duration,
    parse_duration,
)
from core.errors import BlogpipeError, ConflictError, JobNotFound
from core.requests import CALLBACK_EVENTS, BlogRequest

logger = logging.getLogger("blogpipe.api")

Stage = Literal["research", "outline", "draft", "seo"]
Status = Literal["pending", "queued", "processing", "completed", "failed", "cancelled"]


class ReplayBody(BaseModel):
    """``POST /jobs/{id}/replay``: where to start again, and why."""

    model_config = ConfigDict(extra="forbid")
    from_stage: Stage | None = None
    reason: str | None = Field(default=None, max_length=500)


class CancelBody(BaseModel):
    """``POST /jobs/{id}/cancel``: why (optional)."""

    model_config = ConfigDict(extra="forbid")
    reason: str | None = Field(default=None, max_length=500)


class BulkReplayBody(BaseModel):
    """``POST /replay``: which jobs (status, stage, since), from where, and how many at most."""

    model_config = ConfigDict(extra="forbid")
    status: Status = "failed"
    stage: Stage | None = None
    since: str | float | None = None
    from_stage: Stage | None = None
    reason: str | None = Field(default=None, max_length=500)
    dry_run: bool = False
    limit: int | None = Field(default=None, ge=1)


class BatchBody(BaseModel):
    """``POST /batch``: up to 100 generate-enhanced requests and shared callback settings."""

    model_config = ConfigDict(extra="forbid")
    requests: list[BlogRequest] = Field(min_length=1, max_length=MAX_BATCH)
    callback_url: str | None = Field(default=None, max_length=2048)
    callback_events: list[str] | None = None
    metadata: dict[str, Any] | None = None

    @field_validator("callback_url")
    @classmethod
    def _http(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("http://", "https://")):
            raise ValueError("callback_url must be an http(s) URL")
        return value

    @field_validator("callback_events")
    @classmethod
    def _known(cls, value: list[str] | None) -> list[str] | None:
        unknown = [event for event in value or [] if event not in CALLBACK_EVENTS]
        if unknown:
            raise ValueError(f"unknown callback_events {unknown}; allowed: {list(CALLBACK_EVENTS)}")
        return value

    def items(self) -> list[BlogRequest]:
        """Each request with the shared callback settings filled in where it has none."""
        shared: dict[str, Any] = {}
        if self.callback_url:
            shared["callback_url"] = self.callback_url
        if self.callback_events:
            shared["callback_events"] = self.callback_events
        return [
            item.model_copy(update={k: v for k, v in shared.items() if getattr(item, k) is None})
            for item in self.requests
        ]


async def _audit(request: Request, action: str, target: str, details: dict[str, Any]) -> None:
    """Operator actions go to the audit log: who, when, what, from which key."""
    await audit.record(_deps(request).engine, actor_of(request), action, target, details)


def _deps(request: Request) -> ApiDeps:
    return request.app.state.deps  # type: ignore[no-any-return]


def _tenant(request: Request) -> str | None:
    return getattr(request.state, "tenant", None)


def _actor(request: Request) -> str:
    return str(getattr(request.state, "actor", None) or "api")


def _operations(request: Request) -> OperationsStore:
    deps = _deps(request)
    return OperationsStore(deps.engine, deps.store.dispatcher)


async def _optional_body(request: Request) -> Any:
    """An absent body means defaults; a present one must be a JSON object."""
    if not await request.body():
        return {}
    return await read_json(request)  # type: ignore[no-any-return]


def _failure(exc: BlogpipeError) -> Response:
    if isinstance(exc, JobNotFound):
        return detail(404, str(exc))
    if isinstance(exc, ConflictError):
        return detail(409, str(exc))
    return detail(422, str(exc))


async def idempotent_job(request: Request, blog: BlogRequest, key: str) -> JobRecord | Response:
    """For ``generate-enhanced`` with an ``Idempotency-Key``: a new job to queue, or the
    response to send (the original job for a repeated key, 422 for a reused key)."""
    deps = _deps(request)
    if not valid_key(key):
        return detail(422, "Idempotency-Key header must be 1-255 visible ASCII characters")
    try:
        outcome = await IdempotencyStore(deps.engine, deps.jobs).create_job(
            key, blog, tenant=_tenant(request)
        )
    except IdempotencyMismatch as exc:
        return detail(422, str(exc))
    if outcome.created:
        return outcome.job
    job = outcome.job
    logger.info(
        "Idempotency-Key repeated for job %s",
        job.id,
        extra={"action": "idempotent_replay", "job_id": str(job.id)},
    )
    estimate = await deps.jobs.estimated_seconds()
    return JSONResponse(
        {
            "job_id": str(job.id),
            "status": job.status,
            "message": "Blog generation job queued successfully",
            "estimated_completion_time": int(round(estimate)),
        },
        status_code=202,
        headers={"Idempotent-Replayed": "true"},
    )


async def replay_job(request: Request) -> Response:
    """POST /api/v1/blog/jobs/{job_id}/replay — run again from a stage (default: where it
    stopped)."""
    raw = request.path_params["job_id"]
    try:
        body = validate(ReplayBody, await _optional_body(request))
    except BadRequest as bad:
        return bad.response
    try:
        job_id = UUID(raw)
        result = await _operations(request).replay(
            job_id,
            actor=_actor(request),
            from_stage=body.from_stage,
            reason=body.reason,
            tenant=_tenant(request),
        )
    except ValueError:
        return detail(404, f"Job {raw} not found")
    except BlogpipeError as exc:
        return _failure(exc)
    await _audit(request, "job.replay", raw, result.to_json())
    return JSONResponse(result.to_json(), status_code=202)


async def cancel_job(request: Request) -> Response:
    """POST /api/v1/blog/jobs/{job_id}/cancel — cancel a queued or running job."""
    raw = request.path_params["job_id"]
    try:
        body = validate(CancelBody, await _optional_body(request))
    except BadRequest as bad:
        return bad.response
    try:
        job_id = UUID(raw)
        result = await _operations(request).cancel(
            job_id, actor=_actor(request), reason=body.reason, tenant=_tenant(request)
        )
    except ValueError:
        return detail(404, f"Job {raw} not found")
    except BlogpipeError as exc:
        return _failure(exc)
    await _audit(request, "job.cancel", raw, result.to_json())
    return JSONResponse(result.to_json())


async def bulk_replay(request: Request) -> Response:
    """POST /api/v1/blog/replay — replay jobs matching a filter (``dry_run`` previews)."""
    cap = _deps(request).settings.replay_cap
    try:
        body = validate(BulkReplayBody, await read_json(request))
    except BadRequest as bad:
        return bad.response
    if body.limit is not None and body.limit > cap:
        return detail(422, f"limit must be at most {cap} (BLOGPIPE_REPLAY_CAP)")
    try:
        since = None
        if body.since is not None:
            since = (
                check_duration(float(body.since), body.since)
                if isinstance(body.since, float | int)
                else parse_duration(body.since)
            )
        where = JobFilter(
            status=body.status, stage=body.stage, since_seconds=since, tenant=_tenant(request)
        )
        outcome = await _operations(request).bulk_replay(
            where,
            actor=_actor(request),
            from_stage=body.from_stage,
            reason=body.reason,
            cap=body.limit or cap,
            dry_run=body.dry_run,
        )
    except (InvalidOperation, ValueError) as exc:
        return detail(422, str(exc))
    if not body.dry_run:
        await _audit(request, "job.bulk_replay", "jobs", outcome.to_json())
    return JSONResponse(outcome.to_json(), status_code=200 if body.dry_run else 202)


async def create_batch(request: Request) -> Response:
    """POST /api/v1/blog/batch — validate every request, store all jobs at once, queue them."""
    deps = _deps(request)
    try:
        body = validate(BatchBody, await read_json(request, max_bytes=MAX_BATCH * 16 * 1024))
        items = body.items()
        for index, item in enumerate(items):
            await check_callback(item, deps.settings, loc=("body", "requests", index))
    except BadRequest as bad:
        return bad.response
    batch = await BatchRepository(deps.engine, deps.jobs).create(
        items,
        tenant=_tenant(request),
        callback_url=body.callback_url,
        metadata=body.metadata,
    )
    unqueued: list[str] = []
    for job in batch.jobs:
        try:
            await deps.task_queue.enqueue(job.id, job.request)
        except BlogpipeError as exc:
            unqueued.append(str(job.id))
            await deps.store.fail_job_unstarted(job.id, f"Job could not be queued: {exc}")
    logger.info(
        "Batch %s of %d job(s) queued",
        batch.id,
        len(batch.jobs),
        extra={"action": "batch_queued", "batch_id": str(batch.id)},
    )
    return JSONResponse(
        {
            "batch_id": str(batch.id),
            "status": "queued",
            "message": f"Batch of {len(batch.jobs)} blog generation job(s) queued",
            "job_ids": [str(job.id) for job in batch.jobs],
            "failed_to_queue": unqueued,
        },
        status_code=202,
    )


async def batch_status(request: Request) -> Response:
    """GET /api/v1/blog/batches/{batch_id} — counts per status and each job's status."""
    raw = request.path_params["batch_id"]
    try:
        batch_id = UUID(raw)
    except ValueError:
        return detail(404, f"Batch {raw} not found")
    deps = _deps(request)
    summary = await BatchRepository(deps.engine, deps.jobs).summary(
        batch_id, tenant=_tenant(request)
    )
    if summary is None:
        return detail(404, f"Batch {raw} not found")
    return JSONResponse(summary)


routes: list[Route] = [
    Route("/api/v1/blog/jobs/{job_id}/replay", replay_job, methods=["POST"]),
    Route("/api/v1/blog/jobs/{job_id}/cancel", cancel_job, methods=["POST"]),
    Route("/api/v1/blog/replay", bulk_replay, methods=["POST"]),
    Route("/api/v1/blog/batch", create_batch, methods=["POST"]),
    Route("/api/v1/blog/batches/{batch_id}", batch_status, methods=["GET"]),
]


def openapi_paths() -> dict[str, Any]:
    """OpenAPI entries for the operator endpoints."""

    def body(model: type[BaseModel]) -> dict[str, Any]:
        return {"content": {"application/json": {"schema": model.model_json_schema()}}}

    def answer(text: str) -> dict[str, Any]:
        return {
            "description": text,
            "content": {"application/json": {"schema": {"type": "object"}}},
        }

    job_id = {"name": "job_id", "in": "path", "required": True, "schema": {"type": "string"}}
    errors = {
        "404": answer("Job not found"),
        "409": answer("Not possible in the job's state"),
        "422": answer("Invalid request; the message names the field"),
    }
    return {
        "/api/v1/blog/jobs/{job_id}/replay": {
            "post": {
                "summary": "Replay a job from a stage (default: where it failed)",
                "parameters": [job_id],
                "requestBody": {"required": False, **body(ReplayBody)},
                "responses": {"202": answer("Replay published"), **errors},
            }
        },
        "/api/v1/blog/jobs/{job_id}/cancel": {
            "post": {
                "summary": "Cancel a queued or running job; emits job.cancelled",
                "parameters": [job_id],
                "requestBody": {"required": False, **body(CancelBody)},
                "responses": {"200": answer("Cancelled"), **errors},
            }
        },
        "/api/v1/blog/replay": {
            "post": {
                "summary": "Bulk replay by filter (status, stage, since) with dry_run and a cap",
                "requestBody": {"required": True, **body(BulkReplayBody)},
                "responses": {
                    "200": answer("Dry run: count and ids"),
                    "202": answer("Replayed"),
                    "422": errors["422"],
                },
            }
        },
        "/api/v1/blog/batch": {
            "post": {
                "summary": f"Submit up to {MAX_BATCH} generate-enhanced requests at once",
                "requestBody": {"required": True, **body(BatchBody)},
                "responses": {
                    "202": answer("Batch queued: batch_id and job_ids"),
                    "422": errors["422"],
                },
            }
        },
        "/api/v1/blog/batches/{batch_id}": {
            "get": {
                "summary": "A batch's counts per status and its jobs",
                "parameters": [
                    {
                        "name": "batch_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string"},
                    }
                ],
                "responses": {"200": answer("The batch"), "404": answer("Batch not found")},
            }
        },
    }
