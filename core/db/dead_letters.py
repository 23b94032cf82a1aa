"""Dead-lettered stage messages: decide what each means, record it, and replay on demand.

A message dead-letters when the broker ran out of delivery attempts. That is not always
a failed stage: deliveries nacked because another worker held the run's lease, and
deliveries lost with a killed worker, count too. So the dead-letter consumer looks at the
stage runs first:

- a newer generation, a finished job, or a run that already succeeded → nothing to do;
- a run still alive (its lease is current) → nothing to do, that worker will hand off;
- attempts that really failed (``max_attempts`` of them) → the job fails at that stage;
- otherwise (workers died, leases expired) → the stage is re-driven with a fresh message,
  at most ``max_redrives`` times, then the job fails with a clear error.

Every dead letter is recorded in ``dead_letters`` for ``blogpipe dlq list|replay``.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection

from core.constants import stage_topic
from core.db.operations import OperationsStore, ReplayResult
from core.db.pipeline import PipelineStore
from core.errors import BlogpipeError
from core.events import StageMessage

logger = logging.getLogger("blogpipe.dead_letters")


@dataclass(frozen=True)
class DeadLetter:
    """A recorded dead letter and what was done about it."""

    id: int
    job_id: UUID
    stage: str
    generation: int
    subscription: str
    attempts: int | None
    outcome: str
    error: str | None
    created_at: datetime
    replayed_at: datetime | None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "job_id": str(self.job_id),
            "stage": self.stage,
            "generation": self.generation,
            "subscription": self.subscription,
            "attempts": self.attempts,
            "outcome": self.outcome,
            "error": self.error,
            "created_at": self.created_at.isoformat(),
            "replayed_at": self.replayed_at.isoformat() if self.replayed_at else None,
        }


class DeadLetterStore:
    """Handles, records, lists and replays dead-lettered stage messages."""

    def __init__(self, store: PipelineStore, *, max_attempts: int, max_redrives: int = 3) -> None:
        self.store = store
        self.engine = store.engine
        self.max_attempts = max_attempts
        self.max_redrives = max_redrives

    async def handle(
        self, message: StageMessage, *, subscription: str, message_id: str, attempts: int | None
    ) -> str:
        """Act on one dead letter; return the outcome recorded (``failed``, ``redriven``, …)."""
        outbox_id: int | None = None
        failure: tuple[str, dict[str, Any]] | None = None
        async with self.engine.begin() as conn:
            job = (
                await conn.execute(
                    text("SELECT status, generation FROM jobs WHERE id = :id FOR UPDATE"),
                    {"id": message.job_id},
                )
            ).first()
            if job is None:
                return "missing"
            runs = (
                await conn.execute(
                    text(
                        "SELECT status, error, error_type, lease_until > now() AS live FROM"
                        " stage_runs WHERE job_id = :id AND stage = :stage AND generation = :gen"
                        " ORDER BY attempt"
                    ),
                    {"id": message.job_id, "stage": message.stage, "gen": message.generation},
                )
            ).all()
            redrives = (
                await conn.execute(
                    text(
                        "SELECT count(*) FROM dead_letters WHERE job_id = :id AND stage = :stage"
                        " AND generation = :gen AND outcome = 'redriven'"
                    ),
                    {"id": message.job_id, "stage": message.stage, "gen": message.generation},
                )
            ).scalar_one()
            failed = [run for run in runs if run.status == "failed"]
            last_error = runs[-1].error if runs else None
            if job.generation != message.generation or job.status != "processing":
                outcome = "stale"
            elif any(run.status == "succeeded" for run in runs):
                outcome = "duplicate"
            elif runs and runs[-1].status == "running" and runs[-1].live:
                outcome = "in_progress"
            elif len(failed) >= self.max_attempts or redrives >= self.max_redrives:
                outcome = "failed"
                failure = self._failure(message, runs, attempts, redrives)
            else:
                outcome = "redriven"
                await conn.execute(
                    text("UPDATE jobs SET updated_at = now() WHERE id = :id"),
                    {"id": message.job_id},
                )
                fresh = StageMessage(message.job_id, message.stage, message.generation)
                outbox_id = await self.store.dispatcher.stage(
                    conn, stage_topic(message.stage), fresh.to_message()
                )
            await _insert(conn, message, subscription, message_id, attempts, outcome, last_error)
        await self.store.dispatcher.flush([outbox_id])
        if failure is not None:
            await self.store.fail_job(message.job_id, message.generation, message.stage, *failure)
        level = logging.ERROR if outcome == "failed" else logging.WARNING
        logger.log(
            level,
            "Dead letter for job %s at %s: %s",
            message.job_id,
            message.stage,
            outcome,
            extra={
                "action": f"dead_letter_{outcome}",
                "job_id": str(message.job_id),
                "stage": message.stage,
                "generation": message.generation,
            },
        )
        return outcome

    def _failure(
        self, message: StageMessage, runs: Sequence[Any], attempts: int | None, redrives: int
    ) -> tuple[str, dict[str, Any]]:
        last = runs[-1] if runs else None
        error = (last.error if last is not None else None) or "delivery attempts exhausted"
        tried = len(runs) or attempts
        if last is not None and last.status != "failed":
            error = f"the worker running it stopped ({redrives} re-drive(s) did not help): {error}"
        text_ = f"Stage {message.stage} failed after {tried} attempt(s): {error}"
        error_type = (last.error_type if last is not None else None) or "DeadLetter"
        details = {"type": error_type, "message": error, "attempts": tried, "stage": message.stage}
        return text_, details

    async def recent(self, *, limit: int = 50, include_replayed: bool = False) -> list[DeadLetter]:
        """Unreplayed dead letters that failed their job, newest first (or every one)."""
        where = "true" if include_replayed else "outcome = 'failed' AND replayed_at IS NULL"
        async with self.engine.connect() as conn:
            rows = await conn.execute(
                text(
                    "SELECT id, job_id, stage, generation, subscription, attempts, outcome, error,"
                    f" created_at, replayed_at FROM dead_letters WHERE {where}"
                    " ORDER BY id DESC LIMIT :limit"
                ),
                {"limit": limit},
            )
            return [DeadLetter(**dict(row._mapping)) for row in rows]

    async def replay(
        self,
        operations: OperationsStore,
        ids: list[int] | None,
        *,
        actor: str,
        reason: str | None = None,
    ) -> tuple[list[ReplayResult], dict[int, str]]:
        """Replay the jobs of the given dead letters (all unreplayed failures when None)."""
        letters = [
            letter
            for letter in await self.recent(limit=1000, include_replayed=ids is not None)
            if ids is None or letter.id in ids
        ]
        done: list[ReplayResult] = []
        skipped: dict[int, str] = {}
        for letter in letters:
            try:
                done.append(
                    await operations.replay(
                        letter.job_id, actor=actor, from_stage=letter.stage, reason=reason
                    )
                )
            except BlogpipeError as exc:
                skipped[letter.id] = str(exc)
                continue
            async with self.engine.begin() as conn:
                await conn.execute(
                    text("UPDATE dead_letters SET replayed_at = now() WHERE id = :id"),
                    {"id": letter.id},
                )
        known = {letter.id for letter in letters}
        for missing in sorted(set(ids or ()) - known):
            skipped[missing] = f"Dead letter {missing} not found"
        return done, skipped


async def _insert(
    conn: AsyncConnection,
    message: StageMessage,
    subscription: str,
    message_id: str,
    attempts: int | None,
    outcome: str,
    error: str | None,
) -> None:
    await conn.execute(
        text(
            "INSERT INTO dead_letters (job_id, stage, generation, subscription, message_id,"
            " attempts, outcome, error) VALUES (:job, :stage, :gen, :sub, :mid, :attempts,"
            " :outcome, :error)"
        ),
        {
            "job": message.job_id,
            "stage": message.stage,
            "gen": message.generation,
            "sub": subscription,
            "mid": message_id,
            "attempts": attempts,
            "outcome": outcome,
            "error": error,
        },
    )
