"""The database's own ceiling: the state changes a job needs, issued directly with asyncpg.

Per job: one transaction creates it (as the API does), then one per stage that locks the
job row, writes the stage's output, moves progress with its event, and hands off (the
current stage's queue row deleted, the next one inserted — the ``postgres`` broker's
queue table, with its NOTIFY trigger). No HTTP, no Python pipeline around it: this is
what blogpipe would reach if its own code cost nothing. Run on blogpipe's real schema
with an asyncpg pool of 8 and 64 jobs in flight.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

import asyncpg
import orjson

from bench.infra import Databases

STAGES = ("research", "outline", "draft", "seo")
POOL_SIZE = 8
IN_FLIGHT = 64
# A stage output of the size the offline stages write (a few kB of JSON).
OUTPUT = orjson.dumps({"text": "lorem ipsum " * 250, "sections": ["a", "b", "c"]}).decode()
REQUEST = orjson.dumps({"topic": "Best presents for teenagers", "keywords": ["gifts"]}).decode()

_CREATE = """INSERT INTO jobs (id, status, request, callback_url)
VALUES ($1, 'queued', $2::jsonb, 'http://127.0.0.1/hook')"""
_SUBSCRIPTIONS = """INSERT INTO broker_subscriptions (name, topic) VALUES ($1, $1)
ON CONFLICT (name) DO NOTHING"""
_LOCK = "SELECT status, generation FROM jobs WHERE id = $1 FOR UPDATE"
_OUTPUT = """INSERT INTO stage_runs (job_id, stage, generation, attempt, status, output,
    finished_at) VALUES ($1, $2, 1, 1, 'succeeded', $3::json, now())"""
_PROGRESS = """UPDATE jobs SET status = $3, progress_percentage = $2, current_stage = $4,
    updated_at = now() WHERE id = $1"""
_EVENT = """INSERT INTO job_events (job_id, generation, stage, stage_number, total_stages,
    progress_percentage, status, details) VALUES ($1, 1, $2, $3, 4, $4, 'completed', 'done')"""
_DEQUEUE = "DELETE FROM broker_messages WHERE id = $1"
_ENQUEUE = "INSERT INTO broker_messages (subscription, data) VALUES ($1, $2) RETURNING id"


async def _job(pool: asyncpg.Pool) -> None:
    job_id = uuid.uuid4()
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute(_CREATE, job_id, REQUEST)
        message = await conn.fetchval(_ENQUEUE, "bench-research", job_id.bytes)
    for number, stage in enumerate(STAGES, start=1):
        following = STAGES[number] if number < len(STAGES) else "events"
        last = number == len(STAGES)
        async with pool.acquire() as conn, conn.transaction():
            await conn.fetchrow(_LOCK, job_id)
            await conn.execute(_OUTPUT, job_id, stage, OUTPUT)
            await conn.execute(
                _PROGRESS, job_id, 25.0 * number, "completed" if last else "processing", stage
            )
            await conn.execute(_EVENT, job_id, stage, number, 25.0 * number)
            await conn.execute(_DEQUEUE, message)
            message = await conn.fetchval(_ENQUEUE, f"bench-{following}", job_id.bytes)


async def ceiling(dbs: Databases, jobs: int) -> dict[str, Any]:
    """Jobs/s and transactions/s the database sustains for blogpipe's state changes."""
    db_url = await dbs.fresh()
    try:
        pool = await asyncpg.create_pool(db_url, min_size=POOL_SIZE, max_size=POOL_SIZE)
        try:
            async with pool.acquire() as conn:
                for stage in (*STAGES, "events"):
                    await conn.execute(_SUBSCRIPTIONS, f"bench-{stage}")
            queue: asyncio.Queue[int] = asyncio.Queue()
            for i in range(jobs):
                queue.put_nowait(i)

            async def worker() -> None:
                while not queue.empty():
                    queue.get_nowait()
                    await _job(pool)

            started = time.perf_counter()
            await asyncio.wait_for(
                asyncio.gather(*(worker() for _ in range(IN_FLIGHT))), max(120.0, jobs / 10)
            )
            elapsed = time.perf_counter() - started
        finally:
            await asyncio.wait_for(pool.close(), 30)
    finally:
        await dbs.drop(db_url)
    transactions = jobs * (1 + len(STAGES))
    return {
        "jobs": jobs,
        "jobs_per_s": round(jobs / elapsed, 1),
        "transactions_per_s": round(transactions / elapsed, 1),
        "elapsed_s": round(elapsed, 3),
    }
