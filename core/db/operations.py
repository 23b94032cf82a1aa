"""Operator actions on jobs: replay from a stage, cancel, and bulk replay by filter.

Each action is one short transaction that locks the job row, bumps the job's generation
(so messages and in-flight work of the old generation become stale and are dropped or
discarded at commit), records who, when and why in ``job_operations``, and stages the
follow-up message through the ``Dispatcher`` (published after commit).
"""

from __future__ import annotations

import logging
import math
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.constants import (
    EVENTS_TOPIC,
    FINISHED_STATUSES,
    JOB_STATUSES,
    STAGE_PROGRESS,
    STAGES,
    TOTAL_STAGES,
    stage_number,
    stage_topic,
)
from core.dispatch import Dispatcher
from core.errors import BlogpipeError, ConflictError, JobNotFound
from core.events import JobEvent, StageMessage

logger = logging.getLogger("blogpipe.operations")

DEFAULT_REPLAY_CAP = 100


class InvalidOperation(BlogpipeError):
    """An operator request that cannot be carried out as asked; the message names the field."""


@dataclass(frozen=True)
class ReplayResult:
    """A replay that was published: the job runs again from ``from_stage`` at ``generation``."""

    job_id: UUID
    from_stage: str
    generation: int
    previous_status: str

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "status": "processing",
            "from_stage": self.from_stage,
            "generation": self.generation,
            "previous_status": self.previous_status,
        }


@dataclass(frozen=True)
class CancelResult:
    """A cancelled job and the generation that made its in-flight work stale."""

    job_id: UUID
    generation: int
    previous_status: str

    def to_json(self) -> dict[str, Any]:
        return {
            "job_id": str(self.job_id),
            "status": "cancelled",
            "generation": self.generation,
            "previous_status": self.previous_status,
        }


@dataclass(frozen=True)
class JobFilter:
    """Which jobs a bulk action applies to (all given conditions must hold)."""

    status: str | None = "failed"
    stage: str | None = None
    since_seconds: float | None = None
    tenant: str | None = None

    def validate(self) -> None:
        """Raise InvalidOperation naming the bad field."""
        if self.status is not None and self.status not in JOB_STATUSES:
            raise InvalidOperation(f"status must be one of {', '.join(JOB_STATUSES)}")
        if self.stage is not None and self.stage not in STAGES:
            raise InvalidOperation(f"stage must be one of {', '.join(STAGES)}")
        if self.since_seconds is not None and self.since_seconds <= 0:
            raise InvalidOperation("since must be a positive duration")

    def where(self) -> tuple[str, dict[str, Any]]:
        clauses: list[str] = []
        params: dict[str, Any] = {}
        if self.status is not None:
            clauses.append("status = :status")
            params["status"] = self.status
        if self.stage is not None:
            clauses.append("current_stage = :stage")
            params["stage"] = self.stage
        if self.since_seconds is not None:
            clauses.append("updated_at >= now() - make_interval(secs => :since)")
            params["since"] = self.since_seconds
        if self.tenant is not None:
            clauses.append("tenant = :tenant")
            params["tenant"] = self.tenant
        return (" AND ".join(clauses) or "true"), params


@dataclass
class BulkReplay:
    """What a bulk replay matched, did, and skipped (with why)."""

    matched: int
    cap: int
    dry_run: bool
    job_ids: list[UUID] = field(default_factory=list)
    replayed: list[ReplayResult] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)

    @property
    def truncated(self) -> bool:
        return self.matched > len(self.job_ids)

    def to_json(self) -> dict[str, Any]:
        return {
            "matched": self.matched,
            "cap": self.cap,
            "dry_run": self.dry_run,
            "truncated": self.truncated,
            "job_ids": [str(job_id) for job_id in self.job_ids],
            "replayed": [result.to_json() for result in self.replayed],
            "skipped": self.skipped,
        }


def parse_duration(raw: str) -> float:
    """``90``, ``90s``, ``15m``, ``2h``, ``3d`` → seconds; InvalidOperation otherwise."""
    units = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
    value = raw.strip().lower()
    scale = units.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        raise InvalidOperation(
            f"since must be a duration like 90s, 15m, 2h or 3d; got {raw!r}"
        ) from None
    return check_duration(seconds, raw)


MAX_SINCE_SECONDS = 100 * 365 * 86400.0
"""How far back ``since`` may reach (further would overflow Postgres timestamps)."""


def check_duration(seconds: float, raw: object) -> float:
    """``seconds`` if it is a positive, finite duration of at most a century."""
    if not (seconds > 0 and math.isfinite(seconds)):
        raise InvalidOperation(f"since must be a positive duration; got {raw!r}")
    if seconds > MAX_SINCE_SECONDS:
        raise InvalidOperation(f"since must be at most 36500d (a century); got {raw!r}")
    return seconds


