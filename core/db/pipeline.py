"""Job state transitions: start, claim a stage, record progress, commit, fail.

Each transition locks the job row (or updates it under a condition on its generation
and status, which locks it just the same), so a replay or a cancel — which bumps the
generation — makes older messages stale. It writes the state change with a progress
event and stages the next message through the ``Dispatcher``, in one transaction. No
transaction is held while a stage runs.

These are the pipeline's hot path: they run on asyncpg connections from the hot pool
(``core.db.raw``) with statements prepared once per connection (``pipeline_sql``), and
a stage's hand-off is one statement, sent together with other jobs' concurrent hand-offs
(``Statement.fetchrow_batched``): under load, one round trip and one commit for many.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import orjson
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

from core import jsonbytes
from core.broker import Delivery, Message
from core.constants import (
    EVENTS_TOPIC,
    STAGE_PROGRESS,
    STAGES,
    TOTAL_STAGES,
    next_stage,
    stage_number,
    stage_topic,
)
from core.db import pipeline_sql as sql
from core.db.raw import EncodedJson, read_on_live_connection
from core.db.statements import Statement
from core.dispatch import Dispatcher
from core.events import JobEvent, StageMessage
from core.llm import Usage
from core.requests import BlogRequest

logger = logging.getLogger("blogpipe.pipeline")

Opening = tuple[Statement, dict[str, Any], Callable[[Any, Mapping[str, Any]], "Claim"]]
"""A statement that also opens the next run, its extra values, and how to build its claim
from the statement's row and values."""

Finalizer = Callable[[Mapping[str, Mapping[str, Any]], list[dict[str, Any]], float], dict[str, Any]]
"""Builds the final result from stage outputs, per-stage usage, and generation time."""


class StoredOutputs(Mapping[str, dict[str, Any]]):
    """Earlier stages' outputs as the JSON they were stored as, each parsed (afresh) when
    a stage reads it.

    A claim is held for as long as its stage runs, LLM calls included, and thousands may
    be running at once: the JSON is about 13 KB a job by the SEO stage, the same outputs
    parsed about 23 KB."""

    __slots__ = ("_raw",)

    def __init__(self, raw: Mapping[str, bytes] | None = None) -> None:
        self._raw: dict[str, bytes] = dict(raw or {})

    @classmethod
    def parsed(cls, outputs: Mapping[str, Any]) -> StoredOutputs:
        """From outputs already parsed (a claim read from the database)."""
        return cls({stage: _json_bytes(output) for stage, output in outputs.items()})

    def with_output(self, stage: str, raw: bytes) -> StoredOutputs:
        """These outputs and ``stage``'s."""
        return StoredOutputs({**self._raw, stage: raw})

    def __getitem__(self, stage: str) -> dict[str, Any]:
        output: dict[str, Any] = orjson.loads(self._raw[stage])
        return output

    def __iter__(self) -> Iterator[str]:
        return iter(self._raw)

    def __len__(self) -> int:
        return len(self._raw)

    def __repr__(self) -> str:
        return f"StoredOutputs({sorted(self._raw)})"


def _json_bytes(value: Any) -> bytes:
    """``value`` as JSON, encoded as the database's codec encodes it, right-sized: a
    claim keeps it for as long as the stage runs."""
    return jsonbytes.dumps(value, option=orjson.OPT_NON_STR_KEYS)


@dataclass(frozen=True)
class Claim:
    """A stage run this worker now owns (until its lease expires).

    ``request`` is the job's request as stored, or validated (``BlogRequest``) once a
    stage in this process has run with it. ``outputs`` holds the latest output of each
    earlier stage; for the last stage, ``usage`` holds each earlier stage's provider,
    tokens and cost, for the result.
    """

    job_id: UUID
    stage: str
    generation: int
    run_id: int
    attempt: int
    request: dict[str, Any] | BlogRequest
    outputs: StoredOutputs = field(default_factory=StoredOutputs)
    started_at: datetime | None = None
    usage: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass(frozen=True)
class Skip:
    """Why a stage message was not claimed: missing, stale, duplicate, leased, not_processing."""

    reason: str
    retry_after: float | None = None


@dataclass(frozen=True)
class StageOutcome:
    """What a stage produced, as stored on its run."""

    output: dict[str, Any]
    provider: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: float


