"""The peer scenario: the Celery pipeline through the same harness, on the same N."""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg

from bench.blogpipe_runs import WARMUP_JOBS, receiver
from bench.infra import (
    WEBHOOK_SECRET,
    BenchError,
    Child,
    Databases,
    free_port,
    python,
    wait_until_ready,
)
from bench.load import run_jobs
from bench.peer import require_peer_dependencies

REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/9")


def redis_available(url: str = REDIS_URL) -> str | None:
    """None when Redis answers PING, else why not."""
    try:
        import redis
    except ImportError as exc:
        return f"redis client not installed ({exc})"
    try:
        redis.Redis.from_url(url, socket_connect_timeout=2).ping()
    except Exception as exc:  # any failure means "no peer run"
        return f"Redis not reachable at {url}: {exc}"
    return None


@contextlib.asynccontextmanager
async def running_peer(
    dbs: Databases, workdir: Path, *, workers: int, delay: float = 0.0
) -> AsyncIterator[tuple[list[Child], str]]:
    """A fresh database, the Celery worker (prefork) and the peer's API; yields the URL."""
    try:
        require_peer_dependencies()
    except ImportError as exc:
        raise BenchError(str(exc)) from exc
    problem = redis_available()
    if problem:
        raise BenchError(problem)
    from bench.peer.tasks import SCHEMA

    db_url = await dbs.fresh(migrated=False)
    conn = await asyncio.wait_for(asyncpg.connect(db_url), 30)
    try:
        await conn.execute(SCHEMA)
    finally:
        await conn.close()
    queue = f"peer-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {
        "PEER_DATABASE_URL": db_url,
        "PEER_REDIS_URL": REDIS_URL,
        "PEER_QUEUE": queue,
        "PEER_LLM_DELAY": str(delay),
        "WEBHOOK_SECRET": WEBHOOK_SECRET,
    }
    worker = Child(
        [
            python(),
            "-m",
            "celery",
            "-A",
            "bench.peer.tasks",
            "worker",
            "-P",
            "prefork",
            "-c",
            str(workers),
            "-Q",
            queue,
            "--without-gossip",
            "--without-mingle",
            "--without-heartbeat",
            "-l",
            "WARNING",
        ],
        env,
        workdir / "peer-worker.log",
        name="celery worker",
    )
    api = Child(
        [
            python(),
            "-m",
            "uvicorn",
            "bench.peer.api:app",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-level",
            "warning",
            "--no-access-log",
        ],
        env,
        workdir / "peer-api.log",
        name="peer api",
    )
    children = [worker, api]
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_until_ready(api, f"{base}/readyz")
        worker.check_alive()
        for child in children:
            child.start_sampling()
        yield children, base
    finally:
        for child in children:
            await child.stop()
        await dbs.drop(db_url)
        with contextlib.suppress(Exception):
            import redis

            redis.Redis.from_url(REDIS_URL).delete(queue)


async def peer(dbs: Databases, workdir: Path, jobs: int, *, workers: int) -> dict[str, Any]:
    """The throughput scenario on the Celery peer."""
    async with receiver() as hook, running_peer(dbs, workdir, workers=workers) as (children, base):
        warm = await run_jobs(base, hook, WARMUP_JOBS, within=60)
        if warm["completed"] < WARMUP_JOBS:
            raise BenchError(
                f"the Celery peer did not finish its warm-up jobs:\n{children[0].log_tail()}"
            )
        figures = await run_jobs(base, hook, jobs, within=max(120.0, jobs / 5))
        figures["peak_rss_mb"] = round(sum(child.peak_rss for child in children) / 2**20, 1)
        figures["celery_workers"] = workers
    return figures
