"""``blogpipe dev --workers N``: the API in the dev process, the stages and the notifier
in N ``blogpipe worker`` children, which are restarted when they die."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import httpx
import psutil
import pytest

from tests.support.pipeline import PipelineProcess, pipeline_env, submit
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

pytestmark = pytest.mark.slow


def workers_of(process: PipelineProcess) -> list[psutil.Process]:
    assert process.process is not None
    children = psutil.Process(process.process.pid).children()
    return [c for c in children if c.cmdline()[-1:] == ["worker"] and c.is_running()]


async def test_workers_do_the_stages_and_are_restarted(
    database_url: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    env = pipeline_env(database_url, BLOGPIPE_OFFLINE_LLM_DELAY="0.05")
    dev = PipelineProcess(env, tmp_path / "dev.log", args=("--workers", "2"))
    await dev.start()
    try:

        async def two_workers() -> list[psutil.Process] | None:
            found = workers_of(dev)
            return found if len(found) == 2 else None

        workers = await wait_for(two_workers, timeout=30, message="two worker processes")
        async with httpx.AsyncClient(timeout=10) as client:
            job_ids = [
                await submit(client, dev.url, webhook_receiver.url, topic=f"Workers {n}")
                for n in range(6)
            ]

            async def completed(ids: list[str]) -> bool:
                bodies = [(await client.get(f"{dev.url}/api/v1/blog/jobs/{j}")).json() for j in ids]
                assert all(b["status"] != "failed" for b in bodies), bodies
                return all(b["status"] == "completed" for b in bodies)

            await wait_for(lambda: completed(job_ids), timeout=90, message="jobs completed")
            log = (tmp_path / "dev.log").read_text()
            # The dev process runs only the API: the stage work was the workers'.
            assert "Running research, outline, draft, seo, notifier" in log
            assert log.count("Running research, outline, draft, seo, notifier") == 2

            # A worker killed with SIGKILL is replaced, and jobs still complete.
            os.kill(workers[0].pid, signal.SIGKILL)

            async def replaced() -> bool:
                pids = {w.pid for w in workers_of(dev)}
                return len(pids) == 2 and workers[0].pid not in pids

            await wait_for(replaced, timeout=30, message="the killed worker to be replaced")
            more = [
                await submit(client, dev.url, webhook_receiver.url, topic=f"After {n}")
                for n in range(3)
            ]
            await wait_for(lambda: completed(more), timeout=90, message="jobs after the kill")

        async def webhooks() -> bool:
            return len(webhook_receiver.requests) >= len(job_ids) + len(more)

        await wait_for(webhooks, timeout=60, message="a webhook per job")
        survivors = workers_of(dev)
    finally:
        await asyncio.wait_for(asyncio.to_thread(dev.stop), 40)
    # SIGTERM to dev stops its workers too.
    gone = await asyncio.wait_for(asyncio.to_thread(psutil.wait_procs, survivors, 20), 30)
    assert not gone[1], f"workers still running after dev stopped: {gone[1]}"
