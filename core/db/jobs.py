"""Jobs: create, read, list, and the status document clients poll."""

from __future__ import annotations

import base64
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol
from uuid import UUID

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.constants import STAGES, TOTAL_STAGES
from core.db.polling import CACHED_STATUS, PollReads
from core.db.raw import read_on_live_connection
from core.db.statements import Statement
from core.requests import BlogRequest

DEFAULT_ESTIMATE_SECONDS = 240.0
_ESTIMATE_TTL = 30.0

JOB_COLUMNS = (
    "id, tenant, status, current_stage, progress_percentage, generation, request, result, "
    "error_message, error, callback_url, callback_events, metadata, created_at, updated_at, "
    "started_at, completed_at"
)


@dataclass(frozen=True)
class JobRecord:
    """A row of ``jobs``."""

    id: UUID
    tenant: str
    status: str
    current_stage: str | None
    progress_percentage: float
    generation: int
    request: dict[str, Any]
    result: dict[str, Any] | None
    error_message: str | None
    error: dict[str, Any] | None
    callback_url: str | None
    callback_events: list[str] | None
    metadata: dict[str, Any] | None
    created_at: datetime
    updated_at: datetime
    started_at: datetime | None
    completed_at: datetime | None

    @classmethod
    def from_row(cls, row: Any) -> JobRecord:
        return cls(**dict(row._mapping))


_CREATE = Statement(
    "INSERT INTO jobs (id, tenant, status, request, callback_url, callback_events, metadata)"
    " VALUES (:id, :tenant, :status, :request, :callback_url, :callback_events, :metadata)"
    f" RETURNING {JOB_COLUMNS}"
)


class JobStatusFields(Protocol):
    """The job fields a status document shows: a ``JobRecord`` has them all."""

    @property
    def id(self) -> UUID: ...
    @property
    def status(self) -> str: ...
    @property
    def progress_percentage(self) -> float: ...
    @property
    def current_stage(self) -> str | None: ...
    @property
    def generation(self) -> int: ...
    @property
    def result(self) -> Any: ...
    @property
    def error_message(self) -> str | None: ...
    @property
    def error(self) -> Any: ...
    @property
    def metadata(self) -> Any: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...
    @property
    def started_at(self) -> datetime | None: ...
    @property
    def completed_at(self) -> datetime | None: ...


@dataclass(frozen=True, slots=True)
class _PolledJob:
    """The job as the polling query returns it: its JSON columns are orjson fragments
    holding the text Postgres wrote, to be spliced into the response as they are."""

    id: UUID
    status: str
    progress_percentage: float
    current_stage: str | None
    created_at: datetime
    started_at: datetime | None
    completed_at: datetime | None
    result: orjson.Fragment | None
    error_message: str | None
    error: orjson.Fragment | None
    generation: int
    metadata: orjson.Fragment | None
    updated_at: datetime


def _utc(column: str) -> str:
    """SQL rendering a timestamptz as ISO 8601 in UTC, the same text ``iso`` writes."""
    return f"to_char({column} AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"+00:00\"')"


# The job's progress updates (the CONTRACT's ``progress_updates`` items) and its stage
# runs, each aggregated as one JSON array.
_UPDATES = f"""(SELECT coalesce(json_agg(json_build_object(
      'stage', e.stage, 'stage_number', e.stage_number, 'total_stages', e.total_stages,
      'progress_percentage', e.progress_percentage, 'status', e.status, 'details', e.details,
      'timestamp', {_utc("e.created_at")}) ORDER BY e.id), '[]'::json)
   FROM job_events e WHERE e.job_id = jobs.id)"""
_RUNS = f"""(SELECT coalesce(json_agg(json_build_object(
      'stage', r.stage, 'generation', r.generation, 'status', r.status, 'error', r.error,
      'error_type', r.error_type, 'provider', r.provider,
      'tokens', r.prompt_tokens + r.completion_tokens, 'cost', r.cost,
      'started_at', {_utc("r.started_at")}, 'finished_at', {_utc("r.finished_at")},
      'duration_seconds', EXTRACT(EPOCH FROM r.finished_at - r.started_at)) ORDER BY r.id),
      '[]'::json)
   FROM stage_runs r WHERE r.job_id = jobs.id)"""

