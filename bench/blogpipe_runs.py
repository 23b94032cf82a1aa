"""Scenarios that run ``blogpipe dev`` as a child process: throughput (Postgres broker and
the Google emulators), concurrency with slow LLM calls, and single-job overhead."""

from __future__ import annotations

import contextlib
import subprocess
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

from bench.httpio import WebhookReceiver
from bench.infra import (
    WEBHOOK_SECRET,
    BenchError,
    Child,
    CpuMeter,
    Databases,
    free_port,
    python,
    wait_until_ready,
)
from bench.load import run_jobs, run_one_at_a_time

WARMUP_JOBS = 5


def blogpipe_env(db_url: str, port: int, data_dir: Path, **overrides: str) -> dict[str, str]:
    """``blogpipe dev`` on the embedded choices, posting webhooks to a loopback receiver."""
    env = {
        "DATABASE_URL": db_url,
        "PORT": str(port),
        "HOST": "127.0.0.1",
        "BLOGPIPE_DATA_DIR": str(data_dir),
        "BLOGPIPE_BROKER": "postgres",
        "BLOGPIPE_TASK_QUEUE": "local",
        "BLOGPIPE_LLM": "offline",
        "BLOGPIPE_OFFLINE_LLM_DELAY": "0",
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
        "WORKER_SHARED_SECRET": "bench-worker-secret",
        "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1",
        "WEBHOOK_ALLOW_HTTP": "true",
        "LOG_LEVEL": "INFO",
        # One tenant, no API keys: the auth middleware's key lookup is not what is measured.
        "BLOGPIPE_AUTH": "none",
        # Admission limits (per-tenant rate and in-flight cap) are policy, not capacity.
        "BLOGPIPE_RATE_LIMIT": "0",
        "BLOGPIPE_MAX_IN_FLIGHT": "0",
    }
    for name in ("GOOGLE_CLOUD_PROJECT", "PUBSUB_EMULATOR_HOST", "CLOUD_TASKS_EMULATOR_HOST"):
        env[name] = ""
    env.update(overrides)
    return env


class Processes:
    """``blogpipe dev`` plus any ``blogpipe stage`` processes, sampled as one for RSS."""

    def __init__(self, children: list[Child]) -> None:
        self.children = children

    @property
    def peak_rss(self) -> int:
        return sum(child.peak_rss for child in self.children)

    def check_alive(self) -> None:
        for child in self.children:
            child.check_alive()


@contextlib.asynccontextmanager
async def running_blogpipe(
    dbs: Databases,
    workdir: Path,
    name: str,
    dev_args: Sequence[str] = (),
    /,
    **overrides: str,
) -> AsyncIterator[tuple[Processes, str]]:
    """A fresh database and ``blogpipe dev`` on it, with ``dev_args`` (for example
    ``--replicas 2``: the whole pipeline in two processes sharing the port). Yields the
    processes (RSS counts the children too) and the API's base URL."""
    db_url = await dbs.fresh()
    port = int(overrides.get("PORT") or free_port())
    env = blogpipe_env(db_url, port, workdir / "data", **overrides)
    argv = [python(), "-m", "blogpipe", "dev", *dev_args]
    child = Child(argv, env, workdir / f"{name}.log", name=f"blogpipe dev ({name})")
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(child, f"{base}/readyz")
        child.start_sampling()
        yield Processes([child]), base
    finally:
        await child.stop()
        await dbs.drop(db_url)


@contextlib.asynccontextmanager
async def receiver() -> AsyncIterator[WebhookReceiver]:
    hook = WebhookReceiver()
    await hook.start()
    try:
        yield hook
    finally:
        await hook.stop()


async def throughput(
    dbs: Databases, workdir: Path, jobs: int, processes: int = 1, /, **overrides: str
) -> dict[str, Any]:
    """``jobs`` submitted over HTTP as fast as they are accepted; first submit → last webhook.
    With ``processes`` > 1, ``blogpipe dev --replicas N``."""
    dev_args = ("--replicas", str(processes)) if processes > 1 else ()
    async with (
        receiver() as hook,
        running_blogpipe(dbs, workdir, "throughput", dev_args, **overrides) as (child, base),
    ):
        await run_jobs(base, hook, WARMUP_JOBS, within=60)
        meter = CpuMeter(child.children)
        figures = await run_jobs(base, hook, jobs, within=max(120.0, jobs / 5))
        figures.update(meter.per_job(jobs))
        child.check_alive()
        figures["peak_rss_mb"] = round(child.peak_rss / 2**20, 1)
        figures["processes"] = processes
    return figures