class OperationsStore:
    """Replay, cancel and bulk replay; every action records its actor and reason."""

    def __init__(self, engine: AsyncEngine, dispatcher: Dispatcher) -> None:
        self.engine = engine
        self.dispatcher = dispatcher

    async def replay(
        self,
        job_id: UUID,
        *,
        actor: str,
        from_stage: str | None = None,
        reason: str | None = None,
        tenant: str | None = None,
    ) -> ReplayResult:
        """Run the job again from ``from_stage`` (default: where it failed or stopped).

        Earlier stages keep their outputs (their LLM calls are not repeated). Raises
        JobNotFound, ConflictError (not started, or an earlier output is missing) or
        InvalidOperation (unknown stage).
        """
        if from_stage is not None and from_stage not in STAGES:
            raise InvalidOperation(
                f"from_stage must be one of {', '.join(STAGES)}; got {from_stage!r}"
            )
        async with self.engine.begin() as conn:
            job = await _lock(conn, job_id, tenant)
            if job.status in ("queued", "pending"):
                raise ConflictError(
                    f"Job {job_id} is {job.status} and has not started; nothing to replay"
                )
            stage = from_stage or _default_stage(job)
            if stage is None:
                raise InvalidOperation(
                    f"from_stage is required to replay job {job_id}: it is {job.status}"
                    " and did not stop at a stage"
                )
            missing = await _missing_outputs(conn, job_id, STAGES[: STAGES.index(stage)])
            if missing:
                raise ConflictError(
                    f"Job {job_id} has no {missing[0]} output to keep; replay from {missing[0]}"
                    " or an earlier stage"
                )
            generation = job.generation + 1
            index = STAGES.index(stage)
            progress = STAGE_PROGRESS[STAGES[index - 1]][1] if index else 0.0
            await conn.execute(
                text(
                    "UPDATE jobs SET status = 'processing', generation = :generation,"
                    " current_stage = :stage, progress_percentage = :progress, result = NULL,"
                    " error_message = NULL, error = NULL, completed_at = NULL,"
                    " started_at = COALESCE(started_at, now()), updated_at = now() WHERE id = :id"
                ),
                {"id": job_id, "generation": generation, "stage": stage, "progress": progress},
            )
            details = f"Replay from {stage} requested by {actor}" + (
                f": {reason}" if reason else ""
            )
            await _event(conn, job_id, generation, stage, "replayed", details)
            await _record(conn, job_id, "replay", actor, reason, stage, job.status, generation)
            message = StageMessage(job_id, stage, generation).to_message()
            outbox_id = await self.dispatcher.stage(conn, stage_topic(stage), message)
        await self.dispatcher.flush([outbox_id])
        logger.info(
            "Job %s replayed from %s by %s (generation %d)",
            job_id,
            stage,
            actor,
            generation,
            extra={
                "action": "job_replayed",
                "job_id": str(job_id),
                "stage": stage,
                "actor": actor,
                "generation": generation,
            },
        )
        return ReplayResult(job_id, stage, generation, job.status)

    async def cancel(
        self, job_id: UUID, *, actor: str, reason: str | None = None, tenant: str | None = None
    ) -> CancelResult:
        """Cancel a queued or running job and emit ``job.cancelled``.

        Work in flight is discarded when it tries to commit. Raises JobNotFound, or
        ConflictError for a job that already finished.
        """
        async with self.engine.begin() as conn:
            job = await _lock(conn, job_id, tenant)
            if job.status in FINISHED_STATUSES:
                raise ConflictError(f"Job {job_id} is already {job.status} and cannot be cancelled")
            generation = job.generation + 1
            message = f"Cancelled by {actor}" + (f": {reason}" if reason else "")
            await conn.execute(
                text(
                    "UPDATE jobs SET status = 'cancelled', generation = :generation,"
                    " error_message = :message, completed_at = now(), updated_at = now()"
                    " WHERE id = :id"
                ),
                {"id": job_id, "generation": generation, "message": message},
            )
            stage = job.current_stage or STAGES[0]
            await _event(conn, job_id, generation, stage, "cancelled", message)
            await _record(conn, job_id, "cancel", actor, reason, None, job.status, generation)
            event = JobEvent(
                str(uuid.uuid4()), "job.cancelled", job_id, generation, datetime.now(UTC)
            )
            outbox_id = await self.dispatcher.stage(conn, EVENTS_TOPIC, event.to_message())
        await self.dispatcher.flush([outbox_id])
        logger.info(
            "Job %s cancelled by %s",
            job_id,
            actor,
            extra={"action": "job_cancelled", "job_id": str(job_id), "actor": actor},
        )
        return CancelResult(job_id, generation, job.status)

    async def find(self, where: JobFilter, *, limit: int) -> tuple[int, list[UUID]]:
        """How many jobs match, and the ids of the oldest ``limit`` of them."""
        where.validate()
        sql, params = where.where()
        async with self.engine.connect() as conn:
            count = (
                await conn.execute(text(f"SELECT count(*) FROM jobs WHERE {sql}"), params)
            ).scalar_one()
            rows = await conn.execute(
                text(f"SELECT id FROM jobs WHERE {sql} ORDER BY updated_at, id LIMIT :limit"),
                {**params, "limit": limit},
            )
            return int(count), [row.id for row in rows]

    async def bulk_replay(
        self,
        where: JobFilter,
        *,
        actor: str,
        from_stage: str | None = None,
        reason: str | None = None,
        cap: int = DEFAULT_REPLAY_CAP,
        dry_run: bool = False,
    ) -> BulkReplay:
        """Replay every matching job, at most ``cap`` of them (oldest first).

        ``dry_run`` only counts and lists. Jobs that cannot be replayed are skipped with why.
        """
        if cap < 1:
            raise InvalidOperation("limit must be at least 1")
        if from_stage is not None and from_stage not in STAGES:
            raise InvalidOperation(
                f"from_stage must be one of {', '.join(STAGES)}; got {from_stage!r}"
            )
        matched, job_ids = await self.find(where, limit=cap)
        outcome = BulkReplay(matched=matched, cap=cap, dry_run=dry_run, job_ids=job_ids)
        if dry_run:
            return outcome
        for job_id in job_ids:
            try:
                outcome.replayed.append(
                    await self.replay(
                        job_id,
                        actor=actor,
                        from_stage=from_stage or where.stage,
                        reason=reason,
                        tenant=where.tenant,
                    )
                )
            except (ConflictError, InvalidOperation, JobNotFound) as exc:
                outcome.skipped[str(job_id)] = str(exc)
        logger.info(
            "Bulk replay by %s: %d matched, %d replayed, %d skipped",
            actor,
            matched,
            len(outcome.replayed),
            len(outcome.skipped),
            extra={"action": "bulk_replay", "actor": actor, "matched": matched},
        )
        return outcome

    async def history(self, job_id: UUID) -> list[dict[str, Any]]:
        """The operations recorded for a job, oldest first."""
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT action, actor, reason, from_stage, previous_status, generation,"
                    " created_at FROM job_operations WHERE job_id = :id ORDER BY id"
                ),
                {"id": job_id},
            )
            return [dict(row._mapping) for row in rows]


