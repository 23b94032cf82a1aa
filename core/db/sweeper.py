"""Periodic maintenance: re-drive or fail stuck jobs, and delete finished jobs past retention.

A job is *stuck* when it is ``processing``, has made no progress for ``stuck_after``
seconds, and no worker holds a live lease on one of its stage runs (a slow but alive LLM
call keeps extending its lease, so it is never mistaken for stuck). A stuck job is
re-driven (its next stage message is published again; duplicates are dropped by the
stage runs' idempotency) up to ``max_redrives`` times, then failed with a clear error.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from uuid import UUID

from sqlalchemy import text

from core.constants import FINISHED_STATUSES, next_stage, stage_topic
from core.db.idempotency import KEY_TTL_HOURS
from core.db.operations import record_operation
from core.db.pipeline import PipelineStore
from core.events import StageMessage

logger = logging.getLogger("blogpipe.sweeper")

Requeue = Callable[[UUID, dict[str, Any]], Awaitable[None]]
"""Hands a queued job to the task queue again."""

_FINISHED = list(FINISHED_STATUSES)
_STUCK = """
SELECT j.id, j.generation, j.current_stage,
    EXTRACT(EPOCH FROM now() - j.updated_at) AS idle FROM jobs j
WHERE j.status = 'processing' AND j.updated_at < now() - make_interval(secs => :after)
  AND NOT EXISTS (SELECT 1 FROM stage_runs r WHERE r.job_id = j.id
      AND r.generation = j.generation AND r.status = 'running' AND r.lease_until > now())
ORDER BY j.updated_at LIMIT :limit"""
_EXPIRED = """
SELECT id FROM jobs WHERE status = ANY(:finished)
  AND COALESCE(completed_at, updated_at) < now() - make_interval(secs => :age)
