"""Job state transitions: start, claim a stage, record progress, commit, fail.

Each transition is one short transaction that locks the job row, checks the job's
generation (a replay or a cancel bumps it, so older messages become stale), writes the
state change with a progress event, and stages the next message through the
``Dispatcher``. No transaction is held while a stage runs.
"""

from __future__ import annotations

import contextlib
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from core.constants import (
    EVENTS_TOPIC,
    STAGE_PROGRESS,
    STAGES,
    TOTAL_STAGES,
    next_stage,
    stage_number,
    stage_topic,
)
from core.dispatch import Dispatcher
from core.events import JobEvent, StageMessage
from core.llm import Usage

logger = logging.getLogger("blogpipe.pipeline")

Finalizer = Callable[[Mapping[str, Mapping[str, Any]], list[dict[str, Any]], float], dict[str, Any]]
"""Builds the final result from stage outputs, per-stage usage, and generation time."""


@dataclass(frozen=True)
class Claim:
    """A stage run this worker now owns (until its lease expires)."""

    job_id: UUID
    stage: str
    generation: int
    run_id: int
    attempt: int
    request: dict[str, Any]
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """Why a stage message was not claimed: missing, stale, duplicate, leased, not_processing."""

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class StageOutcome:
    """What a stage produced, as stored on its run."""

    output: dict[str, Any]
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: float


def _json(value: object) -> str:
    return orjson.dumps(value).decode()


