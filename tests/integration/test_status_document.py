"""The polling endpoint's status document (asyncpg, JSON spliced as Postgres wrote it)
against the one webhooks build (``JobRepository.status_document``): the same JSON, key for
key and value for value, in every job state, and still scoped to the caller's tenant."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import orjson
import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.db.jobs import JobRepository
from core.requests import BlogRequest
from tests.support.apikeys import build_app, client_for, make_key, secure_settings

TIMEOUT = 10

RESULT: dict[str, Any] = {
    "title": 'Gifts "teens" actually want \\ 2026',
    "content": "# Gifts\n\nLine one.\tTabbed — ünïcödé, emoji 🎁, separators \u2028\u2029.\n",
    "readability_score": 61.25,
    "seo_score": 88,
    "total_cost": 0.0,
    "stage_results": [{"stage": "draft", "provider": "offline", "tokens": 900, "cost": 1e-05}],
    "citations": [],
    "seo_metadata": {"og_tags": {"og:title": "Gifts"}, "keyword_analysis": {"gifts": 1.5}},
    "success": True,
    "warnings": None,
}
ERROR = {"type": "StageFailed", "stage": "draft", "attempts": 3, "retryable": False}
METADATA = {"campaign": "winter", "ids": [1, 2.5, None], "nested": {"ключ": "значение"}}

# Whole seconds: the document's own timestamps then have no fraction, the stage runs'
# and progress updates' keep six digits (as the old path wrote them).
BASE = datetime(2026, 3, 1, 9, 30, tzinfo=UTC)

# stage, generation, attempt, status, error, error_type, tokens, cost, start (s), end (s)
RUNS = [
    ("research", 1, 1, "succeeded", None, None, 503, 0.0, 0.0, 0.25),
    ("outline", 1, 1, "succeeded", None, None, 120, 0.0015, 0.25, 1.0),
    ("draft", 1, 1, "failed", "provider timed out", "TimeoutError", 0, 0.0, 1.0, 31.0),
    ("draft", 1, 2, "succeeded", None, None, 2048, 0.0125, 32.5, 40.123456),
    # The job was replayed from the draft stage: generation 2.
    ("draft", 2, 1, "succeeded", None, None, 2100, 0.013, 100.0, 107.5),
    ("seo", 2, 1, "running", None, None, 0, 0.0, 107.5, None),
]
# stage, stage number, percentage, status, details, at (s)
EVENTS = [
    ("research", 1, 5.0, "started", "Stage research started (attempt 1)", 0.0),
    ("research", 1, 25.0, "completed", "Stage research completed", 0.25),
    ("outline", 2, 37.5, "completed", 'Outline with "quotes" and \\ backslash', 1.0),
    ("draft", 3, 62.5, "completed", "Stage draft completed", 40.123456),
    ("draft", 3, 62.5, "completed", None, 107.5),
]


async def create_job(engine: AsyncEngine, tenant: str = "default") -> UUID:
    request = BlogRequest.model_validate(
        {"topic": "Gifts for teenagers", "keywords": ["gifts"], "metadata": METADATA}
    )
    job = await JobRepository(engine).create(request, tenant=tenant)
    return job.id


async def add_history(engine: AsyncEngine, job_id: UUID) -> None:
    """Stage runs (a failed attempt, a replayed generation) and progress updates."""
    async with engine.begin() as conn:
        for stage, generation, attempt, status, error, error_type, tokens, cost, start, end in RUNS:
            await conn.execute(
                text(
                    "INSERT INTO stage_runs (job_id, stage, generation, attempt, status, error,"
                    " error_type, provider, model, prompt_tokens, completion_tokens, cost,"
                    " started_at, finished_at) VALUES (:job, :stage, :generation, :attempt,"
                    " :status, :error, :error_type, 'offline', 'offline-1', :tokens, 7, :cost,"
                    " CAST(:base AS timestamptz) + make_interval(secs => :start),"
                    " CAST(:base AS timestamptz) + make_interval(secs => CAST(:end AS float8)))"
                ),
                {
                    "job": job_id,
                    "stage": stage,
                    "generation": generation,
                    "attempt": attempt,
                    "status": status,
                    "error": error,
                    "error_type": error_type,
                    "tokens": tokens,
                    "cost": cost,
                    "start": start,
                    "end": end,
                    "base": BASE,
                },
            )
        for stage, number, percentage, status, details, at in EVENTS:
            await conn.execute(
                text(
                    "INSERT INTO job_events (job_id, generation, stage, stage_number,"
                    " total_stages, progress_percentage, status, details, created_at)"
                    " VALUES (:job, 1, :stage, :number, 4, :percentage, :status, :details,"
                    " CAST(:base AS timestamptz) + make_interval(secs => :at))"
                ),
                {
                    "job": job_id,
                    "stage": stage,
                    "number": number,
                    "percentage": percentage,
                    "status": status,
                    "details": details,
                    "at": at,
                    "base": BASE,
                },
            )


async def set_state(engine: AsyncEngine, job_id: UUID, status: str) -> None:
    changes: dict[str, dict[str, Any]] = {
        "queued": {},
        "processing": {
            "status": "processing",
            "current_stage": "seo",
            "progress_percentage": 62.5,
            "generation": 2,
            "started_at": BASE + timedelta(microseconds=1),
        },
        "completed": {
            "status": "completed",
            "current_stage": "completed",
            "progress_percentage": 100.0,
            "generation": 2,
            "result": orjson.dumps(RESULT).decode(),
            "started_at": BASE,
            "completed_at": BASE + timedelta(seconds=115.5),
        },
        "failed": {
            "status": "failed",
            "current_stage": "draft",
            "progress_percentage": 50.0,
            "error_message": "Stage draft failed after 3 attempts: provider timed out",
            "error": orjson.dumps(ERROR).decode(),
            "started_at": BASE,
            "completed_at": BASE + timedelta(seconds=60),
        },
    }[status]
    if not changes:
        return
    assignments = ", ".join(f"{name} = :{name}" for name in changes)
    async with engine.begin() as conn:
        await conn.execute(
            text(f"UPDATE jobs SET {assignments}, updated_at = now() WHERE id = :id"),
            {**changes, "id": job_id},
        )


def as_json(document: dict[str, Any] | None) -> Any:
    assert document is not None
    return orjson.loads(orjson.dumps(document))


def canonical(value: Any) -> bytes:
    """Sorted keys, so a difference of type (``5`` against ``5.0``) still shows."""
    return orjson.dumps(value, option=orjson.OPT_SORT_KEYS)


@pytest.mark.parametrize("status", ["queued", "processing", "completed", "failed"])
async def test_polled_document_equals_the_webhook_document(
    engine: AsyncEngine, status: str
) -> None:
    job_id = await create_job(engine)
    if status != "queued":
        await add_history(engine, job_id)
    await set_state(engine, job_id, status)
    jobs = JobRepository(engine)

    old = as_json(await asyncio.wait_for(jobs.status_document(job_id), TIMEOUT))
    polled = as_json(await asyncio.wait_for(jobs.poll_document(job_id), TIMEOUT))
    scoped = as_json(await asyncio.wait_for(jobs.poll_document(job_id, tenant="default"), TIMEOUT))

    assert old["status"] == status
    assert polled == old
    assert list(polled) == list(old)
    assert canonical(polled) == canonical(old)
    assert scoped == old


async def test_the_document_shows_what_the_history_holds(engine: AsyncEngine) -> None:
    job_id = await create_job(engine)
    await add_history(engine, job_id)
    await set_state(engine, job_id, "completed")

    polled = as_json(await asyncio.wait_for(JobRepository(engine).poll_document(job_id), TIMEOUT))

    assert polled["result"] == RESULT
    assert polled["metadata"] == METADATA
    assert polled["started_at"] == "2026-03-01T09:30:00+00:00"
    assert polled["completed_at"] == "2026-03-01T09:31:55.500000+00:00"
    assert [update["details"] for update in polled["progress_updates"]] == [
        details for *_, details, _ in EVENTS
    ]
    assert polled["progress_updates"][0]["timestamp"] == "2026-03-01T09:30:00.000000+00:00"
    stages = {stage["stage"]: stage for stage in polled["stages"]}
    assert stages["draft"]["generation"] == 2 and stages["draft"]["attempts"] == 1
    assert stages["seo"]["status"] == "running" and stages["seo"]["finished_at"] is None
    assert stages["outline"]["duration_seconds"] == 0.75


async def test_polling_over_http_serves_the_document(engine: AsyncEngine) -> None:
    app = build_app(engine, secure_settings())
    key = await make_key(engine, "acme")
    job_id = await create_job(engine, tenant="acme")
    await add_history(engine, job_id)
    await set_state(engine, job_id, "completed")
    old = as_json(await JobRepository(engine).status_document(job_id))

    async with client_for(app, key) as client:
        response = await asyncio.wait_for(client.get(f"/api/v1/blog/jobs/{job_id}"), TIMEOUT)

    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert response.json() == old


async def test_another_tenants_job_is_not_found(engine: AsyncEngine) -> None:
    app = build_app(engine, secure_settings())
    intruder = await make_key(engine, "globex")
    job_id = await create_job(engine, tenant="acme")
    await set_state(engine, job_id, "processing")

    async with client_for(app, intruder) as client:
        theirs = await asyncio.wait_for(client.get(f"/api/v1/blog/jobs/{job_id}"), TIMEOUT)
        missing = await asyncio.wait_for(client.get(f"/api/v1/blog/jobs/{uuid.uuid4()}"), TIMEOUT)

    assert theirs.status_code == 404
    assert theirs.json() == {"detail": f"Job {job_id} not found"}
    assert missing.status_code == 404
    assert await JobRepository(engine).poll_document(job_id, tenant="globex") is None


async def test_concurrent_polls_each_get_their_own_answer(engine: AsyncEngine) -> None:
    jobs = JobRepository(engine)
    acme = [await create_job(engine, tenant="acme") for _ in range(3)]
    globex = await create_job(engine, tenant="globex")
    await set_state(engine, acme[1], "processing")
    polls: list[tuple[UUID, str]] = [
        *[(job_id, "acme") for job_id in acme * 5],
        (globex, "globex"),
        (globex, "acme"),
        (uuid.uuid4(), "acme"),
    ]

    answers = await asyncio.wait_for(
        asyncio.gather(*(jobs.poll_document(job_id, tenant=tenant) for job_id, tenant in polls)),
        TIMEOUT,
    )

    for (job_id, tenant), answer in zip(polls, answers, strict=True):
        if tenant == "acme" and job_id in acme:
            assert answer is not None and as_json(answer)["job_id"] == str(job_id)
        elif job_id == globex and tenant == "globex":
            assert answer is not None and as_json(answer)["job_id"] == str(globex)
        else:
            assert answer is None
    assert {as_json(answer)["status"] for answer in answers[:15] if answer} == {
        "queued",
        "processing",
    }


async def test_a_cancelled_poll_leaves_the_others_answered(engine: AsyncEngine) -> None:
    jobs = JobRepository(engine)
    job_id = await create_job(engine)
    polls = [asyncio.ensure_future(jobs.poll_document(job_id)) for _ in range(8)]
    await asyncio.sleep(0)  # one turn of the loop: every poll has queued for the same read
    polls[3].cancel()

    done = await asyncio.wait_for(asyncio.gather(*polls, return_exceptions=True), TIMEOUT)

    assert isinstance(done[3], asyncio.CancelledError)
    assert all(isinstance(answer, dict) for n, answer in enumerate(done) if n != 3)
    later = await asyncio.wait_for(jobs.poll_document(job_id), TIMEOUT)
    assert later is not None and as_json(later)["job_id"] == str(job_id)


async def test_a_poll_sees_a_change_committed_before_it(engine: AsyncEngine) -> None:
    jobs = JobRepository(engine)
    job_id = await create_job(engine)
    first = as_json(await asyncio.wait_for(jobs.poll_document(job_id), TIMEOUT))
    await set_state(engine, job_id, "processing")

    second = as_json(await asyncio.wait_for(jobs.poll_document(job_id), TIMEOUT))

    assert (first["status"], second["status"]) == ("queued", "processing")


async def completed_job(engine: AsyncEngine, tenant: str = "default") -> UUID:
    job_id = await create_job(engine, tenant=tenant)
    await add_history(engine, job_id)
    await set_state(engine, job_id, "completed")
    return job_id


async def test_a_completed_jobs_document_is_kept_and_checked_on_every_poll(
    engine: AsyncEngine,
) -> None:
    jobs = JobRepository(engine)
    job_id = await completed_job(engine)
    first = await asyncio.wait_for(jobs.poll_body(job_id), TIMEOUT)
    second = await asyncio.wait_for(jobs.poll_body(job_id), TIMEOUT)
    assert first is not None and second == first
    assert jobs._polls.hits == 1 and jobs._polls.kept == 1
    assert orjson.loads(second) == as_json(await jobs.status_document(job_id))
    # Kept as a copy sized to its length (test_jsonbytes), so the byte budget is what the
    # cache holds; the poll that read it answered with orjson's own buffer.
    assert jobs._polls._kept[job_id].body == first and jobs._polls._kept[job_id].body is not first

    # Replayed: the row changes, so the kept document is dropped and read again.
    await set_state(engine, job_id, "processing")
    replayed = as_json(await asyncio.wait_for(jobs.poll_document(job_id), TIMEOUT))
    assert replayed["status"] == "processing" and replayed["current_stage"] == "seo"
    assert jobs._polls.hits == 1 and jobs._polls.kept == 0

    await set_state(engine, job_id, "completed")
    again = await asyncio.wait_for(jobs.poll_body(job_id), TIMEOUT)
    assert again is not None and orjson.loads(again)["status"] == "completed"
    assert orjson.loads(again)["updated_at"] != orjson.loads(first)["updated_at"]
    assert jobs._polls.kept == 1


async def test_a_kept_document_follows_a_new_generation_with_the_same_timestamp(
    engine: AsyncEngine,
) -> None:
    jobs = JobRepository(engine)
    job_id = await completed_job(engine)
    await asyncio.wait_for(jobs.poll_body(job_id), TIMEOUT)
    async with engine.begin() as conn:  # updated_at left as it was
        await conn.execute(
            text("UPDATE jobs SET generation = generation + 1 WHERE id = :id"), {"id": job_id}
        )
    document = as_json(await asyncio.wait_for(jobs.poll_document(job_id), TIMEOUT))
    assert document["generation"] == 3 and jobs._polls.hits == 0


async def test_a_kept_document_is_not_served_to_another_tenant_or_after_deletion(
    engine: AsyncEngine,
) -> None:
    jobs = JobRepository(engine)
    job_id = await completed_job(engine, tenant="acme")
    assert await asyncio.wait_for(jobs.poll_body(job_id, tenant="acme"), TIMEOUT) is not None
    assert await asyncio.wait_for(jobs.poll_body(job_id, tenant="globex"), TIMEOUT) is None
    assert jobs._polls.hits == 1

    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM jobs WHERE id = :id"), {"id": job_id})
    assert await asyncio.wait_for(jobs.poll_body(job_id, tenant="acme"), TIMEOUT) is None
    assert jobs._polls.kept == 0


async def test_only_completed_jobs_are_kept_and_the_oldest_go_first(engine: AsyncEngine) -> None:
    jobs = JobRepository(engine)
    failed = await create_job(engine)
    await add_history(engine, failed)
    await set_state(engine, failed, "failed")
    for _ in range(2):
        await asyncio.wait_for(jobs.poll_body(failed), TIMEOUT)
    assert (jobs._polls.hits, jobs._polls.kept) == (0, 0)

    one, two = await completed_job(engine), await completed_job(engine)
    body = await asyncio.wait_for(jobs.poll_body(one), TIMEOUT)
    assert body is not None
    jobs._polls.cache_bytes = len(body) + 10  # room for one document
    await asyncio.wait_for(jobs.poll_body(two), TIMEOUT)
    assert jobs._polls.kept == 1
    await asyncio.wait_for(jobs.poll_body(two), TIMEOUT)
    await asyncio.wait_for(jobs.poll_body(one), TIMEOUT)
    assert jobs._polls.hits == 1  # two was kept; one had gone and was read in full


async def test_a_poll_is_read_again_when_its_pooled_connection_is_broken(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A backend terminated under a pooled connection can leave it mid-protocol: asyncpg
    # then says "another operation is in progress". The read is repeated on a new one.
    import asyncpg

    jobs = JobRepository(engine)
    job_id = await create_job(engine)
    fetch = asyncpg.Connection.fetch
    broken: list[object] = []

    async def fetch_once_broken(self: asyncpg.Connection, query: str, *args: Any) -> Any:
        if not broken:
            broken.append(self)
            raise asyncpg.InternalClientError("cannot switch to state 11; another operation")
        return await fetch(self, query, *args)

    monkeypatch.setattr(asyncpg.Connection, "fetch", fetch_once_broken)
    document = as_json(await asyncio.wait_for(jobs.poll_document(job_id), TIMEOUT))

    assert document["status"] == "queued" and len(broken) == 1
