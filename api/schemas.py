"""Response models: documentation for /openapi.json (handlers build plain dicts)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel


class CreateJobResponse(BaseModel):
    job_id: str
    status: str
    message: str
    estimated_completion_time: int


class ProgressUpdateModel(BaseModel):
    stage: str
    stage_number: int
    total_stages: int
    progress_percentage: float
    status: str
    details: str | None = None
    timestamp: str


class StageView(BaseModel):
    stage: str
    status: str
    attempts: int
    generation: int | None = None
    started_at: str | None = None
    finished_at: str | None = None
    duration_seconds: float | None = None
    provider: str | None = None
    tokens: int | None = None
    cost: float | None = None
    error: str | None = None
    error_type: str | None = None


class JobStatusResponse(BaseModel):
    job_id: str
    status: str
    progress_percentage: float
    current_stage: str | None = None
    created_at: str
    started_at: str | None = None
    completed_at: str | None = None
    updated_at: str | None = None
    result: dict[str, Any] | None = None
    error_message: str | None = None
    error: dict[str, Any] | None = None
    estimated_time_remaining: float | None = None
    progress_updates: list[ProgressUpdateModel]
    stages: list[StageView]
    generation: int
    total_stages: int
    metadata: dict[str, Any] | None = None


class JobSummary(BaseModel):
    job_id: str
    status: str
    progress_percentage: float
    current_stage: str | None = None
    topic: str | None = None
    created_at: str
    completed_at: str | None = None
    error_message: str | None = None
    metadata: dict[str, Any] | None = None


class JobListResponse(BaseModel):
    jobs: list[JobSummary]
    next_cursor: str | None = None


class WorkerRequest(BaseModel):
    job_id: str
    request: dict[str, Any] | None = None


class WorkerResponse(BaseModel):
    job_id: str
    status: str
    outcome: str


class DetailError(BaseModel):
    detail: str


class WorkerError(BaseModel):
    error: str


class ValidationErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorResponse(BaseModel):
    detail: list[ValidationErrorItem]
    message: str


class HealthResponse(BaseModel):
    status: str
    checks: dict[str, str] | None = None