class PipelineStore:
    """The transactions the API worker endpoint and the stage runners perform."""

    def __init__(
        self,
        engine: AsyncEngine,
        dispatcher: Dispatcher,
        *,
        lease_seconds: float = 120.0,
        asynchronous_commit: bool | None = None,
    ):
        self.engine = engine
        self.dispatcher = dispatcher
        self.lease_seconds = lease_seconds
        # With the postgres broker every hand-off lives in the same WAL as the state it
        # follows, so a commit need not wait for the disk: a database crash can only lose
        # the newest transitions *together with* the queue rows they wrote, and the older
        # message is redelivered and the stage redone. With Pub/Sub a message may already
        # have left when the commit is lost, so commits stay synchronous there.
        self.asynchronous_commit = (
            dispatcher.transactional if asynchronous_commit is None else asynchronous_commit
        )

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[AsyncConnection]:
        async with self.engine.begin() as conn:
            if self.asynchronous_commit:
                await conn.exec_driver_sql("SET LOCAL synchronous_commit = off")
            yield conn

    async def start_job(self, job_id: UUID) -> str:
        """Move a queued job to processing and hand it to the first stage.

        Returns ``started``, ``already_started`` (a duplicate Cloud Tasks delivery),
        ``finished`` or ``missing``; only ``started`` publishes anything.
        """
        async with self._transaction() as conn:
            row = await self._lock_job(conn, job_id)
            if row is None:
                return "missing"
            if row.status not in ("queued", "pending"):
                return (
                    "finished"
                    if row.status in ("completed", "failed", "cancelled")
                    else "already_started"
                )
            await conn.execute(
                text(
                    "UPDATE jobs SET status = 'processing', started_at = now(), updated_at = now(),"
                    " current_stage = :stage WHERE id = :id"
                ),
                {"id": job_id, "stage": STAGES[0]},
            )
            first = StageMessage(job_id, STAGES[0], row.generation)
            outbox_id = await self.dispatcher.stage(
                conn, stage_topic(STAGES[0]), first.to_message()
            )
        await self.dispatcher.flush([outbox_id])
        logger.info(
            "Job %s started", job_id, extra={"action": "job_started", "job_id": str(job_id)}
        )
        return "started"

    async def claim(self, message: StageMessage) -> Claim | Skip:
        """Take ownership of a stage run, or say why not (ack or retry later)."""
        async with self._transaction() as conn:
            job = await self._lock_job(conn, message.job_id)
            if job is None:
                return Skip("missing")
            if job.generation != message.generation:
                return Skip("stale")
            if job.status != "processing":
                return Skip("not_processing")
            runs = (
                await conn.execute(
                    text(
                        "SELECT id, attempt, status, lease_until > now() AS live,"
                        " EXTRACT(EPOCH FROM lease_until - now()) AS remaining FROM stage_runs"
                        " WHERE job_id = :id AND stage = :stage AND generation = :generation"
                        " ORDER BY attempt"
                    ),
                    {
                        "id": message.job_id,
                        "stage": message.stage,
                        "generation": message.generation,
                    },
                )
            ).all()
            if any(run.status == "succeeded" for run in runs):
                return Skip("duplicate")
            live = [run for run in runs if run.status == "running" and run.live]
            if live:
                return Skip("leased", retry_after=max(1.0, float(live[-1].remaining or 1.0)))
            abandoned = [run.id for run in runs if run.status == "running"]
            if abandoned:
                await conn.execute(
                    text(
                        "UPDATE stage_runs SET status = 'abandoned', finished_at = now(),"
                        " error = 'lease expired: the worker running it stopped'"
                        " WHERE id = ANY(:ids)"
                    ),
                    {"ids": abandoned},
                )
            attempt = (runs[-1].attempt + 1) if runs else 1
            run_id = (
                await conn.execute(
                    text(
                        "INSERT INTO stage_runs (job_id, stage, generation, attempt, status,"
                        " lease_until) VALUES (:id, :stage, :generation, :attempt, 'running',"
                        " now() + make_interval(secs => :lease)) RETURNING id"
                    ),
                    {
                        "id": message.job_id,
                        "stage": message.stage,
                        "generation": message.generation,
                        "attempt": attempt,
                        "lease": self.lease_seconds,
                    },
                )
            ).scalar_one()
            start = STAGE_PROGRESS[message.stage][0]
            await self._progress(
                conn,
                message.job_id,
                message.generation,
                message.stage,
                start,
                "started",
                f"Stage {message.stage} started (attempt {attempt})",
            )
            outputs = await self._outputs(
                conn, message.job_id, STAGES[: STAGES.index(message.stage)]
            )
        return Claim(
            job_id=message.job_id,
            stage=message.stage,
            generation=message.generation,
            run_id=int(run_id),
            attempt=attempt,
            request=dict(job.request),
            outputs=outputs,
        )

    async def report_progress(self, claim: Claim, percentage: float, details: str) -> None:
        """Move progress within a stage and extend the run's lease."""
        async with self._transaction() as conn:
            await conn.execute(
                text(
                    "UPDATE stage_runs SET lease_until = now() + make_interval(secs => :lease)"
                    " WHERE id = :run AND status = 'running'"
                ),
                {"run": claim.run_id, "lease": self.lease_seconds},
            )
            locked = (
                await conn.execute(
                    text(
                        "SELECT 1 FROM jobs WHERE id = :id AND generation = :generation"
                        " AND status = 'processing' FOR UPDATE"
                    ),
                    {"id": claim.job_id, "generation": claim.generation},
                )
            ).first()
            if locked:
                await self._progress(
                    conn,
                    claim.job_id,
                    claim.generation,
                    claim.stage,
                    percentage,
                    "in_progress",
                    details,
                )

    async def heartbeat(self, claim: Claim) -> None:
        """Extend the run's lease while the stage is still working."""
        async with self._transaction() as conn:
            await conn.execute(
                text(
                    "UPDATE stage_runs SET lease_until = now() + make_interval(secs => :lease)"
                    " WHERE id = :run AND status = 'running'"
                ),
                {"run": claim.run_id, "lease": self.lease_seconds},
            )

    async def complete(
        self, claim: Claim, outcome: StageOutcome, finalize: Finalizer | None = None
    ) -> str:
        """Commit a stage's output and hand off; ``committed`` or ``discarded`` (stale)."""
        async with self._transaction() as conn:
            job = await self._lock_job(conn, claim.job_id)
            if job is None or job.generation != claim.generation or job.status != "processing":
                await conn.execute(
                    text(
                        "UPDATE stage_runs SET status = 'discarded', finished_at = now(),"
                        " error = 'job was replayed or cancelled while this stage ran'"
                        " WHERE id = :run"
                    ),
                    {"run": claim.run_id},
                )
                return "discarded"
            await conn.execute(
                text(
                    "UPDATE stage_runs SET status = 'succeeded', output = :output, provider ="
                    " :provider, model = :model, prompt_tokens = :pt, completion_tokens = :ct,"
                    " cost = :cost, finished_at = now(), lease_until = NULL WHERE id = :run"
                ),
                {
                    "run": claim.run_id,
                    "output": _json(outcome.output),
                    "provider": outcome.provider,
                    "model": outcome.model,
                    "pt": outcome.prompt_tokens,
                    "ct": outcome.completion_tokens,
                    "cost": outcome.cost,
                },
            )
            end = STAGE_PROGRESS[claim.stage][1]
            await self._progress(
                conn,
                claim.job_id,
                claim.generation,
                claim.stage,
                end,
                "completed",
                f"Stage {claim.stage} completed",
            )
            following = next_stage(claim.stage)
            if following is not None:
                message = StageMessage(claim.job_id, following, claim.generation).to_message()
                outbox_id = await self.dispatcher.stage(conn, stage_topic(following), message)
            else:
                outbox_id = await self._finish(conn, claim, job.started_at, finalize)
        await self.dispatcher.flush([outbox_id])
        return "committed"

    async def record_failure(
        self, claim: Claim, error: BaseException, *, retryable: bool, usage: Usage | None = None
    ) -> None:
        """Record a failed attempt on its stage run, with the tokens it spent if known."""
        usage = usage or Usage()
        async with self._transaction() as conn:
            await conn.execute(
                text(
                    "UPDATE stage_runs SET status = 'failed', error = :error, error_type = :type,"
                    " prompt_tokens = :pt, completion_tokens = :ct, cost = :cost,"
                    " finished_at = now(), lease_until = NULL WHERE id = :run"
                ),
                {
                    "run": claim.run_id,
                    "error": str(error)[:2000] or type(error).__name__,
                    "type": ("retryable:" if retryable else "permanent:") + type(error).__name__,
                    "pt": usage.prompt_tokens,
                    "ct": usage.completion_tokens,
                    "cost": usage.cost,
                },
            )

    async def fail_job_unstarted(self, job_id: UUID, message: str) -> None:
        """A queued job whose hand-off to the task queue failed: mark it failed, clearly."""
        async with self._transaction() as conn:
            await conn.execute(
                text(
                    "UPDATE jobs SET status = 'failed', error_message = :message, completed_at ="
                    " now(), updated_at = now() WHERE id = :id AND status IN ('queued', 'pending')"
                ),
                {"id": job_id, "message": message},
            )

    async def last_failure(self, message: StageMessage) -> dict[str, Any]:
        """The latest failed attempt of a stage run and how many attempts were made."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT error, error_type, count(*) OVER () AS attempts FROM stage_runs"
                        " WHERE job_id = :id AND stage = :stage AND generation = :generation"
                        " ORDER BY attempt DESC LIMIT 1"
                    ),
                    {
                        "id": message.job_id,
                        "stage": message.stage,
                        "generation": message.generation,
                    },
                )
            ).first()
        return dict(row._mapping) if row else {}

    async def fail_job(
        self, job_id: UUID, generation: int, stage: str, message: str, details: dict[str, Any]
    ) -> bool:
        """Mark the job failed at ``stage`` and emit ``job.failed``; False if stale or finished."""
        async with self._transaction() as conn:
            job = await self._lock_job(conn, job_id)
            if job is None or job.generation != generation or job.status != "processing":
                return False
            await conn.execute(
                text(
                    "UPDATE jobs SET status = 'failed', current_stage = :stage, error_message ="
                    " :message, error = :details, completed_at = now(), updated_at = now()"
                    " WHERE id = :id"
                ),
                {"id": job_id, "stage": stage, "message": message, "details": _json(details)},
            )
            await self._event(conn, job_id, generation, stage, None, "failed", message)
            outbox_id = await self._emit(conn, "job.failed", job_id, generation)
        await self.dispatcher.flush([outbox_id])
        logger.warning(
            "Job %s failed at %s: %s",
            job_id,
            stage,
            message,
            extra={"action": "job_failed", "job_id": str(job_id), "stage": stage},
        )
        return True

    async def _finish(
        self,
        conn: AsyncConnection,
        claim: Claim,
        started_at: datetime | None,
        finalize: Finalizer | None,
    ) -> int | None:
        outputs = await self._outputs(conn, claim.job_id, STAGES)
        usage = (
            await conn.execute(
                text(
                    "SELECT DISTINCT ON (stage) stage, provider, prompt_tokens + completion_tokens"
                    " AS tokens, cost FROM stage_runs WHERE job_id = :id AND status = 'succeeded'"
                    " ORDER BY stage, finished_at DESC"
                ),
                {"id": claim.job_id},
            )
        ).all()
        by_stage = {row.stage: row for row in usage}
        stage_results = [
            {
                "stage": s,
                "provider": by_stage[s].provider,
                "tokens": by_stage[s].tokens,
                "cost": by_stage[s].cost,
            }
            for s in STAGES
            if s in by_stage
        ]
        elapsed = (datetime.now(UTC) - started_at).total_seconds() if started_at else 0.0
        result = finalize(outputs, stage_results, elapsed) if finalize else outputs[claim.stage]
        await conn.execute(
            text(
                "UPDATE jobs SET status = 'completed', progress_percentage = 100, current_stage ="
                " 'completed', result = :result, completed_at = now(), updated_at = now(),"
                " error_message = NULL, error = NULL WHERE id = :id"
            ),
            {"id": claim.job_id, "result": _json(result)},
        )
        await self._event(
            conn,
            claim.job_id,
            claim.generation,
            "completed",
            100.0,
            "completed",
            "Blog generation completed",
        )
        logger.info(
            "Job %s completed",
            claim.job_id,
            extra={"action": "job_completed", "job_id": str(claim.job_id)},
        )
        return await self._emit(conn, "job.completed", claim.job_id, claim.generation)

    async def _lock_job(self, conn: AsyncConnection, job_id: UUID) -> Any:
        """The job's row, locked until this transaction ends (None if it is gone).

        Every transition takes this lock first, so transitions of one job are serialised
        and each sees the generation the last one left.
        """
        return (
            await conn.execute(
                text(
                    "SELECT status, generation, request, started_at FROM jobs"
                    " WHERE id = :id FOR UPDATE"
                ),
                {"id": job_id},
            )
        ).first()

    async def _emit(
        self, conn: AsyncConnection, kind: str, job_id: UUID, generation: int
    ) -> int | None:
        event = JobEvent(str(uuid.uuid4()), kind, job_id, generation, datetime.now(UTC))
        return await self.dispatcher.stage(conn, EVENTS_TOPIC, event.to_message())

    async def _outputs(
        self, conn: AsyncConnection, job_id: UUID, stages: tuple[str, ...] | list[str]
    ) -> dict[str, dict[str, Any]]:
        # Latest successful output per stage, whatever its generation: a replay from
        # ``draft`` keeps research and outline from the generation before.
        if not stages:
            return {}
        rows = await conn.execute(
            text(
                "SELECT DISTINCT ON (stage) stage, output FROM stage_runs WHERE job_id = :id"
                " AND status = 'succeeded' AND stage = ANY(:stages)"
                " ORDER BY stage, generation DESC, finished_at DESC"
            ),
            {"id": job_id, "stages": list(stages)},
        )
        return {row.stage: dict(row.output) for row in rows}

    async def _progress(
        self,
        conn: AsyncConnection,
        job_id: UUID,
        generation: int,
        stage: str,
        percentage: float,
        status: str,
        details: str,
    ) -> None:
        await conn.execute(
            text(
                "UPDATE jobs SET progress_percentage = GREATEST(progress_percentage, :pct),"
                " current_stage = :stage, updated_at = now() WHERE id = :id"
            ),
            {"id": job_id, "pct": percentage, "stage": stage},
        )
        await self._event(conn, job_id, generation, stage, percentage, status, details)

    async def _event(
        self,
        conn: AsyncConnection,
        job_id: UUID,
        generation: int,
        stage: str,
        percentage: float | None,
        status: str,
        details: str,
    ) -> None:
        await conn.execute(
            text(
                "INSERT INTO job_events (job_id, generation, stage, stage_number, total_stages,"
                " progress_percentage, status, details) SELECT :id, :generation, :stage, :number,"
                " :total, COALESCE(:pct, progress_percentage), :status, :details"
                " FROM jobs WHERE id = :id"
            ),
            {
                "id": job_id,
                "generation": generation,
                "stage": stage,
                "number": stage_number(stage) if stage in STAGES else TOTAL_STAGES,
                "total": TOTAL_STAGES,
                "pct": percentage,
                "status": status,
                "details": details,
            },
        )