# The whole status document in one round trip (webhooks and the operator CLI).
STATUS_QUERY = (
    f"SELECT {JOB_COLUMNS}, {_UPDATES} AS updates, {_RUNS} AS runs FROM jobs WHERE id = :id"
)


def _json_bytes(expression: str) -> str:
    """SQL for a JSON value as its UTF-8 text, arriving as bytes (no decoding into a str
    here and encoding again in orjson)."""
    return f"convert_to(({expression})::text, 'UTF8')"


def _unless_fresh(expression: str) -> str:
    return f"CASE WHEN fresh THEN NULL ELSE {expression} END"


# The same for polling, on asyncpg, for a batch of jobs: what goes into the document
# unchanged (the result, error, metadata and progress updates) comes back as JSON text,
# to be spliced into the response rather than decoded and encoded again; the stage runs
# are decoded, since ``stage_views`` reads them. A job whose encoded document the
# poller keeps (``$2``-``$4``, see ``core.db.polling``) comes back ``fresh`` while the
# document still holds, without the parts that cost Postgres time to build.
_POLL_QUERY = f"""
SELECT id, tenant, status, progress_percentage, current_stage, created_at, started_at,
  completed_at, {_unless_fresh(_json_bytes("result"))} AS result, error_message,
  {_unless_fresh(_json_bytes("error"))} AS error, generation,
  {_unless_fresh(_json_bytes("metadata"))} AS metadata, updated_at,
  {_unless_fresh(_json_bytes(_UPDATES))} AS updates, {_unless_fresh(_RUNS)} AS runs, fresh
FROM (SELECT j.*, coalesce(j.status = '{CACHED_STATUS}' AND k.updated_at = j.updated_at
        AND k.generation = j.generation, false) AS fresh
    FROM jobs j LEFT JOIN unnest($2::uuid[], $3::timestamptz[], $4::int[])
        AS k(id, updated_at, generation) ON k.id = j.id
    WHERE j.id = ANY($1::uuid[])) jobs"""

_ESTIMATE_QUERY = (
    "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY EXTRACT(EPOCH FROM"
    " completed_at - started_at)) FROM (SELECT completed_at, started_at FROM jobs"
    " WHERE status = 'completed' AND started_at IS NOT NULL"
    " ORDER BY completed_at DESC LIMIT 50) recent"
)


def iso(value: datetime | None) -> str | None:
    """ISO 8601 in UTC with the offset written out."""
    if value is None:
        return None
    return value.astimezone(UTC).isoformat()


def encode_cursor(created_at: datetime, job_id: UUID) -> str:
    raw = orjson.dumps([created_at.isoformat(), str(job_id)])
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_cursor(cursor: str) -> tuple[datetime, UUID]:
    """Raise ValueError on anything that is not a cursor we issued."""
    try:
        padded = cursor + "=" * (-len(cursor) % 4)
        created, job_id = orjson.loads(base64.urlsafe_b64decode(padded))
        return datetime.fromisoformat(created), UUID(job_id)
    except Exception as exc:
        raise ValueError("cursor is not valid") from exc


