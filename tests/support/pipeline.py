"""Run the whole pipeline (``blogpipe dev``) in-process or as a subprocess for tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import psutil

from blogpipe.runtime import Pipeline
from core.settings import Settings
from tests.support.net import free_port
from tests.support.receiver import WebhookReceiver
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
WORKER_SECRET = "e2e-worker-secret"


def pipeline_env(database_url: str, **overrides: str) -> dict[str, str]:
    """Environment for a test pipeline: embedded-style defaults, fast retries."""
    env = {
        "DATABASE_URL": database_url,
        "PORT": str(free_port()),
        "HOST": "127.0.0.1",
        "BLOGPIPE_BROKER": "postgres",
        "BLOGPIPE_TASK_QUEUE": "local",
        "BLOGPIPE_LLM": "offline",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WORKER_SHARED_SECRET": WORKER_SECRET,
        "WEBHOOK_RETRY_SCHEDULE": "0,0.2,0.5,1",
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1,localhost",
        "WEBHOOK_ALLOW_HTTP": "true",
        "BLOGPIPE_MIN_BACKOFF": "0.1",
        "BLOGPIPE_MAX_BACKOFF": "1",
        "BLOGPIPE_MAX_ATTEMPTS": "3",
        "BLOGPIPE_STAGE_LEASE": "5",
        "BLOGPIPE_ACK_DEADLINE": "10",
        "LOG_LEVEL": "INFO",
        # The e2e tests call the API as the seed's frontends do, with no key.
        "BLOGPIPE_AUTH": "none",
        "BLOGPIPE_RATE_LIMIT": "0",
    }
    env.update(overrides)
    return env


async def start_pipeline(env: Mapping[str, str]) -> Pipeline:
    pipeline = Pipeline(Settings.from_env(env))
    await asyncio.wait_for(pipeline.start(), timeout=60)
    return pipeline


class PipelineProcess:
    """``blogpipe dev`` in a real subprocess, so tests can kill -9 it."""

    def __init__(self, env: Mapping[str, str], log_path: Path, args: tuple[str, ...] = ()) -> None:
        self.env = {**os.environ, **env}
        self.args = args
        self.log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None
        self.url = f"http://127.0.0.1:{env['PORT']}"

    async def start(self) -> None:
        with self.log_path.open("ab") as log:  # the child keeps its own descriptor
            self.process = subprocess.Popen(  # noqa: ASYNC220 - returns at once; no waiting
                [sys.executable, "-m", "blogpipe", "dev", *self.args],
                cwd=REPO,
                env=self.env,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )

        async def ready() -> bool:
            assert self.process is not None
            if self.process.poll() is not None:
                raise AssertionError(f"blogpipe dev exited: {self.log_path.read_text()[-3000:]}")
            try:
                async with httpx.AsyncClient(timeout=2) as client:
                    return (await client.get(f"{self.url}/readyz")).status_code == 200
            except httpx.HTTPError:
                return False

        await wait_for(ready, timeout=60, interval=0.2, message="blogpipe dev to be ready")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, sig)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


async def submit(
    client: httpx.AsyncClient, base: str, callback_url: str | None = None, **fields: Any
) -> str:
    body: dict[str, Any] = {"topic": "Best presents for teenagers", "keywords": ["gifts for teens"]}
    body.update(fields)
    if callback_url:
        body["callback_url"] = callback_url
    response = await client.post(f"{base}/api/v1/blog/generate-enhanced?async_mode=true", json=body)
    assert response.status_code == 202, response.text
    return str(response.json()["job_id"])


def children_of(process: PipelineProcess, command: str) -> list[psutil.Process]:
    """``blogpipe dev``'s running ``blogpipe <command>`` children (a killed one is a
    zombie until dev reaps it, and is left out)."""
    assert process.process is not None
    found = []
    for child in psutil.Process(process.process.pid).children():
        try:
            if command in child.cmdline() and child.status() != psutil.STATUS_ZOMBIE:
                found.append(child)
        except psutil.Error:
            continue
    return found


async def jobs_completed(client: httpx.AsyncClient, base: str, job_ids: list[str]) -> bool:
    """Whether every job completed (none may have failed)."""
    bodies = [(await client.get(f"{base}/api/v1/blog/jobs/{j}")).json() for j in job_ids]
    assert all(b["status"] != "failed" for b in bodies), bodies
    return all(b["status"] == "completed" for b in bodies)


async def survive_a_child_kill(
    dev: PipelineProcess,
    command: str,
    client: httpx.AsyncClient,
    receiver: WebhookReceiver,
    earlier_jobs: int,
) -> None:
    """SIGKILL one of dev's ``command`` children and wait until dev has replaced it; then
    three more jobs complete, and every job (``earlier_jobs`` and those) gets its webhook."""
    children = children_of(dev, command)
    os.kill(children[0].pid, signal.SIGKILL)

    async def replaced() -> bool:
        pids = {child.pid for child in children_of(dev, command)}
        return len(pids) == len(children) and children[0].pid not in pids

    await wait_for(replaced, timeout=30, message=f"the killed {command} to be replaced")
    more = [await submit(client, dev.url, receiver.url, topic=f"After {n}") for n in range(3)]
    await wait_for(
        lambda: jobs_completed(client, dev.url, more), timeout=90, message="jobs after the kill"
    )

    async def webhooks() -> bool:
        return len(receiver.requests) >= earlier_jobs + len(more)

    await wait_for(webhooks, timeout=60, message="a webhook per job")


async def stop_and_check_children_gone(dev: PipelineProcess, command: str) -> None:
    """SIGTERM dev; its ``command`` children must stop with it."""
    survivors = children_of(dev, command)
    await asyncio.wait_for(asyncio.to_thread(dev.stop), 40)
    gone = await asyncio.wait_for(asyncio.to_thread(psutil.wait_procs, survivors, 20), 30)
    assert not gone[1], f"{command} children still running after dev stopped: {gone[1]}"
