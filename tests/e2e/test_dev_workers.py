"""``blogpipe dev --workers N``: the API in the dev process, the stages and the notifier
in N ``blogpipe worker`` children, which are restarted when they die."""

from __future__ import annotations

from pathlib import Path

import httpx
import pytest

from tests.support.pipeline import (
    PipelineProcess,
    children_of,
    jobs_completed,
    pipeline_env,
    stop_and_check_children_gone,
    submit,
    survive_a_child_kill,
)
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


async def test_workers_do_the_stages_and_are_restarted(
    database_url: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    env = pipeline_env(database_url, BLOGPIPE_OFFLINE_LLM_DELAY="0.05")
    dev = PipelineProcess(env, tmp_path / "dev.log", args=("--workers", "2"))
    await dev.start()
    try:
        # /readyz answers only once both workers are up.
        assert len(children_of(dev, "worker")) == 2
        async with httpx.AsyncClient(timeout=10) as client:
            job_ids = [
                await submit(client, dev.url, webhook_receiver.url, topic=f"Workers {n}")
                for n in range(6)
            ]
            await wait_for(
                lambda: jobs_completed(client, dev.url, job_ids), timeout=90, message="jobs"
            )
            log = (tmp_path / "dev.log").read_text()
            # The dev process runs only the API: the stage work was the workers'.
            assert log.count("Running research, outline, draft, seo, notifier") == 2
            await survive_a_child_kill(dev, "worker", client, webhook_receiver, len(job_ids))
    finally:
        await stop_and_check_children_gone(dev, "worker")
