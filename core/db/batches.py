"""Batches: many jobs created in one transaction, polled as a whole."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from uuid import UUID

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.constants import FINISHED_STATUSES, JOB_STATUSES
from core.db.jobs import JobRecord, JobRepository, iso
from core.requests import BlogRequest

MAX_BATCH = 100


@dataclass(frozen=True)
class Batch:
    """A stored batch and the jobs it created, in request order."""

    id: UUID
    jobs: list[JobRecord]


class BatchRepository:
    """Creates batches of jobs atomically and summarises them."""

    def __init__(self, engine: AsyncEngine, jobs: JobRepository) -> None:
        self.engine = engine
        self.jobs = jobs

    async def create(
        self,
        requests: Sequence[BlogRequest],
        *,
        tenant: str | None = None,
        callback_url: str | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> Batch:
        """Store the batch and all its jobs in one transaction (all or nothing)."""
        batch_id = uuid.uuid4()
        owner = tenant or "default"
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "INSERT INTO batches (id, tenant, size, callback_url, metadata)"
                    " VALUES (:id, :tenant, :size, :callback, :metadata)"
                ),
                {
                    "id": batch_id,
                    "tenant": owner,
                    "size": len(requests),
                    "callback": callback_url,
                    "metadata": orjson.dumps(metadata).decode() if metadata is not None else None,
                },
            )
            jobs = [await self.jobs.insert(conn, request, tenant=owner) for request in requests]
            await conn.execute(
                text("UPDATE jobs SET batch_id = :batch WHERE id = ANY(:ids)"),
                {"batch": batch_id, "ids": [job.id for job in jobs]},
            )
        return Batch(batch_id, jobs)

    async def summary(self, batch_id: UUID, *, tenant: str | None = None) -> dict[str, Any] | None:
        """Counts per status and each job's status; None when not found (for this tenant)."""
        query = "SELECT id, size, callback_url, metadata, created_at FROM batches WHERE id = :id"
        params: dict[str, Any] = {"id": batch_id}
        if tenant is not None:
            query += " AND tenant = :tenant"
            params["tenant"] = tenant
        async with self.engine.connect() as conn:
            batch = (await conn.execute(text(query), params)).first()
            if batch is None:
                return None
            rows = (
                await conn.execute(
                    text(
                        "SELECT id, status, progress_percentage, current_stage, created_at,"
                        " completed_at, error_message FROM jobs WHERE batch_id = :id"
                        " ORDER BY created_at, id"
                    ),
                    {"id": batch_id},
                )
            ).all()
        counts = dict.fromkeys(JOB_STATUSES, 0)
        for row in rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        finished = sum(counts[status] for status in FINISHED_STATUSES)
        return {
            "batch_id": str(batch.id),
            "total": batch.size,
            "counts": counts,
            "finished": finished,
            "done": finished == len(rows),
            "progress_percentage": round(
                sum(row.progress_percentage for row in rows) / len(rows), 1
            )
            if rows
            else 100.0,
            "created_at": iso(batch.created_at),
            "callback_url": batch.callback_url,
            "metadata": batch.metadata,
            "jobs": [
                {
                    "job_id": str(row.id),
                    "status": row.status,
                    "progress_percentage": row.progress_percentage,
                    "current_stage": row.current_stage,
                    "completed_at": iso(row.completed_at),
                    "error_message": row.error_message,
                }
                for row in rows
            ],
        }