class PipelineStore:
    """The transactions the API worker endpoint and the stage runners perform."""

    def __init__(
        self,
        engine: AsyncEngine,
        dispatcher: Dispatcher,
        *,
        lease_seconds: float = 120.0,
        asynchronous_commit: bool | None = None,
    ):
        self.engine = engine
        self.dispatcher = dispatcher
        self.lease_seconds = lease_seconds
        # With the postgres broker every hand-off lives in the same WAL as the state it
        # follows, so a commit need not wait for the disk: a database crash can only lose
        # the newest transitions *together with* the queue rows they wrote, and the older
        # message is redelivered and the stage redone. With Pub/Sub a message may already
        # have left when the commit is lost, so commits stay synchronous there.
        self.asynchronous_commit = (
            dispatcher.transactional if asynchronous_commit is None else asynchronous_commit
        )
        self._sql = sql.Transitions(dispatcher, asynchronous_commit=self.asynchronous_commit)
        # Claims made by hand-offs (``start_claim``, ``complete_claim``), by the id of the
        # delivery that brings each to its stage in this process; taken by ``take_opened``.
        # One whose delivery never reaches its handler here (the consumer stopped first)
        # stays until the process ends; its run is taken over once its lease expires.
        self._opened: dict[str, Claim] = {}

    async def start_job(self, job_id: UUID) -> str:
        """Move a queued job to processing and hand it to the first stage.

        Returns ``started``, ``already_started`` (a duplicate Cloud Tasks delivery),
        ``finished`` or ``missing``; only ``started`` publishes anything.
        """
        # A new job is queued at generation 1: start it in one statement. Anything else
        # (a duplicate delivery, a job already finished or gone) reads the job to say why.
        if not await self._start(job_id, 1):

            async def fetch(conn: asyncpg.Connection) -> asyncpg.Record | None:
                return await conn.fetchrow(sql.JOB_STATE, job_id)

            row = await read_on_live_connection(self.engine, fetch)
            if row is None:
                return "missing"
            if row["status"] not in ("queued", "pending"):
                finished = row["status"] in ("completed", "failed", "cancelled")
                return "finished" if finished else "already_started"
            if not await self._start(job_id, row["generation"]):
                return "already_started"  # it moved on between the two statements
        logger.info(
            "Job %s started", job_id, extra={"action": "job_started", "job_id": str(job_id)}
        )
        return "started"

    async def _start(self, job_id: UUID, generation: int) -> bool:
        first = StageMessage(job_id, STAGES[0], generation).to_message()
        values = {"job": job_id, "generation": generation, "stage": STAGES[0]}
        topic = stage_topic(STAGES[0])
        row = await self._hand_off(self._sql.start, values, topic, first, self._open_first)
        return bool(row["started"])

    def _open_first(self, values: dict[str, Any]) -> Opening:
        """``start_claim``: the start also opens the first stage's run."""
        stage = str(values["stage"])
        extra = {
            "next_pct": STAGE_PROGRESS[stage][0],
            "next_number": stage_number(stage),
            "total": TOTAL_STAGES,
            "lease": self.lease_seconds,
        }

        def build(row: Any, values: Mapping[str, Any]) -> Claim:
            return Claim(
                job_id=values["job"],
                stage=stage,
                generation=int(values["generation"]),
                run_id=int(row["next_run_id"]),
                attempt=1,
                request=dict(row["request"]),
                started_at=row["started_at"],
            )

        return self._sql.start_claim, extra, build

    def _open_after(self, finished: Claim, output: bytes) -> Opening | None:
        """``complete_claim``: the hand-off also opens the next stage's run, whose claim is
        built from ``finished``'s and its ``output`` as sent (see ``_can_open_next``)."""
        if not _can_open_next(finished):
            return None
        following = str(next_stage(finished.stage))
        extra = {
            "next_stage": following,
            "next_pct": STAGE_PROGRESS[following][0],
            "next_number": stage_number(following),
            "lease": self.lease_seconds,
        }

        def build(row: Any, values: Mapping[str, Any]) -> Claim:
            return _next_claim(finished, output, values, int(row["next_run_id"]))

        return self._sql.complete_claim, extra, build

    async def _hand_off(
        self,
        statement: Statement,
        values: dict[str, Any],
        topic: str,
        message: Message,
        opener: Callable[[dict[str, Any]], Opening | None] | None = None,
        ack: Delivery | None = None,
    ) -> Any:
        """Run a transition that stages ``message`` on ``topic``, then send it on: a copy
        leased to a consumer in this process is handed to it, an outbox row is published.

        When a consumer here takes it, ``opener`` may swap in a statement that also opens
        the run of the stage the message is for (``start_claim``, ``complete_claim``); the
        claim that makes travels with the hand-over (``take_opened``), and the stage starts
        without a claim statement. With the ``postgres`` broker, ``ack`` (the delivery
        being finished) is acked by the same statement.
        """
        hold_args, hold = self.dispatcher.hold("next", topic, ack)
        opening = opener(values) if hold is not None and opener is not None else None
        if opening is not None:
            statement, extra, _ = opening
            values = {**values, **extra}
        try:
            row = await statement.fetchrow_batched(
                self.engine,
                **values,
                **Dispatcher.staging_args("next", topic, message),
                **hold_args,
            )
        except BaseException:
            if hold is not None:
                hold.release()
            raise
        if ack is not None:
            self.dispatcher.acked(ack)
        if hold is not None:
            if opening is not None and row["next_run_id"] is not None:
                self._opened[str(row["held_id"])] = opening[2](row, values)
            hold.deliver(row["held_id"], message)
        await self.dispatcher.flush([row["outbox_id"]])
        return row

    def take_opened(self, message_id: str, message: StageMessage) -> Claim | None:
        """The claim a hand-over brought for delivery ``message_id``, if it brought one."""
        claim = self._opened.pop(message_id, None)
        if claim is None:
            return None
        if (claim.job_id, claim.stage, claim.generation) != (
            message.job_id,
            message.stage,
            message.generation,
        ):
            return None
        return claim

    async def claim(self, message: StageMessage) -> Claim | Skip:
        """Take ownership of a stage run, or say why not (ack or retry later)."""
        statement = self._sql.claim
        row = await statement.fetchrow(
            self.engine,
            job=message.job_id,
            stage=message.stage,
            generation=message.generation,
            lease=self.lease_seconds,
            pct=STAGE_PROGRESS[message.stage][0],
            number=stage_number(message.stage),
            total=TOTAL_STAGES,
            earlier=list(STAGES[: STAGES.index(message.stage)]),
            final=next_stage(message.stage) is None,
        )
        verdict = row["verdict"]
        if verdict == "leased":
            return Skip("leased", retry_after=max(1.0, float(row["remaining"] or 1.0)))
        if verdict != "claim":
            return Skip(verdict)
        if row["run_id"] is None:
            # A claim racing ours for the same stage won: it runs now, for a whole lease.
            return Skip("leased", retry_after=self.lease_seconds)
        return Claim(
            job_id=message.job_id,
            stage=message.stage,
            generation=message.generation,
            run_id=int(row["run_id"]),
            attempt=int(row["attempt"]),
            request=dict(row["request"]),
            outputs=StoredOutputs.parsed(row["outputs"] or {}),
            started_at=row["started_at"],
            usage=row["usage"] or {},
        )

    async def report_progress(self, claim: Claim, percentage: float, details: str) -> None:
        """Move progress within a stage and extend the run's lease."""
        # Sent together with concurrent reports: slow LLM calls end in waves.
        await sql.PROGRESS.execute_batched(
            self.engine,
            job=claim.job_id,
            generation=claim.generation,
            run=claim.run_id,
            lease=self.lease_seconds,
            stage=claim.stage,
            number=stage_number(claim.stage),
            total=TOTAL_STAGES,
            pct=percentage,
            details=details,
        )

    async def heartbeat(self, claim: Claim) -> None:
        """Extend the run's lease while the stage is still working."""
        await sql.HEARTBEAT.execute(self.engine, run=claim.run_id, lease=self.lease_seconds)

    async def complete(
        self,
        claim: Claim,
        outcome: StageOutcome,
        finalize: Finalizer | None = None,
        delivery: Delivery | None = None,
    ) -> str:
        """Commit a stage's output and hand off; ``committed`` or ``discarded`` (stale).

        One statement: the job update's condition on generation and status is the check
        (it waits for a concurrent replay or cancel and sees its result), the run, the
        progress event and the next message follow from it.
        """
        # Encoded once: for the database and, as the next stage's input, for its claim.
        output = _json_bytes(outcome.output)
        values: dict[str, Any] = {
            "job": claim.job_id,
            "generation": claim.generation,
            "run": claim.run_id,
            "output": EncodedJson(output),
            "provider": outcome.provider,
            "model": outcome.model,
            "pt": outcome.prompt_tokens,
            "ct": outcome.completion_tokens,
            "cost": outcome.cost,
            "stage": claim.stage,
            "number": stage_number(claim.stage),
            "total": TOTAL_STAGES,
        }
        following = next_stage(claim.stage)
        if following is not None:
            values["pct"] = STAGE_PROGRESS[claim.stage][1]
            topic = stage_topic(following)
            message = StageMessage(claim.job_id, following, claim.generation).to_message()
            row = await self._hand_off(
                self._sql.complete,
                values,
                topic,
                message,
                lambda _: self._open_after(claim, output),
                ack=delivery,
            )
        else:
            values["result"] = self._result(claim, outcome, finalize)
            topic = EVENTS_TOPIC
            message = JobEvent(
                str(uuid.uuid4()), "job.completed", claim.job_id, claim.generation, _now()
            ).to_message()
            row = await self._hand_off(self._sql.finish, values, topic, message, ack=delivery)
        if not row["committed"]:
            return "discarded"
        if following is None:
            logger.info(
                "Job %s completed",
                claim.job_id,
                extra={"action": "job_completed", "job_id": str(claim.job_id)},
            )
        return "committed"

    async def record_failure(
        self, claim: Claim, error: BaseException, *, retryable: bool, usage: Usage | None = None
    ) -> None:
        """Record a failed attempt on its stage run, with the tokens it spent if known."""
        usage = usage or Usage()
        statement = sql.RECORD_FAILURE
        await statement.execute(
            self.engine,
            run=claim.run_id,
            error=str(error)[:2000] or type(error).__name__,
            type=("retryable:" if retryable else "permanent:") + type(error).__name__,
            pt=usage.prompt_tokens,
            ct=usage.completion_tokens,
            cost=usage.cost,
        )

    async def fail_job_unstarted(self, job_id: UUID, message: str) -> None:
        """A queued job whose hand-off to the task queue failed: mark it failed, clearly."""
        async with self.engine.begin() as conn:
            await conn.execute(
                text(
                    "UPDATE jobs SET status = 'failed', error_message = :message, completed_at ="
                    " now(), updated_at = now() WHERE id = :id AND status IN ('queued', 'pending')"
                ),
                {"id": job_id, "message": message},
            )

    async def last_failure(self, message: StageMessage) -> dict[str, Any]:
        """The latest failed attempt of a stage run and how many attempts were made."""
        async with self.engine.connect() as conn:
            row = (
                await conn.execute(
                    text(
                        "SELECT error, error_type, count(*) OVER () AS attempts FROM stage_runs"
                        " WHERE job_id = :id AND stage = :stage AND generation = :generation"
                        " ORDER BY attempt DESC LIMIT 1"
                    ),
                    {
                        "id": message.job_id,
                        "stage": message.stage,
                        "generation": message.generation,
                    },
                )
            ).first()
        return dict(row._mapping) if row else {}

    async def fail_job(
        self, job_id: UUID, generation: int, stage: str, message: str, details: dict[str, Any]
    ) -> bool:
        """Mark the job failed at ``stage`` and emit ``job.failed``; False if stale or finished."""
        event = JobEvent(str(uuid.uuid4()), "job.failed", job_id, generation, _now())
        values = {
            "job": job_id,
            "generation": generation,
            "stage": stage,
            "message": message,
            "details": details,
            "number": stage_number(stage) if stage in STAGES else TOTAL_STAGES,
            "total": TOTAL_STAGES,
        }
        row = await self._hand_off(self._sql.fail, values, EVENTS_TOPIC, event.to_message())
        if not row["committed"]:
            return False
        logger.warning(
            "Job %s failed at %s: %s",
            job_id,
            stage,
            message,
            extra={"action": "job_failed", "job_id": str(job_id), "stage": stage},
        )
        return True

    @staticmethod
    def _result(claim: Claim, outcome: StageOutcome, finalize: Finalizer | None) -> Any:
        """The job's result: the last stage's output, or what ``finalize`` builds from every
        stage's latest output and usage (the earlier stages' were read at claim time; a
        replay that changed them would have made this run stale)."""
        if finalize is None:
            return outcome.output
        outputs = {**claim.outputs, claim.stage: outcome.output}
        usage = {
            **claim.usage,
            claim.stage: {
                "provider": outcome.provider,
                "tokens": outcome.prompt_tokens + outcome.completion_tokens,
                "cost": outcome.cost,
            },
        }
        stage_results = [{"stage": s, **usage[s]} for s in STAGES if s in usage]
        elapsed = (_now() - claim.started_at).total_seconds() if claim.started_at else 0.0
        return finalize(outputs, stage_results, elapsed)


