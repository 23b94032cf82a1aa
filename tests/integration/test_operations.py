"""Operator endpoints on a running in-process pipeline (postgres broker, offline LLM):
replay and cancel errors, Idempotency-Key, batch submit and poll, bulk replay."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest
from sqlalchemy import text

from blogpipe.runtime import Pipeline
from tests.support.pipeline import pipeline_env, start_pipeline, submit
from tests.support.waiting import wait_for

BODY = {"topic": "Best presents for teenagers", "keywords": ["gifts for teens"]}


@pytest.fixture
async def pipeline(database_url: str) -> AsyncIterator[Pipeline]:
    running = await start_pipeline(pipeline_env(database_url))
    yield running
    await asyncio.wait_for(running.stop(), timeout=30)


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as http:
        yield http


async def status(client: httpx.AsyncClient, url: str, job_id: str) -> dict:
    return (await client.get(f"{url}/api/v1/blog/jobs/{job_id}")).json()


async def wait_status(client: httpx.AsyncClient, url: str, job_id: str, wanted: str) -> dict:
    async def probe() -> dict | None:
        body = await status(client, url, job_id)
        return body if body["status"] == wanted else None

    return await wait_for(probe, timeout=60, message=f"job {job_id} {wanted}")


async def count(pipeline: Pipeline, sql: str, **params: object) -> int:
    assert pipeline.runtime is not None
    async with pipeline.runtime.engine.connect() as conn:
        return int((await conn.execute(text(sql), params)).scalar_one())


async def test_unknown_and_finished_jobs(pipeline: Pipeline, client: httpx.AsyncClient) -> None:
    base = f"{pipeline.url}/api/v1/blog"
    missing = "00000000-0000-0000-0000-000000000000"
    for action in ("replay", "cancel"):
        response = await client.post(f"{base}/jobs/{missing}/{action}")
        assert response.status_code == 404
        assert response.json() == {"detail": f"Job {missing} not found"}
        response = await client.post(f"{base}/jobs/not-a-uuid/{action}")
        assert response.status_code == 404
    job_id = await submit(client, pipeline.url)
    await wait_status(client, pipeline.url, job_id, "completed")
    response = await client.post(f"{base}/jobs/{job_id}/cancel")
    assert response.status_code == 409
    assert response.json() == {
        "detail": f"Job {job_id} is already completed and cannot be cancelled"
    }
    response = await client.post(f"{base}/jobs/{job_id}/replay")
    assert response.status_code == 422 and "from_stage" in response.json()["detail"]
    response = await client.post(f"{base}/jobs/{job_id}/replay", json={"from_stage": "nope"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "from_stage"]


async def test_replay_from_a_stage_keeps_earlier_outputs(
    pipeline: Pipeline, client: httpx.AsyncClient
) -> None:
    job_id = await submit(client, pipeline.url)
    await wait_status(client, pipeline.url, job_id, "completed")
    response = await client.post(
        f"{pipeline.url}/api/v1/blog/jobs/{job_id}/replay",
        json={"from_stage": "draft", "reason": "new prompt"},
    )
    assert response.status_code == 202, response.text
    assert response.json()["generation"] == 2
    done = await wait_status(client, pipeline.url, job_id, "completed")
    assert done["generation"] == 2
    runs = await count(
        pipeline,
        "SELECT count(*) FROM stage_runs WHERE job_id = :id AND generation = 2",
        id=done["job_id"],
    )
    assert runs == 2  # draft and seo only; research and outline were kept
    recorded = await count(
        pipeline,
        "SELECT count(*) FROM job_operations WHERE job_id = :id AND action = 'replay'"
        " AND actor <> '' AND reason = 'new prompt' AND from_stage = 'draft'",
        id=done["job_id"],
    )
    assert recorded == 1


async def test_idempotency_key(pipeline: Pipeline, client: httpx.AsyncClient) -> None:
    url = f"{pipeline.url}/api/v1/blog/generate-enhanced?async_mode=true"
    headers = {"Idempotency-Key": "order-42"}
    responses = await asyncio.gather(
        *(client.post(url, json=BODY, headers=headers) for _ in range(5))
    )
    assert {r.status_code for r in responses} == {202}
    assert len({r.json()["job_id"] for r in responses}) == 1
    assert sum(r.headers.get("idempotent-replayed") == "true" for r in responses) == 4
    assert await count(pipeline, "SELECT count(*) FROM jobs") == 1
    other = await client.post(url, json={**BODY, "topic": "Something else"}, headers=headers)
    assert other.status_code == 422
    assert "order-42" in other.json()["detail"] and "different" in other.json()["detail"]
    fresh = await client.post(url, json=BODY, headers={"Idempotency-Key": "order-43"})
    assert fresh.json()["job_id"] != responses[0].json()["job_id"]
    for job_id in (fresh.json()["job_id"], responses[0].json()["job_id"]):
        await wait_status(client, pipeline.url, job_id, "completed")


async def test_batch_validates_everything_first(
    pipeline: Pipeline, client: httpx.AsyncClient
) -> None:
    base = f"{pipeline.url}/api/v1/blog"
    items = [{**BODY, "topic": f"Topic number {n}"} for n in range(5)]
    items[3]["topic"] = "x"
    response = await client.post(f"{base}/batch", json={"requests": items})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "requests", 3, "topic"]
    assert await count(pipeline, "SELECT count(*) FROM jobs") == 0
    too_many = await client.post(f"{base}/batch", json={"requests": [BODY] * 101})
    assert too_many.status_code == 422
    assert too_many.json()["detail"][0]["loc"] == ["body", "requests"]

    items[3]["topic"] = "Topic number 3"
    items[2]["callback_url"] = "http://10.0.0.8/internal"
    refused = await client.post(f"{base}/batch", json={"requests": items})
    assert refused.status_code == 422
    assert refused.json()["detail"][0]["loc"] == ["body", "requests", 2, "callback_url"]
    assert await count(pipeline, "SELECT count(*) FROM jobs") == 0
    del items[2]["callback_url"]
    items[1]["callback_url"] = "http://127.0.0.1:9/own"
    response = await client.post(
        f"{base}/batch", json={"requests": items, "callback_url": "http://127.0.0.1:9/shared"}
    )
    assert response.status_code == 202, response.text
    batch = response.json()
    assert len(batch["job_ids"]) == 5
    urls = await count(
        pipeline,
        "SELECT count(*) FROM jobs WHERE batch_id = :b AND callback_url LIKE '%/shared'",
        b=batch["batch_id"],
    )
    assert urls == 4

    async def all_done() -> dict | None:
        body = (await client.get(f"{base}/batches/{batch['batch_id']}")).json()
        return body if body["done"] else None

    summary = await wait_for(all_done, timeout=60, message="the batch finished")
    assert summary["counts"]["completed"] == 5 and summary["total"] == 5
    missing = await client.get(f"{base}/batches/00000000-0000-0000-0000-000000000000")
    assert missing.status_code == 404


async def test_bulk_replay_preview_and_cap(pipeline: Pipeline, client: httpx.AsyncClient) -> None:
    base = f"{pipeline.url}/api/v1/blog"
    job_ids = [await submit(client, pipeline.url, topic=f"Topic {n}") for n in range(3)]
    for job_id in job_ids:
        await wait_status(client, pipeline.url, job_id, "completed")
    assert pipeline.runtime is not None
    async with pipeline.runtime.engine.begin() as conn:  # as if seo had failed for all three
        await conn.execute(
            text("UPDATE jobs SET status = 'failed', current_stage = 'seo', error_message = 'boom'")
        )
    preview = await client.post(
        f"{base}/replay", json={"status": "failed", "stage": "seo", "since": "2h", "dry_run": True}
    )
    assert preview.status_code == 200, preview.text
    assert preview.json()["matched"] == 3 and preview.json()["replayed"] == []
    capped = await client.post(f"{base}/replay", json={"stage": "seo", "limit": 2})
    assert capped.status_code == 202
    body = capped.json()
    assert body["matched"] == 3 and len(body["replayed"]) == 2 and body["truncated"]
    for item in body["replayed"]:
        await wait_status(client, pipeline.url, item["job_id"], "completed")
    bad = await client.post(f"{base}/replay", json={"since": "soon"})
    assert bad.status_code == 422 and "since" in bad.json()["detail"]
    # Past what Postgres timestamps can hold, or not a duration at all: 422, not a 500.
    for since in (1e300, "1e300d", -5, 0, "nan", "inf"):
        far = await client.post(f"{base}/replay", json={"since": since, "dry_run": True})
        assert far.status_code == 422 and "since" in far.json()["detail"], (since, far.text)
    over = await client.post(f"{base}/replay", json={"limit": 10_000})
    assert over.status_code == 422 and "limit" in over.json()["detail"]
