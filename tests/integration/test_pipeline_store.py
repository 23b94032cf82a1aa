"""PipelineStore transitions against a real database."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core.broker import Delivery, SubscriptionSpec
from core.broker.postgres import PostgresBroker
from core.constants import STAGES, stage_subscription, stage_topic
from core.db.jobs import JobRepository
from core.db.pipeline import Claim, PipelineStore, Skip, StageOutcome
from core.db.raw import raw_connection
from core.dispatch import Dispatcher
from core.errors import PermanentError
from core.events import StageMessage
from core.llm import Usage
from core.requests import BlogRequest
from tests.support.waiting import wait_for


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


async def test_progress_reports_of_several_jobs_at_once_are_all_stored(
    engine: AsyncEngine,
) -> None:
    # Concurrent reports go to the database together (one batch); each job gets its own
    # progress and event, and a report for a job that moved on changes nothing.
    store = PipelineStore(engine, Dispatcher(engine, PostgresBroker(engine)))
    jobs = JobRepository(engine)
    claims = []
    for n in range(4):
        job = await jobs.create(BlogRequest(topic=f"Topic {n}", keywords=["k"]))
        assert await store.start_job(job.id) == "started"
        claim = await store.claim(StageMessage(job.id, "research", job.generation))
        assert isinstance(claim, Claim)
        claims.append(claim)
    stale = Claim(**{**claims[3].__dict__, "generation": claims[3].generation + 1})
    reports = [
        store.report_progress(claim, 10.0 + n, f"working on {n}")
        for n, claim in enumerate([*claims[:3], stale])
    ]
    await asyncio.wait_for(asyncio.gather(*reports), 10)
    async with engine.connect() as conn:
        rows = (
            await conn.execute(
                text(
                    "SELECT j.id, j.progress_percentage, e.details FROM jobs j"
                    " LEFT JOIN job_events e ON e.job_id = j.id AND e.status = 'in_progress'"
                )
            )
        ).all()
    found = {row.id: (row.progress_percentage, row.details) for row in rows}
    for n, claim in enumerate(claims[:3]):
        assert found[claim.job_id] == (10.0 + n, f"working on {n}")
    assert found[claims[3].job_id][1] is None  # the stale report wrote no event


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


@contextlib.asynccontextmanager
async def local_store(engine: AsyncEngine, stages: list[str]) -> AsyncIterator[PipelineStore]:
    """A store whose postgres broker has a consumer in this process for each of
    ``stages`` (recording its deliveries in ``DELIVERED`` and acking them), each up and
    able to hold a message; closed on exit."""
    broker = PostgresBroker(engine)
    broker.poll_interval = 3600.0
    for stage in STAGES:
        spec = SubscriptionSpec(stage_subscription(stage), stage_topic(stage))
        await asyncio.wait_for(broker.ensure_subscription(spec), 10)

    async def take(delivery: Delivery) -> None:
        DELIVERED.setdefault(delivery.subscription, []).append(delivery)

    tasks = [
        asyncio.create_task(broker.subscribe(stage_subscription(stage), take)) for stage in stages
    ]
    try:
        for stage in stages:

            async def ready(topic: str = stage_topic(stage)) -> bool:
                hold = broker.hold(topic)
                if hold is not None:
                    hold.release()
                return hold is not None

            await wait_for(ready, timeout=10, message=f"the {stage} consumer")
        DELIVERED.clear()
        yield PipelineStore(engine, Dispatcher(engine, broker), lease_seconds=30.0)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=10)
        await asyncio.wait_for(broker.close(), 10)


DELIVERED: dict[str, list[Delivery]] = {}


async def delivered_to(stage: str) -> tuple[Delivery, StageMessage]:
    """The one delivery ``stage``'s local consumer got since ``DELIVERED`` was cleared."""

    async def arrived() -> bool:
        return bool(DELIVERED.get(stage_subscription(stage)))

    await wait_for(arrived, timeout=10, message=f"the {stage} delivery")
    (delivery,) = DELIVERED[stage_subscription(stage)]
    return delivery, StageMessage.from_bytes(delivery.data)