def _can_open_next(finished: Claim) -> bool:
    """Whether the next stage's claim can be built from ``finished``'s: the last stage also
    needs every earlier stage's usage, which only the first stage's claim (there is none
    to read) and claims built this way carry."""
    following = next_stage(finished.stage)
    if following is None:
        return False
    if next_stage(following) is not None:
        return True
    return set(finished.usage) == set(STAGES[: STAGES.index(finished.stage)])


def _next_claim(finished: Claim, output: bytes, values: Mapping[str, Any], run_id: int) -> Claim:
    """The claim of the run ``complete_claim`` opened after ``finished``: what a claim
    would have read. The finished stage's ``output`` is kept as the JSON sent to the
    database, so the next stage sees the same shapes a claim from the database gives."""
    usage = {
        "provider": values["provider"],
        "tokens": values["pt"] + values["ct"],
        "cost": float(values["cost"]),
    }
    return Claim(
        job_id=finished.job_id,
        stage=str(values["next_stage"]),
        generation=finished.generation,
        run_id=run_id,
        attempt=1,
        request=finished.request,
        outputs=finished.outputs.with_output(finished.stage, output),
        started_at=finished.started_at,
        usage={**finished.usage, finished.stage: usage},
    )


def _now() -> datetime:
    return datetime.now(UTC)
