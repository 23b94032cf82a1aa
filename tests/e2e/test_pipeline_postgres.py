"""End to end on the embedded defaults: HTTP → local task queue → postgres broker →
four stages → notifier → signed webhook, with progress observed by polling."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import text
from standardwebhooks import Webhook

from blogpipe.runtime import Pipeline
from stages.reading_ease import cmu_syllables
from tests.support.pipeline import WEBHOOK_SECRET, pipeline_env, start_pipeline, submit
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

JOBS = 20


@pytest.fixture
async def pipeline(database_url: str) -> AsyncIterator[Pipeline]:
    # A small per-call delay so pollers can see progress between 0 and 100.
    running = await start_pipeline(pipeline_env(database_url, BLOGPIPE_OFFLINE_LLM_DELAY="0.2"))
    yield running
    await asyncio.wait_for(running.stop(), timeout=30)


async def test_twenty_jobs_complete_with_one_signed_webhook_each(
    pipeline: Pipeline, webhook_receiver: WebhookReceiver
) -> None:
    async with httpx.AsyncClient(timeout=10) as client:
        job_ids = await asyncio.wait_for(
            asyncio.gather(
                *(
                    submit(
                        client,
                        pipeline.url,
                        webhook_receiver.url,
                        topic=f"Gift ideas number {n}",
                        metadata={"n": n},
                    )
                    for n in range(JOBS)
                )
            ),
            timeout=30,
        )
        assert len(set(job_ids)) == JOBS
        seen_progress: dict[str, set[float]] = {job_id: set() for job_id in job_ids}

        async def all_completed() -> bool:
            statuses = await asyncio.gather(
                *(client.get(f"{pipeline.url}/api/v1/blog/jobs/{job_id}") for job_id in job_ids)
            )
            done = 0
            for job_id, response in zip(job_ids, statuses, strict=True):
                body = response.json()
                assert body["status"] not in ("failed", "cancelled"), body
                seen_progress[job_id].add(body["progress_percentage"])
                done += body["status"] == "completed"
            return done == JOBS

        await wait_for(all_completed, timeout=120, interval=0.1, message="all jobs completed")

        midway = [p for values in seen_progress.values() for p in values if 0 < p < 100]
        assert midway, "polling never saw progress between 0 and 100"

        final = (await client.get(f"{pipeline.url}/api/v1/blog/jobs/{job_ids[0]}")).json()
        result = final["result"]
        assert final["progress_percentage"] == 100 and final["completed_at"]
        for field in (
            "title",
            "content",
            "meta_title",
            "meta_description",
            "readability_score",
            "seo_score",
            "structured_data",
            "content_metadata",
            "stage_results",
            "total_tokens",
            "total_cost",
            "generation_time",
            "warnings",
        ):
            assert field in result, field
        assert [r["stage"] for r in result["stage_results"]] == [
            "research",
            "outline",
            "draft",
            "seo",
        ]
        percentages = [u["progress_percentage"] for u in final["progress_updates"]]
        assert percentages == sorted(percentages) and percentages[-1] == 100
        assert {u["stage"] for u in final["progress_updates"]} >= {
            "research",
            "outline",
            "draft",
            "seo",
        }

    async def all_webhooks() -> bool:
        return len(webhook_receiver.requests) >= JOBS

    await wait_for(all_webhooks, timeout=60, message="one webhook per job")
    verifier = Webhook(WEBHOOK_SECRET)
    delivered: dict[str, int] = {}
    for request in webhook_receiver.requests:
        payload = verifier.verify(request.body, request.headers)
        assert payload["type"] == "job.completed"
        assert payload["data"]["status"] == "completed"
        delivered[payload["data"]["job_id"]] = delivered.get(payload["data"]["job_id"], 0) + 1
    assert delivered == {job_id: 1 for job_id in job_ids}
    # No late duplicates: the notifier has nothing left to send.
    runtime = pipeline.runtime
    assert runtime is not None

    async def all_deliveries_succeeded() -> bool:
        async with runtime.engine.connect() as conn:
            rows = await conn.execute(
                text("SELECT status, count(*) FROM webhook_deliveries GROUP BY status")
            )
            counts = {row[0]: row[1] for row in rows}
        return counts == {"succeeded": JOBS}

    await wait_for(all_deliveries_succeeded, timeout=30, message="deliveries marked succeeded")
    async with runtime.engine.connect() as conn:
        outputs = (
            await conn.execute(text("SELECT count(*) FROM stage_runs WHERE status = 'succeeded'"))
        ).scalar_one()
    assert outputs == JOBS * 4
    assert len(webhook_receiver.requests) == JOBS


async def test_a_process_running_the_seo_stage_loads_its_tables_before_any_message(
    database_url: str,
) -> None:
    # Loaded during the first article instead, the syllable table held up the event loop
    # (every request and stage of the process) for about 0.3 s.
    cmu_syllables.cache_clear()
    running = await start_pipeline(pipeline_env(database_url))
    try:
        assert cmu_syllables.cache_info().currsize == 1
    finally:
        await asyncio.wait_for(running.stop(), timeout=30)
