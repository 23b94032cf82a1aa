"""Submission idempotency: an ``Idempotency-Key`` maps to the job it first created.

A repeat of the key (same tenant, within ``KEY_TTL_HOURS``) with the same request returns
that job; with a different request it is refused. Requests with the same key are
serialised by a transaction-scoped advisory lock, so two concurrent retries create one job.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from uuid import UUID

import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.jobs import JobRecord, JobRepository
from core.errors import BlogpipeError
from core.requests import BlogRequest

KEY_TTL_HOURS = 24
MAX_KEY_LENGTH = 255


class IdempotencyMismatch(BlogpipeError):
    """The key was already used with a different request."""


@dataclass(frozen=True)
class IdempotentJob:
    """The job for a key, and whether this call created it."""

    job: JobRecord
    created: bool


def request_hash(request: BlogRequest) -> str:
    """A stable fingerprint of a validated request (defaults filled in, keys sorted)."""
    body = orjson.dumps(request.model_dump(mode="json"), option=orjson.OPT_SORT_KEYS)
    return hashlib.sha256(body).hexdigest()


def valid_key(key: str) -> bool:
    """1–255 visible ASCII characters."""
    return 0 < len(key) <= MAX_KEY_LENGTH and all(33 <= ord(char) <= 126 for char in key)


class IdempotencyStore:
    """Creates a job at most once per (tenant, key)."""

    def __init__(self, engine: AsyncEngine, jobs: JobRepository) -> None:
        self.engine = engine
        self.jobs = jobs

    async def create_job(
        self, key: str, request: BlogRequest, *, tenant: str | None = None
    ) -> IdempotentJob:
        """The job this key created (``created=False``) or a new one; IdempotencyMismatch
        when the key was used with another request."""
        owner = tenant or "default"
        fingerprint = request_hash(request)
        async with self.engine.begin() as conn:
            await conn.execute(
                text("SELECT pg_advisory_xact_lock(hashtextextended(:lock, 0))"),
                {"lock": f"idempotency:{owner}:{key}"},
            )
            existing = (
                await conn.execute(
                    text(
                        "SELECT job_id, request_hash FROM idempotency_keys WHERE tenant = :tenant"
                        " AND key = :key AND created_at > now() - make_interval(hours => :ttl)"
                    ),
                    {"tenant": owner, "key": key, "ttl": KEY_TTL_HOURS},
                )
            ).first()
            if existing is not None:
                if existing.request_hash != fingerprint:
                    raise IdempotencyMismatch(
                        f"Idempotency-Key {key!r} was already used with a different request body"
                    )
                job_id: UUID = existing.job_id
            else:
                job = await self.jobs.insert(conn, request, tenant=owner)
                await conn.execute(
                    text(
                        "INSERT INTO idempotency_keys (tenant, key, request_hash, job_id)"
                        " VALUES (:tenant, :key, :hash, :job) ON CONFLICT (tenant, key) DO UPDATE"
                        " SET request_hash = EXCLUDED.request_hash, job_id = EXCLUDED.job_id,"
                        " created_at = now()"
                    ),
                    {"tenant": owner, "key": key, "hash": fingerprint, "job": job.id},
                )
                return IdempotentJob(job, created=True)
        found = await self.jobs.get(job_id)
        if found is None:  # deleted by retention between the two reads
            raise IdempotencyMismatch(f"Idempotency-Key {key!r} refers to a job that was deleted")
        return IdempotentJob(found, created=False)

    async def expire(self) -> int:
        """Delete keys older than the TTL; return how many."""
        async with self.engine.begin() as conn:
            result = await conn.execute(
                text(
                    "DELETE FROM idempotency_keys WHERE created_at <"
                    " now() - make_interval(hours => :ttl)"
                ),
                {"ttl": KEY_TTL_HOURS},
            )
            return int(result.rowcount or 0)
