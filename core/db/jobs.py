"""Jobs: create, read, list, and the status document clients poll."""

from __future__ import annotations

import asyncio
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
from core.db.raw import CONNECTION_LOST, raw_connection
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


# The same for polling, on asyncpg, for a batch of jobs: what goes into the document
# unchanged (the result, error, metadata and progress updates) comes back as JSON text,
# to be spliced into the response rather than decoded and encoded again; the stage runs
# are decoded, since ``stage_views`` reads them.
_POLL_QUERY = f"""
SELECT id, tenant, status, progress_percentage, current_stage, created_at, started_at,
  completed_at, {_json_bytes("result")} AS result, error_message,
  {_json_bytes("error")} AS error, generation, {_json_bytes("metadata")} AS metadata,
  updated_at, {_json_bytes(_UPDATES)} AS updates, {_RUNS} AS runs
FROM jobs WHERE id = ANY($1::uuid[])"""

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
        self._polls = _PollReads(engine)

    async def create(
        self, request: BlogRequest, *, tenant: str = "default", status: str = "queued"
    ) -> JobRecord:
        """Store a new job: one statement on the hot pool, committed (durably) on return."""
        job_id = uuid.uuid4()
        row = await _CREATE.fetchrow(
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

    async def poll_document(
        self, job_id: UUID, *, tenant: str | None = None
    ) -> dict[str, Any] | None:
        """``status_document`` for the polling endpoint, for orjson to encode: the same
        JSON, with the job's JSON columns and progress updates spliced in as fragments
        of the text Postgres wrote (so ``json.dumps`` cannot encode it)."""
        row = await self._polls.read(job_id)
        if row is None or (tenant is not None and row["tenant"] != tenant):
            return None
        estimate = self._cached_estimate()
        if estimate is None:
            async with raw_connection(self.engine) as conn:
                estimate = self._remember_estimate(await conn.fetchval(_ESTIMATE_QUERY))
        fields = dict(row)
        del fields["tenant"]
        updates, runs = orjson.Fragment(fields.pop("updates")), fields.pop("runs")
        for name in ("result", "error", "metadata"):
            if fields[name] is not None:
                fields[name] = orjson.Fragment(fields[name])
        return status_document(_PolledJob(**fields), updates, runs, estimate)

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
        if estimate is not None:
            return estimate
        async with self.engine.connect() as conn:
            return await self._estimated_total(conn)

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


class _PollReads:
    """Polls read in batches: the polls that arrive while a read is in flight wait and
    go together in the next one, so under load one statement serves many polls (one
    checkout, one round trip, one executor start). Each poll still reads its job after it
    arrived: nothing is kept from one read to the next."""

    def __init__(self, engine: AsyncEngine, *, readers: int = 2, batch: int = 64) -> None:
        self.engine = engine
        self.readers = readers
        self.batch = batch
        self._waiting: list[tuple[UUID, asyncio.Future[asyncpg.Record | None]]] = []
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()

    async def read(self, job_id: UUID) -> asyncpg.Record | None:
        """The job's polling row (whatever its tenant), or None when there is no such job."""
        future: asyncio.Future[asyncpg.Record | None] = asyncio.get_running_loop().create_future()
        self._waiting.append((job_id, future))
        if self._running < self.readers:
            self._running += 1
            task = asyncio.create_task(self._read_while_waiting())
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return await future

    async def _read_while_waiting(self) -> None:
        # The count drops in the same step that finds nobody waiting, so a poll that
        # arrives later always finds a reader running or starts one.
        try:
            while self._waiting:
                batch, self._waiting = self._waiting[: self.batch], self._waiting[self.batch :]
                await self._read_batch(batch)
        finally:
            self._running -= 1

    async def _read_batch(
        self, batch: list[tuple[UUID, asyncio.Future[asyncpg.Record | None]]]
    ) -> None:
        ids = list({job_id for job_id, _ in batch})
        try:
            try:
                async with raw_connection(self.engine) as conn:
                    rows = await conn.fetch(_POLL_QUERY, ids)
            except CONNECTION_LOST:
                # A pooled connection the server closed while it sat idle: a read is safe
                # to repeat, on a fresh connection.
                async with raw_connection(self.engine) as conn:
                    rows = await conn.fetch(_POLL_QUERY, ids)
        except Exception as exc:
            for _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        except BaseException:
            for _, future in batch:
                future.cancel()
            raise
        found = {row["id"]: row for row in rows}
        for job_id, future in batch:
            if not future.done():
                future.set_result(found.get(job_id))


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