ORDER BY COALESCE(completed_at, updated_at) LIMIT :limit"""


@dataclass(frozen=True)
class CleanupReport:
    """What a retention sweep deleted (or, on a dry run, would delete)."""

    jobs: int
    stage_runs: int
    events: int
    deliveries: int
    idempotency_keys: int
    batches: int
    dry_run: bool

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


class Sweeper:
    """Stuck-job detection and retention, run periodically by ``run_forever``."""

    def __init__(
        self,
        store: PipelineStore,
        *,
        stuck_after: float,
        retention_hours: float,
        max_redrives: int = 3,
        requeue: Requeue | None = None,
    ) -> None:
        self.store = store
        self.engine = store.engine
        self.stuck_after = stuck_after
        self.retention_hours = retention_hours
        self.max_redrives = max_redrives
        self.requeue = requeue

    async def sweep_stuck(self, *, limit: int = 100) -> dict[str, int]:
        """Re-drive or fail every stuck job; also hand long-queued jobs to the queue again."""
        counts = {"redriven": 0, "failed": 0, "requeued": 0}
        async with self.engine.connect() as conn:
            stuck = (
                await conn.execute(text(_STUCK), {"after": self.stuck_after, "limit": limit})
            ).all()
            queued = (
                await conn.execute(
                    text(
                        "SELECT id, request FROM jobs WHERE status IN ('queued', 'pending')"
                        " AND updated_at < now() - make_interval(secs => :after) LIMIT :limit"
                    ),
                    {"after": self.stuck_after, "limit": limit},
                )
            ).all()
        for row in stuck:
            counts[
                await self._unstick(row.id, row.generation, row.current_stage, float(row.idle))
            ] += 1
        if self.requeue is not None:
            for row in queued:
                await self._touch(row.id)
                await self.requeue(row.id, dict(row.request))
                counts["requeued"] += 1
        if any(counts.values()):
            logger.warning("Stuck-job sweep: %s", counts, extra={"action": "stuck_sweep", **counts})
        return counts

    async def _unstick(
        self, job_id: UUID, generation: int, current: str | None, idle: float
    ) -> str:
        outbox_id = None
        async with self.engine.begin() as conn:
            job = (
                await conn.execute(
                    text(
                        "SELECT status, generation FROM jobs WHERE id = :id FOR UPDATE SKIP LOCKED"
                    ),
                    {"id": job_id},
                )
            ).first()
            if job is None or job.status != "processing" or job.generation != generation:
                return "redriven"  # moved on meanwhile; nothing to do (counted as handled)
            redrives = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM job_operations WHERE job_id = :id"
                        " AND action = 'redrive' AND generation = :gen"
                    ),
                    {"id": job_id, "gen": generation},
                )
            ).scalar_one()
            stage = await self._stage_to_run(conn, job_id, generation, current)
            reason = f"no progress for {int(idle)}s"
            if redrives < self.max_redrives and stage is not None:
                await conn.execute(
                    text("UPDATE jobs SET updated_at = now() WHERE id = :id"), {"id": job_id}
                )
                await record_operation(
                    conn, job_id, "redrive", "sweeper", reason, stage, "processing", generation
                )
                message = StageMessage(job_id, stage, generation).to_message()
                outbox_id = await self.store.dispatcher.stage(conn, stage_topic(stage), message)
        if outbox_id is not None or (redrives < self.max_redrives and stage is not None):
            await self.store.dispatcher.flush([outbox_id])
            logger.warning(
                "Job %s stuck at %s (%s); re-driven",
                job_id,
                stage,
                reason,
                extra={"action": "job_redriven", "job_id": str(job_id), "stage": stage},
            )
            return "redriven"
        failed_at = stage or current or "research"
        message_text = (
            f"Job made no progress for {int(idle)}s at stage {failed_at}"
            f" and {redrives} re-drive(s) did not help"
        )
        details = {
            "type": "Stuck",
            "message": message_text,
            "attempts": int(redrives),
            "stage": failed_at,
        }
        await self.store.fail_job(job_id, generation, failed_at, message_text, details)
        return "failed"

    async def _stage_to_run(
        self, conn: Any, job_id: UUID, generation: int, current: str | None
    ) -> str | None:
        if current is None:
            return "research"
        done = (
            await conn.execute(
                text(
                    "SELECT 1 FROM stage_runs WHERE job_id = :id AND stage = :stage"
                    " AND generation = :gen AND status = 'succeeded'"
                ),
                {"id": job_id, "stage": current, "gen": generation},
            )
        ).first()
        return next_stage(current) if done else current

    async def _touch(self, job_id: UUID) -> None:
        async with self.engine.begin() as conn:
            await conn.execute(
                text("UPDATE jobs SET updated_at = now() WHERE id = :id"), {"id": job_id}
            )

    async def cleanup(self, *, dry_run: bool = False, batch: int = 500) -> CleanupReport:
        """Delete finished jobs older than the retention with their runs, events and
        deliveries (cascading), expired idempotency keys, and emptied old batches."""
        age = self.retention_hours * 3600.0
        totals = {"jobs": 0, "stage_runs": 0, "events": 0, "deliveries": 0}
        while True:
            async with self.engine.begin() as conn:
                ids = [
                    row.id
                    for row in await conn.execute(
                        text(_EXPIRED + (" FOR UPDATE SKIP LOCKED" if not dry_run else "")),
                        {
                            "finished": _FINISHED,
                            "age": age,
                            "limit": batch if not dry_run else 10**9,
                        },
                    )
                ]
                if not ids:
                    break
                for key, table in (
                    ("stage_runs", "stage_runs"),
                    ("events", "job_events"),
                    ("deliveries", "webhook_deliveries"),
                ):
                    totals[key] += (
                        await conn.execute(
                            text(f"SELECT count(*) FROM {table} WHERE job_id = ANY(:ids)"),
                            {"ids": ids},
                        )
                    ).scalar_one()
                totals["jobs"] += len(ids)
                if dry_run:
                    break
                await conn.execute(text("DELETE FROM jobs WHERE id = ANY(:ids)"), {"ids": ids})
            if len(ids) < batch:
                break
        keys = batches = 0
        key_age = {"age": KEY_TTL_HOURS * 3600.0}
        async with self.engine.begin() as conn:
            if dry_run:
                keys = (
                    await conn.execute(
                        text(
                            "SELECT count(*) FROM idempotency_keys WHERE created_at"
                            " < now() - make_interval(secs => :age)"
                        ),
                        key_age,
                    )
                ).scalar_one()
            else:
                keys = (
                    await conn.execute(
                        text(
                            "DELETE FROM idempotency_keys WHERE created_at"
                            " < now() - make_interval(secs => :age)"
                        ),
                        key_age,
                    )
                ).rowcount or 0
                batches = (
                    await conn.execute(
                        text(
                            "DELETE FROM batches b WHERE created_at"
                            " < now() - make_interval(secs => :age)"
                            " AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.batch_id = b.id)"
                        ),
                        {"age": age},
                    )
                ).rowcount or 0
        report = CleanupReport(
            dry_run=dry_run,
            idempotency_keys=int(keys),
            batches=int(batches),
            **{k: int(v) for k, v in totals.items()},
        )
        if report.jobs and not dry_run:
            logger.info(
                "Retention deleted %d finished job(s) older than %sh",
                report.jobs,
                self.retention_hours,
                extra={"action": "retention_cleanup", "jobs": report.jobs},
            )
        return report

    async def run_forever(self, *, interval: float = 30.0) -> None:
        """Sweep stuck jobs and apply retention every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            for step in (self.sweep_stuck, self.cleanup):
                try:
                    await step()
                except asyncio.CancelledError:
                    raise
                except Exception:
                    logger.exception(
                        "Maintenance step %s failed; retrying later",
                        step.__name__,
                        extra={"action": "sweeper_error"},
                    )