class JobRepository:
    """Reads and creates jobs; state transitions live in ``core.db.pipeline``."""

    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._estimate: tuple[float, float] | None = None
        self._polls = PollReads(engine, _POLL_QUERY, _render_poll, self.estimated_seconds)

    async def create(
        self, request: BlogRequest, *, tenant: str = "default", status: str = "queued"
    ) -> JobRecord:
        """Store a new job: one statement on the hot pool (sent together with concurrent
        submissions), committed (durably) on return."""
        job_id = uuid.uuid4()
        row = await _CREATE.fetchrow_batched(
            self.engine,
            id=job_id,
            tenant=tenant,
            status=status,
            request=request.model_dump(mode="json"),
            callback_url=request.callback_url,
            callback_events=list(request.events) if request.callback_url else None,
            metadata=request.metadata,
        )
        return JobRecord(**{**dict(row), "id": job_id})

    async def insert(
        self,
        conn: AsyncConnection,
        request: BlogRequest,
        *,
        tenant: str = "default",
        status: str = "queued",
    ) -> JobRecord:
        """Insert a job inside the caller's transaction."""
        row = (
            await conn.execute(
                text(
                    f"INSERT INTO jobs (id, tenant, status, request, callback_url, callback_events,"
                    f" metadata) VALUES (:id, :tenant, :status, :request, :callback_url,"
                    f" :callback_events, :metadata) RETURNING {JOB_COLUMNS}"
                ).bindparams(),
                {
                    "id": uuid.uuid4(),
                    "tenant": tenant,
                    "status": status,
                    "request": orjson.dumps(request.model_dump(mode="json")).decode(),
                    "callback_url": request.callback_url,
                    "callback_events": orjson.dumps(list(request.events)).decode()
                    if request.callback_url
                    else None,
                    "metadata": orjson.dumps(request.metadata).decode()
                    if request.metadata is not None
                    else None,
                },
            )
        ).one()
        return JobRecord.from_row(row)

    async def get(self, job_id: UUID, *, tenant: str | None = None) -> JobRecord | None:
        """The job, or None when missing (or owned by another tenant)."""
        query = f"SELECT {JOB_COLUMNS} FROM jobs WHERE id = :id"
        params: dict[str, Any] = {"id": job_id}
        if tenant is not None:
            query += " AND tenant = :tenant"
            params["tenant"] = tenant
        async with self.engine.connect() as conn:
            row = (await conn.execute(text(query), params)).first()
        return JobRecord.from_row(row) if row else None

    async def status_document(
        self, job_id: UUID, *, tenant: str | None = None
    ) -> dict[str, Any] | None:
        """The CONTRACT's ``JobStatusResponse`` for a job, or None if it is not found."""
        query = STATUS_QUERY
        params: dict[str, Any] = {"id": job_id}
        if tenant is not None:
            query += " AND tenant = :tenant"
            params["tenant"] = tenant
        async with self.engine.connect() as conn:
            row = (await conn.execute(text(query), params)).first()
            if row is None:
                return None
            estimate = await self._estimated_total(conn)
        fields = dict(row._mapping)
        updates, runs = fields.pop("updates"), fields.pop("runs")
        return status_document(JobRecord(**fields), updates, runs, estimate)

    async def poll_body(self, job_id: UUID, *, tenant: str | None = None) -> bytes | None:
        """``status_document`` for the polling endpoint, encoded: the same JSON as the
        webhooks send, with the job's JSON columns and progress updates spliced in as the
        text Postgres wrote, and a completed job's document kept (see ``core.db.polling``).
        None when there is no such job, or it belongs to another tenant."""
        polled = await self._polls.read(job_id)
        if polled is None or (tenant is not None and polled.tenant != tenant):
            return None
        return polled.body

    async def poll_document(
        self, job_id: UUID, *, tenant: str | None = None
    ) -> dict[str, Any] | None:
        """``poll_body``, decoded."""
        body = await self.poll_body(job_id, tenant=tenant)
        return None if body is None else dict(orjson.loads(body))

    async def page(
        self,
        *,
        tenant: str | None = None,
        status: str | None = None,
        limit: int = 50,
        cursor: str | None = None,
    ) -> tuple[list[JobRecord], str | None]:
        """Newest first; pass the returned cursor to get the next page."""
        clauses = []
        params: dict[str, Any] = {"limit": limit + 1}
        if tenant is not None:
            clauses.append("tenant = :tenant")
            params["tenant"] = tenant
        if status is not None:
            clauses.append("status = :status")
            params["status"] = status
        if cursor is not None:
            created_at, last_id = decode_cursor(cursor)
            clauses.append("(created_at, id) < (:c_created, :c_id)")
            params.update(c_created=created_at, c_id=last_id)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        query = (
            f"SELECT {JOB_COLUMNS} FROM jobs {where} ORDER BY created_at DESC, id DESC LIMIT :limit"
        )
        async with self.engine.connect() as conn:
            rows = [JobRecord.from_row(row) for row in await conn.execute(text(query), params)]
        next_cursor = None
        if len(rows) > limit:
            rows = rows[:limit]
            next_cursor = encode_cursor(rows[-1].created_at, rows[-1].id)
        return rows, next_cursor

    async def estimated_seconds(self) -> float:
        """How long a job takes end to end, learned from recent runs."""
        estimate = self._cached_estimate()
        if estimate is None:

            async def fetch(conn: asyncpg.Connection) -> Any:
                return await conn.fetchval(_ESTIMATE_QUERY)

            estimate = self._remember_estimate(await read_on_live_connection(self.engine, fetch))
        return estimate

    async def _estimated_total(self, conn: AsyncConnection) -> float:
        """Median run time of recent completed jobs, cached briefly; 240 s with no history."""
        estimate = self._cached_estimate()
        if estimate is None:
            estimate = self._remember_estimate((await conn.execute(text(_ESTIMATE_QUERY))).scalar())
        return estimate

    def _cached_estimate(self) -> float | None:
        if self._estimate and time.monotonic() - self._estimate[1] < _ESTIMATE_TTL:
            return self._estimate[0]
        return None

    def _remember_estimate(self, median: float | None) -> float:
        estimate = float(median) if median is not None else DEFAULT_ESTIMATE_SECONDS
        self._estimate = (estimate, time.monotonic())
        return estimate


