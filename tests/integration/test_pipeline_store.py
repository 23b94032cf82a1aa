"""PipelineStore transitions against a real database."""

from __future__ import annotations

import asyncio

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.broker import SubscriptionSpec
from core.broker.postgres import PostgresBroker
from core.db.jobs import JobRepository
from core.db.pipeline import Claim, PipelineStore
from core.db.raw import raw_connection
from core.dispatch import Dispatcher
from core.errors import PermanentError
from core.events import StageMessage
from core.llm import Usage
from core.requests import BlogRequest


async def test_a_failed_attempt_keeps_the_tokens_it_spent(engine: AsyncEngine) -> None:
    store = PipelineStore(engine, Dispatcher(engine, PostgresBroker(engine)))
    job = await JobRepository(engine).create(BlogRequest(topic="A topic", keywords=["k"]))
    assert await store.start_job(job.id) == "started"
    claim = await store.claim(StageMessage(job.id, "research", job.generation))
    assert isinstance(claim, Claim)
    spent = Usage(prompt_tokens=120, completion_tokens=30, cost=0.002)
    await store.record_failure(claim, PermanentError("refused"), retryable=False, usage=spent)
    async with engine.connect() as conn:
        row = (
            await conn.execute(
                text(
                    "SELECT status, error_type, prompt_tokens, completion_tokens, cost"
                    " FROM stage_runs"
                )
            )
        ).one()
    assert row.status == "failed" and row.error_type == "permanent:PermanentError"
    assert (row.prompt_tokens, row.completion_tokens, row.cost) == (120, 30, 0.002)


async def test_start_job_is_idempotent(engine: AsyncEngine) -> None:
    broker = PostgresBroker(engine)
    await broker.ensure_subscription(SubscriptionSpec("blog-research-worker", "blog-research"))
    store = PipelineStore(engine, Dispatcher(engine, broker))
    job = await JobRepository(engine).create(BlogRequest(topic="A topic", keywords=["k"]))
    assert await store.start_job(job.id) == "started"
    assert await store.start_job(job.id) == "already_started"
    async with engine.connect() as conn:
        queued = (await conn.execute(text("SELECT count(*) FROM broker_messages"))).scalar_one()
    assert queued == 1  # one research message, not two


async def test_commits_wait_for_the_disk_only_when_a_message_could_escape(
    engine: AsyncEngine,
) -> None:
    from core.broker.memory import InMemoryBroker

    transactional = PipelineStore(engine, Dispatcher(engine, PostgresBroker(engine)))
    outbox = PipelineStore(engine, Dispatcher(engine, InMemoryBroker()))
    assert transactional.asynchronous_commit and not outbox.asynchronous_commit
    job = await JobRepository(engine).create(BlogRequest(topic="A topic", keywords=["k"]))
    message = StageMessage(job.id, "outline", job.generation).to_message()
    for store, expected in ((transactional, "off"), (outbox, "on")):
        # The setting each kind of transition leaves in force when its transaction commits
        # (generation 99 is not the job's: nothing is written).
        staged = {
            **Dispatcher.staging_args("next", "blog-outline", message),
            **store.dispatcher.hold("next", "blog-outline")[0],  # no consumer here: none held
        }
        calls = [
            (store._sql.start, {"job": job.id, "generation": 99, "stage": "research"}),
            (
                store._sql.claim,
                {
                    "job": job.id,
                    "stage": "outline",
                    "generation": 99,
                    "lease": 5.0,
                    "pct": 30.0,
                    "number": 2,
                    "total": 4,
                    "earlier": ["research"],
                    "final": False,
                },
            ),
            (
                store._sql.complete,
                {
                    "job": job.id,
                    "generation": 99,
                    "run": 0,
                    "output": {},
                    "provider": "p",
                    "model": "m",
                    "pt": 0,
                    "ct": 0,
                    "cost": 0.0,
                    "stage": "research",
                    "number": 1,
                    "total": 4,
                    "pct": 25.0,
                },
            ),
        ]
        for statement, values in calls:
            extra = staged if "next_data" in statement.names else {}
            async with raw_connection(engine) as conn, conn.transaction():
                await asyncio.wait_for(
                    conn.fetchrow(statement.sql, *statement.args(**values, **extra)), 5
                )
                assert await conn.fetchval("SHOW synchronous_commit") == expected
    assert await asyncio.wait_for(JobRepository(engine).status_document(job.id), 5) is not None
