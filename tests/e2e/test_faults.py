"""Delivery guarantees under injected faults, on the postgres broker and on Pub/Sub:
duplicate and out-of-order delivery, a crash between commit and publish, dropped database
connections, poison LLM output with dead-lettering and replay, and cancel mid-run."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import httpx
import pytest

from blogpipe.runtime import Pipeline
from core.constants import stage_topic
from core.events import StageMessage
from tests.support.fake_openai import FakeOpenAI, running_fake_openai
from tests.support.faults import (
    BROKERS,
    broker_env,
    duplicate_outputs,
    duplicate_stage_messages,
    fail_first_publish,
    scalar,
    terminate_backends,
)
from tests.support.pipeline import pipeline_env, start_pipeline, submit
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

Start = Callable[..., Awaitable[Pipeline]]


@pytest.fixture
async def fake_openai() -> AsyncIterator[FakeOpenAI]:
    async with running_fake_openai() as fake:
        yield fake


@pytest.fixture(params=BROKERS)
def broker_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def start(
    database_url: str, broker_kind: str, request: pytest.FixtureRequest
) -> AsyncIterator[Start]:
    """Start the in-process pipeline on the parametrized broker with extra env overrides."""
    started: list[Pipeline] = []

    async def run(**overrides: str) -> Pipeline:
        env = pipeline_env(database_url, **broker_env(broker_kind, request))
        env.update(overrides)
        pipeline = await start_pipeline(env)
        started.append(pipeline)
        return pipeline

    yield run
    for pipeline in started:
        await asyncio.wait_for(pipeline.stop(), timeout=60)


async def statuses(client: httpx.AsyncClient, url: str, job_ids: list[str]) -> list[dict]:
    responses = await asyncio.gather(*(client.get(f"{url}/api/v1/blog/jobs/{j}") for j in job_ids))
    return [response.json() for response in responses]


async def wait_all(
    client: httpx.AsyncClient,
    url: str,
    job_ids: list[str],
    wanted: str = "completed",
    within: float = 120,
) -> list[dict]:
    async def probe() -> list[dict] | None:
        bodies = await statuses(client, url, job_ids)
        if wanted == "completed":
            assert all(b["status"] not in ("failed", "cancelled") for b in bodies), bodies
        return bodies if all(b["status"] == wanted for b in bodies) else None

    return await wait_for(probe, timeout=within, interval=0.1, message=f"jobs {wanted}")


def webhook_types(receiver: WebhookReceiver) -> Counter[tuple[str, str, int]]:
    seen: Counter[tuple[str, str, int]] = Counter()
    for request in receiver.requests:
        body: Any = request.json()
        seen[(body["data"]["job_id"], body["type"], body["data"].get("generation", 0))] += 1
    return seen


async def test_duplicate_and_out_of_order_delivery(
    start: Start,
    database_url: str,
    webhook_receiver: WebhookReceiver,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    extra = duplicate_stage_messages(monkeypatch)
    pipeline = await start(BLOGPIPE_OFFLINE_LLM_DELAY="0.05")
    async with httpx.AsyncClient(timeout=10) as client:
        job_ids = [
            await submit(client, pipeline.url, webhook_receiver.url, topic=f"Dup {n}")
            for n in range(5)
        ]
        await wait_all(client, pipeline.url, job_ids)

        async def first_webhooks() -> bool:
            return len(webhook_receiver.requests) >= 5

        # Generation 1's completions are sent before the replay (an event handled after
        # it is superseded: the document would describe generation 2).
        await wait_for(first_webhooks, timeout=30, message="one webhook per first completion")
        # A replay, then stale messages of the old generation arriving after it.
        replayed = await client.post(
            f"{pipeline.url}/api/v1/blog/jobs/{job_ids[0]}/replay", json={"from_stage": "draft"}
        )
        assert replayed.status_code == 202
        runtime = pipeline.runtime
        assert runtime is not None
        for stage in ("draft", "seo"):
            stale = StageMessage(job_ids_uuid(job_ids[0]), stage, 1).to_message()
            await runtime.broker.publish(stage_topic(stage), stale)
        done = await wait_all(client, pipeline.url, job_ids[:1])
        assert done[0]["generation"] == 2

    assert sum(extra.values()) >= 5 * 4  # every hand-off really was delivered twice
    assert await duplicate_outputs(database_url) == 0
    outputs = await scalar(
        database_url, "SELECT count(*) FROM stage_runs WHERE status = 'succeeded'"
    )
    assert outputs == 5 * 4 + 2

    async def webhooks() -> bool:
        return len(webhook_receiver.requests) >= 6

    await wait_for(webhooks, timeout=30, message="one webhook per completion")
    completions = [key for key in webhook_types(webhook_receiver) if key[1] == "job.completed"]
    seen = webhook_types(webhook_receiver)
    assert len(webhook_receiver.requests) == 6, seen
    assert sorted(Counter(job for job, _, _ in completions).values()) == [1, 1, 1, 1, 2], seen


def job_ids_uuid(job_id: str) -> Any:
    from uuid import UUID

    return UUID(job_id)


async def test_crash_between_commit_and_publish(
    start: Start, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    failed = fail_first_publish(monkeypatch)
    pipeline = await start()
    async with httpx.AsyncClient(timeout=10) as client:
        job_ids = [await submit(client, pipeline.url, topic=f"Relay {n}") for n in range(4)]
        await wait_all(client, pipeline.url, job_ids, within=90)
    assert sum(failed.values()) >= 4 * 4  # every hand-off lost its first publish

    async def outbox_empty() -> bool:
        return await scalar(database_url, "SELECT count(*) FROM outbox") == 0

    await wait_for(outbox_empty, timeout=30, message="the relay to publish the job events")
    assert await duplicate_outputs(database_url) == 0


async def test_database_connections_terminated(start: Start, database_url: str) -> None:
    pipeline = await start(BLOGPIPE_OFFLINE_LLM_DELAY="0.1")
    async with httpx.AsyncClient(timeout=10) as client:
        job_ids = [await submit(client, pipeline.url, topic=f"Conn {n}") for n in range(8)]

        async def midway() -> bool:
            bodies = await statuses(client, pipeline.url, job_ids)
            return any(0 < body["progress_percentage"] < 100 for body in bodies)

        await wait_for(midway, timeout=60, message="jobs part-way through")
        assert await terminate_backends(database_url) > 0

        async def further() -> bool:
            return bool(
                await scalar(
                    database_url,
                    "SELECT count(*) FROM stage_runs"
                    " WHERE status = 'succeeded' AND finished_at >"
                    " now() - interval '2 seconds'",
                )
            )

        await wait_for(further, timeout=60, message="progress after reconnecting")
        await terminate_backends(database_url)
        await wait_all(client, pipeline.url, job_ids, within=150)
    assert await duplicate_outputs(database_url) == 0


async def test_poison_output_dead_letters_then_replay_completes(
    start: Start,
    database_url: str,
    fake_openai: FakeOpenAI,
    webhook_receiver: WebhookReceiver,
) -> None:
    # The draft is free Markdown, so its poison is an answer cut off at the token limit
    # every time (a retryable invalid output, like invalid JSON for structured stages).
    fake_openai.fail("length", stage="draft", times=10_000)
    pipeline = await start(
        BLOGPIPE_LLM="openai", OPENAI_API_KEY="sk-test", OPENAI_BASE_URL=fake_openai.base_url
    )
    attempts = pipeline.settings.max_delivery_attempts
    async with httpx.AsyncClient(timeout=10) as client:
        job_id = await submit(client, pipeline.url, webhook_receiver.url, use_google_search=False)
        failed = (await wait_all(client, pipeline.url, [job_id], "failed", within=150))[0]
        assert failed["current_stage"] == "draft"
        assert "draft" in failed["error_message"]
        assert failed["error"]["attempts"] == attempts and failed["error"]["type"]
        draft = next(view for view in failed["stages"] if view["stage"] == "draft")
        assert draft["attempts"] == attempts and draft["error"]
        before = Counter(fake_openai.calls)

        # The notifier skips an event whose job a replay moved on before it was handled
        # (its status document would describe the new generation), so the frontend hears
        # of the failure only if it is sent before the replay.
        async def failure_sent() -> bool:
            return any(kind == "job.failed" for _, kind, _ in webhook_types(webhook_receiver))

        await wait_for(failure_sent, timeout=30, message="the job.failed webhook")
        fake_openai.faults.clear()
        response = await client.post(f"{pipeline.url}/api/v1/blog/jobs/{job_id}/replay")
        assert response.status_code == 202 and response.json()["from_stage"] == "draft"
        done = (await wait_all(client, pipeline.url, [job_id], within=60))[0]
        assert done["result"]["content"]
    assert fake_openai.calls["research"] == before["research"]
    assert fake_openai.calls["outline"] == before["outline"]
    assert fake_openai.calls["draft"] > before["draft"]
    letters = await scalar(
        database_url, "SELECT count(*) FROM dead_letters WHERE outcome = 'failed'"
    )
    assert letters == 1

    async def failed_and_completed() -> bool:
        kinds = {kind for _, kind, _ in webhook_types(webhook_receiver)}
        return kinds == {"job.failed", "job.completed"}

    await wait_for(failed_and_completed, timeout=30, message="job.failed then job.completed")


async def test_cancel_mid_run(
    start: Start, database_url: str, webhook_receiver: WebhookReceiver
) -> None:
    pipeline = await start(BLOGPIPE_OFFLINE_LLM_DELAY="0.4")
    async with httpx.AsyncClient(timeout=10) as client:
        job_id = await submit(client, pipeline.url, webhook_receiver.url)

        async def running() -> bool:
            body = (await statuses(client, pipeline.url, [job_id]))[0]
            return body["current_stage"] == "outline"

        await wait_for(running, timeout=60, message="the outline stage running")
        response = await client.post(
            f"{pipeline.url}/api/v1/blog/jobs/{job_id}/cancel", json={"reason": "changed my mind"}
        )
        assert response.status_code == 200, response.text
        assert response.json()["status"] == "cancelled"

        async def settled() -> bool:
            return not await scalar(
                database_url, "SELECT count(*) FROM stage_runs WHERE status = 'running'"
            )

        await wait_for(settled, timeout=60, message="the in-flight stage run to end")
        body = (await statuses(client, pipeline.url, [job_id]))[0]
        assert body["status"] == "cancelled"
        again = await client.post(f"{pipeline.url}/api/v1/blog/jobs/{job_id}/cancel")
        assert again.status_code == 409

    # Nothing started or committed after the cancel: later stages never ran.
    later = await scalar(
        database_url,
        "SELECT count(*) FROM stage_runs r JOIN jobs j ON"
        " j.id = r.job_id WHERE r.started_at > j.completed_at OR"
        " (r.status = 'succeeded' AND r.finished_at > j.completed_at)",
    )
    assert later == 0
    assert await scalar(database_url, "SELECT count(*) FROM stage_runs WHERE stage = 'seo'") == 0

    async def cancelled_webhook() -> bool:
        return any(kind == "job.cancelled" for _, kind, _ in webhook_types(webhook_receiver))

    await wait_for(cancelled_webhook, timeout=30, message="the job.cancelled webhook")
    assert all(kind != "job.completed" for _, kind, _ in webhook_types(webhook_receiver))