async def _lock(conn: AsyncConnection, job_id: UUID, tenant: str | None) -> Any:
    query = "SELECT status, generation, current_stage, error FROM jobs WHERE id = :id"
    params: dict[str, Any] = {"id": job_id}
    if tenant is not None:
        query += " AND tenant = :tenant"
        params["tenant"] = tenant
    row = (await conn.execute(text(query + " FOR UPDATE"), params)).first()
    if row is None:
        raise JobNotFound(job_id)
    return row


def _default_stage(job: Any) -> str | None:
    """Where a failed, cancelled or running job stopped; None for a completed one."""
    if job.status == "completed":
        return None
    failed_at = (job.error or {}).get("stage") if isinstance(job.error, dict) else None
    stage = failed_at or job.current_stage
    return stage if stage in STAGES else STAGES[0]


async def _missing_outputs(
    conn: AsyncConnection, job_id: UUID, stages: tuple[str, ...]
) -> list[str]:
    if not stages:
        return []
    rows = await conn.execute(
        text(
            "SELECT DISTINCT stage FROM stage_runs WHERE job_id = :id AND status = 'succeeded'"
            " AND stage = ANY(:stages)"
        ),
        {"id": job_id, "stages": list(stages)},
    )
    present = {row.stage for row in rows}
    return [stage for stage in stages if stage not in present]


async def _event(
    conn: AsyncConnection, job_id: UUID, generation: int, stage: str, status: str, details: str
) -> None:
    await conn.execute(
        text(
            "INSERT INTO job_events (job_id, generation, stage, stage_number, total_stages,"
            " progress_percentage, status, details) SELECT :id, :generation, :stage, :number,"
            " :total, progress_percentage, :status, :details FROM jobs WHERE id = :id"
        ),
        {
            "id": job_id,
            "generation": generation,
            "stage": stage,
            "number": stage_number(stage) if stage in STAGES else TOTAL_STAGES,
            "total": TOTAL_STAGES,
            "status": status,
            "details": details,
        },
    )


async def _record(
    conn: AsyncConnection,
    job_id: UUID,
    action: str,
    actor: str,
    reason: str | None,
    from_stage: str | None,
    previous_status: str | None,
    generation: int,
) -> None:
    await conn.execute(
        text(
            "INSERT INTO job_operations (job_id, action, actor, reason, from_stage,"
            " previous_status, generation) VALUES (:id, :action, :actor, :reason, :stage,"
            " :previous, :generation)"
        ),
        {
            "id": job_id,
            "action": action,
            "actor": actor,
            "reason": reason,
            "stage": from_stage,
            "previous": previous_status,
            "generation": generation,
        },
    )


record_operation = _record
"""Record an operation inside the caller's transaction (used by the sweeper)."""
