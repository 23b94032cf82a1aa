"""``blogpipe dev --replicas N``: the whole pipeline in N processes on one port; a job
runs in the replica that took it, and a replica that dies is restarted."""

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

CONNECTIONS = 16
"""Fresh connections opened at once: the kernel spreads them over the replicas by a
hash of each one's address, so all of them landing on one of two replicas has a chance
of 2 in 65,536."""


def replicas_of(process: PipelineProcess) -> list[psutil.Process]:
    """The running ``serve`` children (a killed one is a zombie until dev reaps it)."""
    assert process.process is not None
    found = []
    for child in psutil.Process(process.process.pid).children():
        try:
            if "serve" in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


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
        replicas = replicas_of(dev)
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

            async def completed(ids: list[str]) -> bool:
                bodies = [(await client.get(f"{dev.url}/api/v1/blog/jobs/{j}")).json() for j in ids]
                assert all(b["status"] != "failed" for b in bodies), bodies
                return all(b["status"] == "completed" for b in bodies)

            await wait_for(lambda: completed(job_ids), timeout=90, message="jobs completed")
            log = (tmp_path / "dev.log").read_text()
            assert log.count("Running api, research, outline, draft, seo, notifier") == 1

            # A replica killed with SIGKILL is replaced, and jobs still complete.
            os.kill(replicas[0].pid, signal.SIGKILL)

            async def replaced() -> bool:
                pids = {r.pid for r in replicas_of(dev)}
                return len(pids) == 1 and replicas[0].pid not in pids

            await wait_for(replaced, timeout=30, message="the killed replica to be replaced")
            more = [
                await submit(client, dev.url, webhook_receiver.url, topic=f"After {n}")
                for n in range(3)
            ]
            await wait_for(lambda: completed(more), timeout=90, message="jobs after the kill")

        async def webhooks() -> bool:
            return len(webhook_receiver.requests) >= len(job_ids) + len(more)

        await wait_for(webhooks, timeout=60, message="a webhook per job")
        survivors = replicas_of(dev)
    finally:
        await asyncio.wait_for(asyncio.to_thread(dev.stop), 40)
    # SIGTERM to dev stops its replicas too.
    gone = await asyncio.wait_for(asyncio.to_thread(psutil.wait_procs, survivors, 20), 30)
    assert not gone[1], f"replicas still running after dev stopped: {gone[1]}"