def stage_views(runs: list[dict[str, Any]], generation: int) -> list[dict[str, Any]]:
    """One entry per stage: the latest attempt's status, attempts, timings, tokens, error."""
    views: list[dict[str, Any]] = []
    for stage in STAGES:
        attempts = [run for run in runs if run["stage"] == stage]
        if not attempts:
            views.append({"stage": stage, "status": "pending", "attempts": 0})
            continue
        last = attempts[-1]
        same_generation = [run for run in attempts if run["generation"] == last["generation"]]
        views.append({**last, "attempts": len(same_generation)})
    return views


def status_document(
    job: JobStatusFields,
    updates: list[dict[str, Any]] | orjson.Fragment,
    runs: list[dict[str, Any]],
    estimated_total: float = DEFAULT_ESTIMATE_SECONDS,
) -> dict[str, Any]:
    """Build the status object (shared by polling and webhooks)."""
    remaining = None
    if job.status == "processing":
        remaining = round(max(1.0, estimated_total * (1 - job.progress_percentage / 100.0)), 1)
    elif job.status in ("queued", "pending"):
        remaining = round(estimated_total, 1)
    return {
        "job_id": str(job.id),
        "status": job.status,
        "progress_percentage": job.progress_percentage,
        "current_stage": job.current_stage,
        "created_at": iso(job.created_at),
        "started_at": iso(job.started_at),
        "completed_at": iso(job.completed_at),
        "result": job.result,
        "error_message": job.error_message,
        "error": job.error,
        "estimated_time_remaining": remaining,
        "progress_updates": updates,
        "stages": stage_views(runs, job.generation),
        "generation": job.generation,
        "total_stages": TOTAL_STAGES,
        "metadata": job.metadata,
        "updated_at": iso(job.updated_at),
    }


def _render_poll(row: asyncpg.Record, estimate: float) -> bytes:
    """The encoded status document for a full row of ``_POLL_QUERY``."""
    fields = dict(row)
    del fields["tenant"], fields["fresh"]
    updates, runs = orjson.Fragment(fields.pop("updates")), fields.pop("runs")
    for name in ("result", "error", "metadata"):
        if fields[name] is not None:
            fields[name] = orjson.Fragment(fields[name])
    document = status_document(_PolledJob(**fields), updates, runs, estimate)
    return orjson.dumps(document, option=orjson.OPT_NON_STR_KEYS)
