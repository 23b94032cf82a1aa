"""The Celery app and its four tasks (``celery -A bench.peer.tasks worker``).

Configured the way a team would for this workload: Redis broker, no result backend
(the chain passes the job id along), late acks so a crashed worker's task is redelivered.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import orjson
import psycopg
from celery import Celery, Task
from standardwebhooks import Webhook

from core.constants import STAGE_PROGRESS
from core.llm.offline import OfflineLLM
from core.requests import BlogRequest
from core.settings import Settings
from stages.base import StageInput
from stages.registry import get_stage
from stages.result import build_result

QUEUE = os.environ.get("PEER_QUEUE", "peer")
app = Celery("peer", broker=os.environ.get("PEER_REDIS_URL", "redis://127.0.0.1:6379/9"))
app.conf.update(
    task_default_queue=QUEUE,
    task_ignore_result=True,
    task_acks_late=True,
    worker_hijack_root_logger=False,
    broker_connection_retry_on_startup=True,
)

SCHEMA = """
CREATE TABLE IF NOT EXISTS peer_jobs (
    id uuid PRIMARY KEY, status text NOT NULL, current_stage text,
    progress_percentage double precision NOT NULL DEFAULT 0, request jsonb NOT NULL,
    callback_url text, result jsonb, created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now(), started_at timestamptz,
    completed_at timestamptz);
CREATE TABLE IF NOT EXISTS peer_stage_outputs (
    job_id uuid NOT NULL REFERENCES peer_jobs (id), stage text NOT NULL, output jsonb NOT NULL,
    tokens integer NOT NULL, finished_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (job_id, stage));
"""

_state: dict[str, Any] = {}


def _db() -> psycopg.Connection[Any]:
    conn = _state.get("db")
    if conn is None or conn.closed:
        conn = psycopg.connect(os.environ["PEER_DATABASE_URL"])
        _state["db"] = conn
    return conn  # type: ignore[no-any-return]


def _loop() -> asyncio.AbstractEventLoop:
    if "loop" not in _state:
        _state["loop"] = asyncio.new_event_loop()
    return _state["loop"]  # type: ignore[no-any-return]


def _http() -> httpx.Client:
    if "http" not in _state:
        _state["http"] = httpx.Client(timeout=10)
    return _state["http"]  # type: ignore[no-any-return]


SETTINGS = Settings()
LLM = OfflineLLM(float(os.environ.get("PEER_LLM_DELAY", "0")))


def _run_stage(stage: str, job_id: str) -> str:
    conn = _db()
    start, end = STAGE_PROGRESS[stage]
    with conn.transaction():
        request = conn.execute(
            "UPDATE peer_jobs SET status = 'processing', current_stage = %s,"
            " progress_percentage = %s, started_at = coalesce(started_at, now()),"
            " updated_at = now() WHERE id = %s RETURNING request",
            (stage, start, job_id),
        ).fetchone()
        outputs = {
            row[0]: row[1]
            for row in conn.execute(
                "SELECT stage, output FROM peer_stage_outputs WHERE job_id = %s", (job_id,)
            )
        }
    if request is None:
        return job_id

    async def report(fraction: float, details: str) -> None:
        with conn.transaction():
            conn.execute(
                "UPDATE peer_jobs SET progress_percentage = %s, updated_at = now() WHERE id = %s",
                (round(start + (end - start) * fraction, 1), job_id),
            )

    stage_input = StageInput(
        request=BlogRequest.model_validate(request[0]),
        outputs=outputs,
        settings=SETTINGS,
        job_id=uuid.UUID(job_id),
        report=report,
    )
    result = _loop().run_until_complete(get_stage(stage).run(stage_input, LLM))
    tokens = result.usage.prompt_tokens + result.usage.completion_tokens
    with conn.transaction():
        conn.execute(
            "INSERT INTO peer_stage_outputs (job_id, stage, output, tokens) VALUES (%s, %s, %s, %s)"
            " ON CONFLICT (job_id, stage) DO UPDATE SET output = EXCLUDED.output",
            (job_id, stage, orjson.dumps(result.output).decode(), tokens),
        )
        conn.execute(
            "UPDATE peer_jobs SET progress_percentage = %s, updated_at = now() WHERE id = %s",
            (end, job_id),
        )
    return job_id


@app.task(name="peer.research")
def research(job_id: str) -> str:
    return _run_stage("research", job_id)


@app.task(name="peer.outline")
def outline(job_id: str) -> str:
    return _run_stage("outline", job_id)


@app.task(name="peer.draft")
def draft(job_id: str) -> str:
    return _run_stage("draft", job_id)


@app.task(name="peer.seo", bind=True, max_retries=5)
def seo(self: Task, job_id: str) -> str:
    _run_stage("seo", job_id)
    conn = _db()
    with conn.transaction():
        outputs = {}
        usage = []
        for stage, output, tokens in conn.execute(
            "SELECT stage, output, tokens FROM peer_stage_outputs WHERE job_id = %s", (job_id,)
        ):
            outputs[stage] = output
            usage.append({"stage": stage, "provider": "offline", "tokens": tokens, "cost": 0.0})
        row = conn.execute(
            "SELECT callback_url, extract(epoch FROM now() - started_at) FROM peer_jobs"
            " WHERE id = %s",
            (job_id,),
        ).fetchone()
        result = build_result(outputs, usage, float(row[1] or 0) if row else 0.0)
        conn.execute(
            "UPDATE peer_jobs SET status = 'completed', progress_percentage = 100,"
            " current_stage = 'completed', result = %s, completed_at = now(), updated_at = now()"
            " WHERE id = %s",
            (orjson.dumps(result).decode(), job_id),
        )
    if row and row[0]:
        _notify(self, row[0], job_id, result)
    return job_id


def _notify(task: Task, url: str, job_id: str, result: dict[str, Any]) -> None:
    now = datetime.now(UTC)
    body = orjson.dumps(
        {
            "type": "job.completed",
            "timestamp": now.isoformat(),
            "data": {"job_id": job_id, "status": "completed", "result": result},
        }
    ).decode()
    message_id = f"msg_{uuid.uuid4().hex}"
    signature = Webhook(os.environ["WEBHOOK_SECRET"]).sign(message_id, now, body)
    headers = {
        "webhook-id": message_id,
        "webhook-timestamp": str(int(now.timestamp())),
        "webhook-signature": signature,
        "content-type": "application/json",
    }
    try:
        response = _http().post(url, content=body, headers=headers)
        response.raise_for_status()
    except httpx.HTTPError as exc:
        raise task.retry(exc=exc, countdown=min(60, 2**task.request.retries)) from exc
