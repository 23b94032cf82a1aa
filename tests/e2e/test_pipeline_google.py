"""End to end on the Google path: HTTP → Cloud Tasks emulator → worker endpoint →
Pub/Sub emulator → four stage subscribers → notifier → signed webhook."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from sqlalchemy import text
from standardwebhooks import Webhook

from blogpipe.runtime import Pipeline
from tests.support.pipeline import WEBHOOK_SECRET, pipeline_env, start_pipeline, submit
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

JOBS = 20
pytestmark = [pytest.mark.pubsub, pytest.mark.cloudtasks]


@pytest.fixture
async def google_pipeline(
    database_url: str, pubsub_emulator: Any, cloudtasks_emulator: Any
) -> AsyncIterator[Pipeline]:
    env = pipeline_env(database_url, BLOGPIPE_OFFLINE_LLM_DELAY="0.1")
    env.update(
        BLOGPIPE_BROKER="pubsub",
        BLOGPIPE_TASK_QUEUE="cloudtasks",
        GOOGLE_CLOUD_PROJECT=pubsub_emulator.project("bp-e2e"),
        PUBSUB_EMULATOR_HOST=pubsub_emulator.host,
        CLOUD_TASKS_EMULATOR_HOST=cloudtasks_emulator.host,
        CLOUD_RUN_WORKER_URL=f"http://127.0.0.1:{env['PORT']}/api/v1/blog/worker",
        # The Pub/Sub emulator's retry policy has a floor; keep redelivery quick anyway.
        BLOGPIPE_MIN_BACKOFF="0",
        BLOGPIPE_MAX_ATTEMPTS="5",
    )
    running = await start_pipeline(env)
    yield running
    await asyncio.wait_for(running.stop(), timeout=60)


async def test_jobs_flow_through_cloud_tasks_and_pubsub(
    google_pipeline: Pipeline, webhook_receiver: WebhookReceiver
) -> None:
    pipeline = google_pipeline
    async with httpx.AsyncClient(timeout=10) as client:
        job_ids = await asyncio.wait_for(
            asyncio.gather(
                *(
                    submit(client, pipeline.url, webhook_receiver.url, topic=f"Gift ideas {n}")
                    for n in range(JOBS)
                )
            ),
            timeout=60,
        )
        seen_progress: set[float] = set()

        async def all_completed() -> bool:
            responses = await asyncio.gather(
                *(client.get(f"{pipeline.url}/api/v1/blog/jobs/{job_id}") for job_id in job_ids)
            )
            bodies = [response.json() for response in responses]
            for body in bodies:
                assert body["status"] not in ("failed", "cancelled"), body
                seen_progress.add(body["progress_percentage"])
            return all(body["status"] == "completed" for body in bodies)

        await wait_for(all_completed, timeout=180, interval=0.2, message="all jobs completed")
        assert any(0 < p < 100 for p in seen_progress)

    async def all_webhooks() -> bool:
        return len(webhook_receiver.requests) >= JOBS

    await wait_for(all_webhooks, timeout=60, message="one webhook per job")
    verifier = Webhook(WEBHOOK_SECRET)
    delivered = [
        verifier.verify(r.body, r.headers)["data"]["job_id"] for r in webhook_receiver.requests
    ]
    assert sorted(delivered) == sorted(job_ids)

    runtime = pipeline.runtime
    assert runtime is not None
    async with runtime.engine.connect() as conn:
        started = (
            await conn.execute(text("SELECT count(*) FROM jobs WHERE started_at IS NOT NULL"))
        ).scalar_one()
        outputs = (
            await conn.execute(text("SELECT count(*) FROM stage_runs WHERE status = 'succeeded'"))
        ).scalar_one()
        left = (await conn.execute(text("SELECT count(*) FROM outbox"))).scalar_one()
    assert started == JOBS
    assert outputs == JOBS * 4
    assert left == 0