def outcome(stage: str) -> StageOutcome:
    return StageOutcome(
        output={"stage": stage, "items": [1, 2.5, "x"], "nested": {"b": 1, "a": None}},
        provider="p",
        model="m",
        prompt_tokens=10 * len(stage),
        completion_tokens=5,
        cost=0.25,
    )


async def hand_over(store: PipelineStore, claim: Claim, stage: str) -> Claim:
    """Complete ``claim`` and take the claim its hand-over brought to ``stage``."""
    DELIVERED.clear()
    assert await asyncio.wait_for(store.complete(claim, outcome(claim.stage)), 10) == "committed"
    delivery, message = await delivered_to(stage)
    opened = store.take_opened(delivery.message_id, message)
    assert opened is not None and store.take_opened(delivery.message_id, message) is None
    again = await asyncio.wait_for(store.claim(message), 10)  # the run is open: leased
    assert isinstance(again, Skip) and again.reason == "leased"
    return opened


async def test_a_hand_off_to_a_local_consumer_opens_the_next_stage_run(
    engine: AsyncEngine,
) -> None:
    async with local_store(engine, ["outline", "draft", "seo"]) as store:
        job = await JobRepository(engine).create(BlogRequest(topic="A topic", keywords=["k"]))
        assert await store.start_job(job.id) == "started"
        research = await store.claim(StageMessage(job.id, "research", job.generation))
        assert isinstance(research, Claim)

        outline = await hand_over(store, research, "outline")
        draft = await hand_over(store, outline, "draft")
        seo = await hand_over(store, draft, "seo")

        async with engine.connect() as conn:
            runs = (
                await conn.execute(
                    text(
                        "SELECT id, stage, attempt, status, output FROM stage_runs"
                        " WHERE job_id = :id ORDER BY id"
                    ),
                    {"id": job.id},
                )
            ).all()
            events = (
                await conn.execute(
                    text(
                        "SELECT stage, status, progress_percentage FROM job_events"
                        " WHERE job_id = :id ORDER BY id"
                    ),
                    {"id": job.id},
                )
            ).all()
            state = (
                await conn.execute(
                    text("SELECT progress_percentage, current_stage FROM jobs WHERE id = :id"),
                    {"id": job.id},
                )
            ).one()
    assert [(r.stage, r.attempt, r.status) for r in runs] == [
        ("research", 1, "succeeded"),
        ("outline", 1, "succeeded"),
        ("draft", 1, "succeeded"),
        ("seo", 1, "running"),
    ]
    assert (seo.run_id, seo.attempt, seo.generation) == (runs[3].id, 1, job.generation)
    # What a claim would have read: every earlier output as stored, the request, the job's
    # start, and (for the last stage) every earlier stage's usage.
    assert seo.outputs == {r.stage: r.output for r in runs[:3]}
    assert (seo.request, seo.started_at) == (research.request, research.started_at)
    assert seo.usage == {
        stage: {"provider": "p", "tokens": 10 * len(stage) + 5, "cost": 0.25}
        for stage in ("research", "outline", "draft")
    }
    assert draft.outputs == {r.stage: r.output for r in runs[:2]}
    assert [(e.stage, e.status) for e in events][-6:] == [
        ("research", "completed"),
        ("outline", "started"),
        ("outline", "completed"),
        ("draft", "started"),
        ("draft", "completed"),
        ("seo", "started"),
    ]
    assert (state.progress_percentage, state.current_stage) == (85.0, "seo")


