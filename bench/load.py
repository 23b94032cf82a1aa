"""Submitting jobs over HTTP and timing them to their webhook: the measurement every
end-to-end scenario (blogpipe on either broker, and the Celery peer) shares."""

from __future__ import annotations

import asyncio
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import orjson

from bench.httpio import HttpConnection, WebhookReceiver

SUBMIT_PATH = "/api/v1/blog/generate-enhanced?async_mode=true"


def job_body(n: int, callback_url: str) -> bytes:
    return orjson.dumps(
        {
            "topic": f"Best presents for teenagers, take {n}",
            "keywords": ["gifts for teens", "birthday ideas"],
            "callback_url": callback_url,
        }
    )


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(q / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


@dataclass
class Submitted:
    job_id: str | None
    started: float
    status: int


async def submit_all(
    base_url: str, receiver: WebhookReceiver, n: int, concurrency: int, offset: int = 0
) -> list[Submitted]:
    """POST ``n`` jobs over ``concurrency`` keep-alive connections."""
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(n):
        queue.put_nowait(offset + i)
    results: list[Submitted] = []

    async def worker() -> None:
        conn = await HttpConnection.open(base_url)
        try:
            while not queue.empty():
                i = queue.get_nowait()
                started = time.perf_counter()
                try:
                    status, body = await asyncio.wait_for(
                        conn.request("POST", SUBMIT_PATH, job_body(i, receiver.url)), 60
                    )
                except (OSError, TimeoutError, asyncio.IncompleteReadError):
                    results.append(Submitted(None, started, 0))  # 0: connection failed
                    conn.close()
                    conn = await HttpConnection.open(base_url)
                    continue
                job_id = str(orjson.loads(body)["job_id"]) if status == 202 else None
                results.append(Submitted(job_id, started, status))
        finally:
            conn.close()

    await asyncio.gather(*(worker() for _ in range(min(concurrency, n))))
    return results


async def run_jobs(
    base_url: str,
    receiver: WebhookReceiver,
    n: int,
    *,
    concurrency: int = 32,
    within: float = 300.0,
) -> dict[str, Any]:
    """Submit ``n`` jobs and wait for their webhooks; jobs/s, latency, makespan, errors."""
    receiver.reset()
    submitted = await submit_all(base_url, receiver, n, concurrency)
    accepted = [s for s in submitted if s.job_id]
    complete = await receiver.wait_for(len(accepted), within)
    first = min(s.started for s in submitted)
    by_id = {s.job_id: s for s in accepted}
    latencies = [
        (item.at - by_id[job_id].started) * 1000
        for job_id, item in receiver.received.items()
        if job_id in by_id and item.event == "job.completed"
    ]
    last = max((item.at for item in receiver.received.values()), default=time.perf_counter())
    failed = sum(1 for item in receiver.received.values() if item.event != "job.completed")
    missing = len(accepted) - len(receiver.received) if not complete else 0
    elapsed = max(last - first, 1e-9)
    submit_done = max(s.started for s in submitted) - first
    return {
        "jobs": n,
        "completed": len(latencies),
        "errors": (n - len(accepted)) + failed + missing,
        "jobs_per_s": round(len(latencies) / elapsed, 1),
        "makespan_s": round(elapsed, 3),
        "submit_s": round(submit_done, 3),
        "latency_p50_ms": round(percentile(latencies, 50), 1),
        "latency_p99_ms": round(percentile(latencies, 99), 1),
        "duplicate_webhooks": receiver.duplicates,
        "rejected": {
            str(k): v for k, v in Counter(s.status for s in submitted).items() if k != 202
        },
    }


async def run_one_at_a_time(
    base_url: str, receiver: WebhookReceiver, n: int, *, warmup: int = 3, within: float = 30.0
) -> dict[str, Any]:
    """Submit jobs one by one, each after the previous one's webhook; p50/p99 latency."""
    receiver.reset()
    conn = await HttpConnection.open(base_url)
    latencies: list[float] = []
    errors = 0
    try:
        for i in range(warmup + n):
            started = time.perf_counter()
            status, body = await asyncio.wait_for(
                conn.request("POST", SUBMIT_PATH, job_body(i, receiver.url)), 30
            )
            if status != 202:
                errors += 1
                continue
            job_id = str(orjson.loads(body)["job_id"])
            item = await receiver.wait_job(job_id, within)
            if item is None or item.event != "job.completed":
                errors += 1
            elif i >= warmup:
                latencies.append((item.at - started) * 1000)
    finally:
        conn.close()
    return {
        "jobs": n,
        "errors": errors,
        "latency_p50_ms": round(percentile(latencies, 50), 1),
        "latency_p99_ms": round(percentile(latencies, 99), 1),
        "latency_mean_ms": round(statistics.fmean(latencies), 1) if latencies else 0.0,
    }
