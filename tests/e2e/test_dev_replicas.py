"""``blogpipe dev --replicas N``: the whole pipeline in N processes on one port; a job
runs in the replica that took it, and a replica that dies is restarted."""

from __future__ import annotations

import asyncio
from pathlib import Path

import httpx
import psutil
import pytest

from blogpipe.runtime import Pipeline, Runtime
from core.settings import Settings
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

CONNECTIONS = 16
"""Fresh connections opened at once: the kernel spreads them over the replicas by a
hash of each one's address, so all of them landing on one of two replicas has a chance
of 2 in 65,536."""


def connections_on(pid: int, port: int) -> int:
    return sum(
        1
        for conn in psutil.Process(pid).net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_ESTABLISHED
    )


async def test_replicas_share_the_port_run_jobs_and_are_restarted(
    database_url: str, tmp_path: Path, webhook_receiver: WebhookReceiver
) -> None:
    env = pipeline_env(database_url, BLOGPIPE_OFFLINE_LLM_DELAY="0.05")
    dev = PipelineProcess(env, tmp_path / "dev.log", args=("--replicas", "2"))
    await dev.start()
    assert dev.process is not None
    port = int(env["PORT"])
    try:
        # /readyz answers only once the other replica is serving too.
        replicas = children_of(dev, "serve")
        assert len(replicas) == 1, replicas
        clients = [httpx.AsyncClient(timeout=10) for _ in range(CONNECTIONS)]
        try:
            job_ids = await asyncio.wait_for(
                asyncio.gather(
                    *(
                        submit(client, dev.url, webhook_receiver.url, topic=f"Replicas {n}")
                        for n, client in enumerate(clients)
                    )
                ),
                30,
            )
            # Both processes accepted some of the connections (they are still open).
            assert connections_on(dev.process.pid, port) > 0
            assert connections_on(replicas[0].pid, port) > 0
        finally:
            for client in clients:
                await client.aclose()

        async with httpx.AsyncClient(timeout=10) as client:
            await wait_for(
                lambda: jobs_completed(client, dev.url, job_ids), timeout=90, message="jobs"
            )
            log = (tmp_path / "dev.log").read_text()
            assert log.count("Running api, research, outline, draft, seo, notifier") == 1
            await survive_a_child_kill(dev, "serve", client, webhook_receiver, len(job_ids))
    finally:
        await stop_and_check_children_gone(dev, "serve")


async def test_on_a_shared_port_a_process_listens_before_its_replicas_start(
    database_url: str,
) -> None:
    # A client may connect as soon as a replica answers /readyz: had this process not been
    # listening by then, every connection opened in that moment went to the replica (in
    # the benchmark one process did 90% of the work while the other idled).
    settings = Settings.from_env(pipeline_env(database_url))
    pipeline = Pipeline(settings, share_port=True)
    listening: list[bool] = []

    async def before_serving(runtime: Runtime) -> None:
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(settings.host, settings.port), 5
            )
        except OSError:
            listening.append(False)
        else:
            writer.close()
            listening.append(True)

    await asyncio.wait_for(pipeline.start(before_serving=before_serving), 60)
    try:
        assert listening == [True]
    finally:
        await asyncio.wait_for(pipeline.stop(), 30)