async def test_the_last_stage_is_claimed_as_usual_when_the_usage_is_not_carried(
    engine: AsyncEngine,
) -> None:
    # The draft stage was claimed from the database (no consumer of it here when the
    # outline handed off): its claim holds no usage, so the last stage's run is not
    # opened by the hand-off and the last stage claims it, reading the usage itself.
    async with local_store(engine, ["seo"]) as store:
        job = await JobRepository(engine).create(BlogRequest(topic="A topic", keywords=["k"]))
        assert await store.start_job(job.id) == "started"
        claims: dict[str, Claim] = {}
        for stage in ("research", "outline", "draft"):
            claim = await store.claim(StageMessage(job.id, stage, job.generation))
            assert isinstance(claim, Claim)
            claims[stage] = claim
            if stage != "draft":
                assert await store.complete(claim, outcome(stage)) == "committed"
        DELIVERED.clear()
        assert await store.complete(claims["draft"], outcome("draft")) == "committed"
        delivery, message = await delivered_to("seo")
        assert store.take_opened(delivery.message_id, message) is None
        seo = await asyncio.wait_for(store.claim(message), 10)
    assert isinstance(seo, Claim) and seo.attempt == 1
    assert set(seo.usage) == {"research", "outline", "draft"}


async def test_a_start_held_by_a_local_consumer_opens_the_first_stage_run(
    engine: AsyncEngine,
) -> None:
    async with local_store(engine, ["research"]) as store:
        request = BlogRequest(topic="A topic", keywords=["k"])
        job = await JobRepository(engine).create(request)
        assert await asyncio.wait_for(store.start_job(job.id), 10) == "started"
        delivery, message = await delivered_to("research")
        research = store.take_opened(delivery.message_id, message)
        again = await asyncio.wait_for(store.claim(message), 10)
        async with engine.connect() as conn:
            job_row = (
                await conn.execute(
                    text(
                        "SELECT request, started_at, progress_percentage, current_stage"
                        " FROM jobs WHERE id = :id"
                    ),
                    {"id": job.id},
                )
            ).one()
            run = (
                await conn.execute(
                    text("SELECT id, stage, attempt, status FROM stage_runs WHERE job_id = :id"),
                    {"id": job.id},
                )
            ).one()
            events = (
                await conn.execute(
                    text("SELECT stage, status, details FROM job_events WHERE job_id = :id"),
                    {"id": job.id},
                )
            ).all()
    assert isinstance(again, Skip) and again.reason == "leased"
    assert research == Claim(
        job_id=job.id,
        stage="research",
        generation=job.generation,
        run_id=run.id,
        attempt=1,
        request=job_row.request,
        started_at=job_row.started_at,
    )
    assert (run.stage, run.attempt, run.status) == ("research", 1, "running")
    assert (job_row.progress_percentage, job_row.current_stage) == (5.0, "research")
    assert [tuple(e) for e in events][-1] == (
        "research",
        "started",
        "Stage research started (attempt 1)",
    )


async def test_a_stage_output_is_stored_as_the_json_text_it_was_sent_as(
    engine: AsyncEngine,
) -> None:
    # Stored as json, not jsonb (0009): PostgreSQL checks the text and keeps it, so the
    # keys stay in the order the stage wrote them (jsonb would sort them by length) and
    # the next claim reads the same text back.
    store = PipelineStore(engine, Dispatcher(engine, PostgresBroker(engine)))
    job = await JobRepository(engine).create(BlogRequest(topic="A topic", keywords=["k"]))
    assert await store.start_job(job.id) == "started"
    claim = await store.claim(StageMessage(job.id, "research", job.generation))
    assert isinstance(claim, Claim)
    output = {"summary": "Gifts \u2014 for teens", "angle": "x", "key_points": ["a", "b"]}
    outcome = StageOutcome(output, "offline", "offline", 10, 20, 0.0)
    assert await asyncio.wait_for(store.complete(claim, outcome), 10) == "committed"
    async with engine.connect() as conn:
        stored = (
            await conn.execute(
                text(
                    "SELECT output::text AS text, pg_typeof(output)::text AS type"
                    " FROM stage_runs WHERE stage = 'research'"
                )
            )
        ).one()
    assert stored.type == "json"
    assert stored.text == '{"summary":"Gifts \u2014 for teens","angle":"x","key_points":["a","b"]}'
    following = await store.claim(StageMessage(job.id, "outline", job.generation))
    assert isinstance(following, Claim)
    assert list(following.outputs["research"]) == ["summary", "angle", "key_points"]
