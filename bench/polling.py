"""Polling: ``GET /api/v1/blog/jobs/{id}`` from a separate load-generator process, over
completed jobs (whose documents the API keeps) and over jobs still in progress (read in
full on every poll)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import orjson

from bench.blogpipe_runs import receiver, running_blogpipe
from bench.infra import BenchError, Databases, python
from bench.load import run_jobs, submit_all

POLLED_JOBS = 50
# Long enough that no polled job finishes while it is polled.
IN_PROGRESS_LLM_DELAY = "600"


async def _loadgen(
    base: str, paths_file: Path, duration: float, rate: float, connections: int
) -> dict[str, Any]:
    process = await asyncio.create_subprocess_exec(
        python(),
        "-m",
        "bench.loadgen",
        "--url",
        base,
        "--paths-file",
        str(paths_file),
        "--duration",
        str(duration),
        "--rate",
        str(rate),
        "--connections",
        str(connections),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), duration + 90)
    if process.returncode != 0:
        raise BenchError(f"load generator failed: {err.decode()[-2000:]}")
    return dict(orjson.loads(out))


async def polling(dbs: Databases, workdir: Path, *, duration: float, rate: float) -> dict[str, Any]:
    """Requests/s at saturation, then latency at a fixed ``rate``, over completed jobs; then
    requests/s over jobs still in progress."""
    async with receiver() as hook, running_blogpipe(dbs, workdir, "polling") as (child, base):
        await run_jobs(base, hook, POLLED_JOBS, within=120)
        paths_file = workdir / "poll-paths.txt"
        paths_file.write_text("".join(f"/api/v1/blog/jobs/{job}\n" for job in hook.received))
        saturated = await _loadgen(base, paths_file, duration, 0, 32)
        paced = await _loadgen(base, paths_file, duration, rate, 64)
        child.check_alive()
        peak = round(child.peak_rss / 2**20, 1)
    async with (
        receiver() as hook,
        running_blogpipe(
            dbs, workdir, "polling-live", BLOGPIPE_OFFLINE_LLM_DELAY=IN_PROGRESS_LLM_DELAY
        ) as (child, base),
    ):
        submitted = await submit_all(base, hook, POLLED_JOBS, 8)
        live = [s.job_id for s in submitted if s.job_id]
        if len(live) != POLLED_JOBS:
            raise BenchError(f"only {len(live)} of {POLLED_JOBS} in-progress jobs were accepted")
        live_file = workdir / "poll-live-paths.txt"
        live_file.write_text("".join(f"/api/v1/blog/jobs/{job}\n" for job in live))
        in_progress = await _loadgen(base, live_file, duration, 0, 32)
        child.check_alive()
        if hook.received:
            raise BenchError("an in-progress job finished while it was polled")
    return {
        "max_requests_per_s": saturated["requests_per_s"],
        "max_p99_ms": saturated["p99_ms"],
        "rate": rate,
        "rate_achieved_per_s": paced["requests_per_s"],
        "rate_p50_ms": paced["p50_ms"],
        "rate_p99_ms": paced["p99_ms"],
        "in_progress_requests_per_s": in_progress["requests_per_s"],
        "in_progress_p99_ms": in_progress["p99_ms"],
        "errors": saturated["errors"] + paced["errors"] + in_progress["errors"],
        "peak_rss_mb": peak,
    }
