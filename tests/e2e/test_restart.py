"""Restart survival: ``blogpipe dev`` killed with SIGKILL mid-run, started again; every
job completes and no stage output is written twice."""

from __future__ import annotations

import asyncio
from pathlib import Path

import asyncpg
import httpx
import pytest

from core.db.engine import plain_url
from tests.support.pipeline import PipelineProcess, pipeline_env, submit
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

JOBS = 12

pytestmark = pytest.mark.slow


async def statuses(client: httpx.AsyncClient, url: str, job_ids: list[str]) -> list[dict]:
    responses = await asyncio.gather(*(client.get(f"{url}/api/v1/blog/jobs/{j}") for j in job_ids))
    return [response.json() for response in responses]


async def test_jobs_survive_a_killed_process(
    database_url: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    env = pipeline_env(
        database_url,
        BLOGPIPE_OFFLINE_LLM_DELAY="0.3",
        BLOGPIPE_STAGE_LEASE="3",
        BLOGPIPE_ACK_DEADLINE="4",
    )
    first = PipelineProcess(env, tmp_path / "first.log")
    await first.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            job_ids = [
                await submit(client, first.url, webhook_receiver.url, topic=f"Topic {n}")
                for n in range(JOBS)
            ]

            async def some_midway() -> bool:
                bodies = await statuses(client, first.url, job_ids)
                return any(0 < body["progress_percentage"] < 100 for body in bodies)

            await wait_for(some_midway, timeout=60, message="a job part-way through")
            first.kill()
            killed_during = await asyncio.wait_for(_unfinished(database_url), timeout=10)
            assert killed_during > 0, "the kill came too late to test anything"

            second = PipelineProcess(env, tmp_path / "second.log")
            await second.start()
            try:

                async def all_completed() -> bool:
                    bodies = await statuses(client, second.url, job_ids)
                    assert all(body["status"] != "failed" for body in bodies), bodies
                    return all(body["status"] == "completed" for body in bodies)

                await wait_for(
                    all_completed,
                    timeout=120,
                    interval=0.3,
                    message="every job completed after the restart",
                )
                await wait_for(
                    lambda: _delivered(database_url, JOBS),
                    timeout=60,
                    message="every completion webhook delivered",
                )
            finally:
                second.stop()
    finally:
        first.stop()

    conn = await asyncio.wait_for(asyncpg.connect(plain_url(database_url)), timeout=10)
    try:
        duplicates = await conn.fetchval(
            "SELECT count(*) FROM (SELECT job_id, stage, generation FROM stage_runs"
            " WHERE status = 'succeeded' GROUP BY 1, 2, 3 HAVING count(*) > 1) d"
        )
        outputs = await conn.fetchval("SELECT count(*) FROM stage_runs WHERE status = 'succeeded'")
    finally:
        await conn.close()
    assert duplicates == 0
    assert outputs == JOBS * 4
    received = {r.json()["data"]["job_id"] for r in webhook_receiver.requests}  # type: ignore[index]
    assert received == set(job_ids)


async def _unfinished(database_url: str) -> int:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        return int(await conn.fetchval("SELECT count(*) FROM jobs WHERE status <> 'completed'"))
    finally:
        await conn.close()


async def _delivered(database_url: str, expected: int) -> bool:
    conn = await asyncpg.connect(plain_url(database_url))
    try:
        done = await conn.fetchval(
            "SELECT count(DISTINCT job_id) FROM webhook_deliveries WHERE status = 'succeeded'"
        )
    finally:
        await conn.close()
    return int(done) == expected
