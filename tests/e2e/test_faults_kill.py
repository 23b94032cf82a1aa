"""kill -9 of a real worker process mid-LLM-call (both brokers), and a 300-job load run with
the process killed and restarted twice (postgres broker): every job completes once."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.faults import BROKERS, broker_env, duplicate_outputs, scalar
from tests.support.pipeline import PipelineProcess, pipeline_env, submit
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


async def completed(database_url: str) -> int:
    return int(await scalar(database_url, "SELECT count(*) FROM jobs WHERE status = 'completed'"))


async def no_failures(database_url: str) -> None:
    failed = await scalar(database_url, "SELECT count(*) FROM jobs WHERE status = 'failed'")
    assert failed == 0, await scalar(
        database_url, "SELECT error_message FROM jobs WHERE status = 'failed' LIMIT 1"
    )


@pytest.mark.parametrize("broker_kind", BROKERS)
async def test_kill_9_mid_llm_call(
    database_url: str, tmp_path: Path, broker_kind: str, request: pytest.FixtureRequest
) -> None:
    jobs = 8
    env = pipeline_env(
        database_url,
        BLOGPIPE_OFFLINE_LLM_DELAY="0.4",
        BLOGPIPE_STAGE_LEASE="3",
        **broker_env(broker_kind, request),
    )
    if broker_kind == "pubsub":
        # The emulator keeps a SIGKILLed client's streaming pulls registered and goes on
        # handing them messages; each comes back when its stream ack deadline (here the
        # 10 s BLOGPIPE_ACK_DEADLINE) lapses, and every such bounce counts as a delivery
        # attempt. Allow enough attempts that the bounces cannot dead-letter a healthy job.
        env["BLOGPIPE_MAX_ATTEMPTS"] = "30"
        # Those dead streams swallow messages until, it seems, their transport window fills:
        # the emulator's stream-close handler throws (NoSuchMethodError in its log), so it
        # never forgets them, and for the first half-minute or more after a kill a fresh
        # message (a re-drive included) often lands there too. A job whose message is
        # stuck in the broker is what the sweeper is for: here it re-drives a job idle for
        # 8 s (the default is 10 minutes), up to 12 times (the default is 3).
        env["BLOGPIPE_STUCK_AFTER"] = "8"
        env["BLOGPIPE_MAX_REDRIVES"] = "12"
        env["BLOGPIPE_SWEEP_INTERVAL"] = "1"
    first = PipelineProcess(env, tmp_path / "first.log")
    await first.start()
    try:
        async with httpx.AsyncClient(timeout=10) as client:
            for n in range(jobs):
                await submit(client, first.url, topic=f"Kill topic {n}")

        async def mid_call() -> bool:
            return bool(
                await scalar(
                    database_url, "SELECT count(*) FROM stage_runs WHERE status = 'running'"
                )
            )

        await wait_for(mid_call, timeout=60, message="stage runs holding an LLM call")
        first.kill()
    finally:
        first.stop()
    assert await completed(database_url) < jobs, "the kill came too late to test anything"
    second = PipelineProcess(env, tmp_path / "second.log")
    await second.start()
    try:

        async def all_done() -> bool:
            await no_failures(database_url)
            return await completed(database_url) == jobs

        await wait_for(all_done, timeout=150, interval=0.3, message="every job completed")
    finally:
        second.stop()
    assert await duplicate_outputs(database_url) == 0
    outputs = await scalar(
        database_url, "SELECT count(*) FROM stage_runs WHERE status = 'succeeded'"
    )
    assert outputs == jobs * 4


# Postgres broker only: on the Pub/Sub emulator (about 7 jobs/s here, and 10 s stream
# deadlines to wait out after each kill) this run takes longer than the per-test timeout.
@pytest.mark.parametrize("broker_kind", ["postgres"])
async def test_300_jobs_with_two_kills(
    database_url: str,
    tmp_path: Path,
    webhook_receiver: WebhookReceiver,
    broker_kind: str,
    request: pytest.FixtureRequest,
) -> None:
    jobs = 300
    env = pipeline_env(
        database_url,
        BLOGPIPE_OFFLINE_LLM_DELAY="0.01",
        BLOGPIPE_STAGE_LEASE="3",
        BLOGPIPE_ACK_DEADLINE="4",
        **broker_env(broker_kind, request),
    )
    if broker_kind == "pubsub":
        # See test_kill_9_mid_llm_call: the emulator's streams of a killed client bounce
        # messages back every ack deadline (10 s at the least on Pub/Sub).
        env.update(BLOGPIPE_ACK_DEADLINE="10", BLOGPIPE_MAX_ATTEMPTS="30")
    process = PipelineProcess(env, tmp_path / "run-0.log")
    await process.start()
    try:
        async with httpx.AsyncClient(timeout=30) as client:
            for chunk in range(3):
                items = [
                    {"topic": f"Load topic {chunk}-{n}", "keywords": ["load"]} for n in range(100)
                ]
                response = await client.post(
                    f"{process.url}/api/v1/blog/batch",
                    json={"requests": items, "callback_url": webhook_receiver.url},
                )
                assert response.status_code == 202, response.text
        for run, threshold in enumerate((60, 160), start=1):

            async def reached(threshold: int = threshold) -> bool:
                return await completed(database_url) >= threshold

            await wait_for(reached, timeout=180, interval=0.05, message=f"{threshold} completed")
            process.kill()
            assert await completed(database_url) < jobs, "the kill came too late"
            process = PipelineProcess(env, tmp_path / f"run-{run}.log")
            await process.start()

        async def all_done() -> bool:
            await no_failures(database_url)
            return await completed(database_url) == jobs

        await wait_for(all_done, timeout=300, interval=0.5, message="all 300 jobs completed")

        async def all_delivered() -> bool:
            return (
                int(
                    await scalar(
                        database_url,
                        "SELECT count(*) FROM webhook_deliveries WHERE status = 'succeeded'",
                    )
                )
                == jobs
            )

        await wait_for(all_delivered, timeout=120, interval=0.5, message="300 webhooks delivered")
    finally:
        process.stop()
    assert await duplicate_outputs(database_url) == 0
    assert (
        await scalar(database_url, "SELECT count(*) FROM stage_runs WHERE status = 'succeeded'")
        == jobs * 4
    )
    assert await scalar(database_url, "SELECT count(*) FROM webhook_deliveries") == jobs
    webhook_ids = {request.headers.get("webhook-id") for request in webhook_receiver.requests}
    assert len(webhook_ids) == jobs  # a resend after a kill reuses its id; receivers dedupe
