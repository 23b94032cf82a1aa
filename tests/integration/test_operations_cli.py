"""The operator CLI (as a subprocess, against a test database), retention and the
stuck-job sweeper."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.broker.postgres import PostgresBroker
from core.db.engine import plain_url
from core.db.pipeline import PipelineStore
from core.db.sweeper import Sweeper
from core.dispatch import Dispatcher
from tests.support.pipeline import REPO

REQUEST = '{"topic": "Best presents for teenagers", "keywords": ["gifts"]}'


async def blogpipe(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "DATABASE_URL": plain_url(database_url),
        "BLOGPIPE_BROKER": "postgres",
        "BLOGPIPE_TASK_QUEUE": "local",
        "BLOGPIPE_LLM": "offline",
        "LOG_LEVEL": "WARNING",
    }
    return await asyncio.wait_for(
        asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "blogpipe", *args],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        ),
        timeout=70,
    )


async def add_job(
    engine: AsyncEngine, status: str, *, age_hours: float = 0, stage: str | None = None
) -> uuid.UUID:
    job_id = uuid.uuid4()
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO jobs (id, status, request, current_stage, created_at, updated_at,"
                " completed_at) VALUES (:id, :status, CAST(:request AS jsonb), :stage,"
                " now() - make_interval(hours => :age), now() - make_interval(hours => :age),"
                " CASE WHEN :status IN ('completed', 'failed', 'cancelled')"
                " THEN now() - make_interval(hours => :age) END)"
            ),
            {"id": job_id, "status": status, "request": REQUEST, "stage": stage, "age": age_hours},
        )
        await conn.execute(
            text(
                "INSERT INTO job_events (job_id, generation, stage, stage_number, total_stages,"
                " progress_percentage, status) VALUES (:id, 1, 'research', 1, 4, 5, 'started')"
            ),
            {"id": job_id},
        )
    return job_id


@pytest.fixture
async def store(engine: AsyncEngine) -> AsyncIterator[PipelineStore]:
    broker = PostgresBroker(engine)
    yield PipelineStore(engine, Dispatcher(engine, broker))
    await broker.close()


async def test_cleanup_jobs_cancel_and_replay_commands(
    database_url: str, engine: AsyncEngine
) -> None:
    await add_job(engine, "completed", age_hours=48)
    recent = await add_job(engine, "failed", age_hours=1)
    running = await add_job(engine, "processing", age_hours=48, stage="research")

    preview = await blogpipe(database_url, "cleanup", "--dry-run")
    assert preview.returncode == 0, preview.stderr
    assert (
        "Would delete 1 finished job(s) older than 24.0h with 0 stage run(s), 1 event(s)"
        in preview.stdout
    )
    done = await blogpipe(database_url, "cleanup")
    assert "Deleted 1 finished job(s)" in done.stdout
    async with engine.connect() as conn:
        left = {row.id for row in await conn.execute(text("SELECT id FROM jobs"))}
    assert left == {recent, running}

    listing = await blogpipe(database_url, "jobs", "list", "--status", "processing")
    assert str(running) in listing.stdout and str(recent) not in listing.stdout
    cancelled = await blogpipe(database_url, "cancel", str(running), "--reason", "test")
    assert cancelled.returncode == 0 and "cancelled (was processing)" in cancelled.stdout
    again = await blogpipe(database_url, "cancel", str(running))
    assert again.returncode == 1
    assert f"Job {running} is already cancelled and cannot be cancelled" in again.stderr
    replayed = await blogpipe(database_url, "replay", str(running))
    assert "replayed from research (generation 3" in replayed.stdout, replayed.stderr
    async with engine.connect() as conn:
        audited = (
            await conn.execute(text("SELECT action, actor FROM audit_log ORDER BY id"))
        ).all()
    assert [row.action for row in audited] == ["job.cancel", "job.replay"]
    assert all(row.actor.startswith("cli:") for row in audited)
    shown = await blogpipe(database_url, "jobs", "show", str(running))
    assert "cancel by cli:" in shown.stdout and "replay by cli:" in shown.stdout
    assert "research" in shown.stdout and "processing" in shown.stdout
    bulk = await blogpipe(database_url, "replay", "--status", "failed", "--dry-run")
    assert "1 job(s) match; would replay 1" in bulk.stdout, bulk.stderr
    missing = await blogpipe(database_url, "cancel", str(uuid.uuid4()))
    assert missing.returncode == 1 and "not found" in missing.stderr
    letters = await blogpipe(database_url, "dlq", "list")
    assert letters.returncode == 0 and "OUTCOME" in letters.stdout


async def test_jobs_show_says_why_a_replayed_job_had_failed(
    database_url: str, engine: AsyncEngine
) -> None:
    failed = await add_job(engine, "failed", age_hours=1, stage="draft")
    reason = "Stage draft failed after 3 attempt(s): OpenAI unreachable or too slow"
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO job_events (job_id, generation, stage, stage_number, total_stages,"
                " progress_percentage, status, details, created_at) VALUES (:id, 1, 'draft',"
                " 3, 4, 50, 'failed', :details, now() - interval '1 minute')"
            ),
            {"id": failed, "details": reason},
        )
    # From research: this job has no earlier stage output to keep.
    replayed = await blogpipe(
        database_url, "replay", str(failed), "--from", "research", "--reason", "LLM is back"
    )
    assert replayed.returncode == 0, replayed.stderr
    shown = await blogpipe(database_url, "jobs", "show", str(failed))
    assert shown.returncode == 0, shown.stderr
    line = next(line for line in shown.stdout.splitlines() if "replay by cli:" in line)
    assert line.endswith(f"from research: LLM is back -> generation 2 (was failed: {reason})"), line


async def test_sweeper_redrives_then_fails_a_stuck_job(
    engine: AsyncEngine, store: PipelineStore
) -> None:
    stuck = await add_job(engine, "processing", age_hours=1, stage="outline")
    sweeper = Sweeper(store, stuck_after=60, retention_hours=24, max_redrives=1)
    assert await sweeper.sweep_stuck() == {"redriven": 1, "failed": 0, "requeued": 0}
    async with engine.connect() as conn:
        action = (
            await conn.execute(
                text("SELECT action, actor, from_stage FROM job_operations WHERE job_id = :id"),
                {"id": stuck},
            )
        ).one()
    assert tuple(action) == ("redrive", "sweeper", "outline")
    # Re-driven just now: not stuck again until another stuck_after passes.
    assert await sweeper.sweep_stuck() == {"redriven": 0, "failed": 0, "requeued": 0}
    async with engine.begin() as conn:
        await conn.execute(text("UPDATE jobs SET updated_at = now() - interval '1 hour'"))
    assert (await sweeper.sweep_stuck())["failed"] == 1
    async with engine.connect() as conn:
        job = (
            await conn.execute(
                text("SELECT status, error_message, error FROM jobs WHERE id = :id"), {"id": stuck}
            )
        ).one()
    assert job.status == "failed" and "no progress" in job.error_message
    assert job.error["type"] == "Stuck" and job.error["stage"] == "outline"


async def test_a_live_lease_is_not_stuck(engine: AsyncEngine, store: PipelineStore) -> None:
    slow = await add_job(engine, "processing", age_hours=1, stage="draft")
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO stage_runs (job_id, stage, generation, attempt, status, lease_until)"
                " VALUES (:id, 'draft', 1, 1, 'running', now() + interval '1 minute')"
            ),
            {"id": slow},
        )
    sweeper = Sweeper(store, stuck_after=60, retention_hours=24)
    assert await sweeper.sweep_stuck() == {"redriven": 0, "failed": 0, "requeued": 0}