async def concurrency(
    dbs: Databases, workdir: Path, jobs: int, delay: float, processes: int = 1
) -> dict[str, Any]:
    """``jobs`` in flight at once with a slow LLM: makespan against 4 × delay. With
    ``processes`` > 1, ``blogpipe dev --replicas N`` (RSS is every process's)."""
    dev_args = ("--replicas", str(processes)) if processes > 1 else ()
    overrides = {
        "BLOGPIPE_OFFLINE_LLM_DELAY": str(delay),
        # Each stage may hold every job at once: the LLM calls are what is slow.
        "PUBSUB_MAX_MESSAGES": str(max(100, jobs)),
    }
    async with (
        receiver() as hook,
        running_blogpipe(dbs, workdir, "concurrency", dev_args, **overrides) as (child, base),
    ):
        meter = CpuMeter(child.children)
        figures = await run_jobs(base, hook, jobs, concurrency=64, within=max(120.0, jobs / 5))
        figures.update(meter.per_job(jobs))
        child.check_alive()
        figures["peak_rss_mb"] = round(child.peak_rss / 2**20, 1)
        figures["processes"] = processes
    ideal = 4 * delay
    figures["ideal_s"] = ideal
    figures["makespan_vs_ideal"] = round(figures["makespan_s"] / ideal, 2)
    return figures


async def single_job(dbs: Databases, workdir: Path, jobs: int) -> dict[str, Any]:
    """One job at a time, zero LLM delay: submit → webhook received."""
    async with receiver() as hook, running_blogpipe(dbs, workdir, "single") as (child, base):
        figures = await run_one_at_a_time(base, hook, jobs)
        figures["peak_rss_mb"] = round(child.peak_rss / 2**20, 1)
    return figures


@contextlib.asynccontextmanager
async def google_emulators(workdir: Path) -> AsyncIterator[tuple[str, str]]:
    """The Pub/Sub and Cloud Tasks emulators, started as the test fixtures start them."""
    try:
        from tests.support import cloudtasks_emulator as tasks
        from tests.support import pubsub_emulator as pubsub
    except Exception as exc:  # tests/ is part of the checkout, not the package
        raise BenchError(f"emulator helpers unavailable: {exc}") from exc
    executable = tasks.emulator_executable()
    if executable is None:
        raise BenchError("gcloud-tasks-emulator is not installed (run `make emulators`)")
    if pubsub._command(0, workdir) is None:
        raise BenchError("the Pub/Sub emulator is not installed (gcloud)")
    workdir.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240
    started = None
    for _ in range(3):
        started = pubsub._start(workdir)
        if started is not None:
            break
    if started is None:
        raise BenchError("the Pub/Sub emulator exited before becoming ready")
    pubsub_process, emulator = started
    port = free_port()
    with (workdir / "cloudtasks.log").open("wb") as log:
        tasks_process = subprocess.Popen(  # noqa: ASYNC220 (must outlive no loop)
            [str(executable), "start", f"--port={port}", "--max-retries=5"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield emulator.host, f"127.0.0.1:{port}"
    finally:
        tasks._stop(tasks_process)
        pubsub._stop(pubsub_process)


async def throughput_gcp(dbs: Databases, workdir: Path, jobs: int) -> dict[str, Any]:
    """The throughput scenario on the Pub/Sub and Cloud Tasks emulators."""
    async with google_emulators(workdir / "emulators") as (pubsub_host, tasks_host):
        port = free_port()
        overrides = {
            "PORT": str(port),
            "BLOGPIPE_BROKER": "pubsub",
            "BLOGPIPE_TASK_QUEUE": "cloudtasks",
            "GOOGLE_CLOUD_PROJECT": f"bp-bench-{uuid.uuid4().hex[:8]}",
            "PUBSUB_EMULATOR_HOST": pubsub_host,
            "CLOUD_TASKS_EMULATOR_HOST": tasks_host,
            "CLOUD_RUN_WORKER_URL": f"http://127.0.0.1:{port}/api/v1/blog/worker",
            "BLOGPIPE_MIN_BACKOFF": "0",
        }
        return await throughput(dbs, workdir, jobs, **overrides)
